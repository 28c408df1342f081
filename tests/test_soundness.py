"""Attempts to break certificates: attacks, hostile inputs, broken files."""

import functools
import os
import zipfile

import keras
import numpy as np
import pytest

import gloro
from gloro import attacks, layers


def conv_net(strides, padding, pooling):
    x = keras.Input((10, 10, 1))
    z = layers.Conv2D(8, 3, strides=strides, padding=padding)(x)
    z = layers.MinMax()(z)
    if pooling == "max":
        z = layers.MaxPooling2D(2, strides=1)(z)
    elif pooling == "average":
        z = layers.AveragePooling2D(2)(z)
    z = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(z)
    z = layers.Flatten()(z)
    z = layers.Dense(16)(z)
    z = layers.MinMax()(z)
    return x, layers.Dense(3)(z)


def dense_net():
    x = keras.Input((10, 10, 1))
    z = layers.Flatten()(x)
    z = layers.Dense(32)(z)
    z = layers.MinMax()(z)
    z = layers.Dense(32, activation="relu")(z)
    return x, layers.Dense(3)(z)


def stripes(rng, n):
    """Three classes: horizontal, vertical or no stripe, with noise."""
    labels = rng.integers(0, 3, n)
    x = rng.normal(scale=0.3, size=(n, 10, 10, 1)).astype("float32")
    rows = rng.integers(2, 8, n)
    for i in range(n):
        if labels[i] == 0:
            x[i, rows[i], :, 0] += 1.0
        elif labels[i] == 1:
            x[i, :, rows[i], 0] += 1.0
    return x, labels


def train(build, epsilon=0.3, epochs=6, seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = stripes(rng, 768)
    g = gloro.GloroNet(*build(), epsilon=epsilon)
    g.compile(optimizer=keras.optimizers.Adam(3e-3), loss="crossentropy", metrics=["vra"])
    g.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return g, x, y


NETWORKS = {
    "dense": dense_net,
    "conv-s1-same-maxpool": lambda: conv_net(1, "same", "max"),
    "conv-s2-valid": lambda: conv_net(2, "valid", None),
    "conv-s1-valid-avgpool": lambda: conv_net(1, "valid", "average"),
}

# The bounds are NumPy, the same on every backend; what differs (the forward
# pass and the attack's gradients) is exercised by any network. So the
# default tier audits the overlapping max-pooling network (the loosest
# bound) on TensorFlow and torch (on JAX, whose eager attacks take minutes
# here, in the long tier); the long tier audits every network.
AUDITED = [
    pytest.param("conv-s1-same-maxpool", marks=pytest.mark.slow_on_jax),
    pytest.param("conv-s1-valid-avgpool", marks=[pytest.mark.tensorflow, pytest.mark.slow]),
    pytest.param("conv-s2-valid", marks=[pytest.mark.tensorflow, pytest.mark.slow]),
    pytest.param("dense", marks=[pytest.mark.tensorflow, pytest.mark.slow]),
]


@functools.cache
def trained(name):
    """The network `name` after 6 epochs, shared by the audits."""
    return train(NETWORKS[name])


@pytest.mark.parametrize("name", AUDITED)
def test_no_certified_point_is_broken(name):
    g, x, y = trained(name)
    out = g.predict(x, verbose=0)
    certified = np.where(np.argmax(out, axis=1) < 3)[0][:150]
    assert len(certified) >= 20, "too few certified points for a meaningful audit"
    result = attacks.pgd_l2(g.f, x[certified], g.epsilon, steps=60, restarts=3)
    assert not result.success.any()
    # The attack is real: it eats into the margins it cannot break ...
    assert np.median(result.relative_reduction()) > 0.05
    # ... and a few times further out it breaks the closest points (the
    # bounds of overlapping max pooling are loose, hence the wide margin).
    radius = g.certified_radius(x[certified])
    closest = certified[np.argsort(radius)[:20]]
    stronger = attacks.pgd_l2(g.f, x[closest], 12 * g.epsilon, steps=60, restarts=3)
    assert stronger.success.any()


@pytest.mark.parametrize("name", AUDITED)
def test_empirical_lipschitz_never_exceeds_certified(name):
    g, x, _ = trained(name)
    empirical = attacks.empirical_margin_lipschitz(g.f, x[:64], steps=30)
    certified = g.lipschitz_constant()
    assert np.all(empirical <= certified * (1 + 1e-6))
    assert empirical.max() > 0.05 * certified.max()


@pytest.mark.parametrize("policy", [
    # tests/test_holes.py certifies from float32 logits under both policies
    # in the default tier; these train under them and attack.
    pytest.param("mixed_float16", marks=pytest.mark.slow),
    pytest.param("mixed_bfloat16", marks=[pytest.mark.tensorflow, pytest.mark.slow]),
])
def test_mixed_precision_bounds_stay_float32_and_sound(policy):
    keras.config.set_dtype_policy(policy)
    g, x, _ = train(lambda: conv_net(2, "same", None), epochs=3)
    assert g.predict(x[:4], verbose=0).dtype == np.float32
    for layer in g.f.layers:
        if isinstance(layer, gloro.layers.SpectralNormCache):
            assert layer.lipschitz_bound.dtype == "float32"
    empirical = attacks.empirical_margin_lipschitz(g.f, x[:64], steps=20)
    assert np.all(empirical <= g.lipschitz_constant() * 1.01)
    out = g.predict(x, verbose=0)
    certified = np.where(np.argmax(out, axis=1) < 3)[0][:100]
    if len(certified):
        # Float16 logits carry rounding noise (about 1e-3 relative): the
        # attack must not break a certificate by more than that.
        result = attacks.pgd_l2(g.f, x[certified], g.epsilon, steps=40, restarts=2)
        logits = g.f.predict(x[certified], verbose=0).astype(np.float64)
        noise = 4e-3 * np.abs(logits).max(axis=1)
        assert np.all(result.margin > -noise)


# The bounds are NumPy, the same on both backends.
@pytest.mark.slow
@pytest.mark.tensorflow
def test_bounds_hold_with_unconverged_power_iteration(rng):
    # One training step moves the weights; the frozen bound is computed from
    # scratch, never from the stale power-iteration vector.
    g, x, y = train(NETWORKS["conv-s2-valid"], epochs=1)
    for layer in g.f.layers:
        if isinstance(layer, gloro.layers.SpectralNormCache):
            layer.power_vector.assign(rng.normal(size=layer.power_vector.shape))
            layer.kernel.assign(keras.ops.convert_to_numpy(layer.kernel) * 3.0)
    assert not g.lipschitz_frozen
    k = g.lipschitz_constant()
    empirical = attacks.empirical_margin_lipschitz(g.f, x[:32], steps=20)
    assert np.all(empirical <= k)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    g, x, _ = train(dense_net, epochs=1)
    path = tmp_path_factory.mktemp("saved") / "m.keras"
    g.save(path)
    return g, x, path


def test_huge_and_zero_epsilon(saved):
    g, x, _ = saved
    try:
        g.epsilon = 1e30
        assert np.all(np.argmax(g.predict(x, verbose=0), axis=1) == 3)
        g.epsilon = 0.0
        out = g.predict(x, verbose=0)
    finally:
        g.epsilon = 0.3
    clean = np.argmax(out[:, :3], axis=1)
    # At radius 0 every untied prediction is certified.
    np.testing.assert_array_equal(np.argmax(out, axis=1), clean)


def test_load_model_round_trip(saved):
    g, x, path = saved
    loaded = gloro.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), g.predict(x, verbose=0))


def test_truncated_file(saved, tmp_path):
    _, _, path = saved
    broken = tmp_path / "broken.keras"
    broken.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(ValueError, match="not a readable .keras"):
        gloro.load_model(broken)


def test_corrupted_weights(saved, tmp_path):
    _, _, path = saved
    broken = tmp_path / "garbled.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".h5"):
                data = data[:100] + bytes(len(data) - 100)
            dst.writestr(item, data)
    with pytest.raises(ValueError, match="Cannot load"):
        gloro.load_model(broken)


def test_tampered_constants_are_refused(saved, tmp_path):
    g, _, path = saved
    loaded = gloro.load_model(path)
    loaded._margin_lipschitz.assign(keras.ops.convert_to_numpy(loaded._margin_lipschitz) * 0.5)
    # The constants are compared with their copy like the weights: lowered
    # in place, they certify nothing.
    assert not loaded.lipschitz_frozen
    keras.Model.save(loaded, tmp_path / "tampered.keras")
    with pytest.raises(ValueError, match="below what its weights"):
        gloro.load_model(tmp_path / "tampered.keras")


def test_unrelated_model_file(tmp_path):
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(ValueError, match="not a GloroNet"):
        gloro.load_model(tmp_path / "plain.keras")
    with pytest.raises(FileNotFoundError):
        gloro.load_model(tmp_path / "missing.keras")


@pytest.mark.tensorflow
def test_broken_saved_model(saved, tmp_path):
    g, _, _ = saved
    g.export(tmp_path / "served", verbose=False)
    assert gloro.load_saved_model(tmp_path / "served").serve is not None
    (tmp_path / "served" / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="Cannot load the SavedModel"):
        gloro.load_saved_model(tmp_path / "served")
    with pytest.raises(FileNotFoundError):
        gloro.load_saved_model(tmp_path / "nowhere")


def test_loading_never_runs_code(tmp_path):
    x = keras.Input((3,))
    y = keras.layers.Lambda(lambda t: t * 2)(x)
    model = keras.Model(x, keras.layers.Dense(2)(y))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="(?i)lambda|unsafe|safe_mode"):
        gloro.load_model(tmp_path / "lambda.keras")


FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


# On TensorFlow only, like the other heavy audits (see AUDITED); EMMA's JAX
# path is tested in tests/test_losses.py.
@pytest.mark.slow
@pytest.mark.tensorflow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="Debian package dataset-fashion-mnist is not installed")
def test_liresnet_trained_with_emma_on_fashion_mnist_keeps_every_certificate():
    from pathlib import Path

    from gloro.data import _read_idx_pair

    folder = Path(FASHION_MNIST)
    images, labels = _read_idx_pair(folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz")
    x, y = images[:3000].astype("float32") / 255.0, labels[:3000]
    inputs = keras.Input((28, 28, 1))
    z = layers.MinMax()(layers.Conv2D(16, 3, strides=2, padding="same")(inputs))
    for _ in range(2):
        z = layers.MinMax()(layers.LiResNetBlock(3)(z))
    z = layers.MinMax()(layers.Conv2D(32, 4, strides=2, padding="same")(z))
    g = gloro.GloroNet(inputs, layers.Dense(10)(layers.Flatten()(z)), epsilon=0.3)
    g.compile(optimizer=keras.optimizers.Adam(2e-3), loss="emma", metrics=["vra"])
    g.fit(x[:2500], y[:2500], epochs=3, batch_size=125, verbose=0)
    held_out = x[2500:]
    out = g.predict(held_out, verbose=0)
    certified = np.where(np.argmax(out, axis=1) < 10)[0][:120]
    assert len(certified) >= 40, "too few certified points for a meaningful audit"
    result = attacks.pgd_l2(g.f, held_out[certified], g.epsilon, steps=40, restarts=3)
    assert not result.success.any()
    assert np.median(result.relative_reduction()) > 0.05
