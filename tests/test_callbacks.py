"""Callbacks drive epsilon, lambda and the learning rate from schedules."""

import keras
import numpy as np
import pytest

import gloro
from gloro import callbacks, layers, schedules


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append((
            self.model.epsilon,
            float(self.model.loss.lam.numpy()),
            float(self.model.optimizer.learning_rate.numpy()),
            self.model.lipschitz_frozen,
        ))


@pytest.fixture
def model():
    x = keras.Input((4,))
    y = layers.Dense(3)(layers.MinMax()(layers.Dense(8)(x)))
    g = gloro.GloroNet(x, y, epsilon=0.5)
    g.compile(optimizer=keras.optimizers.SGD(0.1), loss="trades_kl.2", metrics=["vra"])
    return g


def test_schedules_are_followed_per_batch(model, rng):
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.integers(0, 3, 40)
    recorder = Recorder()
    eps = schedules.parse("[0.01]-log-[50%:1.1]")
    lam = schedules.parse("linear")
    lr = schedules.parse("[1.]-[50%:1.]-cos-[0.001]")
    model.fit(x, y, epochs=4, batch_size=10, verbose=0, callbacks=[
        callbacks.EpsilonScheduler(eps, 0.5),
        callbacks.TradesScheduler(lam, 2.0),
        callbacks.LearningRateScheduler(lr, 0.1),
        recorder,
    ])
    assert len(recorder.rows) == 16
    for step, (e, l, r, frozen) in enumerate(recorder.rows):
        t = step / 16
        assert e == pytest.approx(0.5 * eps(t), rel=1e-6)
        assert l == pytest.approx(2.0 * lam(t), rel=1e-6)
        assert r == pytest.approx(0.1 * lr(t), rel=1e-5)
        assert not frozen
    assert model.lipschitz_frozen


def test_validation_runs_on_frozen_constants(model, rng):
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.integers(0, 3, 40)
    frozen = []

    class Probe(keras.callbacks.Callback):
        def on_test_batch_begin(self, batch, logs=None):
            frozen.append(self.model.lipschitz_frozen)

    model.fit(x, y, epochs=2, batch_size=10, verbose=0, validation_data=(x, y),
              callbacks=[Probe()])
    assert frozen and all(frozen)


def test_trades_scheduler_needs_trades_loss(rng):
    x = keras.Input((4,))
    g = gloro.GloroNet(x, layers.Dense(3)(x), epsilon=0.5)
    g.compile(optimizer="adam", loss="crossentropy")
    with pytest.raises(ValueError, match="TRADES"):
        g.fit(rng.normal(size=(8, 4)), np.zeros(8, int), verbose=0,
              callbacks=[callbacks.TradesScheduler("linear")])


def test_malformed_schedule_is_quoted():
    with pytest.raises(ValueError, match=r"\[0.1\]-foo"):
        callbacks.EpsilonScheduler("[0.1]-foo-[1]")


@pytest.mark.parametrize("spec,error", [
    ("trades_kl.", ValueError), ("trades_kl.abc", ValueError), ("trades_xx.1", ValueError),
    ("trades_kl.-1", ValueError),
])
def test_malformed_loss_shorthands(spec, error):
    with pytest.raises(error, match="(?i)trades"):
        gloro.losses.get(spec)


def test_loss_values_against_numpy(rng):
    logits = rng.normal(size=(5, 4)).astype("float32")
    labels = rng.integers(0, 3, 5)
    log_q = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ce = -log_q[np.arange(5), labels]
    assert float(gloro.losses.Crossentropy()(labels, logits)) == pytest.approx(ce.mean(), rel=1e-5)
    clean = logits[:, :3]
    log_p = clean - np.log(np.exp(clean).sum(1, keepdims=True))
    p = np.exp(log_p)
    kl = (p * (log_p - log_q[:, :3])).sum(1)
    clean_ce = -log_p[np.arange(5), labels]
    trades = gloro.losses.Trades(0.7)(labels, logits)
    assert float(trades) == pytest.approx((clean_ce + 0.7 * kl).mean(), rel=1e-5)
    trades_ce = gloro.losses.get("sparse_trades_ce.0.7")(labels, logits)
    assert float(trades_ce) == pytest.approx((clean_ce - 0.7 * (p * log_q[:, :3]).sum(1)).mean(), rel=1e-5)
