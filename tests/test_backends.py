"""The core on each Keras backend: no TensorFlow needed on JAX, and `.keras`
files that move between backends with the same outputs and constants."""

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
OTHER = {"tensorflow": "jax", "jax": "tensorflow"}


def run_python(script, backend, cwd, env=None):
    environment = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT, **(env or {})}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd,
                            env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


TRAIN_AND_SAVE = """
    import json
    import numpy as np
    import keras
    import gloro
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
    g.save("model.keras")
    np.save("data.npy", data)
    np.save("outputs.npy", g.predict(data, verbose=0))
    np.save("constants.npy", g.lipschitz_constant())
    print(json.dumps({"backend": keras.backend.backend(), "epsilon": g.epsilon}))
"""


def test_a_model_trained_on_the_other_backend_loads_with_the_same_outputs(tmp_path):
    other = OTHER[keras.backend.backend()]
    report = json.loads(run_python(TRAIN_AND_SAVE, other, tmp_path).strip().splitlines()[-1])
    assert report["backend"] == other
    loaded = gloro.load_model(tmp_path / "model.keras")
    assert loaded.epsilon == report["epsilon"] == pytest.approx(0.05)
    # The constants are NumPy float64 math on the same weights: identical.
    np.testing.assert_array_equal(loaded.lipschitz_constant(), np.load(tmp_path / "constants.npy"))
    outputs = loaded.predict(np.load(tmp_path / "data.npy"), verbose=0)
    expected = np.load(tmp_path / "outputs.npy")
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    clear = np.abs(expected[:, :3].max(axis=1) - expected[:, 3]) > 1e-3
    np.testing.assert_array_equal(outputs[clear].argmax(1), expected[clear].argmax(1))


WITHOUT_TENSORFLOW = """
    import importlib.abc
    import sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, NoTensorFlow())

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
    g.save("m.keras")
    assert gloro.load_model("m.keras").lipschitz_frozen
    try:
        g.export("served")
    except ImportError as error:
        assert "pip install tensorflow" in str(error), error
    else:
        raise AssertionError("export without TensorFlow did not raise")
    assert "tensorflow" not in sys.modules
    print("OK")
"""


def test_the_core_runs_on_jax_without_tensorflow(tmp_path):
    assert run_python(WITHOUT_TENSORFLOW, "jax", tmp_path).strip().endswith("OK")
