"""Bounds of functional graphs and LiResNet blocks, against exact answers."""

import keras
import numpy as np
import pytest
from keras import ops

import gloro
from gloro import attacks, layers, lipschitz
from gloro.graph import LipschitzGraph

# keras.ops code with no backend-specific path: by default it runs in the
# TensorFlow pass; on JAX and torch in the long tier (`-m slow`).
pytestmark = pytest.mark.ops_only


def randomize(g, rng, scale=0.3):
    """Random weights (LiResNet blocks start at the identity otherwise)."""
    for weight in g.f.trainable_weights:
        weight.assign(rng.normal(scale=scale, size=weight.shape).astype("float32"))


def jacobian(f, input_shape):
    """The matrix `(d, m)` of an affine logits model: f(e_k) - f(0)."""
    d = int(np.prod(input_shape))
    basis = np.concatenate([np.zeros((1, d)), np.eye(d)]).reshape((d + 1,) + input_shape)
    out = f.predict(basis.astype("float32"), verbose=0, batch_size=512).astype(np.float64)
    return out[1:] - out[:1]


def exact_margin_norms(j):
    diff = j[:, :, None] - j[:, None, :]
    return np.sqrt(np.sum(diff * diff, axis=0))


def residual_net(activation=None):
    x = keras.Input((5, 5, 2))
    a = layers.Conv2D(2, 3, padding="same")(x)
    if activation:
        a = activation()(a)
    z = layers.Add()([x, a])
    b = layers.Conv2D(4, 3, strides=2, padding="same")(z)
    c = layers.Conv2D(2, 2, strides=2, padding="same")(z)
    if activation:
        b, c = activation()(b), activation()(c)
    z = layers.Concatenate()([b, c])
    z = layers.LiResNetBlock(3)(z)
    z = layers.Average()([z, layers.Scaling(0.5)(z)])
    z = layers.Flatten()(z)
    z = layers.Subtract()([layers.Dense(8)(z), layers.Dense(8)(z)])
    if activation:
        z = activation()(z)
    return x, layers.Dense(4)(z)


def concatenating_net():
    x = keras.Input((6,))
    z = layers.Concatenate()([layers.Dense(5)(x), layers.Dense(3)(x), x])
    z = layers.Dense(6)(z)
    z = layers.Add()([z, layers.Dense(6)(layers.Dense(4)(z))])
    return x, layers.Dense(3)(z)


@pytest.mark.parametrize("build,shape", [(residual_net, (5, 5, 2)), (concatenating_net, (6,))])
def test_linear_graph_bound_is_at_least_the_exact_margin_norm(build, shape, rng):
    g = gloro.GloroNet(*build(), epsilon=0.1)
    randomize(g, rng)
    exact = exact_margin_norms(jacobian(g.f, shape))
    k = g.lipschitz_constant()
    np.testing.assert_array_less(exact * (1 - 1e-5), k + 1e-12)
    # Not vacuous (products of random layers' norms are loose, but not
    # by orders of magnitude on these small graphs).
    assert exact.max() > 0.02 * k.max()


def test_concatenation_and_sums_are_tight_where_they_should_be():
    x = keras.Input((4,))
    z = layers.Concatenate()([layers.Scaling(3.0)(x), layers.Scaling(4.0)(x)])   # exactly 5
    z = layers.Add()([layers.Scaling(0.5)(z), layers.Scaling(1.5)(z)])              # exactly 10
    graph = LipschitzGraph(keras.Model(x, layers.Dense(2)(z)))
    exact = np.linalg.norm(jacobian(keras.Model(x, z), (4,)), 2)
    np.testing.assert_allclose(exact, 10.0, rtol=1e-6)
    assert exact <= graph.bound(layers.layer_bound) <= exact * (1 + 1e-6)


def test_nonlinear_graph_bound_holds_at_every_sampled_gradient(rng):
    g = gloro.GloroNet(*residual_net(layers.MinMax), epsilon=0.1)
    randomize(g, rng)
    x = rng.normal(size=(24, 5, 5, 2)).astype("float32")
    empirical = attacks.empirical_margin_lipschitz(g.f, x, steps=15)
    k = g.lipschitz_constant()
    assert np.all(empirical <= k * (1 + 1e-6))
    assert empirical.max() > 0.05 * k.max()


def test_training_estimate_propagates_through_the_graph(rng):
    g = gloro.GloroNet(*residual_net(layers.MinMax), epsilon=0.1)
    randomize(g, rng)
    # Frozen first, so that features_lipschitz reads these very estimates
    # rather than converging once more.
    g.freeze_lipschitz()
    estimate = g.refresh_lipschitz()
    summary = g.features_lipschitz()
    assert summary["estimate"] == pytest.approx(estimate, rel=1e-6)
    # The converged estimates of each layer, propagated, are within the
    # safety margins of the guaranteed bounds propagated the same way.
    assert summary["estimate"] <= summary["bound"] < 1.05 * summary["estimate"]
    assert summary["ratio"] == pytest.approx(summary["bound"] / summary["estimate"])


@pytest.mark.slow
def test_residual_graph_trains_saves_and_loads(tmp_path, rng):
    x = rng.normal(size=(256, 5, 5, 2)).astype("float32")
    y = (x[..., 0].sum(axis=(1, 2)) > 0).astype("int32")
    g = gloro.GloroNet(*residual_net(layers.MinMax), epsilon=0.05)
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="crossentropy", metrics=["vra"])
    g.fit(x, y, epochs=6, batch_size=32, verbose=0)
    assert g.evaluate(x, y, verbose=0, return_dict=True)["vra"] > 0.5
    g.save(tmp_path / "g.keras")
    loaded = gloro.load_model(tmp_path / "g.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), g.predict(x, verbose=0))
    np.testing.assert_array_equal(loaded.lipschitz_constant(), g.lipschitz_constant())


def test_plain_keras_graph_layers_become_gloro_layers(rng):
    x = keras.Input((6,))
    a = keras.layers.Dense(6, name="branch")(x)
    z = keras.layers.Add()([x, a])
    f = keras.Model(x, keras.layers.Dense(3, name="logits")(z))
    g = gloro.GloroNet(model=f, epsilon=0.1)
    assert isinstance(g.f.get_layer("branch"), layers.Dense)
    inputs = rng.normal(size=(16, 6)).astype("float32")
    np.testing.assert_allclose(g.f.predict(inputs, verbose=0), f.predict(inputs, verbose=0), rtol=1e-6)


def test_graph_refusals_name_the_layer():
    x = keras.Input((4,))
    shared = layers.Dense(4, name="shared")
    z = layers.Add()([shared(x), shared(layers.Dense(4)(x))])
    with pytest.raises(ValueError, match="'shared'.*several places"):
        gloro.GloroNet(x, layers.Dense(2)(z), epsilon=0.1)

    inner = keras.Sequential([keras.Input((4,)), layers.Dense(4)], name="inner")
    with pytest.raises(ValueError, match="'inner' .*nested model"):
        gloro.GloroNet(x, layers.Dense(2)(inner(x)), epsilon=0.1)

    x2 = keras.Input((4,))
    with pytest.raises(ValueError, match="one input"):
        gloro.GloroNet([x, x2], layers.Dense(2)(layers.Add()([x, x2])), epsilon=0.1)

    z = layers.Add()([layers.Dense(4)(x), keras.layers.Activation("tanh", name="squash")(x)])
    with pytest.raises(ValueError, match="'squash'.*tanh"):
        gloro.GloroNet(x, layers.Dense(2)(z), epsilon=0.1)

    z = keras.layers.Maximum(name="biggest")([layers.Dense(4)(x), x])
    with pytest.raises(ValueError, match="'biggest' \\(Maximum\\).*Add, Subtract, Average, Concatenate"):
        gloro.GloroNet(x, layers.Dense(2)(z), epsilon=0.1)


def test_unbuilt_sequential_is_refused():
    with pytest.raises(ValueError, match="keras.Input"):
        gloro.GloroNet(model=keras.Sequential([layers.Dense(4), layers.Dense(2)]), epsilon=0.1)


class DoubledWhileTraining(layers.MinMax):
    """A layer whose `call` takes `training`, as Keras' functional call
    passes it; its own bound covers both modes."""

    def call(self, x, training=None):
        return super().call(x) * (2.0 if training else 1.0)

    def guaranteed_bound(self):
        return 2.0


@pytest.mark.parametrize("build", [residual_net, lambda: residual_net(layers.MinMax), concatenating_net])
def test_run_computes_what_the_functional_model_computes(build, rng):
    """`LipschitzGraph.run` (which a GloroNet's call uses) gives `f`'s own
    outputs bit for bit, on graphs with every merge, in both modes and for
    inputs of other dtypes, which it converts as `f` does."""
    x, y = build()
    f = keras.Model(x, y)
    for weight in f.weights:
        weight.assign(rng.normal(scale=0.3, size=weight.shape).astype("float32"))
    graph = LipschitzGraph(f)
    batch = rng.normal(size=(7,) + tuple(f.input_shape[1:]))
    for inputs in (batch.astype("float32"), batch, np.round(batch * 3).astype("int32")):
        for training in (False, True):
            expected = ops.convert_to_numpy(f(inputs, training=training))
            np.testing.assert_array_equal(ops.convert_to_numpy(graph.run(inputs, training)), expected)


def test_run_casts_and_regularizes_as_the_functional_model_does(rng):
    """Outside training, `run` calls the layers it knows through their
    `call`: inputs are still cast to each layer's dtype (a float64 layer in
    a float32 network), and a layer with an activity regularizer is still
    called through `__call__`, which records its loss."""
    x = keras.Input((4,))
    z = layers.Dense(6, dtype="float64")(x)
    z = layers.MinMax()(z)
    regularized = layers.Dense(4, activity_regularizer="l2")
    f = keras.Model(x, layers.Dense(3)(regularized(z)))
    for weight in f.weights:
        weight.assign(rng.normal(scale=0.3, size=weight.shape))
    graph = LipschitzGraph(f)
    batch = rng.normal(size=(5, 4)).astype("float32")
    out = graph.run(batch, False)
    assert regularized.losses
    np.testing.assert_array_equal(ops.convert_to_numpy(out), ops.convert_to_numpy(f(batch, training=False)))


def test_run_passes_training_to_the_layers_that_take_it(rng):
    x = keras.Input((4,))
    z = DoubledWhileTraining()(layers.Dense(4)(x))
    f = keras.Model(x, layers.Dense(2)(z))
    graph = LipschitzGraph(f)
    batch = rng.normal(size=(5, 4)).astype("float32")
    trained, inferred = (ops.convert_to_numpy(graph.run(batch, training)) for training in (True, False))
    np.testing.assert_array_equal(trained, ops.convert_to_numpy(f(batch, training=True)))
    np.testing.assert_array_equal(inferred, ops.convert_to_numpy(f(batch, training=False)))
    assert not np.array_equal(trained, inferred)


def test_sequential_chain_is_a_graph():
    f = keras.Sequential([keras.Input((4,)), layers.Dense(4), layers.MinMax(), layers.Dense(2)])
    graph = LipschitzGraph(f)
    assert [type(l).__name__ for l in graph.layers] == ["Dense", "MinMax"]
    assert graph.head is f.layers[-1]


# ------------------------------------------------------------ LiResNet blocks


def block_matrix(block, shape):
    """The block's linear operator (bias removed), materialised `(d, d)`."""
    d = int(np.prod(shape))
    basis = np.eye(d, dtype="float32").reshape((d,) + shape)
    bias = ops.convert_to_numpy(block(np.zeros((1,) + shape, "float32")))
    out = ops.convert_to_numpy(block(basis)) - bias
    return out.reshape(d, d).astype(np.float64)


# The last shape is above MAX_MATERIALISED_DIM: its bound is the circular one.
@pytest.mark.parametrize("shape,kernel_size", [((5, 5, 3), 3), ((6, 4, 2), (3, 5)), ((24, 24, 4), 3)])
def test_liresnet_block_bound_is_tight_and_never_below_the_exact_norm(shape, kernel_size, rng):
    block = layers.LiResNetBlock(kernel_size)
    block.build((None,) + shape)
    block.kernel.assign(rng.normal(scale=0.15, size=block.kernel.shape).astype("float32"))
    block.bias.assign(rng.normal(size=block.bias.shape).astype("float32"))
    matrix = block_matrix(block, shape)
    # The largest eigenvalue of the Gram matrix (float64: about 1e-13
    # relative) is several times faster than an SVD at the largest shape.
    exact = float(np.sqrt(np.linalg.eigvalsh(matrix.T @ matrix)[-1]))
    bound = block.guaranteed_bound()
    assert exact <= bound <= 1.05 * exact
    # Folding the identity is the point: 1 + ||W|| is far looser.
    w = np.asarray(ops.convert_to_numpy(block.kernel), np.float64)
    loose = 1 + lipschitz.conv_bound(w, shape, 1, "same", 1)
    assert bound < 0.9 * loose
    if np.prod(shape) <= lipschitz.MAX_MATERIALISED_DIM:
        # Power iteration converges slowly on the larger grid; the small
        # shapes show that the training-time estimate tracks the block too.
        estimate = block.converge()
        assert estimate <= bound and estimate > 0.99 * exact


def test_liresnet_block_is_the_identity_plus_its_convolution(rng):
    block = layers.LiResNetBlock(3, use_bias=False)
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    np.testing.assert_allclose(ops.convert_to_numpy(block(x)), x, atol=1e-6)
    kernel = rng.normal(size=block.kernel.shape).astype("float32")
    block.kernel.assign(kernel)
    conv = keras.layers.Conv2D(3, 3, padding="same", use_bias=False)
    conv.build(x.shape)
    conv.kernel.assign(kernel)
    np.testing.assert_allclose(
        ops.convert_to_numpy(block(x)), x + ops.convert_to_numpy(conv(x)), rtol=1e-5, atol=1e-5
    )


def test_liresnet_block_config_round_trip(rng):
    block = layers.LiResNetBlock(5, use_bias=False, name="b")
    clone = layers.LiResNetBlock.from_config(block.get_config())
    assert clone.kernel_size == (5, 5) and not clone.use_bias and clone.name == "b"
    assert "filters" not in block.get_config()


@pytest.mark.parametrize("kwargs,match", [
    ({"filters": 8}, "fixes filters"),
    ({"strides": 2}, "fixes strides"),
    ({"activation": "relu"}, "MinMax"),
    ({"kernel_size": 4}, "odd kernel_size"),
])
def test_liresnet_block_refuses_what_would_change_its_shape(kwargs, match):
    with pytest.raises(ValueError, match=match):
        layers.LiResNetBlock(**kwargs)


def chain_net():
    x = keras.Input((8, 8, 2))
    z = layers.MinMax()(layers.Conv2D(4, 3, padding="same")(x))
    z = layers.Conv2D(4, 4, strides=2, padding="same")(z)
    z = keras.layers.AveragePooling2D(2)(z)
    z = layers.Dense(5)(layers.Flatten()(z))
    return x, layers.Dense(3)(z)


@pytest.mark.parametrize("build", [residual_net, concatenating_net, chain_net])
def test_vector_bound_is_the_bound_of_the_layers_values(build, rng):
    # The bound of a vector of per-layer values, taken as one product on a
    # chain, equals the propagation of the same values one layer at a time.
    graph = LipschitzGraph(keras.Model(*build()))
    chosen = graph.layers[::2]
    values = rng.uniform(0.5, 2.0, size=len(chosen)).astype(np.float32)
    by_layer = {id(layer): float(v) for layer, v in zip(chosen, values)}
    expected = graph.bound(lambda l: by_layer.get(id(l), graph.guaranteed_bound(l)))
    got = graph.vector_bound(chosen, keras.ops.convert_to_tensor(values), graph.guaranteed_bound)
    assert float(keras.ops.convert_to_numpy(got)) == pytest.approx(expected, rel=1e-5)
