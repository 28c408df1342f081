"""The certifier comparison (benchmarks/certifiers.py) on tiny networks with
known answers.

The known-answer network maps `x in R^2` to the logits `(x0, -x0)` through
MinMax (each hidden pair is `(±x0, -10)`, whose max is `±x0` for
`|x0| < 10`), so the margin is `2 x0`, the decision boundary is `x0 = 0`,
and the exact certified radius is `|x0|`. GloRo's bound is exact on it
(`K = 2`), and so are IBP and the linear bounds (every hidden unit is
stable), so every method must certify a point far from the boundary and
none may certify a point on it.
"""

import keras
import numpy as np
import pytest

pytest.importorskip("scipy")
pytest.importorskip("typer")

from keras import ops  # noqa: E402

from benchmarks import bounds, certified_training, certifiers, smoothing  # noqa: E402
from gloro import layers  # noqa: E402

# keras.ops code with no backend-specific path: by default it runs in the
# TensorFlow pass; on JAX and torch in the long tier (`-m slow`).
pytestmark = pytest.mark.ops_only

RADIUS = 0.1
# The bounds are keras.ops, the same on every backend, but eager JAX
# compiles each op for each new shape: these tests took 11 to 34 s each on
# JAX here against under 1 s on TensorFlow, so they run on TensorFlow only.
# The known-answer and exactness tests run on both.
tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="eager JAX compiles every op; the same keras.ops run on TensorFlow"
)
METHODS = ("gloro", "gloro_radius", "ibp", "crown_ibp", "kw", "crown", "bcp", "smoothing")


def _known_answer_model():
    x = keras.Input((2,))
    h = keras.layers.Dense(4)(x)
    z = layers.MinMax()(h)
    logits = keras.layers.Dense(2)(z)
    model = keras.Model(x, logits)
    model.layers[1].kernel.assign(np.array([[1, 0, -1, 0], [0, 0, 0, 0]], np.float32))
    model.layers[1].bias.assign(np.array([0, -10, 0, -10], np.float32))
    # MinMax outputs (min, max) per pair: the logits are the two maxima.
    model.layers[3].kernel.assign(np.array([[0, 0], [1, 0], [0, 0], [0, 1]], np.float32))
    model.layers[3].bias.assign(np.zeros(2, np.float32))
    return model


def _setting():
    return certifiers.Setting(
        network="known_answer", dataset="synthetic", input_shape=(2,), radius=RADIUS, sigma=0.25,
        train_examples=16, real_data=True, epochs=1, train_subset=16, points={},
    )


def test_far_point_certified_by_all_boundary_point_by_none():
    model = _known_answer_model()
    x = np.array([[1.0, 0.3], [0.0, 0.7]], np.float32)  # margin 2 and margin 0
    y = np.array([0, 0])
    for method in METHODS:
        row, certified = certifiers.certify_row(_setting(), method, model, "none", x, y)
        assert certified.tolist() == [True, False], method
        assert row["certified_accuracy"] == 0.5, (method, row)
        for key in ("task", "method", "implementation", "network", "dataset", "device", "radius",
                    "points_measured", "mb_per_instance", "certified_accuracy", "seconds_test_set"):
            assert key in row


def test_bounds_exact_where_the_network_is_linear():
    model = _known_answer_model()
    steps, shapes = bounds.chain(model)
    x = np.array([[1.0, 0.3], [-0.5, 2.0]], np.float32)
    labels = np.array([0, 1])
    exact = np.array([[0.0, 2 * 1.0 - 2 * RADIUS], [2 * 0.5 - 2 * RADIUS, 0.0]])
    for method in bounds.METHODS:
        lower = ops.convert_to_numpy(bounds.margin_bounds(method, steps, shapes, x, RADIUS, labels))
        np.testing.assert_allclose(lower, exact, atol=1e-5, err_msg=method)


def _small_conv_model():
    # Plain Keras layers: gloro's own build their bound caches, which is
    # slow on JAX and not what these tests are about.
    keras.utils.set_random_seed(1)
    x = keras.Input((6, 6, 2))
    z = layers.MinMax()(keras.layers.Conv2D(4, 3, strides=2, padding="same")(x))
    z = layers.MinMax()(keras.layers.Conv2D(4, 3, padding="same")(z))
    z = layers.MinMax()(keras.layers.Dense(6)(keras.layers.Flatten()(z)))
    return keras.Model(x, keras.layers.Dense(3)(z))


@tensorflow_only
def test_conv_transpose_is_the_adjoint():
    model = _small_conv_model()
    steps, shapes = bounds.chain(model)
    rng = np.random.default_rng(0)
    for (kind, layer), shape in zip(steps, shapes):
        if kind != "conv":
            continue
        a = rng.standard_normal((2,) + shape).astype(np.float32)
        out = ops.convert_to_numpy(layer(a)) - ops.convert_to_numpy(layer.bias)
        b = rng.standard_normal(out.shape).astype(np.float32)
        back = ops.convert_to_numpy(bounds._transpose(kind, layer, b, shape))
        np.testing.assert_allclose((out * b).sum(), (a * back).sum(), rtol=1e-4)


@tensorflow_only
def test_bounds_below_the_sampled_minimum_and_linear_tighter_than_ibp():
    """Sound on a network with unstable units: no bound exceeds the
    smallest margin of points sampled in the ball (sphere and interior)."""
    model = _small_conv_model()
    steps, shapes = bounds.chain(model)
    rng = np.random.default_rng(0)
    x = rng.random((3, 6, 6, 2), dtype=np.float32)
    eps = 0.1
    pred = ops.convert_to_numpy(model(x)).argmax(axis=1)
    sampled = np.full((3, 3), np.inf)
    for i in range(3):
        d = rng.standard_normal((4000, 72)).astype(np.float32)
        d *= eps * rng.random((4000, 1)) ** (1 / 72) / np.linalg.norm(d, axis=1, keepdims=True)
        logits = ops.convert_to_numpy(model(x[i] + d.reshape((-1, 6, 6, 2))))
        sampled[i] = (logits[:, pred[i] : pred[i] + 1] - logits).min(axis=0)
    found = {m: ops.convert_to_numpy(bounds.margin_bounds(m, steps, shapes, x, eps, pred)) for m in bounds.METHODS}
    for method, lower in found.items():
        assert np.all(lower <= sampled + 1e-5), method
    assert np.all(found["crown"] >= found["ibp"] - 1e-5)
    # BCP intersects IBP's box with the Lipschitz ball: at least as tight as
    # either, with the same norms.
    norms = bounds.guaranteed_norms(steps, shapes)
    logits = ops.convert_to_numpy(model(x))
    head = ops.convert_to_numpy(steps[-1][1].kernel)
    lipschitz = np.prod([n for n in norms if n is not None])
    rows = np.linalg.norm(head[:, pred].T[:, None, :] - head.T[None], axis=2)  # ||w_y - w_i||, (3, 3)
    ball = logits[np.arange(3), pred][:, None] - logits - eps * lipschitz * rows
    assert np.all(found["bcp"] >= np.maximum(found["ibp"], ball) - 1e-5)


@tensorflow_only
def test_bcp_norms_cover_the_exact_spectral_norms():
    """BCP certifies with gloro's guaranteed norms: each at least the largest
    singular value of the layer's materialised operator."""
    model = _small_conv_model()
    steps, shapes = bounds.chain(model)
    norms = bounds.guaranteed_norms(steps, shapes)
    checked = 0
    for (kind, layer), shape, norm in zip(steps, shapes, norms):
        if norm is None:
            continue
        # The operator, materialised by applying the layer to each basis
        # vector of its input space.
        basis = np.eye(int(np.prod(shape)), dtype=np.float32).reshape((-1,) + shape)
        matrix = ops.convert_to_numpy(layer(basis)) - ops.convert_to_numpy(layer.bias)
        exact = np.linalg.svd(matrix.reshape(len(basis), -1).astype(np.float64), compute_uv=False)[0]
        assert exact <= norm <= exact * 1.01, (layer.name, exact, norm)
        checked += 1
    assert checked == 3  # two convolutions and the hidden Dense; the head has none


def test_smoothing_lower_confidence_bound():
    # Clopper-Pearson: all successes in n trials bound p below by alpha^(1/n).
    assert abs(smoothing.lower_confidence_bound(100, 100, 0.001) - 0.001 ** (1 / 100)) < 1e-9
    assert smoothing.lower_confidence_bound(0, 100, 0.001) == 0.0


@tensorflow_only
def test_bound_training_losses_are_finite():
    """The bound losses, including the zero row of a class against itself,
    whose norm has no gradient at 0 (a NaN there once stopped IBP training)."""
    rng = np.random.default_rng(0)
    x = rng.random((8, 2), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    for method in ("ibp", "crown_ibp", "kw"):
        trainer = certified_training.trainer(method, _known_answer_model(), RADIUS)
        loss = trainer.compute_loss(x, y, trainer(x))
        assert np.isfinite(ops.convert_to_numpy(loss)), method


def _gloro_layer_model():
    x = keras.Input((2,))
    z = layers.MinMax()(layers.Dense(4)(x))
    return keras.Model(x, layers.Dense(2)(z))


def test_bcp_trains_with_power_iteration_and_refuses_plain_layers():
    rng = np.random.default_rng(0)
    x = rng.random((8, 2), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    trainer = certified_training.trainer("bcp", _gloro_layer_model(), RADIUS)
    history = trainer.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    with pytest.raises(ValueError, match="gloro.layers.Dense"):
        certified_training.trainer("bcp", _known_answer_model(), RADIUS).compute_loss(x, y, None)
