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
  for every class and `+inf` for ⊥. A ⊥ logit that comes out NaN (NaN or
  inf constants, an epsilon that is not finite) is replaced, so that no
  backend's argmax can skip it; and `gloro_predictions` decides ⊥
  explicitly rather than trusting an argmax.
* Nothing is certified at an epsilon that is negative or not finite, nor
  from constants `K` whose diagonal is not finite (a finite diagonal is
  ignored: `f_j - f_j` is 0).

Relaxed robustness (`add_relaxed_bottom_logit`, Leino & Fredrikson 2021)
certifies the set `T` of the top-`k'` classes instead of the top class: no
input within `eps` lifts a class outside `T` above one inside it. The ⊥
logit then sits between the `k'`-th and `(k'+1)`-th largest logits, so the
classes strictly above it are exactly the certified set (`certified_top_k`).
"""

import numpy as np
from keras import ops

from gloro import backend

# Far above float32 rounding of one multiply-add (2**-24), far below any
# margin that matters.
MARGIN_SLACK = 2.0**-20


def _nudge(x):
    """A step that moves float32 `x` by at least one unit in the last place.

    Not nextafter: CPUs flushing denormals to zero would turn a step above 0
    back into a tie, which argmax resolves in favour of the class.
    """
    # A sum rather than `maximum(., tiny)`: it is never smaller, rounds to
    # the same value above the denormal range, and costs an operator rather
    # than a `keras.ops` call.
    return abs(x) * 2.0**-22 + _TINY


_TINY = float(np.finfo(np.float32).tiny)


def _diagonal_mask(m):
    """float32 `(m, m)`: -inf on the diagonal, 0 elsewhere. Built at each
    call (microseconds): torch's compiler (`jit_compile=True` on torch)
    cannot trace a cached read-only array, and a shared writable one could
    be changed."""
    return np.where(np.eye(m, dtype=bool), -np.inf, 0.0).astype(np.float32)


def add_bottom_logit(logits, margin_lipschitz, epsilon, certify=True):
    """Appends the ⊥ logit to a batch of logits.

    Args:
        logits: float tensor `(n, m)`.
        margin_lipschitz: float32 tensor `(m, m)`, `K[j, i]` bounds the
            Lipschitz constant of `f_j - f_i`.
        epsilon: float32 scalar tensor, the certified radius.
        certify: scalar bool tensor; where False (constants that no longer
            belong to the weights) nothing is certified and ⊥ is `+inf` on
            every row, as for rows with NaN/inf logits.

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
    # Kept to few operations, to tensor operators where they mean the same on
    # every backend, and to `backend.certificate_ops`: an eager caller on
    # torch pays for each `keras.ops` call several times what the
    # arithmetic costs.
    xp = backend.certificate_ops(logits)
    logits = xp.cast(logits, "float32")
    margin_lipschitz = xp.cast(margin_lipschitz, "float32")
    epsilon = xp.cast(epsilon, "float32")
    certify = xp.cast(certify, "bool")
    with xp.quiet():
        # The argmax's own column is masked with -inf on the (m, m) offsets
        # rather than on the (n, m) competitors: one small operation instead
        # of three on every row. Only the argmax itself is masked: a class
        # tied with it stays a competitor, so ties are never certified. (A
        # diagonal of the constants that is not finite leaves NaN there,
        # and a NaN ⊥ is never certified.)
        offsets = epsilon * margin_lipschitz + xp.convert_to_tensor(_diagonal_mask(logits.shape[1]))
        top = xp.max(logits, axis=1)
        bottom = xp.max(logits + xp.take(offsets, xp.argmax(logits, axis=1), axis=0), axis=1)
        finite = xp.finite_rows(logits)
        certified = (top - bottom > MARGIN_SLACK * (abs(top) + abs(bottom))) & finite & _valid_epsilon(epsilon)
        # A rejected row's ⊥ sits at least a nudge above the top logit. Not
        # ops.maximum: it returns NaN for a NaN ⊥ on some backends, which
        # TensorFlow's argmax then skips.
        floor = top + _nudge(top)
        bottom = xp.where(certified | (bottom > floor), bottom, floor)
        bottom = xp.where(finite & certify, bottom, np.inf)
        logits = xp.where(finite[:, None], logits, -np.inf)
        return xp.concatenate([logits, bottom[:, None]], axis=1)


def _valid_epsilon(epsilon):
    """Scalar bool tensor: epsilon is finite and >= 0. Two comparisons,
    which NaN fails: `isfinite` is four operations on torch."""
    return (epsilon >= 0.0) & (epsilon <= _FLOAT32_MAX)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_relaxation_k(k, num_classes):
    """Validates the `k` of top-`k` robustness.

    Args:
        k: the largest certified set size, an int with `1 <= k < num_classes`.
        num_classes: number of classes `m`.

    Returns:
        `k` as a Python int.

    Raises:
        ValueError: `k` is not an int or out of range.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an int, got {k!r} of type {type(k).__name__}.")
    if not 1 <= k < num_classes:
        raise ValueError(
            f"k must satisfy 1 <= k < m = {num_classes} (the number of classes), got "
            f"k={k}: a top-{num_classes} set holds every class and certifies nothing."
        )
    return int(k)


def add_relaxed_bottom_logit(logits, margin_lipschitz, epsilon, k, certify=True, affinity=None):
    """Appends a ⊥ logit certifying top-`k'` robustness (RTK), `k' <= k`.

    Let `T` be the top-`k'` classes (by index, from a descending sort that
    puts the lower index first among equal logits). `T` is certified when
    for every `j` in `T`, with `b_j = max_{i not in T} f_i + epsilon * K[j, i]`,
    `f_j - b_j > MARGIN_SLACK * (|f_j| + |b_j|)` (the test of
    `add_bottom_logit`, which `k = 1` reproduces exactly): then no input
    within `epsilon` lifts a class outside `T` above one inside it. A logit
    tied across the boundary of `T` never passes, whatever `epsilon`.

    The largest certified `k'` wins, and ⊥ is placed strictly between the
    `k'`-th and `(k'+1)`-th largest logits, at `f_(k') - min_{j in T} (f_j - b_j)`
    where that lies in between: the classes above ⊥ are exactly `T`. A point
    certified at no `k'` gets ⊥ above every class, at
    `f_(1) - max_k' min_{j in T} (f_j - b_j)`, so training can pull it down.

    Args:
        logits: float tensor `(n, m)`.
        margin_lipschitz: float32 tensor `(m, m)`, `K[j, i]` bounds the
            Lipschitz constant of `f_j - f_i`.
        epsilon: float32 scalar tensor, the certified radius.
        k: Python int, the largest set size, `1 <= k < m`.
        certify: scalar bool tensor; where False nothing is certified and
            ⊥ is `+inf` on every row (as in `add_bottom_logit`).
        affinity: None (every top-`k'` set counts), or a 0/1 array `(s, m)`
            whose rows are the admissible sets (affinity robustness): a
            top-`k'` set is certified only if it equals one of them.

    Returns:
        float32 tensor `(n, m + 1)`; `certified_top_k` reads the certified
        `k'` back (0: not certified), `gloro_predictions` the top class or ⊥.

    Raises:
        ValueError: bad `k` or `affinity` shape.

    Example:

    ```python
    logits = np.array([[3.0, 2.9, 0.0]], "float32")
    k = np.ones((3, 3), "float32") - np.eye(3, dtype="float32")
    out = add_relaxed_bottom_logit(logits, k, 1.0, 2)
    certified_top_k(out)  # [2]: classes 0 and 1 stay above class 2 within 1.0
    ```
    """
    logits = ops.cast(logits, "float32")
    margin_lipschitz = ops.cast(margin_lipschitz, "float32")
    epsilon = ops.cast(epsilon, "float32")
    m = logits.shape[1]
    k = check_relaxation_k(k, m)
    if affinity is not None:
        affinity = np.asarray(affinity)
        if affinity.ndim != 2 or affinity.shape[1] != m:
            raise ValueError(f"affinity must be a 0/1 matrix of shape (s, {m}), got shape {affinity.shape}.")
        affinity = ops.convert_to_tensor(affinity.astype(bool))
    # backend.top_k orders equal logits by index on every backend, so
    # membership never depends on comparing logit values.
    ranked, order = backend.top_k(logits, k + 1)
    # competitors[:, j, i] = f_i + epsilon * K[j, i], as in add_bottom_logit.
    competitors = logits[:, None, :] + epsilon * margin_lipschitz[None, :, :]
    classes = ops.arange(m, dtype="int32")
    finite = ops.all(ops.isfinite(logits), axis=1)
    allowed = ops.logical_and(finite, _valid_epsilon(epsilon))
    in_top = ops.zeros_like(logits, dtype="bool")
    certified = ops.zeros_like(finite)
    certified_bottom = ops.zeros_like(ranked[:, 0])
    best_margin = ops.full_like(ranked[:, 0], -np.inf)
    for rank in range(k):
        in_top = ops.logical_or(in_top, ops.equal(classes[None, :], ops.cast(order[:, rank : rank + 1], "int32")))
        outside = ops.max(ops.where(in_top[:, None, :], -np.inf, competitors), axis=2)
        margins = logits - outside
        passes = margins > MARGIN_SLACK * (ops.abs(logits) + ops.abs(outside))
        ok = ops.logical_and(ops.all(ops.logical_or(passes, ops.logical_not(in_top)), axis=1), allowed)
        if affinity is not None:
            matches = ops.all(ops.equal(in_top[:, None, :], affinity[None, :, :]), axis=2)
            ok = ops.logical_and(ok, ops.any(matches, axis=1))
        margin = ops.min(ops.where(in_top, margins, np.inf), axis=1)
        upper, lower = ranked[:, rank], ranked[:, rank + 1]
        placed = ops.minimum(ops.maximum(upper - margin, lower + _nudge(lower)), upper - _nudge(upper))
        # For logits near float32's smallest normals the two nudges can
        # overlap; ⊥ = the (k'+1)-th logit still leaves exactly T above it
        # (a certified T has upper > lower).
        placed = ops.maximum(placed, lower)
        # Ranks grow, so the last certified one is the largest k'.
        certified_bottom = ops.where(ok, placed, certified_bottom)
        certified = ops.logical_or(certified, ok)
        best_margin = ops.maximum(best_margin, margin)
    top = ranked[:, 0]
    floor = top + _nudge(top)
    rejected_bottom = ops.where(top - best_margin > floor, top - best_margin, floor)
    bottom = ops.where(certified, certified_bottom, rejected_bottom)
    bottom = ops.where(ops.logical_and(finite, certify), bottom, np.inf)
    logits = ops.where(finite[:, None], logits, -np.inf)
    return ops.concatenate([logits, bottom[:, None]], axis=1)


def certified_top_k(y_pred):
    """Size of the certified top-`k'` set of each row of a GloRo output.

    The classes whose logit is strictly above ⊥: for an RTK or affinity
    output (`add_relaxed_bottom_logit`), the certified set; for a plain
    GloroNet output, the predicted class alone (1) or nothing (0).

    Args:
        y_pred: tensor `(n, m + 1)`, ⊥ last.

    Returns:
        int32 tensor `(n,)`; 0 for rejected rows and rows with NaN/inf logits.

    Example:

    ```python
    certified_top_k(np.array([[3.0, 2.0, 0.0, 1.0]]))  # [2]
    ```
    """
    y_pred = ops.convert_to_tensor(y_pred)
    above = ops.sum(ops.cast(y_pred[:, :-1] > y_pred[:, -1:], "int32"), axis=1)
    finite = ops.all(ops.isfinite(y_pred[:, :-1]), axis=1)
    return ops.where(finite, above, 0)


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
        radii = np.where(np.isnan(k_rows), np.nan, radii)
    radii[np.arange(len(logits)), top_index] = np.inf
    radius = np.min(radii, axis=1)
    # NaN constants give NaN radii, which certify nothing.
    valid = np.all(np.isfinite(logits), axis=1) & ~np.isnan(radius)
    return np.where(valid, np.maximum(radius, 0.0), 0.0)


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
    logits, bottom = y_pred[:, :-1], y_pred[:, -1]
    prediction = ops.cast(ops.argmax(logits, axis=1), "int32")
    # Certified only where the top logit is strictly above ⊥: a NaN ⊥, a
    # tie with ⊥ or a non-finite logit gives ⊥ on every backend.
    certified = ops.logical_and(ops.max(logits, axis=1) > bottom, ops.all(ops.isfinite(logits), axis=1))
    return ops.where(certified, prediction, ops.cast(m, "int32"))


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
