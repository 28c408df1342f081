"""Losses for GloRo Nets, on the `m + 1` logits (the last one is ⊥).

Labels may be sparse (`(n,)` or `(n, 1)` class indices) or one-hot / soft
(`(n, m)`); ⊥ is never a label, so one-hot targets get a zero column for it.

`compile` shorthands (see `get`): `"crossentropy"`, `"sparse_crossentropy"`,
`"trades_kl.<lambda>"`, `"sparse_trades_kl.<lambda>"`, `"trades_ce.<lambda>"`,
`"sparse_trades_ce.<lambda>"`. The `sparse_` forms are accepted for
familiarity; both forms read either kind of label.
"""

import re

import keras
import tensorflow as tf

from gloro.certificates import sparse_labels


def _targets(y_true, num_classes):
    """Probability targets over the `m + 1` outputs (zero mass on ⊥)."""
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == 2 and y_true.shape[1] == num_classes and num_classes > 1:
        probs = tf.cast(y_true, tf.float32)
    else:
        probs = tf.one_hot(sparse_labels(y_true, num_classes), num_classes)
    return tf.pad(probs, [[0, 0], [0, 1]])


def _num_classes(y_pred):
    if y_pred.shape.rank != 2 or y_pred.shape[1] is None or y_pred.shape[1] < 2:
        raise ValueError(
            f"A GloRo loss expects predictions of shape (n, m + 1), got {tuple(y_pred.shape)}."
        )
    return y_pred.shape[1] - 1


@keras.saving.register_keras_serializable(package="gloro")
class Crossentropy(keras.losses.Loss):
    """Cross-entropy on the `m + 1` GloRo logits.

    Minimising it maximises verified-robust accuracy: the true class must beat
    the ⊥ logit, which only happens when the point is certified.

    Example:

    ```python
    g.compile(optimizer="adam", loss=gloro.losses.Crossentropy())
    ```
    """

    def __init__(self, name="crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        y_pred = tf.cast(y_pred, tf.float32)
        targets = _targets(y_true, _num_classes(y_pred))
        return _crossentropy(targets, y_pred)


def _crossentropy(targets, logits):
    # Terms with zero target mass are dropped explicitly: -inf logits (rows
    # with non-finite inputs) would otherwise give 0 * inf = NaN.
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    return -tf.reduce_sum(tf.where(targets > 0, targets * log_probs, 0.0), axis=-1)


@keras.saving.register_keras_serializable(package="gloro")
class Trades(keras.losses.Loss):
    """TRADES-style GloRo loss (GloRo-T).

    `CE(f(x), y) + lambda * D(p, q)`, where `p = softmax(f(x))` over the `m`
    clean logits padded with 0 for ⊥, `q = softmax` of all `m + 1` GloRo
    logits, and `D` is `KL(p || q)` (`kind="kl"`) or the cross-entropy
    `-sum p log q` (`kind="ce"`). `lam` is a variable, so
    `gloro.callbacks.TradesScheduler` can change it during `fit`.

    Args:
        lam: the weight lambda, a non-negative float.
        kind: `"kl"` or `"ce"`.

    Example:

    ```python
    g.compile(optimizer="adam", loss=gloro.losses.Trades(1.5))  # = "trades_kl.1.5"
    ```
    """

    def __init__(self, lam=1.0, kind="kl", name=None, **kwargs):
        if kind not in ("kl", "ce"):
            raise ValueError(f"kind must be 'kl' or 'ce', got {kind!r}.")
        super().__init__(name=name or f"trades_{kind}", **kwargs)
        self.kind = kind
        self.lam = keras.Variable(_check_lambda(lam), trainable=False, dtype="float32", name="trades_lambda")

    def call(self, y_true, y_pred):
        y_pred = tf.cast(y_pred, tf.float32)
        m = _num_classes(y_pred)
        clean = y_pred[:, :m]
        clean_loss = _crossentropy(_targets(y_true, m)[:, :m], clean)
        p = tf.pad(tf.nn.softmax(clean, axis=-1), [[0, 0], [0, 1]])
        divergence = _crossentropy(p, y_pred)
        if self.kind == "kl":
            divergence -= -tf.reduce_sum(tf.where(p > 0, p * tf.math.log(p), 0.0), axis=-1)
        return clean_loss + tf.cast(self.lam, tf.float32) * divergence

    def get_config(self):
        return {**super().get_config(), "lam": float(self.lam.numpy()), "kind": self.kind}


def _check_lambda(lam):
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or lam == float("inf"):
        raise ValueError(f"The TRADES weight lambda must be a finite number >= 0, got {lam!r}.")
    return float(lam)


_TRADES = re.compile(r"^(sparse_)?trades_(kl|ce)\.(.+)$")


def get(identifier):
    """Resolves a loss: a gloro shorthand, else anything `keras.losses.get` takes.

    Args:
        identifier: a string shorthand, a loss object or a Keras identifier.

    Returns:
        a loss.

    Raises:
        ValueError: a malformed shorthand (the message quotes it).
    """
    if not isinstance(identifier, str):
        return identifier
    if identifier in ("crossentropy", "sparse_crossentropy"):
        return Crossentropy()
    match = _TRADES.match(identifier)
    if identifier.startswith(("trades", "sparse_trades")):
        if not match:
            raise ValueError(
                f"Malformed loss {identifier!r}: expected 'trades_kl.<lambda>' or "
                "'trades_ce.<lambda>' (optionally prefixed 'sparse_'), e.g. 'trades_kl.1.5'."
            )
        try:
            lam = float(match.group(3))
        except ValueError:
            raise ValueError(f"Malformed loss {identifier!r}: {match.group(3)!r} is not a number.") from None
        return Trades(lam, kind=match.group(2))
    return keras.losses.get(identifier)
