"""Every layer's guaranteed bound, checked against the exact norm of its
materialised operator (or worst cases for non-linear layers)."""

import keras
import numpy as np
import pytest
from keras import ops

import gloro
from gloro import layers

# keras.ops code with no backend-specific path: by default it runs in the
# TensorFlow pass; on JAX and torch in the long tier (`-m slow`).
pytestmark = pytest.mark.ops_only


def exact_norm(layer, input_shape):
    """Largest singular value of the layer's linear part, by float64 SVD of
    its Jacobian (exact for linear layers)."""
    dim = int(np.prod(input_shape))
    basis = np.eye(dim, dtype=np.float32).reshape((dim,) + tuple(input_shape))
    if isinstance(layer, keras.layers.Conv2D):
        kernel = layer.folded_kernel() if isinstance(layer, layers.LiResNetBlock) else layer.kernel
        out = ops.conv(basis, kernel, layer.strides, layer.padding,
                       dilation_rate=layer.dilation_rate)
    elif isinstance(layer, keras.layers.Dense):
        out = basis @ ops.convert_to_numpy(layer.kernel)
    else:
        out = layer(basis)
    matrix = ops.convert_to_numpy(out).reshape(dim, -1).astype(np.float64)
    return np.linalg.svd(matrix, compute_uv=False)[0]


def build(layer, input_shape):
    x = keras.Input(input_shape)
    layer(x)
    return layer


CONV_CASES = [
    # (input_shape, filters, kernel, strides, padding, dilation)
    ((6, 6, 2), 3, 3, 1, "same", 1),
    ((7, 7, 2), 4, 3, 2, "valid", 1),
    ((8, 8, 1), 4, 4, 2, "same", 1),
    ((5, 9, 3), 2, (2, 3), (1, 2), "same", 1),
    ((9, 9, 2), 2, 3, 1, "same", 2),
    ((9, 9, 2), 2, 3, 1, "valid", (2, 3)),
    ((10, 10, 2), 3, 3, 3, "same", 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_conv_layer_bound_and_estimate_bracket_the_exact_norm(case, activation, rng):
    input_shape, filters, kernel, strides, padding, dilation = case
    layer = build(layers.Conv2D(filters, kernel, strides=strides, padding=padding,
                                dilation_rate=dilation, activation=activation), input_shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype("float32"))
    exact = exact_norm(layer, input_shape)
    assert exact <= layer.guaranteed_bound() <= exact * 1.001
    assert exact * 0.999 <= layer.converge() <= exact * (1 + 1e-5)
    assert float(layer.power_step(1)) <= exact * (1 + 1e-5)


def test_dilated_conv_trains(rng):
    # Power iteration needs the convolution's adjoint: with dilation it must
    # not depend on kernels a CPU may lack.
    x = keras.Input((9, 9, 1))
    z = layers.Conv2D(4, 3, dilation_rate=2, padding="same")(x)
    z = layers.MinMax()(z)
    z = layers.Flatten()(z)
    g = gloro.GloroNet(x, layers.Dense(2)(z), epsilon=0.1)
    g.compile(optimizer="adam", loss="crossentropy")
    data = rng.normal(size=(32, 9, 9, 1)).astype("float32")
    history = g.fit(data, rng.integers(0, 2, 32), epochs=1, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert g.lipschitz_frozen


@pytest.mark.parametrize("shape", [(5, 3), (20, 7), (3, 30)])
@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e4])
def test_dense_layer_bound_covers_exact_norm(shape, scale, rng):
    layer = build(layers.Dense(shape[1]), (shape[0],))
    layer.kernel.assign(rng.normal(size=shape).astype("float32") * scale)
    exact = exact_norm(layer, (shape[0],))
    assert exact <= layer.guaranteed_bound() <= exact * 1.001
    assert exact * 0.999 <= layer.converge() <= exact * (1 + 1e-5)
    # The cached bound is float32, rounded up.
    assert float(ops.convert_to_numpy(layer.lipschitz_bound)) >= exact


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
    bound = layers.layer_bound(layer, input_shape)
    if cls is keras.layers.AveragePooling2D:
        assert bound >= exact_norm(layer, input_shape)
        if stride == pool and padding == "valid":
            assert bound == pytest.approx(1 / pool, rel=1e-4)
    else:
        # Max pooling is non-linear: check the bound on random pairs.
        x = rng.normal(size=(200,) + input_shape).astype("float32")
        d = rng.normal(size=x.shape).astype("float32") * 1e-2
        diff = ops.convert_to_numpy(layer(x + d) - layer(x)).reshape(200, -1)
        ratios = np.linalg.norm(diff, axis=1) / np.linalg.norm(d.reshape(200, -1), axis=1)
        assert ratios.max() <= bound
        if stride < pool:
            assert bound > 1.0
        else:
            assert bound == 1.0


def test_overlapping_max_pooling_worst_case_reaches_above_one():
    # Raising one pixel that is the max of 4 overlapping windows moves 4
    # outputs: the 1-Lipschitz claim would be wrong.
    layer = build(keras.layers.MaxPooling2D(2, strides=1), (3, 3, 1))
    x = np.zeros((1, 3, 3, 1), np.float32)
    y = x.copy()
    y[0, 1, 1, 0] = 1.0
    ratio = np.linalg.norm(ops.convert_to_numpy(layer(y) - layer(x)))
    assert ratio == pytest.approx(2.0)
    assert layers.layer_bound(layer, (3, 3, 1)) >= ratio


@pytest.mark.parametrize("layer,expected", [
    (keras.layers.Flatten(), 1.0),
    (keras.layers.ReLU(), 1.0),
    (keras.layers.ReLU(negative_slope=0.3), 1.0),
    (keras.layers.Activation("relu"), 1.0),
    (layers.MinMax(), 1.0),
    (layers.InvertibleDownsampling(2), 1.0),
    (layers.Scaling(-2.5), 2.5),
])
def test_static_bounds(layer, expected):
    build(layer, (4, 4, 2))
    assert layers.layer_bound(layer, (4, 4, 2)) == expected


def test_minmax_and_downsampling_are_permutations(rng):
    x = rng.normal(size=(3, 4, 4, 6)).astype("float32")
    mm = ops.convert_to_numpy(layers.MinMax()(x))
    np.testing.assert_array_equal(np.sort(x.reshape(-1, 2), axis=1), mm.reshape(-1, 2))
    down = ops.convert_to_numpy(layers.InvertibleDownsampling(2)(x))
    assert down.shape == (3, 2, 2, 24)
    # Channel order: (block row, block column, channel), as space_to_depth.
    np.testing.assert_array_equal(down[1, 0, 1, 6 * 3 + 4], x[1, 1, 3, 4])
    np.testing.assert_array_equal(np.sort(down, axis=None), np.sort(x, axis=None))


@pytest.mark.tensorflow
def test_downsampling_matches_space_to_depth(rng):
    import tensorflow as tf

    x = rng.normal(size=(2, 6, 4, 3)).astype("float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(layers.InvertibleDownsampling(2)(x)),
        tf.nn.space_to_depth(x, 2).numpy(),
    )


@pytest.mark.parametrize("layer,match", [
    (keras.layers.BatchNormalization(), "BatchNormalization.*Batch statistics"),
    (keras.layers.Dropout(0.5), "Dropout"),
    (keras.layers.Softmax(), "softmax"),
    (keras.layers.Activation("sigmoid"), "sigmoid"),
    (keras.layers.LayerNormalization(), "LayerNormalization"),
    (keras.layers.ReLU(negative_slope=2.0), "negative_slope"),
])
def test_unknown_layers_are_refused(layer, match):
    build(layer, (4, 4, 2))
    with pytest.raises(ValueError, match=match):
        layers.layer_bound(layer, (4, 4, 2))


def test_unknown_activation_on_a_linear_layer_is_refused():
    with pytest.raises(ValueError, match="tanh"):
        build(layers.Dense(4, activation="tanh"), (3,))


def test_minmax_needs_even_channels():
    with pytest.raises(ValueError, match="even"):
        layers.MinMax()(keras.Input((3,)))


def test_conv_needs_fixed_input_size():
    with pytest.raises(ValueError, match="fixed height and width"):
        layers.Conv2D(2, 3)(keras.Input((None, None, 1)))


class Halve(keras.layers.Layer):
    """A user's own layer that declares its bound."""

    def call(self, x):
        return x * 0.5

    def guaranteed_bound(self):
        return 0.5


def test_a_users_layer_declares_its_bound(rng):
    x = keras.Input((4,))
    z = layers.Dense(4)(x)
    z = Halve()(z)
    g = gloro.GloroNet(x, layers.Dense(3)(z), epsilon=0.1)
    with_halving = g.freeze_lipschitz()
    x2 = keras.Input((4,))
    plain = gloro.GloroNet(x2, layers.Dense(3)(layers.Dense(4)(x2)), epsilon=0.1)
    plain.f.set_weights(g.f.get_weights())
    np.testing.assert_allclose(with_halving, plain.freeze_lipschitz() * 0.5, rtol=1e-6)


def test_a_users_layer_without_a_bound_is_refused():
    class Double(keras.layers.Layer):
        def call(self, x):
            return x * 2

    x = keras.Input((4,))
    z = Double(name="my_double")(layers.Dense(4)(x))
    with pytest.raises(ValueError, match="'my_double'.*guaranteed_bound"):
        gloro.GloroNet(x, layers.Dense(3)(z), epsilon=0.1)


def test_power_steps_stack_layers_and_match_each_layer_alone(rng):
    # A network's layers stepped together (stride-1 convolutions of one
    # spatial size in one grouped convolution, whatever their channels, a
    # LiResNet block among them; Dense layers of one shape stacked) give
    # each layer the estimate and vector it gets stepped alone.
    def network():
        x = keras.Input((6, 6, 3))
        z = layers.Conv2D(4, 3, padding="same", activation="relu")(x)
        z = layers.LiResNetBlock(3)(z)
        z = layers.Conv2D(6, 3, padding="same")(z)
        z = layers.Conv2D(6, 4, strides=2, padding="same")(z)
        z = layers.Flatten()(z)
        z = layers.Dense(5)(z)
        z = layers.Dense(5)(z)
        return keras.Model(x, layers.Dense(5)(z))

    together, alone = network(), network()
    for a, b in zip(together.weights, alone.weights):
        value = rng.normal(size=a.shape).astype("float32") * 0.5
        a.assign(value)
        b.assign(value)
    spectral = [l for l in together.layers if isinstance(l, layers.SpectralNormCache)]
    singles = [l for l in alone.layers if isinstance(l, layers.SpectralNormCache)]
    for _ in range(2):
        stepped = [float(ops.convert_to_numpy(e)) for e in layers.power_steps(spectral, 3)]
        one_by_one = [float(ops.convert_to_numpy(l.power_step(3))) for l in singles]
        np.testing.assert_allclose(stepped, one_by_one, rtol=1e-5)
    for a, b in zip(spectral, singles):
        np.testing.assert_allclose(
            ops.convert_to_numpy(a.power_vector), ops.convert_to_numpy(b.power_vector), atol=1e-5
        )
        exact = exact_norm(a, tuple(a.input.shape[1:]))
        assert float(ops.convert_to_numpy(a.lipschitz_estimate)) <= exact * (1 + 1e-5)


def test_minmax_formulations_agree_exactly(rng):
    # Each backend picks the faster of two MinMax formulations; both must
    # compute the same numbers, ties included.
    from gloro.backend import common

    x = rng.integers(-3, 4, size=(5, 3, 4, 8)).astype("float32")
    strided = ops.convert_to_numpy(common.strided_pair_min_max(ops.convert_to_tensor(x)))
    reshaped = ops.convert_to_numpy(common.reshaped_pair_min_max(ops.convert_to_tensor(x)))
    np.testing.assert_array_equal(strided, reshaped)
    pairs = x.reshape(5, 3, 4, 4, 2)
    np.testing.assert_array_equal(strided.reshape(5, 3, 4, 4, 2), np.sort(pairs, axis=-1))
