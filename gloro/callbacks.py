"""Keras callbacks for training GloRo Nets.

* `EpsilonScheduler`, `TradesScheduler`, `LearningRateScheduler`: set epsilon,
  the TRADES weight lambda or the learning rate before every batch from a
  `gloro.schedules` string (values are interpolated within an epoch).
* `LipschitzRefresh`: makes the Lipschitz constants guaranteed before each
  validation pass and at the end of training (`GloroNet.fit` adds it).

Schedules are functions of the fraction of training done, so a run resumed by
`keras.callbacks.BackupAndRestore` (which restarts `fit` at the right epoch)
picks them up where they were. Give the base value explicitly when resuming:
by default it is read from the model when training starts, and a restored
model holds the scheduled value, not the base.
"""

import keras

from gloro import schedules


class _ScheduleCallback(keras.callbacks.Callback):
    """Sets `self._set(base * schedule(progress))` before every batch."""

    def __init__(self, schedule, base=None):
        super().__init__()
        self.schedule = schedules.parse(schedule)
        self.base = base
        self._epoch = 0
        self._last = None

    def on_train_begin(self, logs=None):
        if self.base is None:
            self.base = self._get()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        multiplier = self.schedule.at(self._epoch, batch, self.params["epochs"], self.params.get("steps"))
        value = self.base * multiplier
        # Assigning a variable from Python costs a host round trip; skip it
        # when the value has not moved (fixed or held segments).
        if value != self._last:
            self._set(value)
            self._last = value


class EpsilonScheduler(_ScheduleCallback):
    """Schedules a GloroNet's epsilon.

    Args:
        schedule: a `gloro.schedules` string or `Schedule`, e.g.
            `"[0.01]-log-[50%:1.1]"` (multipliers of `epsilon`).
        epsilon: the base value; defaults to the model's epsilon when
            training starts.

    Example:

    ```python
    g.fit(x, y, epochs=10, callbacks=[gloro.callbacks.EpsilonScheduler("[0.01]-log-[50%:1.1]", 0.3)])
    ```
    """

    def __init__(self, schedule, epsilon=None):
        super().__init__(schedule, epsilon)

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


class LearningRateScheduler(_ScheduleCallback):
    """Schedules the optimizer's learning rate with a `gloro.schedules` string.

    Args:
        schedule: a `gloro.schedules` string or `Schedule`, e.g.
            `"[1.]-[50%:1.]-cos-[0.001]"`.
        learning_rate: the base value; defaults to the optimizer's learning
            rate when training starts.

    Example:

    ```python
    g.fit(x, y, epochs=10, callbacks=[gloro.callbacks.LearningRateScheduler("cosine", 1e-3)])
    ```
    """

    def __init__(self, schedule, learning_rate=None):
        super().__init__(schedule, learning_rate)

    def _variable(self):
        lr = self.model.optimizer.learning_rate
        if not hasattr(lr, "assign"):
            raise ValueError(
                "LearningRateScheduler needs an optimizer with a constant "
                "learning rate, not a LearningRateSchedule."
            )
        return lr

    def _get(self):
        return float(self._variable().numpy())

    def _set(self, value):
        self._variable().assign(value)


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
