"""Metrics of GloRo Nets, on the `m + 1` logits (the last one is ⊥).

* `CleanAccuracy` (`"clean_acc"`): argmax of the first `m` logits is the label.
* `VerifiedRobustAccuracy` (`"vra"`): the GloRo prediction (argmax of all
  `m + 1`) is the label, i.e. correct *and* certified.
* `RejectionRate` (`"rejection_rate"`): fraction predicted ⊥.

Rows with a NaN or inf logit count as rejected and wrong.
"""

import keras
from keras import ops

from gloro.certificates import gloro_predictions, sparse_labels


class _GloroMean(keras.metrics.Mean):
    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        m = y_pred.shape[-1] - 1
        values = ops.cast(self._values(sparse_labels(y_true, m), y_pred, m), self.dtype)
        return super().update_state(values, sample_weight=sample_weight)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="gloro")
class CleanAccuracy(_GloroMean):
    """Accuracy of the underlying model, ignoring ⊥.

    Example:

    ```python
    g.compile(optimizer="adam", loss="crossentropy", metrics=[gloro.metrics.CleanAccuracy()])
    ```
    """

    def __init__(self, name="clean_acc", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def _values(self, labels, y_pred, m):
        clean = ops.cast(ops.argmax(y_pred[:, :m], axis=1), "int32")
        finite = ops.all(ops.isfinite(y_pred[:, :m]), axis=1)
        return ops.logical_and(ops.equal(clean, labels), finite)


@keras.saving.register_keras_serializable(package="gloro")
class VerifiedRobustAccuracy(_GloroMean):
    """Fraction of points predicted correctly *and* certified.

    Example:

    ```python
    g.compile(optimizer="adam", loss="crossentropy", metrics=[gloro.metrics.VerifiedRobustAccuracy()])
    ```
    """

    def __init__(self, name="vra", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def _values(self, labels, y_pred, m):
        return ops.equal(gloro_predictions(y_pred), labels)


@keras.saving.register_keras_serializable(package="gloro")
class RejectionRate(_GloroMean):
    """Fraction of points predicted ⊥ (not certified).

    Example:

    ```python
    g.compile(optimizer="adam", loss="crossentropy", metrics=[gloro.metrics.RejectionRate()])
    ```
    """

    def __init__(self, name="rejection_rate", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def _values(self, labels, y_pred, m):
        return ops.equal(gloro_predictions(y_pred), m)


_SHORTHANDS = {
    "clean_acc": CleanAccuracy,
    "vra": VerifiedRobustAccuracy,
    "rejection_rate": RejectionRate,
}


def get(identifier):
    """Resolves a metric: `"clean_acc"`, `"vra"`, `"rejection_rate"`, else
    anything Keras' `compile` accepts (returned unchanged).

    Args:
        identifier: a shorthand string, a metric object or a Keras identifier.

    Returns:
        a metric or the identifier.
    """
    if isinstance(identifier, str) and identifier in _SHORTHANDS:
        return _SHORTHANDS[identifier]()
    return identifier
