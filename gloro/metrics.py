"""Metrics of GloRo Nets, on the `m + 1` logits (the last one is ⊥).

* `CleanAccuracy` (`"clean_acc"`): argmax of the first `m` logits is the label.
* `VerifiedRobustAccuracy` (`"vra"`): the GloRo prediction (argmax of all
  `m + 1`) is the label, i.e. correct *and* certified.
* `RejectionRate` (`"rejection_rate"`): fraction predicted ⊥.

Relaxed robustness (`gloro.relaxations`) places ⊥ so that the classes above
it are the certified top-`k'` set; these metrics read that set:

* `RtkVerifiedRobustAccuracy` (`"rtk_vra"`): the label's logit is strictly
  above ⊥, i.e. the label is in the certified set.
  `AffinityVerifiedRobustAccuracy` (`"affinity_vra"`) is the same measure
  under the name used for affinity robustness.
* `CertifiedK` (`"certified_k"`): mean size of the certified set (0 where
  nothing is certified).

On a plain `GloroNet` output the certified set is the predicted class alone,
so `rtk_vra` equals `vra` and `certified_k` is 1 minus the rejection rate.

Rows with a NaN or inf logit count as rejected and wrong.
"""

import keras
from keras import ops

from gloro.certificates import certified_top_k, gloro_predictions, sparse_labels


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


@keras.saving.register_keras_serializable(package="gloro")
class RtkVerifiedRobustAccuracy(_GloroMean):
    """Fraction of points whose label is in the certified top-`k'` set.

    The label's logit must be strictly above ⊥ (see
    `gloro.certificates.add_relaxed_bottom_logit`).

    Example:

    ```python
    g = gloro.relaxations.RtkGloroNet(x, y, epsilon=0.3, k=2)
    g.compile(optimizer="adam", loss="crossentropy", metrics=[gloro.metrics.RtkVerifiedRobustAccuracy()])
    ```
    """

    def __init__(self, name="rtk_vra", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def _values(self, labels, y_pred, m):
        label_logit = ops.take_along_axis(y_pred[:, :m], labels[:, None], axis=1)[:, 0]
        finite = ops.all(ops.isfinite(y_pred[:, :m]), axis=1)
        return ops.logical_and(label_logit > y_pred[:, m], finite)


@keras.saving.register_keras_serializable(package="gloro")
class AffinityVerifiedRobustAccuracy(RtkVerifiedRobustAccuracy):
    """`RtkVerifiedRobustAccuracy` named for affinity robustness: the label
    is in the certified set, which is one of the affinity sets.

    Example:

    ```python
    g = gloro.relaxations.AffinityGloroNet(x, y, epsilon=0.3, affinity_sets=[[0, 1], [2]])
    g.compile(optimizer="adam", loss="crossentropy", metrics=[gloro.metrics.AffinityVerifiedRobustAccuracy()])
    ```
    """

    def __init__(self, name="affinity_vra", dtype=None):
        super().__init__(name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="gloro")
class CertifiedK(_GloroMean):
    """Mean size of the certified top-`k'` set (0 where not certified).

    Example:

    ```python
    g = gloro.relaxations.RtkGloroNet(x, y, epsilon=0.3, k=2)
    g.compile(optimizer="adam", loss="crossentropy", metrics=[gloro.metrics.CertifiedK()])
    ```
    """

    def __init__(self, name="certified_k", dtype=None):
        super().__init__(name=name, dtype=dtype)

    def _values(self, labels, y_pred, m):
        return certified_top_k(y_pred)


_SHORTHANDS = {
    "clean_acc": CleanAccuracy,
    "vra": VerifiedRobustAccuracy,
    "rejection_rate": RejectionRate,
    "rtk_vra": RtkVerifiedRobustAccuracy,
    "affinity_vra": AffinityVerifiedRobustAccuracy,
    "certified_k": CertifiedK,
}


def get(identifier):
    """Resolves a metric: `"clean_acc"`, `"vra"`, `"rejection_rate"`,
    `"rtk_vra"`, `"affinity_vra"`, `"certified_k"`, else anything Keras'
    `compile` accepts (returned unchanged).

    Args:
        identifier: a shorthand string, a metric object or a Keras identifier.

    Returns:
        a metric or the identifier.
    """
    if isinstance(identifier, str) and identifier in _SHORTHANDS:
        return _SHORTHANDS[identifier]()
    return identifier
