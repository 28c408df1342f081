"""Empirical audits of GloRo certificates: L2 attacks and Lipschitz lower bounds.

A GloRo Net certifies its prediction `j` at `x` for radius `epsilon` when, for
every other class `i`, `f_j(x) - f_i(x) > epsilon * K_ji`, with `K_ji` an upper
bound on the L2 Lipschitz constant of the margin `f_j - f_i`. Two things here
put such claims to an empirical test:

* `pgd_l2`, a strong L2 projected-gradient attack (random restarts that also
  cycle through targeted losses) that looks for a point within distance
  `epsilon` of `x` where the logits model predicts another class.
* `empirical_margin_lipschitz`, which finds pairs of points (and local
  gradients) that witness how steep each margin `f_i - f_j` really is: a
  *lower* bound on its Lipschitz constant.

What an audit proves, and what it does not:

* An attack that **succeeds** on a certified point, or an empirical Lipschitz
  value that **exceeds** the matching `K_ji`, proves that the certificate (or
  the bound) is wrong, up to floating-point error: the adversarial point and
  the witness pairs are concrete and can be checked by hand.
* An attack that **fails** proves nothing. Gradient methods find local optima;
  robustness is only established by the certificate itself. Likewise, an
  empirical Lipschitz value below `K_ji` says nothing about how tight `K_ji`
  is in the worst case, only that these searches found nothing steeper.

Both functions take the *underlying logits model* (no bottom logit) as a Keras
model or any callable that the Keras backend can differentiate (written with
`keras.ops`, say), and run on the TensorFlow and JAX backends.
"""

import dataclasses
import functools
import math
import numbers
import weakref

import keras
import numpy as np

from gloro import backend

# The projection targets a radius a hair under epsilon: float32 rounding of
# `x + delta` and of the norm then cannot push an iterate that should lie on
# the sphere outside of it (and so get it rejected). It costs a relative
# 1e-6 of attack strength.
_PROJECTION_SHRINK = 1.0 - 1e-6

# The public contract is `||x_adv - x||_2 <= epsilon * (1 + 1e-6)`, checked
# in float64 on the returned float32 arrays.
_BALL_TOLERANCE = 1e-6

# A random offset of this size (relative to the search scale) keeps the
# Lipschitz search off the exact points given: at a ReLU kink autodiff returns
# a one-sided mix of gradients that need not be the gradient of any nearby
# linear piece, and so need not be a valid lower bound.
_KINK_ESCAPE = 1e-4

# Smallest separation of a witness pair, relative to the search scale; pairs
# also start this far apart. It keeps the ascent steps (which scale with the
# separation) from stalling.
_MIN_SEPARATION = 0.1

# Each ascent step moves the pair by this multiple of its separation (capped
# at the search scale, so the pair drifts away from the data at most
# linearly). Tuned on random ReLU networks, where it beats dense random
# sampling of gradient norms at equal cost.
_ASCENT_STEP = 2.0

# A ratio |g(a) - g(b)| / ||a - b|| is only trusted when the pair is at least
# this many units of roundoff (of the dtype the model computes its logits in)
# apart, relative to its size: rounding of g is relative to the magnitude of
# the inputs, and dividing it by a small separation could report a slope that
# does not exist. For float32 that is a separation of 1.2% of ||a||; for
# float16 and bfloat16 no pair qualifies, and only gradient norms count.
_RATIO_TRUST_ROUNDOFFS = 1e5
_ROUNDOFF = {
    "float16": 2.0**-10,
    "bfloat16": 2.0**-7,
    "float32": 2.0**-23,
    "float64": 2.0**-52,
}


# Compiled runs per Keras model, so that repeated calls (a sweep over
# epsilon, a loop over chunks of a data set) trace once. The runs take the
# model's weights as arguments, so weight changes between calls are seen (JAX
# would bake weights read while tracing into the compiled run). Models are
# held weakly, and the runs reach them only through weak references, so the
# cache never keeps a model alive.
_COMPILED = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class AttackResult:
    """Outcome of `pgd_l2`, one entry per example.

    Attributes:
        x_adv: the lowest-margin point found, inside the L2 ball of radius
            `epsilon` around `x` (`x` itself when nothing better was found).
        margin: `f_y(x_adv) - max_{i != y} f_i(x_adv)` for the attacked class
            `y`. Negative (or zero) means the prediction changed.
        clean_margin: the same margin at `x`.
        success: `margin <= 0`. A tie counts as success: a certificate claims
            a strictly positive margin everywhere in the ball.
    """

    x_adv: np.ndarray
    margin: np.ndarray
    clean_margin: np.ndarray
    success: np.ndarray

    def relative_reduction(self):
        """Fraction of the clean margin that the attack removed.

        Returns:
            float numpy array `(n,)`, `(clean_margin - margin) / clean_margin`:
            0 when the attack found nothing, 1 when it reached the decision
            boundary, above 1 when it crossed it. NaN where the clean margin
            is exactly 0.
        """
        clean = self.clean_margin.astype(np.float64)
        reduction = clean - self.margin.astype(np.float64)
        safe = np.where(clean == 0, 1.0, clean)
        return np.where(clean == 0, np.nan, reduction / safe)


def _as_batch(x):
    x = np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float32)
    if x.ndim < 2:
        raise ValueError(
            "x must be a batch of shape (n, ...) with at least 2 dimensions, "
            f"got shape {x.shape}."
        )
    if x.shape[0] == 0:
        raise ValueError("x must contain at least one example.")
    if not np.all(np.isfinite(x)):
        raise ValueError("x contains NaN or infinite values.")
    return x


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _check_nonnegative(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}.")
    return value


def _logits(f, x, batch_size):
    """Logits of `f` on `x` in batches, checked to be a finite (n, m) array.

    Returns:
        a tuple `(logits, dtype)`: the float32 numpy logits and the name of
        the dtype `f` computes them in.
    """
    parts = []
    for start in range(0, x.shape[0], batch_size):
        out = f(keras.ops.convert_to_tensor(x[start : start + batch_size]))
        dtype = keras.backend.standardize_dtype(out.dtype)
        parts.append(np.asarray(keras.ops.convert_to_numpy(out), np.float32))
    logits = np.concatenate(parts)
    if not np.all(np.isfinite(logits)):
        raise ValueError("f returned NaN or infinite logits on x.")
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(
            "f must map a batch (n, ...) to logits of shape (n, m), got "
            f"{logits.shape} for an input of shape {x.shape}."
        )
    if logits.shape[1] < 2:
        raise ValueError(f"f must output at least 2 classes, got {logits.shape[1]}.")
    return logits, dtype


def _margins(logits, labels):
    """`f_y - max_{i != y} f_i` per row, in numpy."""
    rows = np.arange(logits.shape[0])
    others = logits.copy()
    others[rows, labels] = -np.inf
    return logits[rows, labels] - others.max(axis=1)


def _flat_norms(t):
    """L2 norm of each example of a batch."""
    flat = keras.ops.reshape(t, (-1, math.prod(t.shape[1:])))
    return keras.ops.sqrt(keras.ops.sum(keras.ops.square(flat), axis=1))


def _broadcast_rows(v, like):
    """Reshape a per-example vector so it broadcasts against batch `like`."""
    return keras.ops.reshape(v, (-1,) + (1,) * (len(like.shape) - 1))


def _sphere(rng, shape, radius):
    """Points at distance `radius` from 0 in uniformly random directions."""
    n = shape[0]
    direction = rng.standard_normal((n, int(np.prod(shape[1:]))))
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-30)
    return (radius * direction).reshape(shape)


def _uniform_ball(rng, shape, radius):
    """Points distributed uniformly in the L2 ball of `radius`, per row."""
    dim = int(np.prod(shape[1:]))
    # Volume grows like r**dim, so the radius of a uniform point is U**(1/dim).
    r = radius * rng.uniform(size=(shape[0],)) ** (1.0 / dim)
    r = r.reshape((-1,) + (1,) * (len(shape) - 1))
    return (_sphere(rng, shape, 1.0) * r).astype(np.float32)


def _bucket(rows, batch_size):
    """Rows to pad a batch to before a compiled run.

    Compiled runs are traced per input shape: padding a short batch to the
    next power of two (at most `batch_size`) bounds the shapes, and so the
    traces, that calls with varying sizes need.

    Args:
        rows: examples in the batch, `1 <= rows <= batch_size`.
        batch_size: the largest batch.

    Returns:
        int, the padded number of rows.
    """
    return min(batch_size, 1 << (rows - 1).bit_length())


def _pad(array, rows):
    """Repeats the last row of a batch.

    Examples are independent, so the repeated rows change nothing for the
    others; their results are dropped.

    Args:
        array: numpy array `(n, ...)`.
        rows: rows wanted, `>= n`.

    Returns:
        numpy array `(rows, ...)`.
    """
    extra = [(0, rows - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, extra, mode="edge")


def _stateless_logits(model_ref, weights, batch):
    """Logits of a weakly referenced Keras model, with its weights passed in.

    Args:
        model_ref: weak reference to the model.
        weights: `(trainable, non_trainable)`, lists of tensors in the order
            of the model's variables.
        batch: input batch.

    Returns:
        the model's output on `batch`.
    """
    trainable, non_trainable = weights
    logits, _ = model_ref().stateless_call(trainable, non_trainable, batch)
    return logits


def _compiled(f, key, build):
    """A compiled run for `f` and the weights to call it with.

    Args:
        f: the logits model or callable.
        key: hashable tuple of the run's static settings.
        build: `build(logits, *key)` returns a function of `(weights, ...)`
            in which `logits(weights, batch)` gives the logits of `f`.

    Returns:
        a tuple `(run, weights)`. For a Keras layer or model, `run` calls it
        statelessly on `weights`, its current variable values, and is cached
        per model and key. Any other callable is called as is, with no
        weights, and compiled for this call only: it may read state that
        changes between calls.
    """
    if not isinstance(f, keras.Layer):
        return backend.compiled(build(lambda weights, batch: f(batch), *key)), ()
    weights = (
        [keras.ops.convert_to_tensor(v) for v in f.trainable_variables],
        [keras.ops.convert_to_tensor(v) for v in f.non_trainable_variables],
    )
    runs = _COMPILED.setdefault(f, {})
    if key not in runs:
        logits = functools.partial(_stateless_logits, weakref.ref(f))
        runs[key] = backend.compiled(build(logits, *key))
    return runs[key], weights


def _make_pgd_run(logits_of, steps, clip):
    """Builds one PGD run over a batch; see `pgd_l2`."""

    def run(weights, x, label_mask, attack_mask, delta, epsilon, step_size):
        def loss_and_margin(x_now):
            logits = keras.ops.cast(logits_of(weights, x_now), "float32")
            true_logit = keras.ops.sum(keras.ops.where(label_mask, logits, 0.0), axis=1)
            other = keras.ops.max(keras.ops.where(label_mask, -np.inf, logits), axis=1)
            attacked = keras.ops.max(keras.ops.where(attack_mask, logits, -np.inf), axis=1)
            # Row 0 is the loss to descend; examples are independent, so the
            # gradient of its sum is the per-example gradient. Row 1, the
            # margin, only rides along: without a gradient it adds nothing.
            return keras.ops.stack(
                [true_logit - attacked, keras.ops.stop_gradient(true_logit - other)]
            )

        value_and_grad = backend.value_and_grad(loss_and_margin)

        def evaluate(delta):
            x_now = x + delta
            values, grad = value_and_grad(x_now)
            return x_now, values[1], grad

        def admit(x_now, margin, best_x, best_margin):
            # Only points that really lie in the ball may become the answer,
            # measured on the rounded float32 point that would be returned.
            inside = _flat_norms(x_now - x) <= epsilon
            better = keras.ops.logical_and(inside, margin < best_margin)
            best_x = keras.ops.where(_broadcast_rows(better, x), x_now, best_x)
            return best_x, keras.ops.where(better, margin, best_margin)

        def project(delta):
            radius = epsilon * _PROJECTION_SHRINK
            norms = _flat_norms(delta)
            scale = keras.ops.minimum(1.0, radius / keras.ops.maximum(norms, 1e-30))
            delta = delta * _broadcast_rows(scale, delta)
            if clip is None:
                return delta
            # x lies in the box, so clipping only shortens coordinates of
            # delta and keeps the point in the ball.
            return keras.ops.clip(x + delta, clip[0], clip[1]) - x

        def step(_, state):
            delta, best_x, best_margin = state
            x_now, margin, grad = evaluate(delta)
            best_x, best_margin = admit(x_now, margin, best_x, best_margin)
            # Normalised steps: the margin's gradient scale says nothing about
            # how far to move, and a zero gradient must give a zero step.
            norms = _broadcast_rows(_flat_norms(grad), grad)
            direction = keras.ops.divide_no_nan(grad, norms)
            return project(delta - step_size * direction), best_x, best_margin

        best_margin = keras.ops.full((x.shape[0],), np.inf, dtype="float32")
        delta, best_x, best_margin = keras.ops.fori_loop(
            0, steps, step, (project(delta), x, best_margin)
        )
        x_now, margin, _ = evaluate(delta)
        return admit(x_now, margin, best_x, best_margin)

    return run


def pgd_l2(
    f,
    x,
    epsilon,
    labels=None,
    steps=100,
    restarts=5,
    step_size=None,
    seed=0,
    batch_size=256,
    clip=None,
    verbose=0,
):
    """L2 projected gradient descent on the logit margin, with restarts.

    Minimises the margin `f_y(x') - max_{i != y} f_i(x')` over the L2 ball
    `||x' - x||_2 <= epsilon` with normalised gradient steps, each followed by
    projection onto the ball. Every iterate of every run is scored by that
    margin, and the lowest-margin point per example is kept.

    Minimising a margin over a ball is not convex, even for a linear model:
    descending the untargeted loss can settle on the class that is steepest
    from `x` rather than the one that is closest, a local optimum that random
    starts escape only by luck. So the runs differ in loss as well as start:

    * run 0 starts at `x` and descends the untargeted (Carlini-Wagner) loss
      `f_y - max_{i != y} f_i`;
    * run `r >= 1` starts at a point drawn uniformly from the ball, and
      descends the targeted loss `f_y - f_t` for the `r`-th runner-up class
      `t` (ranked by the logits at `x`), or the untargeted loss once every
      runner-up has had a run; then the cycle starts over. With `m` classes,
      `restarts >= m` gives every class a targeted run, which makes the
      attack exact on linear models.

    Args:
        f: the logits model: a Keras model (called with the values its
            weights have at the time of the call) or a callable that the
            Keras backend can differentiate, mapping a float32 batch
            `(n, ...)` to logits `(n, m)`.
        x: numpy array or tensor `(n, ...)`, the points to attack.
        epsilon: radius of the L2 ball, a finite number `>= 0`.
        labels: int array `(n,)`, the class whose margin is attacked. Defaults
            to the prediction `argmax f(x)`.
        steps: gradient steps per run, `>= 0`.
        restarts: number of runs, `>= 1` (see above).
        step_size: L2 length of each step. Defaults to `2.5 * epsilon /
            steps`, enough to cross the ball and come back.
        seed: seed of the random starts; equal seeds give equal results.
        batch_size: examples attacked at once.
        clip: optional `(lo, hi)`; the attack then stays inside that box as
            well, and `x` must lie in it. By default nothing is clipped: a
            certificate speaks about the whole L2 ball in input space.
        verbose: 1 shows a `keras.utils.Progbar`, 0 is silent.

    Returns:
        An `AttackResult` with numpy fields `x_adv` `(n, ...)`, `margin`,
        `clean_margin` and `success` `(n,)`.

    Raises:
        ValueError: on a negative or non-finite `epsilon`, malformed `x`,
            `labels`, `clip` or counts, or if `f` does not return finite
            `(n, m)` logits.

    Example:

    ```python
    result = attacks.pgd_l2(model, x_test[:100], epsilon=0.3, restarts=10)
    # certified: bool (n,), from the GloRo Net at the same epsilon.
    assert not np.any(result.success & certified)  # else a certificate is wrong
    print(result.success.mean(), result.relative_reduction().mean())
    ```
    """
    epsilon = _check_nonnegative("epsilon", epsilon)
    steps = _check_int("steps", steps, 0)
    restarts = _check_int("restarts", restarts, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    if step_size is None:
        step_size = 2.5 * epsilon / max(steps, 1)
    step_size = _check_nonnegative("step_size", step_size)
    x = _as_batch(x)
    if clip is not None:
        if len(clip) != 2 or not clip[0] <= clip[1]:
            raise ValueError(
                f"clip must be a pair (lo, hi) with lo <= hi, got {clip!r}."
            )
        clip = (float(clip[0]), float(clip[1]))
        if np.any(x < clip[0]) or np.any(x > clip[1]):
            raise ValueError(f"x lies outside the clip box {clip}.")

    n = x.shape[0]
    logits, _ = _logits(f, x, batch_size)
    num_classes = logits.shape[1]
    if labels is None:
        labels = np.argmax(logits, axis=1)
    labels = np.asarray(keras.ops.convert_to_numpy(labels))
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be an integer array of shape ({n},), got dtype "
            f"{labels.dtype} and shape {labels.shape}."
        )
    if np.any(labels < 0) or np.any(labels >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}).")
    labels = labels.astype(np.int32)
    clean_margin = _margins(logits, labels)

    # attack_masks[k] marks the classes whose max the loss of a run subtracts
    # from f_y: every other class for the untargeted loss (k = 0), the k-th
    # runner-up alone for k >= 1.
    label_mask = np.eye(num_classes, dtype=bool)[labels]
    ranked = np.argsort(np.where(label_mask, np.inf, -logits), axis=1, kind="stable")
    attack_masks = [~label_mask] + [
        np.eye(num_classes, dtype=bool)[ranked[:, k]] for k in range(num_classes - 1)
    ]

    run, weights = _compiled(f, (steps, clip), _make_pgd_run)
    # Tensors, not Python floats: new values must not retrace the run.
    epsilon_t = keras.ops.convert_to_tensor(epsilon, "float32")
    step_size_t = keras.ops.convert_to_tensor(step_size, "float32")
    rng = np.random.default_rng(seed)
    best_x = x.copy()
    best_margin = clean_margin.copy()
    progbar = keras.utils.Progbar(math.ceil(n / batch_size) * restarts, verbose=verbose)
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        xb = x[rows]
        padded = _bucket(xb.shape[0], batch_size)
        for restart in range(restarts):
            if restart == 0:
                delta = np.zeros_like(xb)
                mask = attack_masks[0]
            else:
                delta = _uniform_ball(rng, xb.shape, epsilon)
                # Targets 1..m-1 in rank order, then the untargeted loss.
                mask = attack_masks[restart % num_classes]
            run_x, run_margin = run(
                weights,
                *(_pad(a, padded) for a in (xb, label_mask[rows], mask[rows], delta)),
                epsilon_t,
                step_size_t,
            )
            run_margin = keras.ops.convert_to_numpy(run_margin)[: xb.shape[0]]
            better = run_margin < best_margin[rows]
            best_margin[rows] = np.where(better, run_margin, best_margin[rows])
            best_x[rows][better] = keras.ops.convert_to_numpy(run_x)[: xb.shape[0]][better]
            progbar.add(1)

    # The in-graph ball test is done in float32; re-check in float64 and fall
    # back to x where the two disagree, so the contract holds exactly.
    dist = np.linalg.norm(
        (best_x.astype(np.float64) - x.astype(np.float64)).reshape(n, -1), axis=1
    )
    outside = dist > epsilon * (1 + _BALL_TOLERANCE)
    best_x[outside] = x[outside]
    best_margin[outside] = clean_margin[outside]
    return AttackResult(
        x_adv=best_x,
        margin=best_margin,
        clean_margin=clean_margin,
        success=best_margin <= 0,
    )


def _make_lipschitz_run(logits_of, steps, trust):
    """Builds one witness-pair ascent over a batch of (point, pair).

    `trust` is the smallest relative separation at which a ratio counts; see
    `_RATIO_TRUST_ROUNDOFFS`.
    """

    def run(weights, a, b, ci, cj, scale, max_separation):
        def margin(ab):
            logits = keras.ops.cast(logits_of(weights, ab), "float32")

            def logit(classes):
                classes = keras.ops.concatenate([classes, classes])[:, None]
                return keras.ops.take_along_axis(logits, classes, axis=1)[:, 0]

            # Each g depends only on its own row, so the gradient of the sum
            # gives every per-row gradient of f_i - f_j.
            return logit(ci) - logit(cj)

        value_and_grad = backend.value_and_grad(margin)
        n = a.shape[0]

        def evaluate(a, b):
            g, grad = value_and_grad(keras.ops.concatenate([a, b], axis=0))
            grad_a, grad_b = grad[:n], grad[n:]
            gap = g[:n] - g[n:]
            diff = a - b
            sep = _flat_norms(diff)
            ratio = keras.ops.abs(gap) / sep
            size = keras.ops.maximum(_flat_norms(a), _flat_norms(b))
            trusted = keras.ops.where(sep >= trust * size, ratio, 0.0)
            local = keras.ops.maximum(_flat_norms(grad_a), _flat_norms(grad_b))
            found = keras.ops.maximum(trusted, local)
            return found, ratio, gap, grad_a, grad_b, diff, sep

        def separate(a, b, lo, hi):
            # Move both ends along their difference, about the midpoint, until
            # the separation lies in [lo, hi].
            diff = a - b
            sep = _flat_norms(diff)
            clipped = keras.ops.minimum(keras.ops.maximum(sep, lo), hi)
            factor = clipped / keras.ops.maximum(sep, 1e-30)
            mid = (a + b) / 2
            half = diff * _broadcast_rows(factor, diff) / 2
            return mid + half, mid - half

        min_separation = keras.ops.minimum(_MIN_SEPARATION * scale, max_separation)

        def step(_, state):
            a, b, best = state
            found, ratio, gap, grad_a, grad_b, diff, sep = evaluate(a, b)
            best = keras.ops.maximum(best, found)
            # Gradient of |g(a) - g(b)| / ||a - b|| with respect to a and b.
            sign = _broadcast_rows(keras.ops.sign(gap), diff)
            sep_rows = _broadcast_rows(sep, diff)
            pull = _broadcast_rows(ratio, diff) * diff / sep_rows**2
            d_a = sign * grad_a / sep_rows - pull
            d_b = -sign * grad_b / sep_rows + pull
            joint = keras.ops.sqrt(_flat_norms(d_a) ** 2 + _flat_norms(d_b) ** 2)
            length = keras.ops.divide_no_nan(
                _ASCENT_STEP * keras.ops.minimum(sep, scale), joint
            )
            length = _broadcast_rows(length, diff)
            a, b = separate(a + length * d_a, b + length * d_b, min_separation, max_separation)
            return a, b, best

        best = keras.ops.zeros((n,), dtype="float32")
        a, b, best = keras.ops.fori_loop(0, steps, step, (a, b, best))
        found, *_ = evaluate(a, b)
        return keras.ops.maximum(best, found)

    return run


def empirical_margin_lipschitz(
    f, x, steps=50, seed=0, radius=None, batch_size=256, verbose=0
):
    """Empirical lower bounds on the L2 Lipschitz constants of all margins.

    For every pair of classes `(i, j)` and every point of `x`, a witness pair
    `(a, b)` starts near the point (`b` a small random offset from `a`) and
    climbs the ratio `|g(a) - g(b)| / ||a - b||_2` of `g = f_i - f_j` by
    normalised gradient ascent. Every ratio met along the way is a lower bound
    on the Lipschitz constant of `g`, and so is the exact local gradient norm
    `||grad g||_2` at every visited point, which for piecewise-linear networks
    is usually the stronger of the two. The largest value found over all
    points and steps is reported.

    Compare the result with the `K_ji` a GloRo Net certifies with: an entry
    above its `K_ji` (beyond float rounding) proves that bound wrong. Ratios
    count only where the pair is far enough apart for rounding of the logits
    not to fake a slope; for float16 or bfloat16 logits that is never, and
    only gradient norms (good to about 1e-3) count.

    The search runs once per point and pair of classes: its cost grows like
    `len(x) * m * (m - 1) / 2 * steps` evaluations of `f` and its gradient,
    on two points each.

    Args:
        f: the logits model: a Keras model (called with the values its
            weights have at the time of the call) or a callable that the
            Keras backend can differentiate, mapping a float32 batch
            `(n, ...)` to logits `(n, m)`.
        x: numpy array or tensor `(n, ...)`, the starting points.
        steps: ascent steps per (point, pair), `>= 0`; 0 only measures the
            local gradients next to `x`.
        seed: seed of the random offsets; equal seeds give equal results.
        radius: optional bound on `||a - b||_2`, for a local search around the
            data at the scale of a certificate radius. It also sets the scale
            of the starting offsets, which otherwise follows the mean norm of
            the points of `x`.
        batch_size: (point, pair) searches run at once; each one evaluates
            `f` on two points.
        verbose: 1 shows a `keras.utils.Progbar`, 0 is silent.

    Returns:
        numpy float32 array `(m, m)`: entry `[i, j]` is the lower bound found
        for the Lipschitz constant of `f_i - f_j`. It is symmetric with a zero
        diagonal.

    Raises:
        ValueError: on malformed `x`, counts or `radius` (which must be
            finite and `> 0`), or if `f` does not return finite `(n, m)`
            logits.

    Example:

    ```python
    lower = attacks.empirical_margin_lipschitz(model, x_test[:32])
    assert np.all(lower <= upper * (1 + 1e-5))  # upper: the certified K
    ```
    """
    steps = _check_int("steps", steps, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    if radius is not None:
        radius = _check_nonnegative("radius", radius)
        if radius == 0:
            raise ValueError("radius must be > 0: a pair needs two distinct points.")
    x = _as_batch(x)
    n = x.shape[0]
    logits, dtype = _logits(f, x, batch_size)
    num_classes = logits.shape[1]

    if radius is None:
        scale = float(np.mean(np.linalg.norm(x.reshape(n, -1), axis=1)))
        scale = scale if scale > 0 else 1.0
        max_separation = np.inf
    else:
        scale = max_separation = radius
    pair_i, pair_j = np.triu_indices(num_classes, k=1)
    point = np.repeat(np.arange(n), len(pair_i))
    ci = np.tile(pair_i, n).astype(np.int32)
    cj = np.tile(pair_j, n).astype(np.int32)

    trust = _RATIO_TRUST_ROUNDOFFS * _ROUNDOFF[dtype]
    run, weights = _compiled(f, (steps, trust), _make_lipschitz_run)
    # Tensors, not Python floats: new values must not retrace the run.
    scale_t = keras.ops.convert_to_tensor(scale, "float32")
    max_separation_t = keras.ops.convert_to_tensor(max_separation, "float32")
    rng = np.random.default_rng(seed)
    best = np.zeros(len(point), np.float32)
    progbar = keras.utils.Progbar(len(point), verbose=verbose)
    for start in range(0, len(point), batch_size):
        rows = slice(start, start + batch_size)
        xb = x[point[rows]]
        a = xb + _sphere(rng, xb.shape, _KINK_ESCAPE * scale)
        b = a + _sphere(rng, xb.shape, _MIN_SEPARATION * scale)
        padded = _bucket(xb.shape[0], batch_size)
        found = run(
            weights,
            *(_pad(v, padded) for v in (a.astype(np.float32), b.astype(np.float32), ci[rows], cj[rows])),
            scale_t,
            max_separation_t,
        )
        best[rows] = keras.ops.convert_to_numpy(found)[: xb.shape[0]]
        progbar.add(xb.shape[0])

    lip = np.zeros((num_classes, num_classes), np.float32)
    np.maximum.at(lip, (ci, cj), best)
    return np.maximum(lip, lip.T)
