"""Tests of `gloro.attacks` against answers known in closed form.

On an affine model `f(x) = W^T x + b` everything is exact: the margin between
classes y and i drops by exactly `eps * ||w_y - w_i||` at best inside a ball
of radius eps, the smallest adversarial distance is
`min_i (f_y - f_i)(x) / ||w_y - w_i||`, and the Lipschitz constant of
`f_i - f_j` is `||w_i - w_j||`. For ReLU networks the products of spectral
norms bound the Lipschitz constants from above, and points constructed next
to a decision boundary must fall to the attack. Everything here runs on the
TensorFlow and on the JAX backend.
"""

import gc
import math
import weakref

import keras
import numpy as np
import pytest

from gloro import attacks

# keras.ops code with no backend-specific path: by default it runs in the
# TensorFlow pass; on JAX and torch in the long tier (`-m slow`).
pytestmark = pytest.mark.ops_only


def _affine_model(W, b):
    model = keras.Sequential(
        [keras.Input((W.shape[0],)), keras.layers.Dense(W.shape[1])]
    )
    model.layers[0].set_weights([W.astype(np.float32), b.astype(np.float32)])
    return model


def _relu_mlp(d, hidden, m, seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(m),
        ]
    )


def _logits(model, x):
    return keras.ops.convert_to_numpy(model(x))


def _predict(model, x):
    return np.argmax(_logits(model, x), axis=1)


def _affine_distances(W, b, x):
    """Per row: predicted class and (f_y - f_i) / ||w_y - w_i|| for every i."""
    logits = x.astype(np.float64) @ W + b
    y = logits.argmax(axis=1)
    norms = np.linalg.norm(W.T[y][:, None, :] - W.T[None, :, :], axis=2)
    rows = np.arange(len(y))
    norms[rows, y] = 1.0
    dist = (logits[rows, y][:, None] - logits) / norms
    dist[rows, y] = np.inf
    return y, dist, logits, norms


def _affine_optimum(W, b, x, eps):
    """Exact smallest margin f_y - max_{i != y} f_i over the ball of radius eps."""
    y, _, logits, norms = _affine_distances(W, b, x)
    rows = np.arange(len(y))
    values = logits[rows, y][:, None] - logits - eps * norms
    values[rows, y] = np.inf
    return values.min(axis=1)


def _points_at_distance(W, b, distance, n, rng):
    """Points whose smallest adversarial L2 distance is exactly `distance`."""
    points = []
    while len(points) < n:
        z = 2.0 * rng.standard_normal(W.shape[0])
        y, dist, _, _ = _affine_distances(W, b, z[None])
        i = dist[0].argmin()
        u = (W[:, y[0]] - W[:, i]) / np.linalg.norm(W[:, y[0]] - W[:, i])
        # Moving along u changes the distance to class i one for one.
        candidate = z + (distance - dist[0, i]) * u
        y2, dist2, _, _ = _affine_distances(W, b, candidate[None])
        if y2[0] == y[0] and abs(dist2.min() - distance) < 1e-9:
            points.append(candidate)
    return np.array(points, np.float32)


def _ball_distances(result, x):
    diff = result.x_adv.astype(np.float64) - np.asarray(x, np.float64)
    return np.linalg.norm(diff.reshape(len(diff), -1), axis=1)


@pytest.fixture(scope="module")
def affine():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 4))
    b = rng.standard_normal(4)
    return W, b, _affine_model(W, b)


def test_affine_attack_succeeds_exactly_beyond_the_minimal_distance(affine):
    W, b, model = affine
    x = _points_at_distance(W, b, 1.0, 60, np.random.default_rng(1))

    above = attacks.pgd_l2(model, x, 1.02, restarts=8)
    assert above.success.all()
    assert np.all(_ball_distances(above, x) <= 1.02 * (1 + 1e-6))

    below = attacks.pgd_l2(model, x, 0.98)
    assert not below.success.any()
    assert np.all(below.margin > 0)
    assert np.all(_ball_distances(below, x) <= 0.98 * (1 + 1e-6))

    # No point in the ball beats the exact optimum, and the search gets close.
    for result, eps in [(above, 1.02), (below, 0.98)]:
        optimum = _affine_optimum(W, b, x, eps)
        assert np.all(result.margin >= optimum - 1e-4)
        assert np.all(result.margin < result.clean_margin)
        # The returned margin is the model's margin at x_adv.
        logits = _logits(model, result.x_adv)
        y = _predict(model, x)
        others = np.where(np.eye(4, dtype=bool)[y], -np.inf, logits)
        np.testing.assert_allclose(
            logits[np.arange(len(y)), y] - others.max(axis=1), result.margin, atol=1e-4
        )


def test_affine_margin_reduction_is_eps_times_weight_gap():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((5, 2))
    b = rng.standard_normal(2)
    model = _affine_model(W, b)
    x = rng.standard_normal((20, 5)).astype(np.float32)
    eps = 0.3
    gap = np.linalg.norm(W[:, 0] - W[:, 1])

    result = attacks.pgd_l2(model, x, eps, restarts=1)

    np.testing.assert_allclose(
        result.clean_margin - result.margin, eps * gap, rtol=1e-4
    )
    np.testing.assert_allclose(
        result.relative_reduction(), eps * gap / result.clean_margin, rtol=1e-3
    )
    np.testing.assert_allclose(result.margin, _affine_optimum(W, b, x, eps), atol=1e-4)
    np.testing.assert_array_equal(result.success, eps * gap >= result.clean_margin)
    # The optimum of an affine margin lies on the sphere.
    np.testing.assert_allclose(_ball_distances(result, x), eps, rtol=1e-5)


@pytest.mark.parametrize("radius", [None, 0.5])
def test_affine_lipschitz_is_weight_gap(affine, radius):
    W, _, model = affine
    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    exact = np.linalg.norm(W.T[:, None, :] - W.T[None, :, :], axis=2)

    lower = attacks.empirical_margin_lipschitz(model, x, steps=10, radius=radius)

    assert lower.shape == (4, 4)
    np.testing.assert_array_equal(lower, lower.T)
    np.testing.assert_array_equal(np.diag(lower), 0)
    assert np.all(lower <= exact * (1 + 1e-5) + 1e-6)
    assert np.all(lower >= exact * 0.99)


def _gradient_norms(model, x):
    """Exact ||grad (f_i - f_j)(x_k)|| of a ReLU MLP from `_relu_mlp`,
    maximised over the points x_k."""
    (w1, b1), (w2, b2), (w3, _) = (
        [w.astype(np.float64) for w in layer.get_weights()] for layer in model.layers
    )
    h1 = x.astype(np.float64) @ w1 + b1
    h2 = np.maximum(h1, 0) @ w2 + b2
    # The Jacobian at x_k is W3^T D2 W2^T D1 W1^T, with D the ReLU's 0/1
    # derivatives on the pre-activations.
    jac = np.stack(
        [
            w3.T @ ((h2[k] > 0)[:, None] * w2.T) @ ((h1[k] > 0)[:, None] * w1.T)
            for k in range(len(x))
        ]
    )
    return np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=3).max(axis=0)


def test_relu_mlp_lipschitz_between_gradient_and_spectral_bounds():
    d, m = 6, 3
    model = _relu_mlp(d, 16, m, seed=4)
    kernels = [layer.get_weights()[0].astype(np.float64) for layer in model.layers]
    spectral = np.linalg.norm(kernels[0], 2) * np.linalg.norm(kernels[1], 2)
    last = kernels[2]
    upper = spectral * np.linalg.norm(last.T[:, None, :] - last.T[None, :, :], axis=2)
    x = np.random.default_rng(5).standard_normal((8, d)).astype(np.float32)

    lower = attacks.empirical_margin_lipschitz(model, x, steps=30)

    assert np.all(lower <= upper * (1 + 1e-5))
    # The ascent only ever adds to the local gradients next to x.
    assert np.all(lower >= _gradient_norms(model, x) * (1 - 1e-3))
    assert np.all(lower[~np.eye(m, dtype=bool)] > 0)


def _boundary_pairs(model, rng, n, shape, delta):
    """Points at L2 distance `delta` before a decision boundary, and witnesses
    `delta` beyond it, found by bisection between differently classified
    points."""
    points, witnesses = [], []
    while len(points) < n:
        z0, z1 = rng.uniform(-1, 1, size=(2,) + shape).astype(np.float32)
        y0, y1 = _predict(model, np.stack([z0, z1]))
        if y0 == y1:
            continue
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            pred = _predict(model, (z0 + mid * (z1 - z0))[None])[0]
            lo, hi = (mid, hi) if pred == y0 else (lo, mid)
        u = (z1 - z0) / np.linalg.norm(z1 - z0)
        points.append(z0 + lo * (z1 - z0) - delta * u)
        witnesses.append(z0 + hi * (z1 - z0) + delta * u)
    return np.array(points, np.float32), np.array(witnesses, np.float32)


def _assert_attack_crosses(model, x, witnesses, delta):
    y = _predict(model, x)
    # A changed prediction exists within 3 * delta: the attack must find one.
    assert np.all(_predict(model, witnesses) != y)
    distances = np.linalg.norm((witnesses - x).reshape(len(x), -1), axis=1)
    assert np.all(distances < 3 * delta)

    result = attacks.pgd_l2(model, x, 3 * delta)

    assert result.success.all()
    assert np.all(_predict(model, result.x_adv) != y)
    assert np.all(_ball_distances(result, x) <= 3 * delta * (1 + 1e-6))
    return result


def test_relu_mlp_attack_crosses_a_nearby_boundary():
    d, m, delta = 6, 3, 0.01
    model = _relu_mlp(d, 16, m, seed=6)
    x, witnesses = _boundary_pairs(model, np.random.default_rng(7), 10, (d,), delta)
    _assert_attack_crosses(model, x, witnesses, delta)


def test_conv_model_attack_and_lipschitz_bound():
    keras.utils.set_random_seed(8)
    conv = keras.layers.Conv2D(3, 3, activation="relu")
    dense = keras.layers.Dense(3)
    model = keras.Sequential(
        [keras.Input((6, 6, 1)), conv, keras.layers.Flatten(), dense]
    )
    # Operator norm of the convolution, from its matrix on the 6x6 input.
    basis = np.eye(36, dtype=np.float32).reshape(36, 6, 6, 1)
    conv_matrix = keras.ops.convert_to_numpy(
        keras.ops.conv(basis, conv.get_weights()[0], padding="valid")
    ).reshape(36, -1)
    last = dense.get_weights()[0].astype(np.float64)
    upper = np.linalg.norm(conv_matrix.astype(np.float64), 2) * np.linalg.norm(
        last.T[:, None, :] - last.T[None, :, :], axis=2
    )
    x = np.random.default_rng(9).uniform(size=(4, 6, 6, 1)).astype(np.float32)

    lower = attacks.empirical_margin_lipschitz(model, x, steps=10)
    assert np.all(lower <= upper * (1 + 1e-5))
    assert np.all(lower[~np.eye(3, dtype=bool)] > 0)

    result = attacks.pgd_l2(model, x, 0.5, steps=30, restarts=2, clip=(0.0, 1.0))
    assert result.x_adv.shape == x.shape
    assert np.all((result.x_adv >= 0) & (result.x_adv <= 1))
    assert np.all(_ball_distances(result, x) <= 0.5 * (1 + 1e-6))
    assert np.all(result.margin <= result.clean_margin)

    near, witnesses = _boundary_pairs(
        model, np.random.default_rng(10), 4, x.shape[1:], 0.01
    )
    _assert_attack_crosses(model, near, witnesses, 0.01)


def test_labels_default_to_the_prediction(affine):
    _, _, model = affine
    x = np.random.default_rng(10).standard_normal((16, 8)).astype(np.float32)
    predicted = _predict(model, x)

    default = attacks.pgd_l2(model, x, 0.2, steps=20, restarts=2)
    explicit = attacks.pgd_l2(model, x, 0.2, labels=predicted, steps=20, restarts=2)

    np.testing.assert_array_equal(default.x_adv, explicit.x_adv)
    np.testing.assert_array_equal(default.margin, explicit.margin)
    assert np.all(default.clean_margin >= 0)


def test_a_wrong_label_is_already_a_success(affine):
    _, _, model = affine
    x = np.random.default_rng(11).standard_normal((8, 8)).astype(np.float32)
    wrong = (_predict(model, x) + 1) % 4

    result = attacks.pgd_l2(model, x, 0.0, labels=wrong)

    assert np.all(result.clean_margin < 0)
    assert result.success.all()


def test_zero_epsilon_returns_x_and_ties_count_as_success():
    model = _affine_model(np.zeros((3, 2)), np.zeros(2))
    x = np.random.default_rng(12).standard_normal((5, 3)).astype(np.float32)

    result = attacks.pgd_l2(model, x, 0.0, steps=5, restarts=2)

    np.testing.assert_array_equal(result.x_adv, x)
    np.testing.assert_array_equal(result.margin, 0)
    assert result.success.all()
    assert np.all(np.isnan(result.relative_reduction()))


def test_x_adv_stays_in_the_ball_at_the_limits_of_float32(affine):
    _, _, model = affine
    # Coordinates near 1e3 have float32 spacing ~6e-5, comparable to eps:
    # rounding x + delta alone would leave the ball.
    x = (1e3 + np.random.default_rng(13).standard_normal((16, 8))).astype(np.float32)
    for eps in [1e-4, 1e-3, 1e-2]:
        result = attacks.pgd_l2(model, x, eps, steps=20, restarts=2)
        assert np.all(_ball_distances(result, x) <= eps * (1 + 1e-6))
        assert np.all(result.margin <= result.clean_margin)


def test_results_are_reproducible_and_accept_tensors_and_callables(affine):
    W, b, model = affine
    x = np.random.default_rng(14).standard_normal((6, 8)).astype(np.float32)
    W32 = keras.ops.convert_to_tensor(W, "float32")
    b32 = keras.ops.convert_to_tensor(b, "float32")

    def plain(batch):
        return keras.ops.matmul(batch, W32) + b32

    first = attacks.pgd_l2(model, x, 0.4, steps=20, restarts=3, seed=5)
    again = attacks.pgd_l2(
        plain, keras.ops.convert_to_tensor(x), 0.4, steps=20, restarts=3, seed=5
    )
    np.testing.assert_allclose(first.x_adv, again.x_adv, atol=1e-5)
    np.testing.assert_allclose(first.margin, again.margin, atol=1e-5)

    lip_a = attacks.empirical_margin_lipschitz(model, x, steps=5, seed=1)
    lip_b = attacks.empirical_margin_lipschitz(model, x, steps=5, seed=1)
    np.testing.assert_array_equal(lip_a, lip_b)


def test_batches_do_not_change_the_answer(affine):
    W, b, model = affine
    x = _points_at_distance(W, b, 1.0, 10, np.random.default_rng(15))

    whole = attacks.pgd_l2(model, x, 0.9, steps=20, restarts=1)
    pieces = attacks.pgd_l2(model, x, 0.9, steps=20, restarts=1, batch_size=3)

    np.testing.assert_allclose(whole.margin, pieces.margin, atol=1e-5)


def test_verbose_shows_a_progress_bar(affine, capsys):
    _, _, model = affine
    x = np.zeros((2, 8), np.float32)
    attacks.pgd_l2(model, x, 0.1, steps=2, restarts=2, verbose=1)
    assert "2/2" in capsys.readouterr().out


@pytest.mark.parametrize("epsilon", [-0.1, math.nan, math.inf, "0.5", None, True])
def test_bad_epsilon_raises(affine, epsilon):
    _, _, model = affine
    with pytest.raises(ValueError, match="epsilon"):
        attacks.pgd_l2(model, np.zeros((2, 8), np.float32), epsilon)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=np.zeros(8, np.float32)), "batch"),
        (dict(x=np.zeros((0, 8), np.float32)), "at least one"),
        (dict(x=np.full((2, 8), np.nan, np.float32)), "NaN"),
        (dict(labels=np.array([0])), "labels"),
        (dict(labels=np.array([0.0, 1.0])), "labels"),
        (dict(labels=np.array([0, 4])), "labels"),
        (dict(restarts=0), "restarts"),
        (dict(steps=-1), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(step_size=-1.0), "step_size"),
        (dict(clip=(0.0, 1.0), x=np.full((2, 8), 2.0, np.float32)), "clip"),
    ],
)
def test_bad_attack_arguments_raise(affine, kwargs, match):
    _, _, model = affine
    args = dict(x=np.zeros((2, 8), np.float32), epsilon=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        attacks.pgd_l2(model, **args)


def test_bad_logits_and_lipschitz_arguments_raise(affine):
    _, _, model = affine
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="at least 2 classes"):
        attacks.pgd_l2(lambda batch: keras.ops.sum(batch, 1, keepdims=True), x, 0.1)
    with pytest.raises(ValueError, match=r"\(n, m\)"):
        attacks.pgd_l2(lambda batch: keras.ops.sum(batch, 1), x, 0.1)
    for radius in [0.0, -1.0, math.inf]:
        with pytest.raises(ValueError, match="radius"):
            attacks.empirical_margin_lipschitz(model, x, radius=radius)
    with pytest.raises(ValueError, match="steps"):
        attacks.empirical_margin_lipschitz(model, x, steps=-1)


def test_repeated_calls_reuse_one_trace_without_keeping_the_model_alive():
    calls = []

    class Counting(keras.layers.Layer):
        """Identity whose `call` runs once per eager call and once per trace."""

        def call(self, inputs):
            calls.append(None)
            return inputs

    model = _relu_mlp(4, 8, 3, seed=16)
    model.add(Counting())
    x = np.random.default_rng(17).standard_normal((7, 4)).astype(np.float32)
    attacks.pgd_l2(model, x, 0.1, steps=5, restarts=2)
    traced = len(calls)
    # Other radii and another number of rows in the same padded batch; each
    # call evaluates the model once outside the compiled run, on x.
    for eps in [0.2, 0.3]:
        attacks.pgd_l2(model, x, eps, steps=5, restarts=2)
    attacks.pgd_l2(model, x[:5], 0.1, steps=5, restarts=2)
    # torch runs eagerly (gloro/backend/torch.py): there is no trace to reuse.
    if keras.backend.backend() != "torch":
        assert len(calls) == traced + 3

    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_weight_changes_between_calls_are_seen():
    rng = np.random.default_rng(19)
    W, b = rng.standard_normal((5, 3)), rng.standard_normal(3)
    model = _affine_model(W, b)
    kernel = keras.Variable(W.astype(np.float32))

    def plain(batch):
        return keras.ops.matmul(batch, kernel)

    x = rng.standard_normal((6, 5)).astype(np.float32)
    # Same arguments before and after the change: a cached compiled run with
    # the old weights baked in would be reused.
    for f in (model, plain):
        attacks.pgd_l2(f, x, 0.3, restarts=3)
        attacks.empirical_margin_lipschitz(f, x, steps=10)

    W2 = 3.0 * W[:, ::-1]
    model.layers[0].set_weights([W2.astype(np.float32), b.astype(np.float32)])
    kernel.assign(W2.astype(np.float32))
    exact = np.linalg.norm(W2.T[:, None, :] - W2.T[None, :, :], axis=2)
    for f, bias in ((model, b), (plain, np.zeros(3))):
        result = attacks.pgd_l2(f, x, 0.3, restarts=3)
        # The margins are those of the new weights at the points returned,
        # and close to their optimum, which no point in the ball beats.
        logits = result.x_adv.astype(np.float64) @ W2 + bias
        y = np.argmax(x.astype(np.float64) @ W2 + bias, axis=1)
        others = np.where(np.eye(3, dtype=bool)[y], -np.inf, logits)
        np.testing.assert_allclose(
            logits[np.arange(len(y)), y] - others.max(axis=1), result.margin, atol=1e-4
        )
        optimum = _affine_optimum(W2, bias, x, 0.3)
        assert np.all(result.margin >= optimum - 1e-4)
        assert np.all(result.margin <= optimum + 0.01 * np.abs(optimum))
        lower = attacks.empirical_margin_lipschitz(f, x, steps=10)
        assert np.all(lower <= exact * (1 + 1e-5) + 1e-6)
        assert np.all(lower >= exact * 0.99)


def test_low_precision_logits_do_not_inflate_the_lipschitz_bound():
    rng = np.random.default_rng(18)
    W = rng.standard_normal((8, 3))
    b = 500.0 * rng.standard_normal(3)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = _affine_model(W, b)
    finally:
        keras.config.set_dtype_policy("float32")
    x = (20.0 + rng.standard_normal((8, 8))).astype(np.float32)
    exact = np.linalg.norm(W.T[:, None, :] - W.T[None, :, :], axis=2)

    lower = attacks.empirical_margin_lipschitz(model, x, steps=20, radius=1.0)

    # float16 gradients are good to about 1e-3; float16 differences of large
    # logits over small separations are not, and must not be counted.
    assert np.all(lower <= exact * 1.01)
    assert np.all(lower >= exact * 0.98)
