"""Callbacks drive epsilon and lambda from schedules, inside the compiled
training step, and leave the model at the values the user asked for."""

import keras
import numpy as np
import pytest

import gloro
from gloro import callbacks, layers, schedules

jax_only = pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX trainer state")

EPS = "[0.01]-log-[50%:1.1]"


def f32(value):
    return float(np.float32(value))


class Recorder(keras.callbacks.Callback):
    """What the compiled steps used (their logs) and what the model holds."""

    def __init__(self):
        super().__init__()
        self.train = []
        self.test = []
        self.test_model_epsilon = []

    def on_train_batch_end(self, batch, logs=None):
        self.train.append({k: float(v) for k, v in logs.items()})

    def on_test_batch_begin(self, batch, logs=None):
        self.test_model_epsilon.append(self.model.epsilon)

    def on_test_batch_end(self, batch, logs=None):
        self.test.append({k: float(v) for k, v in logs.items()})


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
    lam_values = []

    class Lambda(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            lam_values.append(float(self.model.loss.lam.numpy()))

    recorder = Recorder()
    eps = schedules.parse(EPS)
    lam = schedules.parse("linear")
    model.fit(x, y, epochs=4, batch_size=10, verbose=0, callbacks=[
        callbacks.EpsilonScheduler(eps, 0.5),
        callbacks.TradesScheduler(lam, 2.0),
        recorder,
        Lambda(),
    ])
    assert len(recorder.train) == 16
    for step, (row, l) in enumerate(zip(recorder.train, lam_values)):
        t = step / 16
        assert row["epsilon"] == pytest.approx(f32(0.5 * eps(t)), rel=1e-6)
        assert l == pytest.approx(2.0 * lam(t), rel=1e-6)
    assert model.lipschitz_frozen


def test_certifies_at_the_requested_epsilon_after_fit(model, rng):
    # Issue 8, item 3: the schedule ends at 1.1 x epsilon, but the model left
    # by fit and every validation pass certify at epsilon itself.
    x = rng.normal(size=(40, 4)).astype("float32")
    y = rng.integers(0, 3, 40)
    recorder = Recorder()
    model.fit(x, y, epochs=4, batch_size=10, verbose=0, validation_data=(x[:20], y[:20]),
              callbacks=[callbacks.EpsilonScheduler(EPS, 0.3), recorder])
    assert model.epsilon == f32(0.3)
    # Training followed the schedule, also on the batches right after each
    # validation pass (the second half holds 1.1, so a cached value that was
    # not re-applied after validation would show up here).
    eps = schedules.parse(EPS)
    used = [row["epsilon"] for row in recorder.train]
    assert used == pytest.approx([f32(0.3 * eps(s / 16)) for s in range(16)], rel=1e-6)
    assert used[-1] == pytest.approx(0.33, rel=1e-6)
    # Validation (2 batches after each of the 4 epochs) ran at 0.3.
    assert len(recorder.test) == 8
    assert all(row["epsilon"] == f32(0.3) for row in recorder.test)
    assert recorder.test_model_epsilon == [f32(0.3)] * 8
    # The certificates after fit are those at 0.3.
    logits = model.f.predict(x, verbose=0)
    radius = gloro.certificates.certified_radius(logits, model.lipschitz_constant())
    rejected = np.argmax(model.predict(x, verbose=0), axis=1) == 3
    assert not rejected[radius > 0.3 * (1 + 1e-4)].any()
    assert rejected[radius < 0.3 * (1 - 1e-4)].all()


def test_second_fit_without_base_does_not_drift(model, rng):
    # The base defaults to the model's epsilon; a model left at the scheduled
    # 1.1 x epsilon would make every further fit grow the radius.
    x = rng.normal(size=(20, 4)).astype("float32")
    y = rng.integers(0, 3, 20)
    model.epsilon = 0.3
    for _ in range(2):
        model.fit(x, y, epochs=2, batch_size=10, verbose=0, callbacks=[callbacks.EpsilonScheduler(EPS)])
        assert model.epsilon == f32(0.3)


def _numpy_trades(x, y, kernel, bias, epsilon, lam):
    """GloRo-TRADES (KL) loss of a head-only GloroNet, in float64."""
    logits = x.astype(np.float64) @ kernel + bias
    n, m = logits.shape
    k = np.linalg.norm(kernel[:, :, None] - kernel[:, None, :], axis=0)
    top = np.argmax(logits, axis=1)
    competitors = logits + epsilon * k[top]
    competitors[np.arange(n), top] = -np.inf
    gloro_logits = np.concatenate([logits, competitors.max(axis=1, keepdims=True)], axis=1)
    log_q = gloro_logits - np.log(np.exp(gloro_logits).sum(axis=1, keepdims=True))
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    clean = -log_p[np.arange(n), y]
    kl = (p * (log_p - log_q[:, :m])).sum(axis=1)
    return float(np.mean(clean + lam * kl))


def test_scheduled_values_reach_the_compiled_step(rng):
    # The loss of each step is recomputed in NumPy from the fixed weights
    # (learning rate 0) and the scheduled epsilon and lambda: it only matches
    # when the compiled step read the values the callbacks set (on JAX the
    # step works on a copy of the state).
    x_in = keras.Input((4,))
    g = gloro.GloroNet(x_in, layers.Dense(3)(x_in), epsilon=0.5)
    g.compile(optimizer=keras.optimizers.SGD(0.0), loss="trades_kl.2")
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, 16)
    recorder = Recorder()
    epochs = 8
    eps, lam = schedules.parse("[0.1]-lin-[1]"), schedules.parse("[0]-lin-[1]")
    g.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=[
        callbacks.EpsilonScheduler(eps, 0.5),
        callbacks.TradesScheduler(lam, 2.0),
        recorder,
    ])
    head = g.f.layers[-1]
    kernel, bias = (keras.ops.convert_to_numpy(w).astype(np.float64) for w in (head.kernel, head.bias))
    assert len(recorder.train) == epochs
    losses = []
    for step, row in enumerate(recorder.train):
        t = step / epochs
        expected = _numpy_trades(x, y, kernel, bias, 0.5 * eps(t), 2.0 * lam(t))
        assert row["loss"] == pytest.approx(expected, rel=1e-4), step
        losses.append(expected)
    # Every step's values differ, far beyond the tolerance: a step that kept
    # reading earlier values would have failed above.
    assert np.min(np.abs(np.diff(losses)) / np.abs(losses[1:])) > 1e-2


class EpsilonProbe(keras.Model):
    """The `epsilon` contract of GloroNet (a float property over a
    non-trainable variable); its output is epsilon, so an MAE loss against 0
    is the epsilon the compiled step used."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)
        self._epsilon = self.add_weight(shape=(), initializer="zeros", trainable=False, name="epsilon")

    @property
    def epsilon(self):
        return float(self._epsilon.numpy())

    @epsilon.setter
    def epsilon(self, value):
        self._epsilon.assign(value)

    def call(self, x):
        return 0.0 * self.dense(x) + self._epsilon


def _probe():
    probe = EpsilonProbe()
    probe.compile(optimizer=keras.optimizers.SGD(0.0), loss="mae")
    return probe


def test_epsilon_reaches_the_step_and_validation_uses_the_base():
    # One batch per epoch, so the logged loss is that batch's epsilon.
    x, y = np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")
    probe = _probe()
    probe.epsilon = 0.7
    recorder = Recorder()
    history = probe.fit(x, y, epochs=8, batch_size=4, verbose=0, validation_data=(x, y),
                        callbacks=[callbacks.EpsilonScheduler(EPS, 0.3), recorder])
    eps = schedules.parse(EPS)
    assert [row["loss"] for row in recorder.train] == pytest.approx(
        [f32(0.3 * eps(e / 8)) for e in range(8)], rel=1e-6)
    assert history.history["val_loss"] == pytest.approx([f32(0.3)] * 8, rel=1e-6)
    assert probe.epsilon == f32(0.3)


def test_evaluate_outside_fit_is_left_alone():
    x, y = np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")
    probe = _probe()
    scheduler = callbacks.EpsilonScheduler("fixed", 0.3)
    probe.fit(x, y, epochs=1, verbose=0, callbacks=[scheduler])
    probe.epsilon = 0.2
    assert probe.evaluate(x, y, verbose=0, callbacks=[scheduler]) == pytest.approx(0.2)


@jax_only
def test_no_state_sync_while_the_value_holds(monkeypatch):
    # On JAX a callback that touches `self.model` mid-epoch syncs the
    # trainer's state to the variables (a host round trip per batch). A held
    # value must cost nothing per batch; a moving one must sync (that is what
    # makes the assignment reach the next step).
    x, y = np.ones((10, 2), "float32"), np.zeros((10, 1), "float32")

    def syncs(extra):
        probe = _probe()
        count = [0]
        original = probe.jax_state_sync

        def counting():
            count[0] += 1
            original()

        monkeypatch.setattr(probe, "jax_state_sync", counting)
        probe.fit(x, y, epochs=3, batch_size=2, verbose=0, callbacks=extra)
        return count[0]

    steps = 15
    baseline = syncs([])
    held = syncs([callbacks.EpsilonScheduler("fixed", 0.3)])
    moving = syncs([callbacks.EpsilonScheduler("[0]-lin-[1]", 0.3)])
    # Reading the base when training starts and the first assignment.
    assert held - baseline <= 2
    assert moving - baseline >= steps


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


def test_no_keras_callback_names_reused():
    # Issue 8, item 5: a gloro callback must not shadow a Keras one with
    # another signature (the learning rate has ScheduledLearningRate).
    for name in dir(callbacks):
        value = getattr(callbacks, name)
        if isinstance(value, type) and hasattr(keras.callbacks, name):
            assert value is getattr(keras.callbacks, name), name
    assert not hasattr(callbacks, "LearningRateScheduler")
