"""Training under tf.distribute keeps the spectral-norm caches in sync."""

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.tensorflow
def test_mirrored_strategy_keeps_caches_identical_across_replicas(tmp_path):
    # Logical devices must be configured before TensorFlow starts: run in a
    # fresh interpreter.
    script = textwrap.dedent("""
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        import gloro
        from gloro import layers

        keras.utils.set_random_seed(0)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        rng = np.random.default_rng(0)
        x = rng.normal(size=(256, 8, 8, 1)).astype("float32")
        y = rng.integers(0, 3, 256)
        with strategy.scope():
            inputs = keras.Input((8, 8, 1))
            z = layers.Conv2D(8, 3, strides=2, padding="same")(inputs)
            z = layers.MinMax()(z)
            z = layers.Flatten()(z)
            g = gloro.GloroNet(inputs, layers.Dense(3)(z), epsilon=0.1)
            g.compile(optimizer="adam", loss="crossentropy", metrics=["vra"])
        g.fit(x, y, epochs=2, batch_size=32, verbose=0, validation_data=(x[:64], y[:64]))
        for layer in g.f.layers:
            if isinstance(layer, gloro.layers.SpectralNormCache):
                for variable in (layer.power_vector, layer.lipschitz_estimate, layer.lipschitz_bound):
                    copies = [c.numpy() for c in variable.value.values]
                    assert len(copies) == 2, copies
                    np.testing.assert_array_equal(copies[0], copies[1])
        copies = [c.numpy() for c in g._margin_lipschitz.value.values]
        np.testing.assert_array_equal(copies[0], copies[1])
        assert g.lipschitz_frozen
        print("OK", g.evaluate(x, y, verbose=0, return_dict=True)["vra"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
