"""GloRo losses against NumPy, and the refusal of probability losses."""

import keras
import numpy as np
import pytest

import gloro
from gloro import layers, losses

# GloroNet trains on JAX once gloro/model.py and gloro/layers.py no longer
# use TensorFlow (issue 9); until then its training tests run on TensorFlow.


def log_softmax(z):
    shifted = np.asarray(z, np.float64) - np.max(z, axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def value(loss, y_true, y_pred):
    return float(keras.ops.convert_to_numpy(loss(y_true, y_pred)))


@pytest.fixture
def batch(rng):
    logits = rng.normal(size=(6, 4)).astype("float32")  # 3 classes and ⊥
    labels = rng.integers(0, 3, 6)
    return logits, labels


def test_crossentropy_against_numpy(batch):
    logits, labels = batch
    expected = -log_softmax(logits)[np.arange(6), labels].mean()
    one_hot = np.eye(3, dtype="float32")[labels]
    for y in (labels, labels[:, None], labels.astype("float32"), one_hot):
        assert value(losses.Crossentropy(), y, logits) == pytest.approx(expected, rel=1e-5)
    assert value(losses.get("crossentropy"), labels, logits) == pytest.approx(expected, rel=1e-5)
    assert value(losses.get("sparse_crossentropy"), labels, logits) == pytest.approx(expected, rel=1e-5)


def test_crossentropy_soft_labels(batch):
    logits, _ = batch
    soft = np.random.default_rng(1).dirichlet(np.ones(3), size=6).astype("float32")
    expected = -(soft * log_softmax(logits)[:, :3]).sum(axis=1).mean()
    assert value(losses.Crossentropy(), soft, logits) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_trades_against_numpy(batch, kind):
    logits, labels = batch
    log_q = log_softmax(logits)
    log_p = log_softmax(logits[:, :3])
    p = np.exp(log_p)
    clean = -log_p[np.arange(6), labels]
    if kind == "kl":
        divergence = (p * (log_p - log_q[:, :3])).sum(axis=1)
    else:
        divergence = -(p * log_q[:, :3]).sum(axis=1)
    expected = (clean + 0.7 * divergence).mean()
    assert value(losses.Trades(0.7, kind=kind), labels, logits) == pytest.approx(expected, rel=1e-5)
    assert value(losses.get(f"sparse_trades_{kind}.0.7"), labels, logits) == pytest.approx(expected, rel=1e-5)
    assert value(losses.get(f"trades_{kind}.0.7"), np.eye(3)[labels], logits) == pytest.approx(expected, rel=1e-5)


def test_trades_kl_is_finite_when_a_probability_underflows():
    # exp(-200) is 0 in float32: p log p must not turn into 0 * -inf.
    logits = np.array([[0.0, -200.0, 1.0, 0.5]], "float32")
    loss = losses.Trades(1.0)
    result = value(loss, np.array([0]), logits)
    assert np.isfinite(result)
    x = keras.Variable(logits)
    grad = keras.ops.convert_to_numpy(_gradient(lambda z: loss(np.array([0]), z), x))
    assert np.all(np.isfinite(grad))


def _gradient(fn, variable):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            out = fn(variable.value)
        return tape.gradient(out, variable.value)
    import jax

    return jax.grad(fn)(variable.value)


def test_trades_lambda_is_state_and_serialises():
    loss = losses.Trades(1.5, kind="ce")
    assert loss.variables == [loss.lam]
    assert float(loss.lam.numpy()) == 1.5
    loss.lam.assign(2.5)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(clone) is losses.Trades
    assert clone.kind == "ce" and float(clone.lam.numpy()) == 2.5


@pytest.mark.parametrize("spec", ["trades_kl.", "trades_kl.abc", "trades_xx.1", "trades_kl.-1"])
def test_malformed_loss_shorthands(spec):
    with pytest.raises(ValueError, match="(?i)trades"):
        losses.get(spec)


def test_predictions_must_have_m_plus_one_columns():
    with pytest.raises(ValueError, match=r"\(n, m \+ 1\)"):
        losses.Crossentropy()(np.zeros(3, int), np.zeros((3, 1), "float32"))


# Issue 8, item 5: these read the m + 1 logits as probabilities.
PROBABILITY_LOSSES = [
    ("sparse_categorical_crossentropy", "sparse_crossentropy"),
    ("categorical_crossentropy", "crossentropy"),
    ("SparseCategoricalCrossentropy", "sparse_crossentropy"),
    ("CategoricalCrossentropy", "crossentropy"),
    (keras.losses.sparse_categorical_crossentropy, "sparse_crossentropy"),
    (keras.losses.categorical_crossentropy, "crossentropy"),
    (keras.losses.SparseCategoricalCrossentropy(), "sparse_crossentropy"),
    (keras.losses.CategoricalCrossentropy(), "crossentropy"),
    (keras.losses.CategoricalCrossentropy(from_logits=False, label_smoothing=0.1), "crossentropy"),
    (keras.losses.CategoricalFocalCrossentropy(), "crossentropy"),
]


def _id(value):
    if isinstance(value, str):
        return value
    if isinstance(value, keras.losses.Loss):
        return f"{type(value).__name__}({value.get_config().get('from_logits')})"
    return f"function:{value.__name__}"


@pytest.mark.parametrize("loss, shorthand", PROBABILITY_LOSSES, ids=_id)
def test_probability_losses_are_refused(loss, shorthand):
    with pytest.raises(ValueError, match=f"loss='{shorthand}'") as info:
        losses.get(loss)
    assert "from_logits" in str(info.value)


ACCEPTED = [
    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    keras.losses.CategoricalCrossentropy(from_logits=True),
    "mse",
    losses.Crossentropy(),
    losses.Trades(1.0),
]


@pytest.mark.parametrize("loss", ACCEPTED, ids=_id)
def test_logit_losses_are_accepted(loss):
    resolved = losses.get(loss)
    if not isinstance(loss, str):
        assert resolved is loss


def _gloronet():
    x = keras.Input((4,))
    return gloro.GloroNet(x, layers.Dense(3)(layers.MinMax()(layers.Dense(8)(x))), epsilon=0.3)


@pytest.mark.parametrize("loss, shorthand", PROBABILITY_LOSSES, ids=_id)
def test_gloronet_compile_refuses_probability_losses(loss, shorthand):
    g = _gloronet()
    with pytest.raises(ValueError, match=f"loss='{shorthand}'"):
        g.compile(optimizer="adam", loss=loss)


def test_gloronet_trains_with_a_from_logits_keras_loss(rng):
    # Keras' sparse cross-entropy on logits is gloro's cross-entropy.
    g = _gloronet()
    g.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.integers(0, 3, 8)
    keras_loss = g.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    expected = -log_softmax(g.predict(x, verbose=0))[np.arange(8), y].mean()
    assert keras_loss == pytest.approx(expected, rel=1e-5)
