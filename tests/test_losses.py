"""GloRo losses against NumPy, and the refusal of probability losses."""

import keras
import numpy as np
import pytest

import gloro
from gloro import layers, losses


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
    if backend == "torch":
        import torch

        x = variable.value.detach().requires_grad_(True)
        return torch.autograd.grad(keras.ops.sum(fn(x)), x)[0]
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


def emma_numpy(logits, labels, k, epsilon):
    logits = np.asarray(logits, np.float64)[:, :-1]
    rows = np.arange(len(labels))
    radius = epsilon * np.asarray(k, np.float64)[labels]
    true = logits[rows, labels][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(radius > 0, np.clip((true - logits) / radius, 0.01, 1.0), 1.0)
    raised = logits + share * radius
    return -log_softmax(raised)[rows, labels].mean()


def test_emma_against_numpy(rng):
    logits = rng.normal(size=(8, 5)).astype("float32")
    labels = rng.integers(0, 4, 8)
    k = np.abs(rng.normal(size=(4, 4))).astype("float32")
    k = k + k.T
    np.fill_diagonal(k, 0.0)
    # Competitors far behind (share 1), close (share in between), ahead
    # (share 0.01), and a pair with K = 0.
    k[0, 1] = k[1, 0] = 0.0
    emma = losses.get("emma")
    assert isinstance(emma, losses.Emma) and isinstance(losses.get("sparse_emma"), losses.Emma)
    for epsilon in (0.0, 0.3, 2.0):
        with emma.margins(k, np.float32(epsilon)):
            for y in (labels, labels[:, None], np.eye(4, dtype="float32")[labels]):
                assert value(emma, y, logits) == pytest.approx(emma_numpy(logits, labels, k, epsilon), rel=1e-5)
    # With epsilon 0 it is the cross-entropy on the m class logits.
    clean = -log_softmax(logits[:, :-1])[np.arange(8), labels].mean()
    with emma.margins(k, np.float32(0.0)):
        assert value(emma, labels, logits) == pytest.approx(clean, rel=1e-5)


def test_emma_shares_carry_no_gradient(rng):
    # The share is a constant: the gradient with respect to the logits is
    # that of the cross-entropy of the raised logits.
    logits = rng.normal(size=(1, 4)).astype("float32")
    k = np.array([[0, 1.0, 2.0], [1.0, 0, 1.5], [2.0, 1.5, 0]], "float32")
    emma = losses.Emma()

    def loss_of(z):
        with emma.margins(k, np.float32(0.5)):
            return emma(np.array([0]), z)

    _, grad = gloro.backend.value_and_grad(loss_of)(keras.ops.convert_to_tensor(logits))
    radius = 0.5 * k[0].astype(np.float64)
    f = logits[0, :3].astype(np.float64)
    share = np.where(radius > 0, np.clip((f[0] - f) / np.where(radius > 0, radius, 1), 0.01, 1), 1)
    z = f + share * radius
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    expected = p - np.eye(3)[0]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(grad)[0, :3], expected, rtol=1e-4, atol=1e-6)


def test_emma_outside_a_gloronet_explains_itself(rng):
    with pytest.raises(ValueError, match="compile it into a GloroNet"):
        losses.Emma()(np.array([0]), np.zeros((1, 3), "float32"))


def test_emma_in_a_gloronet_reads_the_forward_pass_constants(rng):
    x = rng.normal(size=(128, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0)
    inputs = keras.Input((6,))
    g = gloro.GloroNet(inputs, layers.Dense(3)(layers.MinMax()(layers.Dense(8)(inputs))), epsilon=0.2)
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="emma", metrics=["vra"])
    history = g.fit(x, y, epochs=3, batch_size=32, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for epsilon in (0.2, 0.5):
        g.epsilon = epsilon
        loss = g.evaluate(x, y, verbose=0, return_dict=True)["loss"]
        logits = np.pad(g.f.predict(x, verbose=0), [[0, 0], [0, 1]])
        assert loss == pytest.approx(emma_numpy(logits, y, g.lipschitz_constant(), epsilon), rel=1e-4)
    with pytest.raises(ValueError, match="output of calling the model"):
        g.compute_loss(x[:4], y[:4], g.predict(x[:4], verbose=0))
