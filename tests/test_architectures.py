"""LiResNet from `gloro.architectures`: its structure, and that a GloroNet on
it certifies with constants at least the exact ones (and close to them).

Exact answers come from operators materialised by applying each layer to the
standard basis (minus its value at 0, which removes the bias) and from input
gradients taken by the backend's autodiff."""

import keras
import numpy as np
import pytest
from keras import ops

import gloro
from gloro import architectures, backend, layers

# keras.ops code with no backend-specific path: by default it runs in the
# TensorFlow pass; on JAX and torch in the long tier (`-m slow`).
pytestmark = pytest.mark.ops_only

INPUT_SHAPE = (6, 6, 2)
NUM_CLASSES = 3


def _of_type(model, cls):
    return [layer for layer in model.layers if type(layer) is cls]


def _operator_matrix(layer, input_shape):
    """float64 `(n_in, n_out)` matrix of the linear part of `layer`, built by
    applying it to the basis vectors of its input space."""
    n = int(np.prod(input_shape))
    basis = np.eye(n, dtype=np.float32).reshape((n,) + tuple(input_shape))
    outputs = ops.convert_to_numpy(layer(basis)) - ops.convert_to_numpy(layer(np.zeros_like(basis[:1])))
    return outputs.reshape(n, -1).astype(np.float64)


def _spectral_norm(matrix):
    """Largest singular value, as the square root of the top eigenvalue of
    the smaller Gram matrix (a few times faster than an SVD at 2,304
    dimensions, and as exact)."""
    if matrix.shape[0] < matrix.shape[1]:
        matrix = matrix.T
    return float(np.sqrt(np.linalg.eigvalsh(matrix.T @ matrix)[-1]))


@pytest.fixture
def tiny(rng):
    """A LiResNet (width 4, depth 2) on 6x6x2 inputs whose blocks are far from
    the identity: random block kernels and biases."""
    f = architectures.get("liresnet", INPUT_SHAPE, NUM_CLASSES, depth=2, width=4, seed=0)
    for block in _of_type(f, layers.LiResNetBlock):
        block.kernel.assign(0.3 * rng.standard_normal(block.kernel.shape).astype(np.float32))
        block.bias.assign(0.1 * rng.standard_normal(block.bias.shape).astype(np.float32))
    return f


# Structure and argument checks are the same on every backend: TensorFlow only.
@pytest.mark.tensorflow
@pytest.mark.parametrize(
    "input_shape, depth, width, activation",
    [((12, 12, 1), 0, 2, "minmax"), ((16, 16, 1), 3, 8, "minmax"), ((10, 10, 3), 2, 6, "relu"), ((9, 7, 2), 1, 3, "relu")],
)
def test_liresnet_structure(input_shape, depth, width, activation, rng):
    f = architectures.get("liresnet", input_shape, 5, activation=activation, depth=depth, width=width, seed=0)
    stem, neck = _of_type(f, layers.Conv2D)
    blocks = _of_type(f, layers.LiResNetBlock)
    hidden, logits = _of_type(f, layers.Dense)
    assert len(blocks) == depth
    assert stem.filters == width and stem.kernel_size == (3, 3) and stem.strides == (1, 1)
    assert all(block.filters == width and block.kernel_size == (3, 3) for block in blocks)
    assert neck.filters == 2 * width and neck.kernel_size == (4, 4) and neck.strides == (4, 4)
    height, wide = (-(-size // 4) for size in input_shape[:2])
    assert tuple(neck.output.shape) == (None, height, wide, 2 * width)
    assert hidden.units == architectures.LIRESNET_DENSE_UNITS and logits.units == 5
    assert tuple(f.output_shape) == (None, 5)
    # An activation after every layer but the logits.
    activation_type = architectures.ACTIVATIONS[activation]
    assert len(_of_type(f, activation_type)) == depth + 3
    # The orthogonal kernels are orthogonal: Q^T Q = I on the smaller side.
    for layer in (stem, neck, hidden, logits):
        kernel = ops.convert_to_numpy(layer.kernel).reshape(-1, ops.shape(layer.kernel)[-1]).astype(np.float64)
        gram = kernel.T @ kernel if kernel.shape[0] >= kernel.shape[1] else kernel @ kernel.T
        np.testing.assert_allclose(gram, np.eye(len(gram)), atol=1e-5)
    # New blocks are the identity.
    x = rng.standard_normal((2,) + stem.output.shape[1:]).astype(np.float32)
    for block in blocks:
        np.testing.assert_array_equal(ops.convert_to_numpy(block(x)), x)


@pytest.mark.tensorflow
def test_get_options_and_errors():
    same = [architectures.get("liresnet", INPUT_SHAPE, 3, seed=1), architectures.liresnet(INPUT_SHAPE, 3, seed=1)]
    assert [len(_of_type(f, layers.LiResNetBlock)) for f in same] == [6, 6]
    assert [_of_type(f, layers.Conv2D)[0].filters for f in same] == [64, 64]
    for a, b in zip(*(f.get_weights() for f in same)):
        np.testing.assert_array_equal(a, b)
    assert "liresnet" in architectures.ARCHITECTURES
    with pytest.raises(ValueError, match="'cnn_2C2F' takes no options; got depth"):
        architectures.get("cnn_2C2F", (28, 28, 1), 10, depth=2)
    with pytest.raises(ValueError, match="takes only depth, width; got blocks"):
        architectures.get("liresnet", INPUT_SHAPE, 3, blocks=2)
    with pytest.raises(ValueError, match="even"):
        architectures.get("liresnet", INPUT_SHAPE, 3, width=5)
    with pytest.raises(ValueError, match="depth"):
        architectures.get("liresnet", INPUT_SHAPE, 3, depth=-1)
    with pytest.raises(ValueError, match="width"):
        architectures.get("liresnet", INPUT_SHAPE, 3, width=0)
    with pytest.raises(ValueError, match="activation"):
        architectures.get("liresnet", INPUT_SHAPE, 3, activation="tanh")


def test_frozen_constants_bound_the_margin_gradients(tiny, rng):
    g = gloro.GloroNet(model=tiny, epsilon=0.1)
    K = g.lipschitz_constant().astype(np.float64)

    # The exact constants of the method: the product of the exact operator
    # norms of the hidden layers (MinMax and Flatten are 1), times the
    # distances between the logits layer's columns.
    f = g.f
    product = 1.0
    for layer in f.layers[1:-1]:
        if isinstance(layer, (layers.Conv2D, layers.Dense)):
            product *= _spectral_norm(_operator_matrix(layer, layer.input.shape[1:]))
    w = ops.convert_to_numpy(f.layers[-1].kernel).astype(np.float64)
    exact = product * np.linalg.norm(w[:, :, None] - w[:, None, :], axis=0)
    off = ~np.eye(NUM_CLASSES, dtype=bool)
    assert np.all(K[off] >= exact[off])
    assert np.all(K[off] <= 1.001 * exact[off])

    # No margin changes faster than its constant anywhere: input gradients at
    # random points of several scales.
    x = np.concatenate([s * rng.standard_normal((32,) + INPUT_SHAPE) for s in (0.1, 1.0, 10.0)]).astype(np.float32)
    worst = 0.0
    for j in range(NUM_CLASSES):
        for i in range(NUM_CLASSES):
            if i == j:
                continue
            margin = backend.value_and_grad(lambda x: (lambda y: y[:, j] - y[:, i])(f(x)))
            _, grad = margin(x)
            norms = np.linalg.norm(ops.convert_to_numpy(grad).reshape(len(x), -1).astype(np.float64), axis=1)
            assert np.all(norms <= K[j, i]), (j, i, norms.max(), K[j, i])
            worst = max(worst, norms.max() / K[j, i])
    # The gradients are not all zero (the check is not vacuous).
    assert worst > 0.01


@pytest.mark.slow
def test_save_load_round_trip(tiny, rng, tmp_path):
    g = gloro.GloroNet(model=tiny, epsilon=0.1)
    x = rng.standard_normal((16,) + INPUT_SHAPE).astype(np.float32)
    before = g.predict(x, verbose=0)
    g.save(tmp_path / "liresnet.keras")
    loaded = gloro.load_model(tmp_path / "liresnet.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
    np.testing.assert_array_equal(loaded.lipschitz_constant(), g.lipschitz_constant())
    assert len(_of_type(loaded.f, layers.LiResNetBlock)) == 2
