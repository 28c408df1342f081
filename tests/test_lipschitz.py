"""Every bound is checked against the exact norm of the materialised operator."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from gloro import layers, lipschitz


def exact_norm(layer, input_shape):
    """Largest singular value of the layer's linear part, by float64 SVD of
    its Jacobian (exact for linear layers)."""
    dim = int(np.prod(input_shape))
    basis = np.eye(dim, dtype=np.float32).reshape((dim,) + tuple(input_shape))
    if isinstance(layer, keras.layers.Conv2D):
        out = tf.nn.conv2d(basis, layer.kernel, layer.strides, layer.padding.upper(),
                           dilations=layer.dilation_rate).numpy()
    elif isinstance(layer, keras.layers.Dense):
        out = basis @ layer.kernel.numpy()
    else:
        out = layer(basis).numpy()
    matrix = out.reshape(dim, -1).astype(np.float64)
    return np.linalg.svd(matrix, compute_uv=False)[0]


def build(layer, input_shape):
    x = keras.Input(input_shape)
    layer(x)
    return layer


CONV_CASES = [
    # (input_shape, filters, kernel, strides, padding, dilation)
    ((6, 6, 2), 3, 3, 1, "same", 1),
    ((6, 6, 2), 3, 3, 1, "valid", 1),
    ((7, 7, 2), 4, 3, 2, "same", 1),
    ((7, 7, 2), 4, 3, 2, "valid", 1),
    ((8, 8, 1), 4, 4, 2, "same", 1),
    ((8, 8, 1), 4, 4, 2, "valid", 1),
    ((5, 9, 3), 2, (2, 3), (1, 2), "same", 1),
    ((9, 9, 2), 2, 3, 1, "same", 2),
    ((4, 4, 2), 3, 5, 1, "same", 1),
    ((10, 10, 2), 3, 3, 3, "same", 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e3])
def test_conv_bound_covers_exact_norm(case, scale, rng):
    input_shape, filters, kernel, strides, padding, dilation = case
    layer = build(layers.Conv2D(filters, kernel, strides=strides, padding=padding,
                                dilation_rate=dilation), input_shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32") * scale)
    exact = exact_norm(layer, input_shape)
    bound = layer.guaranteed_bound()
    assert bound >= exact
    assert bound <= exact * 1.001
    estimate = layer.converge()
    assert estimate <= exact * (1 + 1e-5)
    assert estimate >= exact * 0.999


@pytest.mark.parametrize("case", CONV_CASES)
def test_circular_bound_is_an_upper_bound(case, rng):
    input_shape, filters, kernel, strides, padding, dilation = case
    layer = build(layers.Conv2D(filters, kernel, strides=strides, padding=padding,
                                dilation_rate=dilation), input_shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
    exact = exact_norm(layer, input_shape)
    circular = lipschitz.circular_conv_bound(
        layer.kernel.numpy(), input_shape, layer.strides, layer.padding, layer.dilation_rate
    )
    assert circular >= exact * (1 - 1e-9)


def test_circular_bound_is_exact_for_periodic_case(rng):
    # A 1x1 convolution has no boundary: the circular bound is exact.
    layer = build(layers.Conv2D(3, 1), (4, 4, 5))
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
    circular = lipschitz.circular_conv_bound(layer.kernel.numpy(), (4, 4, 5), (1, 1), "same", (1, 1))
    assert circular == pytest.approx(exact_norm(layer, (4, 4, 5)), rel=1e-9)


@pytest.mark.parametrize("shape", [(5, 3), (20, 7), (3, 30)])
@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e4])
def test_dense_bound_covers_exact_norm(shape, scale, rng):
    layer = build(layers.Dense(shape[1]), (shape[0],))
    layer.kernel.assign(rng.normal(size=shape).astype("float32") * scale)
    exact = exact_norm(layer, (shape[0],))
    assert exact <= layer.guaranteed_bound() <= exact * 1.001
    assert exact * 0.999 <= layer.converge() <= exact * (1 + 1e-5)


def test_power_iteration_underestimates_before_convergence(rng):
    # One step from a fixed start is below the norm: the reason why estimates
    # never certify.
    layer = build(layers.Dense(30), (30,))
    u, _, vt = np.linalg.svd(rng.normal(size=(30, 30)))
    s = np.linspace(1.0, 0.99, 30)
    layer.kernel.assign((u * s) @ vt)
    sigma = float(layer.power_step(1))
    assert sigma < 1.0
    assert layer.guaranteed_bound() >= 1.0


POOL_CASES = [
    (keras.layers.AveragePooling2D, 2, 2, "valid", (6, 6, 2)),
    (keras.layers.AveragePooling2D, 2, 1, "valid", (5, 5, 1)),
    (keras.layers.AveragePooling2D, 3, 2, "same", (7, 7, 1)),
    (keras.layers.AveragePooling2D, 2, 1, "same", (4, 4, 1)),
    (keras.layers.MaxPooling2D, 2, 2, "valid", (6, 6, 1)),
    (keras.layers.MaxPooling2D, 3, 1, "same", (5, 5, 1)),
    (keras.layers.MaxPooling2D, 3, 2, "valid", (7, 7, 1)),
]


@pytest.mark.parametrize("cls,pool,stride,padding,input_shape", POOL_CASES)
def test_pooling_bounds(cls, pool, stride, padding, input_shape, rng):
    layer = build(cls(pool, strides=stride, padding=padding), input_shape)
    bound = lipschitz.static_bound(layer)
    if cls is keras.layers.AveragePooling2D:
        assert bound >= exact_norm(layer, input_shape)
        if stride == pool and padding == "valid":
            assert bound == pytest.approx(1 / pool, rel=1e-4)
    else:
        # Max pooling is non-linear: check the bound on random pairs and on
        # pairs that differ only in one input shared by many windows.
        x = rng.normal(size=(200,) + input_shape).astype("float32")
        d = rng.normal(size=x.shape).astype("float32") * 1e-2
        ratios = (np.linalg.norm((layer(x + d) - layer(x)).numpy().reshape(200, -1), axis=1)
                  / np.linalg.norm(d.reshape(200, -1), axis=1))
        assert ratios.max() <= bound
        if stride < pool:
            assert bound > 1.0
    if cls is keras.layers.MaxPooling2D and stride == pool:
        assert bound == 1.0


def test_overlapping_max_pooling_worst_case_reaches_above_one():
    # Raising one pixel that is the max of 4 overlapping windows moves 4
    # outputs: the 1-Lipschitz claim would be wrong.
    layer = build(keras.layers.MaxPooling2D(2, strides=1), (3, 3, 1))
    x = np.zeros((1, 3, 3, 1), np.float32)
    y = x.copy()
    y[0, 1, 1, 0] = 1.0
    ratio = np.linalg.norm(layer(y) - layer(x)) / 1.0
    assert ratio == pytest.approx(2.0)
    assert lipschitz.static_bound(layer) >= ratio


@pytest.mark.parametrize("layer,expected", [
    (keras.layers.Flatten(), 1.0),
    (keras.layers.ReLU(), 1.0),
    (keras.layers.Activation("relu"), 1.0),
    (layers.MinMax(), 1.0),
    (layers.Scaling(-2.5), 2.5),
])
def test_static_bounds(layer, expected):
    build(layer, (4, 4, 2))
    assert lipschitz.static_bound(layer) == expected


def test_minmax_and_downsampling_are_permutation_like(rng):
    x = rng.normal(size=(3, 4, 4, 6)).astype("float32")
    mm = layers.MinMax()(x).numpy()
    np.testing.assert_allclose(np.sort(mm.reshape(-1, 2), axis=1), mm.reshape(-1, 2))
    np.testing.assert_allclose(np.sort(mm, axis=None), np.sort(x, axis=None))
    down = layers.InvertibleDownsampling(2)(x).numpy()
    assert down.shape == (3, 2, 2, 24)
    np.testing.assert_allclose(np.sort(down, axis=None), np.sort(x, axis=None))


@pytest.mark.parametrize("layer,match", [
    (keras.layers.BatchNormalization(), "BatchNormalization"),
    (keras.layers.Dropout(0.5), "Dropout"),
    (keras.layers.Softmax(), "softmax"),
    (keras.layers.Activation("sigmoid"), "sigmoid"),
    (keras.layers.LayerNormalization(), "LayerNormalization"),
])
def test_unknown_layers_are_refused(layer, match):
    build(layer, (4, 4, 2))
    with pytest.raises(ValueError, match=match):
        lipschitz.static_bound(layer)


def test_minmax_needs_even_channels():
    with pytest.raises(ValueError, match="even"):
        layers.MinMax()(keras.Input((3,)))


def test_conv_needs_fixed_input_size():
    with pytest.raises(ValueError, match="fixed height and width"):
        layers.Conv2D(2, 3)(keras.Input((None, None, 1)))
