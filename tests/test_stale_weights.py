"""Certificates never use constants frozen for other weights (issue 8, item 1).

Each test changes the weights of `g.f` by one of the ways Keras offers, then
checks that a direct inference call certifies nothing, and that every public
entry point (`predict`, `evaluate`, `certified_radius`, `lipschitz_constant`,
`save`) refreezes and certifies with the constants of the new weights,
compared with a fresh GloroNet built on the same weights.
"""

import keras
import numpy as np
import pytest

import gloro
from gloro import layers


def blobs(rng, n=300, classes=3, spread=0.15):
    centres = np.array([[np.cos(a), np.sin(a)] for a in 2 * np.pi * np.arange(classes) / classes])
    labels = rng.integers(0, classes, size=n)
    return (centres[labels] + spread * rng.normal(size=(n, 2))).astype("float32"), labels


def make_net(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((2,))
    z = layers.Dense(16)(x)
    z = layers.MinMax()(z)
    z = layers.Dense(16)(z)
    z = layers.MinMax()(z)
    return gloro.GloroNet(x, layers.Dense(3)(z), epsilon=0.2)


@pytest.fixture(scope="module")
def data():
    return blobs(np.random.default_rng(0))


@pytest.fixture(scope="module")
def trained_state(data):
    """The variables of a trained, frozen GloroNet (trained once: each test
    starts from a copy)."""
    x, y = data
    g = make_net()
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="crossentropy", metrics=["vra"])
    g.fit(x, y, epochs=8, batch_size=64, verbose=0)
    assert g.lipschitz_frozen
    # Many points certified: a stale certificate would show.
    assert np.mean(np.argmax(keras.ops.convert_to_numpy(g(x, training=False)), axis=1) < 3) > 0.5
    return g.get_weights()


@pytest.fixture
def trained(trained_state):
    g = make_net()
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="crossentropy", metrics=["vra"])
    g.set_weights(trained_state)
    # Stored constants are claims: set_weights never makes them certify.
    assert not g.lipschitz_frozen
    g.freeze_lipschitz()
    return g


def fresh_constants(g):
    """Constants a new GloroNet computes for the current weights of `g.f`."""
    other = make_net(seed=1)
    other.f.set_weights(g.f.get_weights())
    return other.freeze_lipschitz()


def scale_hidden_kernel(g):
    kernel = g.f.layers[1].kernel
    kernel.assign(np.asarray(kernel) * 10)


def fit_inner_model(g):
    x, y = blobs(np.random.default_rng(5))
    g.f.compile(optimizer=keras.optimizers.Adam(5e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    g.f.fit(x, y, epochs=2, batch_size=64, verbose=0)


def set_inner_weights(g):
    g.f.set_weights(make_net(seed=3).f.get_weights())


def load_inner_weights(g, tmp_path):
    path = str(tmp_path / "other.weights.h5")
    make_net(seed=4).f.save_weights(path)
    g.f.load_weights(path)


def optimizer_loop(g):
    optimizer = keras.optimizers.SGD(1.0)
    rng = np.random.default_rng(6)
    grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in g.f.trainable_variables]
    optimizer.apply(grads, g.f.trainable_variables)


CHANGES = {
    "kernel.assign": scale_hidden_kernel,
    "f.fit": fit_inner_model,
    "f.set_weights": set_inner_weights,
    "f.load_weights": load_inner_weights,
    "optimizer.apply": optimizer_loop,
}


def apply_change(name, g, tmp_path):
    change = CHANGES[name]
    if name == "f.load_weights":
        change(g, tmp_path)
    else:
        change(g)


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_direct_call_certifies_nothing_after_a_weight_change(change, trained, data, tmp_path):
    x, _ = data
    apply_change(change, trained, tmp_path)
    assert not trained.lipschitz_frozen
    out = keras.ops.convert_to_numpy(trained(x, training=False))
    assert np.all(np.argmax(out, axis=1) == 3)
    # The mark that `predict_on_batch` reads to freeze again.
    assert np.all(np.isposinf(out[:, -1]))


def test_stateless_call_certifies_only_for_the_frozen_weights(trained, data):
    # The weights a StatelessScope stands in are the ones compared, not the
    # variables' own values (which still equal the frozen copy).
    x, _ = data
    trainable = [keras.ops.convert_to_numpy(v) for v in trained.trainable_variables]
    non_trainable = [v.value for v in trained.non_trainable_variables]
    same, _ = trained.stateless_call(trainable, non_trainable, x)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(same), keras.ops.convert_to_numpy(trained(x, training=False))
    )
    out, _ = trained.stateless_call([w * 3.0 for w in trainable], non_trainable, x)
    out = keras.ops.convert_to_numpy(out)
    assert np.all(np.argmax(out, axis=1) == 3) and np.all(np.isposinf(out[:, -1]))
    # The variables' own certificates are untouched.
    assert np.any(np.argmax(keras.ops.convert_to_numpy(trained(x, training=False)), axis=1) < 3)


def test_a_change_the_value_marks_miss_still_certifies_nothing(trained, data, monkeypatch):
    # The backend's value marks only spare the check that decides whether
    # `predict` and friends freeze again. With marks that wrongly report
    # every value unchanged (as torch's do for a write through `.data` or a
    # NumPy view), a changed weight still certifies nothing through them,
    # and the paths whose numbers come from the constants alone
    # (`lipschitz_frozen`, `lipschitz_constant`, `certified_radius`) never
    # trust the marks. `predict_on_batch` reads no marks: it freezes again.
    x, _ = data
    trained.predict(x, verbose=0)
    monkeypatch.setattr(gloro.backend, "values_unchanged", lambda variables, marks: True)
    scale_hidden_kernel(trained)
    for out in [trained.predict(x, verbose=0), trained(x, training=False)]:
        assert np.all(np.argmax(keras.ops.convert_to_numpy(out), axis=1) == 3)
    assert not trained.lipschitz_frozen
    expected = fresh_constants(trained)
    np.testing.assert_array_equal(trained.lipschitz_constant(), expected)
    scale_hidden_kernel(trained)
    expected = fresh_constants(trained)
    out = trained.predict_on_batch(x)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(trained._margin_lipschitz), expected)
    np.testing.assert_array_equal(out, keras.ops.convert_to_numpy(trained(x, training=False)))
    assert np.any(np.argmax(out, axis=1) < 3)


def test_predict_on_batch_keeps_frozen_constants_for_non_finite_rows(trained, data, monkeypatch):
    # A NaN row also has a +inf ⊥: the weights are compared, found
    # unchanged, and nothing is frozen again.
    x, _ = data
    trained.predict_on_batch(x)
    x = x.copy()
    x[0] = np.nan
    monkeypatch.setattr(type(trained), "freeze_lipschitz", lambda self: pytest.fail("froze again"))
    out = trained.predict_on_batch(x)
    assert np.isposinf(out[0, -1]) and np.all(np.isneginf(out[0, :-1]))
    np.testing.assert_array_equal(out[1:], keras.ops.convert_to_numpy(trained(x[1:], training=False)))


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_entry_points_refreeze_for_the_new_weights(change, trained, data, tmp_path):
    x, y = data
    apply_change(change, trained, tmp_path)
    expected = fresh_constants(trained)
    np.testing.assert_array_equal(trained.lipschitz_constant(), expected)
    assert trained.lipschitz_frozen


# The model was compiled but never trained, so its saved optimizer has no
# slots yet; Keras warns about that when loading, as it would for any model.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
@pytest.mark.parametrize("entry", ["predict", "predict_on_batch", "evaluate", "certified_radius", "save"])
def test_each_entry_point_refreezes(entry, trained, data, tmp_path):
    x, y = data
    scale_hidden_kernel(trained)
    expected = fresh_constants(trained)
    if entry == "predict":
        trained.predict(x, verbose=0)
    elif entry == "predict_on_batch":
        out = trained.predict_on_batch(x)
        np.testing.assert_array_equal(out, trained.predict(x, batch_size=len(x), verbose=0))
    elif entry == "evaluate":
        trained.evaluate(x, y, verbose=0)
    elif entry == "certified_radius":
        trained.certified_radius(x)
    else:
        trained.save(tmp_path / "m.keras")
        loaded = gloro.load_model(tmp_path / "m.keras")
        np.testing.assert_array_equal(loaded.lipschitz_constant(), expected)
    assert trained.lipschitz_frozen
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(trained._margin_lipschitz), expected)


def test_scaled_kernel_certifies_no_more_than_the_new_constants_allow(trained, data):
    x, _ = data
    scale_hidden_kernel(trained)
    out = trained.predict(x, verbose=0)
    certified = np.argmax(out, axis=1) < 3
    radius = trained.certified_radius(x)
    np.testing.assert_array_equal(certified, radius > trained.epsilon)


def test_restoring_the_frozen_weights_restores_the_certificates(trained, data):
    x, _ = data
    before = keras.ops.convert_to_numpy(trained(x, training=False))
    kernel = trained.f.layers[1].kernel
    original = np.asarray(kernel).copy()
    kernel.assign(original * 10)
    kernel.assign(original)
    assert trained.lipschitz_frozen
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(trained(x, training=False)), before)


def test_a_training_step_unfreezes_and_fit_refreezes(trained, data):
    x, y = data
    trained.fit(x, y, epochs=1, batch_size=64, verbose=0)
    assert trained.lipschitz_frozen
    trained.train_on_batch(x[:64], y[:64])
    assert not trained.lipschitz_frozen
    out = keras.ops.convert_to_numpy(trained(x, training=False))
    assert np.all(np.argmax(out, axis=1) == 3)
