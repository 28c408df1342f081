"""Losses for GloRo Nets, on the `m + 1` logits (the last one is ⊥).

Labels may be sparse (`(n,)` or `(n, 1)` class indices) or one-hot / soft
(`(n, m)`); ⊥ is never a label, so one-hot targets get a zero column for it.

`compile` shorthands (see `get`): `"crossentropy"`, `"sparse_crossentropy"`,
`"trades_kl.<lambda>"`, `"sparse_trades_kl.<lambda>"`, `"trades_ce.<lambda>"`,
`"sparse_trades_ce.<lambda>"`, `"emma"`, `"sparse_emma"`. The `sparse_` forms are accepted for
familiarity; both forms read either kind of label.

Keras losses that read their input as probabilities (`from_logits=False`,
such as `"sparse_categorical_crossentropy"`) are refused: a GloroNet outputs
logits.
"""

import contextlib
import inspect
import re

import keras
from keras import ops

from gloro.certificates import _rank, sparse_labels


def _targets(y_true, num_classes):
    """Probability targets over the `m + 1` outputs (zero mass on ⊥)."""
    y_true = ops.convert_to_tensor(y_true)
    shape = y_true.shape
    if _rank(shape) == 2 and shape[1] == num_classes and num_classes > 1:
        probs = ops.cast(y_true, "float32")
    else:
        probs = ops.one_hot(sparse_labels(y_true, num_classes), num_classes, dtype="float32")
    return ops.pad(probs, [[0, 0], [0, 1]])


def _num_classes(y_pred):
    shape = y_pred.shape
    if len(shape) != 2 or shape[1] is None or shape[1] < 2:
        raise ValueError(
            f"A GloRo loss expects predictions of shape (n, m + 1), got {tuple(shape)}."
        )
    return shape[1] - 1


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
        y_pred = ops.cast(y_pred, "float32")
        targets = _targets(y_true, _num_classes(y_pred))
        return _crossentropy(targets, y_pred)


def _crossentropy(targets, logits):
    # Terms with zero target mass are dropped explicitly: -inf logits (rows
    # with non-finite inputs) would otherwise give 0 * inf = NaN.
    log_probs = ops.log_softmax(logits, axis=-1)
    return -ops.sum(ops.where(targets > 0, targets * log_probs, 0.0), axis=-1)


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

    @property
    def variables(self):
        """The loss's state, `[lam]`.

        A model compiled with this loss must pass these variables to its
        training step as state (`GloroNet` does): a step compiled as a pure
        function, as on JAX, would otherwise keep the value it was traced
        with and never see `TradesScheduler`'s changes.
        """
        return [self.lam]

    def call(self, y_true, y_pred):
        y_pred = ops.cast(y_pred, "float32")
        m = _num_classes(y_pred)
        clean = y_pred[:, :m]
        clean_loss = _crossentropy(_targets(y_true, m)[:, :m], clean)
        log_p = ops.log_softmax(clean, axis=-1)
        p = ops.exp(log_p)
        divergence = _crossentropy(ops.pad(p, [[0, 0], [0, 1]]), y_pred)
        if self.kind == "kl":
            # KL(p || q) = CE(p, q) - H(p); log_softmax keeps H finite where
            # a probability underflows to 0.
            divergence = divergence + ops.sum(p * log_p, axis=-1)
        return clean_loss + ops.cast(self.lam, "float32") * divergence

    def get_config(self):
        return {**super().get_config(), "lam": float(self.lam.numpy()), "kind": self.kind}


def _check_lambda(lam):
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or lam == float("inf"):
        raise ValueError(f"The TRADES weight lambda must be a finite number >= 0, got {lam!r}.")
    return float(lam)


# The smallest share of epsilon by which EMMA raises a competing class, so
# that a class already past the true one still gets pushed back a little.
EMMA_MIN_SHARE = 0.01


@keras.saving.register_keras_serializable(package="gloro")
class Emma(keras.losses.Loss):
    """Efficient margin maximisation (EMMA), the loss of LiResNet.

    For the true class `y` and each other class `i`, the logit `f_i` is
    raised by `s_i * epsilon * K[y, i]`, an adaptive share of the margin that
    certification needs, with
    `s_i = stop_gradient(clip((f_y - f_i) / (epsilon * K[y, i]), 0.01, 1))`,
    and the loss is the cross-entropy of the raised logits with label `y`.
    Every close class is pushed back at once, each by as much as it threatens
    `y`, instead of only the one that the ⊥ logit picks (Hu et al., NeurIPS
    2023). It reads `K` and `epsilon` of the forward pass itself, so it
    follows `gloro.callbacks.EpsilonScheduler` and the power-iteration
    estimates during training; `GloroNet.compute_loss` hands them over.
    Labels may be sparse or one-hot (the argmax is the true class).

    Example:

    ```python
    g.compile(optimizer="adam", loss="emma")    # = gloro.losses.Emma()
    ```
    """

    def __init__(self, name="emma", **kwargs):
        super().__init__(name=name, **kwargs)
        self._margins = None

    @contextlib.contextmanager
    def margins(self, margin_lipschitz, epsilon):
        """Makes the forward pass's constants visible to `call`.

        Args:
            margin_lipschitz: tensor `(m, m)`, the `K` of the forward pass.
            epsilon: scalar tensor, its epsilon.
        """
        self._margins = (margin_lipschitz, epsilon)
        try:
            yield self
        finally:
            self._margins = None

    def call(self, y_true, y_pred):
        if self._margins is None:
            raise ValueError(
                "The EMMA loss needs the margin Lipschitz constants of the forward "
                "pass that gave y_pred; compile it into a GloroNet "
                "(g.compile(loss='emma')), which provides them."
            )
        margin_lipschitz, epsilon = self._margins
        y_pred = ops.cast(y_pred, "float32")
        m = _num_classes(y_pred)
        logits = y_pred[:, :m]
        labels = sparse_labels(y_true, m)
        radius = ops.cast(epsilon, "float32") * ops.take(ops.cast(margin_lipschitz, "float32"), labels, axis=0)
        true = ops.take_along_axis(logits, labels[:, None], axis=1)
        # K[y, y] = 0, so the true class itself is never raised.
        positive = radius > 0
        share = ops.where(positive, (true - logits) / ops.where(positive, radius, 1.0), 1.0)
        share = ops.stop_gradient(ops.clip(share, EMMA_MIN_SHARE, 1.0))
        raised = logits + share * radius
        return _crossentropy(ops.one_hot(labels, m, dtype="float32"), raised)


_TRADES = re.compile(r"^(sparse_)?trades_(kl|ce)\.(.+)$")


def _expects_probabilities(loss):
    """True for a Keras loss that reads its input as probabilities."""
    if isinstance(loss, keras.losses.Loss):
        return loss.get_config().get("from_logits") is False
    if callable(loss):
        try:
            parameter = inspect.signature(loss).parameters.get("from_logits")
        except (TypeError, ValueError):
            return False
        return parameter is not None and parameter.default is False
    return False


def _loss_name(loss):
    return getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__


def get(identifier):
    """Resolves a loss: a gloro shorthand, else anything `keras.losses.get` takes.

    `GloroNet.compile` calls it on its `loss` argument.

    Args:
        identifier: a string shorthand, a loss object or a Keras identifier.

    Returns:
        a loss.

    Raises:
        ValueError: a malformed shorthand (the message quotes it), or a Keras
            loss that reads its input as probabilities (`from_logits=False`):
            a GloroNet outputs `m + 1` logits, so the message names the gloro
            shorthand to use instead.

    Example:

    ```python
    gloro.losses.get("trades_kl.1.5")   # Trades(1.5, kind="kl")
    gloro.losses.get("sparse_categorical_crossentropy")  # ValueError: use "sparse_crossentropy"
    ```
    """
    if isinstance(identifier, str):
        if identifier in ("crossentropy", "sparse_crossentropy"):
            return Crossentropy()
        if identifier in ("emma", "sparse_emma"):
            return Emma()
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
        loss = keras.losses.get(identifier)
        name = identifier
    else:
        loss = identifier
        name = _loss_name(loss)
    if _expects_probabilities(loss):
        sparse = "sparse" in f"{name} {type(loss).__name__}".lower()
        shorthand = "sparse_crossentropy" if sparse else "crossentropy"
        raise ValueError(
            f"Loss {name!r} reads the model's outputs as probabilities "
            "(from_logits=False), but a GloroNet outputs m + 1 logits (the last "
            f"one is ⊥). Use loss={shorthand!r} (gloro's cross-entropy on the "
            "GloRo logits), or a Keras loss with from_logits=True."
        )
    return loss
