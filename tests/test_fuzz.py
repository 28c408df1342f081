"""Property-based search for unsound certificates and silent acceptances.

`test_random_accepted_graphs_certify_soundly` draws random networks from
every layer, option and merge that gloro accepts, trains them a few steps,
freezes them, and checks the certificates against exact answers:

* every linear layer's guaranteed bound is at least the spectral norm of
  its operator, materialised on the input shape at its node (float64 SVD);
* no margin's empirical Lipschitz constant (gradient ascent on the ratio)
  exceeds its certified constant;
* no certified prediction changes under PGD at epsilon, nor at any of many
  random points of the ball.

`test_random_unsupported_options_are_refused` draws networks with one
unsupported layer, option, merge or input and expects a `ValueError` that
names the offending layer (or the input).

The suite runs a bounded number of examples; set `GLORO_FUZZ_EXAMPLES` for
a longer run (the README's Soundness section gives the command and what the
last long run found).
"""

import os

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import ops

import gloro
from gloro import attacks, certificates, layers

EXAMPLES = int(os.environ.get("GLORO_FUZZ_EXAMPLES", "2"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="GLORO_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=list(HealthCheck),
)
INPUT_SHAPE = (6, 6, 2)
CLASSES = 3


# ---------------------------------------------------------- accepted graphs


def _conv(draw):
    stride = draw(st.sampled_from([1, 2]))
    return layers.Conv2D(
        draw(st.sampled_from([2, 4])),
        draw(st.sampled_from([1, 2, 3])),
        strides=stride,
        padding=draw(st.sampled_from(["same", "valid"])),
        dilation_rate=draw(st.sampled_from([1, 2])) if stride == 1 else 1,
        activation=draw(st.sampled_from([None, "relu"])),
        kernel_initializer="orthogonal",
    )


def _block(draw, z):
    """One random accepted block applied to `z`, or `z` when it does not fit."""
    h, w, c = z.shape[1:]
    kind = draw(st.sampled_from([
        "conv", "liresnet", "minmax", "relu", "average", "max", "downsample",
        "scaling", "residual", "concatenate",
    ]))
    if kind == "conv":
        layer = _conv(draw)
        try:
            out = layer.compute_output_shape((None, h, w, c))
        except ValueError:
            return z
        return layer(z) if min(out[1:3]) >= 1 else z
    if kind == "liresnet":
        return layers.LiResNetBlock(draw(st.sampled_from([1, 3])))(z)
    if kind == "minmax":
        return layers.MinMax()(z) if c % 2 == 0 else z
    if kind == "relu":
        return keras.layers.ReLU(
            negative_slope=draw(st.sampled_from([0.0, 0.3, 1.0])),
            max_value=draw(st.sampled_from([None, 0.5, 2.0])),
        )(z)
    if kind in ("average", "max"):
        pool = draw(st.sampled_from([2, 3]))
        stride = draw(st.sampled_from([1, 2, 3]))
        padding = draw(st.sampled_from(["valid", "same"]))
        if padding == "valid" and min(h, w) < pool:
            return z
        cls = keras.layers.AveragePooling2D if kind == "average" else keras.layers.MaxPooling2D
        return cls(pool, strides=stride, padding=padding)(z)
    if kind == "downsample":
        return layers.InvertibleDownsampling(2)(z) if h % 2 == 0 and w % 2 == 0 else z
    if kind == "scaling":
        return layers.Scaling(draw(st.floats(-2.0, 2.0, allow_nan=False)))(z)
    branch = layers.Conv2D(c, 3, padding="same", kernel_initializer="orthogonal")(z)
    if kind == "concatenate":
        return layers.Concatenate(axis=draw(st.sampled_from([-1, 1, 2])))([z, branch])
    merge = draw(st.sampled_from([layers.Add, layers.Subtract, layers.Average]))
    return merge()([z, layers.Scaling(draw(st.floats(-1.5, 1.5, allow_nan=False)))(branch)])


@st.composite
def accepted_networks(draw):
    x = keras.Input(INPUT_SHAPE)
    z = x
    for _ in range(draw(st.integers(1, 4))):
        z = _block(draw, z)
    z = layers.Flatten()(z)
    if draw(st.booleans()):
        z = layers.Dense(8, activation=draw(st.sampled_from([None, "relu"])))(z)
        z = layers.MinMax()(z)
    return x, layers.Dense(CLASSES)(z)


def _exact_norm(layer, input_shape):
    """Spectral norm of a linear layer's operator (bias removed), float64."""
    d = int(np.prod(input_shape))
    basis = np.concatenate([np.zeros((1, d)), np.eye(d)]).reshape((d + 1,) + tuple(input_shape))
    out = ops.convert_to_numpy(layer(basis.astype("float32"))).reshape(d + 1, -1).astype(np.float64)
    return np.linalg.norm(out[1:] - out[:1], 2)


LINEAR = (layers.Dense, layers.Conv2D, keras.layers.AveragePooling2D)


# The bounds under test are NumPy and the graph's reading of the network is
# Python: the backend does not change what this finds.
@pytest.mark.backend_neutral
@FUZZ
@given(network=accepted_networks(), seed=st.integers(0, 2**16))
def test_random_accepted_graphs_certify_soundly(network, seed):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    g = gloro.GloroNet(*network, epsilon=0.1, power_iterations=2)
    data = rng.normal(size=(64,) + INPUT_SHAPE).astype("float32")
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="crossentropy")
    g.fit(data, rng.integers(0, CLASSES, 64), epochs=1, batch_size=32, verbose=0)
    g.freeze_lipschitz()

    for layer in g._graph.layers:
        linear = isinstance(layer, LINEAR) and getattr(layer, "activation", None) in (None, keras.activations.linear)
        if linear:
            shape = g._graph._input_shapes[id(layer)]
            assert g._graph.guaranteed_bound(layer) >= _exact_norm(layer, shape) * (1 - 1e-6), layer.name

    k = g.lipschitz_constant()
    empirical = attacks.empirical_margin_lipschitz(g.f, data[:4], steps=5, seed=seed)
    assert np.all(empirical <= k * (1 + 1e-5))

    # An epsilon at which about half the points are certified.
    points = rng.normal(size=(48,) + INPUT_SHAPE).astype("float32")
    radius = g.certified_radius(points)
    # Infinite radii: a constant network (a scaling by 0) certifies at
    # every epsilon.
    finite = radius[(radius > 0) & np.isfinite(radius)]
    if len(finite) == 0:
        return
    g.epsilon = float(np.median(finite))
    predictions = ops.convert_to_numpy(certificates.gloro_predictions(g.predict(points, verbose=0)))
    certified = np.flatnonzero(predictions < CLASSES)
    assert np.all(radius[certified] >= g.epsilon * (1 - 1e-6))
    if len(certified) == 0:
        return
    result = attacks.pgd_l2(g.f, points[certified], g.epsilon, steps=20, restarts=2, seed=seed)
    assert not result.success.any()
    samples = 64
    direction = rng.normal(size=(len(certified), samples) + INPUT_SHAPE)
    direction /= np.linalg.norm(direction.reshape(len(certified), samples, -1), axis=2)[..., None, None, None]
    scale = g.epsilon * rng.uniform(0.5, 1.0, size=(len(certified), samples, 1, 1, 1))
    ball = (points[certified][:, None] + scale * direction).astype("float32").reshape((-1,) + INPUT_SHAPE)
    labels = np.argmax(g.f.predict(ball, verbose=0, batch_size=1024), axis=1).reshape(len(certified), samples)
    np.testing.assert_array_equal(labels, predictions[certified][:, None].repeat(samples, axis=1))


# ---------------------------------------------------------------- refusals


class ScaledFlatten(keras.layers.Flatten):
    def call(self, x):
        return 3.0 * super().call(x)


class LoudMinMax(layers.MinMax):
    def call(self, x):
        return 3.0 * super().call(x)


class Unbounded(keras.layers.Layer):
    def call(self, x):
        return x * x


def relu(x):
    return 3.0 * x


def _lora_dense(z):
    layer = layers.Dense(4, name="bad")
    out = layer(z)
    layer.enable_lora(1)
    return out


def _quantized_dense(z):
    layer = keras.layers.Dense(4, name="bad")
    out = layer(z)
    layer.quantize("int8")
    return out


def _stale_shape_conv(z, value):
    layer = layers.Conv2D(2, 3, padding="same", name="bad")
    layer(keras.Input((3, 3, z.shape[-1])))
    return layer(z)


# Each makes the network's one unsupported part, named "bad".
UNSUPPORTED = {
    "thresholded relu": lambda z, v: keras.layers.ReLU(threshold=v, name="bad")(z),
    "steep relu": lambda z, v: keras.layers.ReLU(negative_slope=1.0 + v, name="bad")(z),
    "tanh activation": lambda z, v: keras.layers.Activation("tanh", name="bad")(z),
    "sigmoid conv": lambda z, v: layers.Conv2D(2, 3, activation="sigmoid", name="bad")(z),
    "fake relu": lambda z, v: layers.Conv2D(2, 3, activation=relu, name="bad")(z),
    "grouped conv": lambda z, v: layers.Conv2D(2, 3, groups=2, name="bad")(z),
    "subclassed flatten": lambda z, v: ScaledFlatten(name="bad")(z),
    "subclassed minmax": lambda z, v: LoudMinMax(name="bad")(z),
    "unbounded layer": lambda z, v: Unbounded(name="bad")(z),
    "batch norm": lambda z, v: keras.layers.BatchNormalization(name="bad")(z),
    "dropout": lambda z, v: keras.layers.Dropout(v, name="bad")(z),
    "multiply": lambda z, v: keras.layers.Multiply(name="bad")([z, z]),
    "maximum": lambda z, v: keras.layers.Maximum(name="bad")([z, z]),
    "broadcast add": lambda z, v: layers.Add(name="bad")([z, keras.layers.AveragePooling2D(6)(z)]),
    "batch concatenate": lambda z, v: layers.Concatenate(axis=0, name="bad")([z, z]),
    "lora": lambda z, v: _lora_dense(layers.Flatten()(z)),
    "int8": lambda z, v: _quantized_dense(layers.Flatten()(z)),
    "built on another shape": _stale_shape_conv,
    "channels first pooling": lambda z, v: keras.layers.AveragePooling2D(
        2, data_format="channels_first", name="bad")(z),
}


# The refusals are Python; on JAX, where each network's build compiles, in
# the long tier.
@pytest.mark.slow_on_jax
@settings(max_examples=max(EXAMPLES * 5, len(UNSUPPORTED)), deadline=None,
          derandomize="GLORO_FUZZ_EXAMPLES" not in os.environ, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(sorted(UNSUPPORTED)), value=st.floats(1e-3, 0.9), prefix=st.integers(0, 2),
       suffix=st.booleans())
def test_random_unsupported_options_are_refused(kind, value, prefix, suffix):
    with pytest.raises(ValueError, match="'bad'"):
        x = keras.Input(INPUT_SHAPE)
        z = x
        for _ in range(prefix):
            z = layers.Conv2D(2, 3, padding="same")(z)
        z = UNSUPPORTED[kind](z, value)
        if suffix and len(z.shape) == 4 and z.shape[-1] % 2 == 0:
            z = layers.MinMax()(z)
        if len(z.shape) > 2:
            z = layers.Flatten()(z)
        gloro.GloroNet(x, layers.Dense(CLASSES)(z), epsilon=0.1)


@pytest.mark.parametrize("dtype", ["int32", "uint8", "float16", "bfloat16", "int64"])
def test_rounded_inputs_are_refused_for_every_dtype(dtype):
    x = keras.Input((4,), dtype=dtype)
    with pytest.raises(ValueError, match=dtype):
        gloro.GloroNet(x, layers.Dense(CLASSES)(layers.Dense(4)(x)), epsilon=0.1)
