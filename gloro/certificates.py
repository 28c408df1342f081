"""The ⊥ ("not certified") logit, certified radii and GloRo predictions.

Given logits `f(x)` (n, m), the predicted class `j = argmax f(x)` and margin
Lipschitz constants `K[j, i]` (a bound on the Lipschitz constant of
`f_j - f_i`), the point is certified at radius `eps` when for every `i != j`

    f_j(x) - f_i(x) > eps * K[j, i]   (with slack, see below),

and then no input within L2 distance `eps` changes the prediction. The ⊥
logit is `max_{i != j} f_i(x) + eps * K[j, i]`, so `argmax` over the `m + 1`
logits is `j` exactly when `j` is certified, and ⊥ (index `m`) otherwise.

Soundness details:
* Ties for the top logit are never certified (the tied class makes the ⊥
  logit at least the top one), for any epsilon including 0.
* The test is made in float32 with a relative slack `MARGIN_SLACK` so that
  rounding in forming `f_i + eps * K` can only refuse a certificate, never
  grant one; the output ⊥ logit is then nudged to sit strictly above or below
  the top logit so that `argmax` agrees with the test.
* Rows with a NaN or inf logit are never certified: their output is `-inf`
  for every class and `+inf` for ⊥.
"""

import numpy as np
from keras import ops

# Far above float32 rounding of one multiply-add (2**-24), far below any
# margin that matters.
MARGIN_SLACK = 2.0**-20


def add_bottom_logit(logits, margin_lipschitz, epsilon, certify=True):
    """Appends the ⊥ logit to a batch of logits.

    Args:
        logits: float tensor `(n, m)`.
        margin_lipschitz: float32 tensor `(m, m)`, `K[j, i]` bounds the
            Lipschitz constant of `f_j - f_i`.
        epsilon: float32 scalar tensor, the certified radius.
        certify: scalar bool tensor; where False nothing is certified (used
            while the constants are stale).

    Returns:
        float32 tensor `(n, m + 1)`.

    Example:

    ```python
    logits = np.array([[3.0, 1.0], [1.0, 1.0]], "float32")
    k = np.array([[0.0, 2.0], [2.0, 0.0]], "float32")
    add_bottom_logit(logits, k, 0.5, True)
    # [[3, 1, 2]: certified (2 > 1 + 0.5 * 2), [1, 1, 2]: a tie, never certified]
    ```
    """
    logits = ops.cast(logits, "float32")
    margin_lipschitz = ops.cast(margin_lipschitz, "float32")
    epsilon = ops.cast(epsilon, "float32")
    top_index = ops.cast(ops.argmax(logits, axis=1), "int32")
    top = ops.max(logits, axis=1)
    k_rows = ops.take(margin_lipschitz, top_index, axis=0)
    competitors = logits + epsilon * k_rows
    # Only the argmax itself is masked: a class tied with it stays a
    # competitor, so ties are never certified.
    classes = ops.arange(ops.shape(logits)[1], dtype="int32")
    is_top = ops.equal(classes[None, :], top_index[:, None])
    bottom = ops.max(ops.where(is_top, -np.inf, competitors), axis=1)
    finite = ops.all(ops.isfinite(logits), axis=1)
    certified = ops.logical_and(
        ops.logical_and(top - bottom > MARGIN_SLACK * (ops.abs(top) + ops.abs(bottom)), finite),
        ops.cast(certify, "bool"),
    )
    # Not nextafter: CPUs flushing denormals to zero would turn the nudge
    # above 0 back into a tie, which argmax resolves in favour of the class.
    nudge = ops.maximum(ops.abs(top) * 2.0**-22, np.finfo(np.float32).tiny)
    rejected_bottom = ops.maximum(bottom, top + nudge)
    bottom = ops.where(certified, bottom, rejected_bottom)
    bottom = ops.where(finite, bottom, np.inf)
    logits = ops.where(finite[:, None], logits, -np.inf)
    return ops.concatenate([logits, bottom[:, None]], axis=1)


def certified_radius(logits, margin_lipschitz):
    """Largest radius at which each prediction is certified.

    `min_{i != j} (f_j - f_i) / K[j, i]`, reduced by the same slack as the
    ⊥ logit's test; 0 for ties and non-finite rows, inf when every competing
    margin is constant (`K[j, i] = 0`).

    Args:
        logits: array `(n, m)`.
        margin_lipschitz: array `(m, m)`.

    Returns:
        float64 numpy array `(n,)`.
    """
    logits = np.asarray(logits, np.float64)
    k = np.asarray(margin_lipschitz, np.float64)
    if logits.shape[0] == 0:
        return np.zeros((0,))
    top_index = np.argmax(logits, axis=1)
    top = logits[np.arange(len(logits)), top_index]
    k_rows = k[top_index]
    # Rows with inf/NaN give invalid arithmetic here; they are zeroed below.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        gaps = top[:, None] - logits - 2 * MARGIN_SLACK * (np.abs(top)[:, None] + np.abs(logits))
        radii = np.where(k_rows > 0, gaps / k_rows, np.where(gaps > 0, np.inf, 0.0))
    radii[np.arange(len(logits)), top_index] = np.inf
    radius = np.maximum(np.min(radii, axis=1), 0.0)
    finite = np.all(np.isfinite(logits), axis=1)
    return np.where(finite, radius, 0.0)


def gloro_predictions(y_pred):
    """Class predicted by a GloroNet output; `m` (⊥) where not certified.

    Args:
        y_pred: tensor `(n, m + 1)` of GloroNet logits.

    Returns:
        int32 tensor `(n,)`.

    Example:

    ```python
    gloro_predictions(g.predict(x))  # m where g does not certify
    ```
    """
    y_pred = ops.convert_to_tensor(y_pred)
    m = ops.shape(y_pred)[1] - 1
    prediction = ops.cast(ops.argmax(y_pred, axis=1), "int32")
    finite = ops.all(ops.isfinite(y_pred[:, :-1]), axis=1)
    return ops.where(finite, prediction, ops.cast(m, "int32"))


def _rank(shape):
    # A TensorFlow tensor traced without a known rank has no length.
    try:
        return len(shape)
    except (TypeError, ValueError):
        return None


def sparse_labels(y_true, num_classes):
    """Integer class labels from sparse or one-hot labels.

    Args:
        y_true: labels shaped `(n,)` or `(n, 1)` (class indices) or
            `(n, num_classes)` (one-hot or soft labels, argmax is taken).
        num_classes: number of real classes `m` (⊥ is never a label).

    Returns:
        int32 tensor `(n,)`.

    Raises:
        ValueError: the shape matches neither form.

    Example:

    ```python
    sparse_labels(np.array([[0, 0, 1], [1, 0, 0]]), 3)  # [2, 0]
    ```
    """
    y_true = ops.convert_to_tensor(y_true)
    shape = tuple(y_true.shape) if _rank(y_true.shape) is not None else None
    # Keras' loss wrapper squeezes an (n, 1) label tensor with a dynamic
    # shape, which loses the rank: such labels are sparse.
    if shape is None or len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
        return ops.cast(ops.reshape(y_true, (-1,)), "int32")
    if len(shape) == 2 and shape[1] == num_classes:
        return ops.cast(ops.argmax(y_true, axis=1), "int32")
    raise ValueError(
        f"Labels of shape {shape} match neither sparse labels (n,) or "
        f"(n, 1) nor one-hot labels (n, {num_classes}) for a model with "
        f"{num_classes} classes."
    )
