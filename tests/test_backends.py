"""The core on each Keras backend: no TensorFlow needed on JAX and torch, and
`.keras` files that move between any two backends with the same outputs and
constants."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import gloro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite runs once per backend, in this order; each pair of backends is
# tested, both ways, in the pass of the one that comes first.
BACKENDS = ("tensorflow", "jax", "torch")


def run_python(script, backend, cwd, env=None):
    environment = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT, **(env or {})}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def train_and_save(folder):
    """Trains a small GloroNet on this process's backend and saves it into
    `folder` with its inputs, outputs, constants and backend."""
    from gloro import layers

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = keras.Input((8, 8, 1))
    z = layers.Conv2D(4, 3, strides=2, padding="same")(x)
    z = layers.MinMax()(z)
    z = layers.AveragePooling2D(2)(z)
    z = layers.Flatten()(z)
    z = layers.Dense(8, activation="relu")(z)
    g = gloro.GloroNet(x, layers.Dense(3)(z), epsilon=0.05)
    g.compile(optimizer="adam", loss="crossentropy", metrics=["vra"])
    data = rng.normal(size=(128, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 3, 128)
    g.fit(data, labels, epochs=2, batch_size=32, verbose=0,
          callbacks=[gloro.callbacks.EpsilonScheduler("[0.5]-lin-[1.]")])
    assert g.lipschitz_frozen
    g.save(os.path.join(folder, "model.keras"))
    np.save(os.path.join(folder, "data.npy"), data)
    np.save(os.path.join(folder, "outputs.npy"), g.predict(data, verbose=0))
    np.save(os.path.join(folder, "constants.npy"), g.lipschitz_constant())
    with open(os.path.join(folder, "backend.json"), "w") as file:
        json.dump({"backend": keras.backend.backend(), "epsilon": g.epsilon}, file)


def load_and_check(folder):
    """Loads the model of `train_and_save(folder)` on this process's backend
    and checks it against what was saved there."""
    with open(os.path.join(folder, "backend.json")) as file:
        saved = json.load(file)
    assert saved["backend"] != keras.backend.backend()
    loaded = gloro.load_model(os.path.join(folder, "model.keras"))
    assert loaded.epsilon == saved["epsilon"] == pytest.approx(0.05)
    # The constants are NumPy float64 math on the same weights: identical.
    np.testing.assert_array_equal(loaded.lipschitz_constant(), np.load(os.path.join(folder, "constants.npy")))
    outputs = loaded.predict(np.load(os.path.join(folder, "data.npy")), verbose=0)
    expected = np.load(os.path.join(folder, "outputs.npy"))
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    clear = np.abs(expected[:, :3].max(axis=1) - expected[:, 3]) > 1e-3
    np.testing.assert_array_equal(outputs[clear].argmax(1), expected[clear].argmax(1))


# Each pass tests the directions to and from the backends after it: all six
# in the long tier (each direction starts another backend's process and
# trains there: 25 s to minutes on two cores). The default tier checks the
# format on every backend through tests/test_saving.py.
@pytest.mark.slow
@pytest.mark.parametrize("other", BACKENDS)
def test_a_model_saved_on_one_backend_loads_on_another_with_the_same_outputs(other, tmp_path):
    here = keras.backend.backend()
    if other == here:
        pytest.skip("a file saved and loaded on one backend: tests/test_saving.py")
    if BACKENDS.index(other) < BACKENDS.index(here):
        pytest.skip(f"{other} <-> {here} runs in the {other} test pass")
    (tmp_path / here).mkdir()
    (tmp_path / other).mkdir()
    train_and_save(str(tmp_path / here))
    # The other backend loads this one's file, then saves its own.
    run_python(
        f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from test_backends import load_and_check, train_and_save
        load_and_check({str(tmp_path / here)!r})
        train_and_save({str(tmp_path / other)!r})
        """,
        other, tmp_path,
    )
    load_and_check(str(tmp_path / other))


WITHOUT_TENSORFLOW = """
    import importlib.util
    import sys

    # As if TensorFlow were not installed: importing it raises
    # ModuleNotFoundError and find_spec (which torch asks) finds nothing.
    sys.modules["tensorflow"] = None
    assert importlib.util.find_spec("tensorflow") is None

    import numpy as np
    import keras
    import gloro
    from gloro import layers

    rng = np.random.default_rng(0)
    x = keras.Input((6, 6, 1))
    z = layers.Conv2D(4, 3, dilation_rate=2, padding="same")(x)
    z = layers.MinMax()(z)
    z = layers.Flatten()(z)
    g = gloro.GloroNet(x, layers.Dense(3)(z), epsilon=0.1)
    g.compile(optimizer="adam", loss="crossentropy",
              metrics=["clean_acc", "vra", "rejection_rate"])
    data = rng.normal(size=(64, 6, 6, 1)).astype("float32")
    labels = rng.integers(0, 3, 64)
    g.fit(data, labels, epochs=1, batch_size=16, verbose=0,
          callbacks=[gloro.callbacks.EpsilonScheduler("linear", 0.1)])
    g.evaluate(data, labels, verbose=0)
    g.certified_radius(data)
    import gloro.attacks
    attack = gloro.attacks.pgd_l2(g.f, data[:8], 0.1, steps=5, restarts=2)
    assert np.all(attack.margin <= attack.clean_margin + 1e-5)
    g.save("m.keras")
    assert gloro.load_model("m.keras").lipschitz_frozen
    try:
        g.export("served")
    except ImportError as error:
        assert "pip install tensorflow" in str(error), error
    else:
        raise AssertionError("export without TensorFlow did not raise")
    assert sys.modules["tensorflow"] is None
    assert not [name for name in sys.modules if name.startswith("tensorflow.")]
    print("OK")
"""


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="runs in the JAX and torch test passes")
def test_the_core_runs_without_tensorflow(tmp_path):
    assert run_python(WITHOUT_TENSORFLOW, keras.backend.backend(), tmp_path).strip().endswith("OK")
