"""A loop that fails half-way loses nothing, on every backend.

A data source raises after a few batches of `fit`, `evaluate` or `predict`.
Afterwards the GloroNet holds what the loop had reached (for `fit`, exactly
the weights and optimizer state of the steps it finished), still predicts,
certifies and trains. Keras' own JAX loops leave the variables empty in this
case (keras-team/keras#21019); `gloro/backend/jax.py` attaches them again.
"""

import keras
import numpy as np
import pytest

import gloro
from gloro import layers

FAILURE = "the data source failed"
BATCH = 32


class SourceFailed(RuntimeError):
    pass


# Keras' own TensorFlow loops already leave the model usable; the fix is for
# JAX and torch, so the TensorFlow check is in the long tier.
pytestmark = [pytest.mark.slow] if keras.backend.backend() == "tensorflow" else []


def make_net(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((4,))
    z = layers.MinMax()(layers.Dense(16)(x))
    g = gloro.GloroNet(x, layers.Dense(3)(z), epsilon=0.1)
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="crossentropy", metrics=["vra"])
    return g


@pytest.fixture
def data(rng):
    return rng.normal(size=(256, 4)).astype("float32"), rng.integers(0, 3, 256)


def source(x, y=None, batches=3, fail=True):
    """Yields `batches` batches, then raises (unless `fail` is False)."""
    for i in range(batches):
        rows = slice(i * BATCH, (i + 1) * BATCH)
        yield (x[rows], y[rows]) if y is not None else (x[rows],)
    if fail:
        raise SourceFailed(FAILURE)


def weights_of(variables):
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]


def assert_usable(g, x, y):
    """Predicts, certifies with the constants of its weights, and trains."""
    reference = make_net(seed=1)
    reference.f.set_weights(g.f.get_weights())
    np.testing.assert_array_equal(g.lipschitz_constant(), reference.freeze_lipschitz())
    np.testing.assert_array_equal(g.predict(x, verbose=0), reference.predict(x, verbose=0))
    g.fit(x, y, epochs=1, batch_size=BATCH, verbose=0)
    assert g.lipschitz_frozen


def test_fit_that_fails_keeps_the_steps_it_finished(data):
    x, y = data
    g = make_net()
    start = g.get_weights()
    with pytest.raises(Exception, match=FAILURE):
        g.fit(source(x, y, batches=3), epochs=1, steps_per_epoch=6, verbose=0)
    # (The optimizer's step counter is no witness: on TensorFlow it also
    # counts the step whose batch never came.)

    # The same three steps, with a source that ends instead of failing.
    finished = make_net()
    finished.set_weights(start)
    finished.fit(source(x, y, batches=3, fail=False), epochs=1, steps_per_epoch=3, verbose=0)
    # Kernels and biases (a finished `fit` also converges the power-iteration
    # caches, which the failed one never reached).
    for got, want in zip(weights_of(g.f.trainable_variables), weights_of(finished.f.trainable_variables)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert_usable(g, x, y)


def test_evaluate_that_fails_changes_nothing(data):
    x, y = data
    g = make_net()
    g.fit(x, y, epochs=1, batch_size=BATCH, verbose=0)
    before, outputs = weights_of(g.variables), g.predict(x, verbose=0)
    with pytest.raises(Exception, match=FAILURE):
        g.evaluate(source(x, y), steps=6, verbose=0)
    for got, want in zip(weights_of(g.variables), before):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(g.predict(x, verbose=0), outputs)
    assert_usable(g, x, y)


def test_predict_that_fails_changes_nothing(data):
    x, y = data
    g = make_net()
    g.fit(x, y, epochs=1, batch_size=BATCH, verbose=0)
    before, outputs = weights_of(g.variables), g.predict(x, verbose=0)
    with pytest.raises(Exception, match=FAILURE):
        g.predict(source(x), steps=6, verbose=0)
    for got, want in zip(weights_of(g.variables), before):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(g.predict(x, verbose=0), outputs)
    assert_usable(g, x, y)
