"""Native .keras round trips and SavedModel export."""

import subprocess
import sys

import keras
import numpy as np
import pytest

import gloro
from gloro import layers


@pytest.fixture(scope="module")
def trained_cnn():
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = keras.Input((8, 8, 1))
    z = layers.Conv2D(6, 3, strides=2, padding="same")(x)
    z = layers.MinMax()(z)
    z = keras.layers.MaxPooling2D(2, strides=1)(z)
    z = layers.Conv2D(4, 2, padding="valid", activation="relu")(z)
    z = layers.Flatten()(z)
    z = layers.Scaling(0.5)(z)
    z = layers.Dense(8)(z)
    z = layers.ReLU()(z)
    y = layers.Dense(4)(z)
    g = gloro.GloroNet(x, y, epsilon=0.05, power_iterations=2)
    g.compile(optimizer="adam", loss="trades_ce.0.5", metrics=["clean_acc", "vra", "rejection_rate"])
    data = rng.normal(size=(256, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 4, size=256)
    g.fit(data, labels, epochs=2, batch_size=64, verbose=0)
    return g, data, labels


def test_keras_round_trip_is_exact(trained_cnn, tmp_path):
    g, data, labels = trained_cnn
    path = tmp_path / "m.keras"
    g.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, gloro.GloroNet)
    assert loaded.epsilon == g.epsilon
    assert loaded.power_iterations == 2
    # Loaded constants are claims: recomputed (to the same values) before
    # the first certificate.
    assert not loaded.lipschitz_frozen
    np.testing.assert_array_equal(loaded.predict(data, verbose=0), g.predict(data, verbose=0))
    np.testing.assert_array_equal(loaded.lipschitz_constant(), g.lipschitz_constant())
    # The weights of the function; the power-iteration caches are derived
    # state, which recomputing the constants converges further.
    for a, b in zip(g._certified_for, loaded._certified_for):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert loaded.evaluate(data, labels, verbose=0) == g.evaluate(data, labels, verbose=0)
    assert isinstance(loaded.loss, gloro.losses.Trades)


@pytest.mark.slow
def test_loaded_model_keeps_training(trained_cnn, tmp_path):
    g, data, labels = trained_cnn
    g.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    loaded.fit(data, labels, epochs=1, batch_size=64, verbose=0)
    assert loaded.lipschitz_frozen


def test_save_freezes_first(tmp_path, rng):
    x = keras.Input((3,))
    g = gloro.GloroNet(x, layers.Dense(2)(layers.Dense(4)(x)), epsilon=0.1)
    g(rng.normal(size=(2, 3)).astype("float32"), training=True)
    assert not g.lipschitz_frozen
    g.save(tmp_path / "m.keras")
    assert g.lipschitz_frozen
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.lipschitz_constant(), g.lipschitz_constant())


@pytest.mark.tensorflow
@pytest.mark.parametrize("weights", ["frozen", pytest.param("changed after freezing", marks=pytest.mark.slow)])
def test_export_serves_without_gloro(trained_cnn, tmp_path, weights):
    g, data, _ = trained_cnn
    if weights != "frozen":
        kernel = g.f.layers[1].kernel
        kernel.assign(keras.ops.convert_to_numpy(kernel) * 1.5)
        assert not g.lipschitz_frozen
    g.export(tmp_path / "served", verbose=False)
    assert g.lipschitz_frozen
    np.save(tmp_path / "x.npy", data)
    np.save(tmp_path / "expected.npy", g.predict(data, verbose=0))
    script = f"""
import sys
import numpy as np
import tensorflow as tf
served = tf.saved_model.load({str(tmp_path / 'served')!r})
out = served.serve(tf.constant(np.load({str(tmp_path / 'x.npy')!r}))).numpy()
assert "gloro" not in sys.modules, "gloro was imported"
np.testing.assert_allclose(out, np.load({str(tmp_path / 'expected.npy')!r}), rtol=1e-5, atol=1e-6)
assert (out.argmax(1) == np.load({str(tmp_path / 'expected.npy')!r}).argmax(1)).all()
print("OK", out.shape)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK (256, 5)" in result.stdout
