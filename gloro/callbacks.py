"""Keras callbacks for training GloRo Nets.

* `EpsilonScheduler`, `TradesScheduler`: set epsilon or the TRADES weight
  lambda before every batch from a `gloro.schedules` string (values are
  interpolated within an epoch). For the learning rate use
  `gloro.schedules.ScheduledLearningRate`, which the optimizer evaluates
  itself.
* `LipschitzRefresh`: makes the Lipschitz constants guaranteed before each
  validation pass and at the end of training (`GloroNet.fit` adds it).

Schedules are functions of the fraction of training done, so a run resumed by
`keras.callbacks.BackupAndRestore` (which restarts `fit` at the right epoch)
picks them up where they were. Give the base value explicitly when resuming:
by default it is read from the model when training starts, and a model saved
during training holds the scheduled value, not the base.
"""

import keras

from gloro import schedules


class _ScheduleCallback(keras.callbacks.Callback):
    """Sets `base * schedule(progress)` before every training batch.

    Subclasses read and write the value through `self.model` in `_get` and
    `_set`. On JAX that access writes the trainer's state back into the
    variables and makes the next step read them again, which is what lets an
    assignment reach the compiled step; it costs a host round trip, so the
    model is only touched when the value changes.
    """

    def __init__(self, schedule, base=None):
        super().__init__()
        self.schedule = schedules.parse(schedule)
        self.base = base
        self._epoch = 0
        self._last = None

    def on_train_begin(self, logs=None):
        if self.base is None:
            self.base = self._get()
        # The model may have been changed since a previous `fit`.
        self._last = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        multiplier = self.schedule.at(self._epoch, batch, self.params["epochs"], self.params.get("steps"))
        self._apply(self.base * multiplier)

    def _apply(self, value):
        if value != self._last:
            self._set(value)
            self._last = value


class EpsilonScheduler(_ScheduleCallback):
    """Schedules a GloroNet's epsilon during training.

    Training batches use `epsilon * schedule(progress)`. Validation passes
    inside `fit` and the model left by `fit` use `epsilon` itself: the
    schedule shapes training only, and the model certifies at the radius
    asked for.

    Args:
        schedule: a `gloro.schedules` string or `Schedule`, e.g.
            `"[0.01]-log-[50%:1.1]"` (multipliers of `epsilon`).
        epsilon: the base value, the radius certified after training;
            defaults to the model's epsilon when training starts.

    Example:

    ```python
    g.fit(x, y, epochs=10, callbacks=[gloro.callbacks.EpsilonScheduler("[0.01]-log-[50%:1.1]", 0.3)])
    ```
    """

    def __init__(self, schedule, epsilon=None):
        super().__init__(schedule, epsilon)
        self._fitting = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._fitting = True

    def on_test_begin(self, logs=None):
        # A validation pass measures the model at the radius asked for; the
        # cached value then makes the next training batch set the schedule's
        # value again. Outside `fit` the callback leaves evaluation alone.
        if self._fitting:
            self._apply(self.base)

    def on_train_end(self, logs=None):
        self._apply(self.base)
        self._fitting = False

    def _get(self):
        return self.model.epsilon

    def _set(self, value):
        self.model.epsilon = value


class TradesScheduler(_ScheduleCallback):
    """Schedules the weight lambda of a `gloro.losses.Trades` loss.

    Args:
        schedule: a `gloro.schedules` string or `Schedule`.
        lam: the base value; defaults to the loss's lambda when training starts.

    Example:

    ```python
    g.compile(optimizer="adam", loss="trades_kl.2")
    g.fit(x, y, epochs=10, callbacks=[gloro.callbacks.TradesScheduler("linear")])
    ```
    """

    def __init__(self, schedule, lam=None):
        super().__init__(schedule, lam)

    def _loss(self):
        from gloro.losses import Trades

        loss = getattr(self.model, "loss", None)
        if not isinstance(loss, Trades):
            raise ValueError(
                "TradesScheduler needs a model compiled with a TRADES loss "
                f"(e.g. loss='trades_kl.1.5'), got {loss!r}."
            )
        return loss

    def _get(self):
        return float(self._loss().lam.numpy())

    def _set(self, value):
        self._loss().lam.assign(value)


class LipschitzRefresh(keras.callbacks.Callback):
    """Freezes guaranteed Lipschitz constants before each validation pass and
    at the end of training.

    `GloroNet.fit` adds one unless the callbacks already hold one. Freezing
    converges the power iterations (which also warm-starts the next epoch)
    and replaces the training estimates with guaranteed bounds.

    Example:

    ```python
    g.fit(x, y, validation_data=(xv, yv), callbacks=[gloro.callbacks.LipschitzRefresh()])
    ```
    """

    def on_test_begin(self, logs=None):
        if not self.model.lipschitz_frozen:
            self.model.freeze_lipschitz()

    def on_train_end(self, logs=None):
        self.model.freeze_lipschitz()
