"""GloroNet: training, certificates, Keras integration and bad input."""

import keras
import numpy as np
import pytest
from keras import ops

import gloro
from gloro import backend, layers


def blobs(rng, n=600, dim=2, classes=3, spread=0.15):
    centres = np.array([[np.cos(a), np.sin(a)] for a in 2 * np.pi * np.arange(classes) / classes])
    labels = rng.integers(0, classes, size=n)
    x = centres[labels] + spread * rng.normal(size=(n, dim))
    return x.astype("float32"), labels


def mlp(input_dim=2, classes=3, width=32):
    x = keras.Input((input_dim,))
    z = layers.Dense(width)(x)
    z = layers.MinMax()(z)
    z = layers.Dense(width)(z)
    z = layers.MinMax()(z)
    y = layers.Dense(classes)(z)
    return x, y


def small_cnn():
    x = keras.Input((8, 8, 1))
    z = layers.Conv2D(4, 3, strides=2, padding="same")(x)
    z = layers.MinMax()(z)
    z = layers.Conv2D(4, 3, padding="valid")(z)
    z = layers.ReLU()(z)
    z = layers.Flatten()(z)
    y = layers.Dense(3)(z)
    return gloro.GloroNet(x, y, epsilon=0.1)


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(1)
    x, y = blobs(rng)
    keras.utils.set_random_seed(1)
    g = gloro.GloroNet(*mlp(), epsilon=0.2)
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_crossentropy",
              metrics=["clean_acc", "vra", "rejection_rate"])
    g.fit(x, y, epochs=30, batch_size=64, verbose=0)
    return g, x, y


def test_training_reaches_high_vra(trained):
    g, x, y = trained
    results = g.evaluate(x, y, verbose=0, return_dict=True)
    assert results["clean_acc"] > 0.97
    assert results["vra"] > 0.9
    assert results["rejection_rate"] == pytest.approx(
        np.mean(np.argmax(g.predict(x, verbose=0), axis=1) == 3), abs=1e-6)


def test_fit_leaves_constants_frozen(trained):
    g, _, _ = trained
    assert g.lipschitz_frozen
    k = g.lipschitz_constant()
    assert k.shape == (3, 3)
    np.testing.assert_array_equal(np.diag(k), 0)
    np.testing.assert_array_equal(k, k.T)


def margin_gradient(f, x, i, j):
    """Per-row gradient of `f_i - f_j` at `x`, as numpy `(n, d)`."""
    _, grad = backend.value_and_grad(lambda z: f(z)[:, i] - f(z)[:, j])(ops.convert_to_tensor(x))
    return ops.convert_to_numpy(grad).reshape(len(x), -1)


def margin_jacobian_norms(f, x, m):
    norms = np.zeros((len(x), m, m))
    for i in range(m):
        for j in range(m):
            if i != j:
                norms[:, i, j] = np.linalg.norm(margin_gradient(f, x, i, j), axis=1)
    return norms


def test_margin_constants_bound_true_jacobians(trained, rng):
    g, x, _ = trained
    samples = np.concatenate([x[:100], rng.normal(size=(100, 2)).astype("float32") * 2])
    norms = margin_jacobian_norms(g.f, samples, 3)
    assert np.all(norms <= g.lipschitz_constant()[None] + 1e-6)


@pytest.mark.slow_on_jax
def test_cnn_margin_constants_bound_true_jacobians(rng):
    g = small_cnn()
    for layer in g.f.layers:
        if hasattr(layer, "kernel"):
            layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
    samples = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    norms = margin_jacobian_norms(g.f, samples, 3)
    assert np.all(norms <= g.lipschitz_constant()[None] * (1 + 1e-6))
    # The bound is not vacuous: within a modest factor of what is attained.
    assert norms.max() >= 0.05 * g.lipschitz_constant().max()


def test_certified_points_match_radius(trained):
    g, x, y = trained
    out = g.predict(x, verbose=0)
    radius = g.certified_radius(x)
    certified = np.argmax(out, axis=1) < 3
    assert np.all(radius[certified] >= g.epsilon * (1 - 1e-4))
    assert np.all(radius[~certified] <= g.epsilon * (1 + 1e-4))


@pytest.mark.slow_on_jax
def test_certified_points_survive_worst_case_perturbation(trained):
    # For each certified point, step eps towards the decision boundary along
    # the exact gradient of every margin: the prediction never changes.
    g, x, _ = trained
    out = g.predict(x, verbose=0)
    pred = np.argmax(out, axis=1)
    idx = np.where(pred < 3)[0][:100]
    xs = x[idx]
    for other in range(3):
        for top in range(3):
            rows = pred[idx] == top
            if top == other or not rows.any():
                continue
            grad = margin_gradient(g.f, xs[rows], top, other)
            norm = np.linalg.norm(grad, axis=1, keepdims=True)
            step = -g.epsilon * grad / np.where(norm > 0, norm, 1)
            moved = np.argmax(ops.convert_to_numpy(g.f(xs[rows] + step)), axis=1)
            assert np.all(moved == top)


def test_epsilon_is_a_settable_variable(trained):
    g, x, y = trained
    before = g.evaluate(x, y, verbose=0, return_dict=True)["vra"]
    g.epsilon = 10.0
    assert g.epsilon == 10.0
    assert g.evaluate(x, y, verbose=0, return_dict=True)["vra"] < before
    g.epsilon = 0.2


@pytest.mark.parametrize("bad,error", [
    (-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    ("0.3", TypeError), (None, TypeError), (True, TypeError),
])
def test_bad_epsilon(bad, error):
    with pytest.raises(error, match="epsilon"):
        gloro.GloroNet(*mlp(), epsilon=bad)
    g = gloro.GloroNet(*mlp(), epsilon=0.1)
    with pytest.raises(error, match="epsilon"):
        g.epsilon = bad
    assert g.epsilon == pytest.approx(0.1)


def test_ties_and_zero_epsilon_are_not_certified():
    x = keras.Input((2,))
    y = layers.Dense(3)(x)
    g = gloro.GloroNet(x, y, epsilon=0.0)
    g.f.layers[-1].kernel.assign(np.array([[1, 1, 0], [0, 0, 1]], np.float32))
    g.f.layers[-1].bias.assign(np.zeros(3, np.float32))
    points = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32)
    pred = np.argmax(g.predict(points, verbose=0), axis=1)
    # Classes 0 and 1 always tie; point 2 ties everywhere; point 1 is class 2.
    assert list(pred) == [3, 2, 3]
    np.testing.assert_array_equal(g.certified_radius(points)[[0, 2]], 0)


def test_nan_and_inf_inputs_are_never_certified(trained):
    g, x, _ = trained
    bad = x[:4].copy()
    bad[0, 0] = np.nan
    bad[1, 1] = np.inf
    bad[2, 0] = -np.inf
    bad[3, 0] = 1e38
    out = g.predict(bad, verbose=0)
    assert np.all(np.argmax(out, axis=1) == 3)
    assert np.all(g.certified_radius(bad) == 0)
    results = g.evaluate(bad, np.zeros(4, int), verbose=0, return_dict=True)
    assert results["vra"] == 0 and results["rejection_rate"] == 1


def test_training_mode_calls_keep_certificates_of_unchanged_weights(trained):
    # A training-mode forward pass moves power-iteration caches, not weights:
    # the frozen constants still hold for the weights.
    g, x, _ = trained
    before = ops.convert_to_numpy(g(x[:8], training=False))
    g(x[:8], training=True)
    assert g.lipschitz_frozen
    np.testing.assert_array_equal(ops.convert_to_numpy(g(x[:8], training=False)), before)


def test_plain_keras_model_is_converted(rng):
    f = keras.Sequential([
        keras.Input((6, 6, 1)),
        keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
        keras.layers.AveragePooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(8),
        keras.layers.Activation("relu"),
        keras.layers.Dense(3),
    ])
    g = gloro.GloroNet(model=f, epsilon=0.1)
    # The functional model of the same layers, with the InputLayer first.
    assert isinstance(g.f.layers[0], keras.layers.InputLayer)
    assert isinstance(g.f.layers[1], layers.Conv2D)
    x = rng.normal(size=(5, 6, 6, 1)).astype("float32")
    np.testing.assert_allclose(g.predict(x, verbose=0)[:, :3], f.predict(x, verbose=0), rtol=1e-6)


def test_refresh_and_freeze(rng):
    g = small_cnn()
    estimate = g.refresh_lipschitz()
    k = g.freeze_lipschitz()
    report = g.lipschitz_report()
    assert [r["layer"] for r in report] == [l.name for l in g.f.layers[1:-1]]
    product = np.prod([r["bound"] for r in report])
    assert product >= estimate
    for row in report:
        assert row["bound"] >= row["estimate"]
    head = ops.convert_to_numpy(g.f.layers[-1].kernel)
    distances = np.linalg.norm(head[:, :, None] - head[:, None, :], axis=0)
    np.testing.assert_array_less(product * distances - 1e-6, k)


@pytest.mark.parametrize("build,match", [
    (lambda x: keras.layers.Add()([layers.Dense(4)(x), x]), "must be a Dense"),
    (lambda x: layers.Dense(3)(keras.layers.Multiply()([layers.Dense(4)(x), x])), "Multiply"),
    (lambda x: layers.Dense(3, activation="softmax")(x), "softmax"),
    (lambda x: keras.layers.Softmax()(layers.Dense(3)(x)), "Softmax"),
    (lambda x: layers.Dense(3)(keras.layers.BatchNormalization()(x)), "BatchNormalization"),
    (lambda x: layers.Dense(3)(keras.layers.Activation("tanh")(layers.Dense(4)(x))), "tanh"),
    (lambda x: layers.Dense(1)(x), "at least 2 classes"),
    (lambda x: keras.layers.Reshape((2, 2))(layers.Dense(4)(x)), "Dense"),
])
def test_unsupported_models_are_refused(build, match):
    x = keras.Input((4,))
    with pytest.raises(ValueError, match=match):
        gloro.GloroNet(x, build(x), epsilon=0.1)


def test_dense_on_unflattened_features_is_refused():
    x = keras.Input((4, 4, 1))
    with pytest.raises(ValueError, match="Flatten"):
        gloro.GloroNet(x, layers.Dense(3)(x), epsilon=0.1)


def test_wrong_input_shape_and_dtype(trained):
    g, _, _ = trained
    with pytest.raises(ValueError, match="expects inputs of shape"):
        g.predict(np.zeros((3, 5), np.float32), verbose=0)
    with pytest.raises(ValueError, match="expects inputs of shape"):
        g.certified_radius(np.zeros((3, 2, 1), np.float32))
    with pytest.raises(TypeError, match="numeric"):
        g.predict(np.array([[True, False]]), verbose=0)


def test_empty_batches(trained):
    g, _, _ = trained
    assert g.predict(np.zeros((0, 2), np.float32), verbose=0).shape == (0, 4)
    assert g.certified_radius(np.zeros((0, 2), np.float32)).shape == (0,)


def test_bad_labels(trained):
    g, x, y = trained
    with pytest.raises(ValueError, match="match neither"):
        g.evaluate(x, np.zeros((len(x), 5)), verbose=0)


@pytest.mark.slow_on_jax
def test_one_hot_and_sparse_labels_agree(trained):
    g, x, y = trained
    sparse = g.evaluate(x, y, verbose=0, return_dict=True)
    one_hot = g.evaluate(x, keras.utils.to_categorical(y, 3), verbose=0, return_dict=True)
    column = g.evaluate(x, y[:, None], verbose=0, return_dict=True)
    for key in ("loss", "vra", "clean_acc", "rejection_rate"):
        assert one_hot[key] == pytest.approx(sparse[key], rel=1e-6)
        assert column[key] == pytest.approx(sparse[key], rel=1e-6)


@pytest.mark.slow
def test_trades_loss_trains(rng):
    x, y = blobs(rng, n=300)
    g = gloro.GloroNet(*mlp(), epsilon=0.1)
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="trades_kl.1.5", metrics=["vra"])
    g.fit(x, y, epochs=10, batch_size=64, verbose=0)
    assert g.evaluate(x, y, verbose=0, return_dict=True)["vra"] > 0.8
    assert isinstance(g.loss, gloro.losses.Trades)
    assert float(ops.convert_to_numpy(g.loss.lam)) == 1.5


def test_train_and_test_steps_log_lipschitz_and_epsilon(rng):
    x, y = blobs(rng, n=256)
    g = gloro.GloroNet(*mlp(), epsilon=0.15)
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="crossentropy", metrics=["vra"])
    history = g.fit(x, y, epochs=2, batch_size=64, verbose=0, validation_data=(x, y)).history
    assert history["epsilon"] == pytest.approx([0.15, 0.15])
    assert history["val_epsilon"] == pytest.approx([0.15, 0.15])
    # Training logs the power-iteration estimate: below the certified
    # constant, but close to it once the iteration has caught up.
    certified = g.lipschitz_constant().max()
    assert 0.5 * certified < history["lipschitz"][-1] <= certified * (1 + 1e-5)
    # Validation logs the frozen constant, rounded up to float32.
    assert history["val_lipschitz"][-1] == pytest.approx(certified, rel=1e-6)
