"""Bound propagation certifiers for chains of Conv2D / Dense / MinMax layers:
IBP, KW-style and CROWN linear bounds, CROWN-IBP and BCP.

Written for the certifier comparison (`certifiers.py`) from the papers:
Gowal et al. 2018 (IBP), Wong & Kolter 2018 (KW), Zhang et al. 2018 (CROWN)
and 2020 (CROWN-IBP), Lee et al. 2020 (BCP). No PyPI library runs with this project's versions:
decomon 0.2.1 uses `np.float_` and auto_LiRPA 0.3 imports
`numpy.lib.arraysetops`, both removed in NumPy 2, and auto_LiRPA pins
torch < 1.13.

The threat model is GloRo's: the L2 ball of radius `eps` around `x`, with no
box constraint, so all certifiers answer the same question.

How each method sees MinMax (pairs of channels `(a, b) -> (min, max)`):

- IBP and BCP use it as is: min and max are monotone in each argument, so the
  interval of `min(a, b)` is `[min(la, lb), min(ua, ub)]`, exactly.
- The linear methods need a ReLU, so they see
  `min(a, b) = a - relu(a - b)`, `max(a, b) = b + relu(a - b)` and relax
  `relu(d)` for `d = a - b`, with bounds computed on `d` itself.

Linear bounds (KW and CROWN): a lower bound of `Lambda . z_k` is propagated
backwards to an affine function `A . x + c` of the input, which is then
minimised over the ball: `A . x0 - eps ||A||_2 + c`. Each unstable ReLU
(`l < 0 < u`) is bounded above by the chord `s (d - l)`, `s = u / (u - l)`,
and below by `alpha d`; KW's dual network takes `alpha = s` (as Fast-Lin
showed, that is what KW's dual computes), CROWN takes `alpha = 1` when
`u > -l`, else `0`. Both need bounds on every hidden unit, which they get
by running the same backward pass from each layer in turn: that is their
cost. CROWN-IBP takes the hidden bounds from IBP and runs the backward pass
from the margins only.

BCP (box constrained propagation) keeps two outer bounds of each layer's
reachable set and intersects them: IBP's box, and a ball around the clean
activation whose radius grows by each linear layer's operator norm (MinMax,
like ReLU, is 1-Lipschitz, so the ball keeps its radius). Each unit's
interval is the intersection of the box's interval and the ball's
(`w . p +- rho ||w||`); the margins take the better of the two lower bounds.
The ball alone is GloRo's Lipschitz margin (same layer norms, pairwise
head rows), so BCP certifies at least what GloRo certifies with the same
norms. This is the bound of the paper's main text; its appendix tightens the
ball after each ReLU further, which this version leaves out (sound, possibly
looser than the authors' code).

Everything is `keras.ops`, so the same code gives training losses
(differentiable) on any backend.
"""

import keras
import numpy as np
from keras import ops

from gloro import layers as gloro_layers
from gloro import lipschitz

METHODS = ("ibp", "kw", "crown", "crown_ibp", "bcp")


def chain(model):
    """Reads a logits model as a list of steps the certifiers understand.

    Args:
        model: a functional `keras.Model` that is a chain of `Conv2D`
            (`"same"` or `"valid"` padding, no activation), `Dense` (no
            activation), `MinMax` and `Flatten` layers, ending in `Dense`.

    Returns:
        a list of `(kind, layer)`, kind in `"conv"`, `"dense"`, `"minmax"`,
        `"flatten"`, and the input shape of each step in a parallel list.

    Raises:
        ValueError: a layer these certifiers do not handle.
    """
    steps = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.layers.Conv2D):
            kind = "conv"
        elif isinstance(layer, keras.layers.Dense):
            kind = "dense"
        elif isinstance(layer, gloro_layers.MinMax):
            kind = "minmax"
        elif isinstance(layer, keras.layers.Flatten):
            kind = "flatten"
        else:
            raise ValueError(f"Layer '{layer.name}' ({type(layer).__name__}) is not a Conv2D, Dense, MinMax or Flatten.")
        if kind in ("conv", "dense") and layer.get_config().get("activation", "linear") != "linear":
            raise ValueError(f"Layer '{layer.name}' has an activation; write it as a separate layer.")
        steps.append((kind, layer))
    if not steps or steps[0][0] not in ("conv", "dense") or steps[-1][0] != "dense":
        raise ValueError("The model must start with a Conv2D or Dense layer and end in a Dense logits layer.")
    shapes = [tuple(layer.input.shape[1:]) for _, layer in steps]
    return steps, shapes


def _linear(kind, layer, x, bias=True):
    """The layer's linear map (and bias) on a batch."""
    if kind == "dense":
        y = ops.matmul(x, layer.kernel)
    else:
        y = ops.conv(x, layer.kernel, strides=layer.strides, padding=layer.padding)
    return y + layer.bias if bias and layer.use_bias else y


def _linear_abs(kind, layer, r):
    """`|W| r`: how the layer maps an interval's radius."""
    if kind == "dense":
        return ops.matmul(r, ops.abs(layer.kernel))
    return ops.conv(r, ops.abs(layer.kernel), strides=layer.strides, padding=layer.padding)


def _norm(squares, axis):
    """`sqrt(sum(squares))`, nudged off 0 where a row is zero (the margin
    of a class against itself), whose gradient would be NaN; the nudge only
    raises a radius, so the bound stays sound."""
    return ops.sqrt(ops.sum(squares, axis=axis) + 1e-30)


def _row_norms(kind, layer, in_shape):
    """L2 norm of each output unit's row of the linear map (padding
    included: a unit at a border sees fewer inputs), `(1,) + out_shape`."""
    if kind == "dense":
        return _norm(ops.square(layer.kernel), axis=0)[None]
    ones = ops.ones((1,) + tuple(in_shape))
    return ops.sqrt(ops.conv(ones, ops.square(layer.kernel), strides=layer.strides, padding=layer.padding) + 1e-30)


def _transpose(kind, layer, lam, in_shape):
    """`W^T lam` for a batch of row vectors `lam` over the layer's output."""
    if kind == "dense":
        return ops.matmul(lam, ops.transpose(layer.kernel))
    # conv_transpose with the same kernel, strides and padding is the
    # adjoint of conv when it reproduces the input size; output_padding
    # picks that size where stride and padding leave it ambiguous.
    out = ops.conv_transpose(lam, layer.kernel, strides=layer.strides, padding=layer.padding)
    missing = [in_shape[i] - out.shape[i + 1] for i in range(2)]
    if any(missing):
        out = ops.conv_transpose(
            lam, layer.kernel, strides=layer.strides, padding=layer.padding, output_padding=tuple(missing)
        )
    return out


def _pairs(z):
    return z[..., 0::2], z[..., 1::2]


def _interleave(first, second):
    """Inverse of `_pairs`."""
    shape = ops.shape(first)
    return ops.reshape(ops.stack([first, second], axis=-1), tuple(shape[:-1]) + (2 * shape[-1],))


def _margin_spec(labels, num_classes):
    """Rows `e_y - e_i` for every class i, `(batch, m, m)` (row y is zero)."""
    one_hot = ops.one_hot(labels, num_classes)
    return one_hot[:, None, :] - ops.eye(num_classes)[None]


def ibp(steps, shapes, x, eps, labels):
    """IBP lower bounds of the margins `f_y - f_i` over the L2 ball.

    The first linear layer maps the ball exactly onto a box (centre
    `W x + b`, radius `eps` times each row's L2 norm); intervals follow; the
    last layer is folded into the margins, as Gowal et al. do, so that it is
    not loosened by an interval of logits.

    Args:
        steps, shapes: from `chain`.
        x: inputs `(batch,) + input_shape`.
        eps: the L2 radius.
        labels: int `(batch,)`, the class whose margins are bounded.

    Returns:
        `(batch, m)` lower bounds; entry y is 0.
    """
    centre, radius = _ibp_hidden(steps, shapes, x, eps)[-1]
    weights, bias = _margin_rows(steps[-1][1], labels)
    return ops.einsum("bjk,bk->bj", weights, centre) - ops.einsum("bjk,bk->bj", ops.abs(weights), radius) + bias


def _minmax_interval(centre, radius):
    """The exact interval of MinMax's output over a box `centre +- radius`:
    min and max are monotone in each argument."""
    (la, lb), (ua, ub) = _pairs(centre - radius), _pairs(centre + radius)
    lower = _interleave(ops.minimum(la, lb), ops.maximum(la, lb))
    upper = _interleave(ops.minimum(ua, ub), ops.maximum(ua, ub))
    return (upper + lower) / 2, (upper - lower) / 2


def _ibp_hidden(steps, shapes, x, eps):
    """Interval `(centre, radius)` of the input of every step after the
    first linear one; the last is the head's input."""
    kind, layer = steps[0]
    centre = _linear(kind, layer, x)
    radius = eps * _row_norms(kind, layer, shapes[0]) * ops.ones_like(centre)
    boxes = []
    for kind, layer in steps[1:]:
        boxes.append((centre, radius))
        if kind in ("conv", "dense"):
            centre, radius = _linear(kind, layer, centre), _linear_abs(kind, layer, radius)
        elif kind == "minmax":
            centre, radius = _minmax_interval(centre, radius)
        else:
            centre, radius = ops.reshape(centre, (ops.shape(centre)[0], -1)), ops.reshape(radius, (ops.shape(radius)[0], -1))
    return boxes


def _margin_rows(head, labels):
    """The head's rows of the margins `f_y - f_i`: `(batch, m, k)` weights
    and `(batch, m)` biases."""
    spec = _margin_spec(labels, head.units)
    return ops.einsum("bjm,km->bjk", spec, head.kernel), ops.einsum("bjm,m->bj", spec, head.bias)


def guaranteed_norms(steps, shapes):
    """Upper bounds of the operator norm of every linear step but the head
    (`gloro.lipschitz`'s guaranteed bounds, on each step's input shape),
    `None` for the other steps: the norms BCP certifies with."""
    norms = []
    for k, ((kind, layer), shape) in enumerate(zip(steps, shapes)):
        kernel = np.asarray(ops.convert_to_numpy(layer.kernel), np.float64) if kind in ("conv", "dense") else None
        if kernel is None or k == len(steps) - 1:
            norms.append(None)
        elif kind == "dense":
            norms.append(float(lipschitz.round_up_float32(lipschitz.dense_bound(kernel))))
        else:
            bound = lipschitz.conv_bound(kernel, shape, layer.strides, layer.padding, layer.dilation_rate)
            norms.append(float(lipschitz.round_up_float32(bound)))
    return norms


def estimated_norms(steps):
    """One power-iteration step of every linear gloro layer but the head: the
    differentiable estimates BCP trains with (as its paper does; an estimate
    is never used to certify)."""
    norms = []
    for k, (kind, layer) in enumerate(steps):
        if kind not in ("conv", "dense") or k == len(steps) - 1:
            norms.append(None)
        elif isinstance(layer, gloro_layers.SpectralNormCache):
            norms.append(layer.power_step())
        else:
            raise ValueError(f"BCP training needs gloro.layers.Dense / Conv2D (power iteration); '{layer.name}' is not one.")
    return norms


def bcp(steps, shapes, x, eps, labels, norms):
    """BCP lower bounds of the margins `f_y - f_i` over the L2 ball.

    Args:
        steps, shapes: from `chain`.
        x: inputs `(batch,) + input_shape`.
        eps: the L2 radius.
        labels: int `(batch,)`.
        norms: per step, the operator norm of each linear step but the head
            (`guaranteed_norms` to certify, `estimated_norms` to train).

    Returns:
        `(batch, m)` lower bounds; entry y is 0.
    """
    kind, layer = steps[0]
    centre = _linear(kind, layer, x)
    radius = eps * _row_norms(kind, layer, shapes[0]) * ops.ones_like(centre)
    # The ball's centre is the clean activation, its radius `rho`.
    clean, rho = centre, eps * norms[0]
    for k in range(1, len(steps) - 1):
        kind, layer = steps[k]
        if kind in ("conv", "dense"):
            box_centre, box_radius = _linear(kind, layer, centre), _linear_abs(kind, layer, radius)
            clean = _linear(kind, layer, clean)
            ball_radius = rho * _row_norms(kind, layer, shapes[k])
            lower = ops.maximum(box_centre - box_radius, clean - ball_radius)
            upper = ops.minimum(box_centre + box_radius, clean + ball_radius)
            centre, radius = (upper + lower) / 2, (upper - lower) / 2
            rho = rho * norms[k]
        elif kind == "minmax":
            centre, radius = _minmax_interval(centre, radius)
            clean = layer(clean)
        else:
            batch = ops.shape(centre)[0]
            centre, radius, clean = (ops.reshape(v, (batch, -1)) for v in (centre, radius, clean))
    weights, bias = _margin_rows(steps[-1][1], labels)
    box = ops.einsum("bjk,bk->bj", weights, centre) - ops.einsum("bjk,bk->bj", ops.abs(weights), radius)
    ball = ops.einsum("bjk,bk->bj", weights, clean) - rho * _norm(ops.square(weights), axis=2)
    return ops.maximum(box, ball) + bias


def hidden_units(steps, shapes):
    """The number of ReLUs (MinMax pairs) at each MinMax step, in order."""
    return [int(np.prod(shapes[k])) // 2 for k, (kind, _) in enumerate(steps) if kind == "minmax"]


def _relu_slopes(lower, upper, rule):
    """Relaxation of `relu(d)` for `lower <= d <= upper`: the upper line
    `s d + t` and the lower line `alpha d`."""
    active = ops.cast(lower >= 0, lower.dtype)
    unstable = ops.cast((lower < 0) & (upper > 0), lower.dtype)
    chord = upper / ops.maximum(upper - lower, 1e-12)
    s = active + unstable * chord
    t = -unstable * chord * lower
    if rule == "kw":
        alpha = s
    else:
        alpha = active + unstable * ops.cast(upper > -lower, lower.dtype)
    return s, t, alpha


def _backward(steps, shapes, lam, upto, relaxations):
    """Propagates the rows `lam` (over the output of step `upto - 1`) back
    to the input; returns `(A, c)` with `lam . z >= A . x + c`.

    `lam` is `(batch, rows) + shape`; `relaxations[k]` holds `(s, t, alpha)`
    of MinMax step k, each `(batch,) + pair_shape`.
    """
    batch, rows = ops.shape(lam)[0], ops.shape(lam)[1]
    const = ops.zeros((batch, rows))
    for k in range(upto - 1, -1, -1):
        kind, layer = steps[k]
        if kind in ("conv", "dense"):
            if layer.use_bias:
                const = const + ops.sum(ops.reshape(lam, (batch, rows, -1, layer.bias.shape[0])) * layer.bias, axis=(2, 3))
            # The layers see rows of all points as one batch.
            flat = ops.reshape(lam, (batch * rows,) + tuple(lam.shape[2:]))
            lam = ops.reshape(_transpose(kind, layer, flat, shapes[k]), (batch, rows) + shapes[k])
        elif kind == "flatten":
            lam = ops.reshape(lam, (batch, rows) + shapes[k])
        else:
            s, t, alpha = (v[:, None] for v in relaxations[k])
            lam_min, lam_max = _pairs(lam)
            mu = lam_max - lam_min
            pos, neg = ops.maximum(mu, 0), ops.minimum(mu, 0)
            coef = pos * alpha + neg * s
            const = const + ops.sum(ops.reshape(neg * t, (batch, rows, -1)), axis=2)
            lam = _interleave(lam_min + coef, lam_max - coef)
    return lam, const


def _concretise(a, const, x, eps):
    """Minimum of `A . x' + c` over `||x' - x|| <= eps`, `(batch, rows)`."""
    batch, rows = ops.shape(a)[0], ops.shape(a)[1]
    a = ops.reshape(a, (batch, rows, -1))
    return ops.einsum("brd,bd->br", a, ops.reshape(x, (batch, -1))) - eps * _norm(ops.square(a), axis=2) + const


def _pair_difference_rows(shape, start, stop):
    """Rows `e_a - e_b` for the pairs numbered `start..stop` of a tensor of
    `shape` (pairs in row-major order of `shape[:-1] + (channels / 2,)`)."""
    size = int(np.prod(shape))
    index = np.arange(start, stop)
    rows = np.zeros((stop - start, size), np.float32)
    rows[np.arange(stop - start), 2 * index] = 1.0
    rows[np.arange(stop - start), 2 * index + 1] = -1.0
    return ops.convert_to_tensor(rows.reshape((stop - start,) + tuple(shape)))


def _hidden_bounds(steps, shapes, x, eps, k, relaxations, chunk, count):
    """Lower and upper bounds of `d = a - b` at MinMax step k by linear
    propagation, for the first `count` hidden units, `chunk` units (each
    bounded below and above) per backward pass."""
    lowers, uppers = [], []
    for start in range(0, count, chunk):
        rows = _pair_difference_rows(shapes[k], start, min(start + chunk, count))
        both = ops.concatenate([rows, -rows], axis=0)
        lam = ops.broadcast_to(both[None], (ops.shape(x)[0],) + tuple(both.shape))
        a, c = _backward(steps, shapes, lam, k, relaxations)
        bound = _concretise(a, c, x, eps)
        n = rows.shape[0]
        lowers.append(bound[:, :n])
        uppers.append(-bound[:, n:])
    return ops.concatenate(lowers, axis=1), ops.concatenate(uppers, axis=1)


def linear_bounds(steps, shapes, x, eps, labels, rule="crown", hidden="linear", chunk=4096, fraction=1.0):
    """Lower bounds of the margins `f_y - f_i` by backward linear propagation.

    Args:
        steps, shapes: from `chain`.
        x: inputs `(batch,) + input_shape`.
        eps: the L2 radius.
        labels: int `(batch,)`.
        rule: `"kw"` or `"crown"`, the lower line of an unstable ReLU.
        hidden: `"linear"` bounds every hidden unit by the same backward
            propagation (KW, CROWN); `"ibp"` takes them from IBP (CROWN-IBP).
        chunk: hidden units bounded per backward pass (memory vs. calls).
        fraction: with `hidden="linear"`, the share of each layer's hidden
            units bounded by linear propagation; the others keep their
            (looser, still sound) IBP bounds. Below 1 it measures the cost
            of a network too large to bound in full: the time scales with
            the fraction.

    Returns:
        `(batch, m)` lower bounds; entry y is 0.
    """
    relaxations = {}
    boxes = _ibp_hidden(steps, shapes, x, eps) if hidden == "ibp" or fraction < 1 else None
    batch = ops.shape(x)[0]
    for k, (kind, _) in enumerate(steps):
        if kind != "minmax":
            continue
        pair_shape = tuple(shapes[k][:-1]) + (shapes[k][-1] // 2,)
        if boxes is not None:
            centre, radius = boxes[k - 1]
            (la, lb), (ua, ub) = _pairs(centre - radius), _pairs(centre + radius)
            lower, upper = ops.reshape(la - ub, (batch, -1)), ops.reshape(ua - lb, (batch, -1))
        if hidden == "linear":
            pairs = int(np.prod(pair_shape))
            count = pairs if fraction >= 1 else max(1, int(np.ceil(fraction * pairs)))
            low, up = _hidden_bounds(steps, shapes, x, eps, k, relaxations, chunk, count)
            if count < pairs:
                low = ops.concatenate([low, lower[:, count:]], axis=1)
                up = ops.concatenate([up, upper[:, count:]], axis=1)
            lower, upper = low, up
        relaxations[k] = _relu_slopes(ops.reshape(lower, (batch,) + pair_shape), ops.reshape(upper, (batch,) + pair_shape), rule)
    _, head = steps[-1]
    lam = _margin_spec(labels, head.units)
    a, c = _backward(steps, shapes, lam, len(steps), relaxations)
    return _concretise(a, c, x, eps)


def margin_bounds(method, steps, shapes, x, eps, labels, chunk=4096, fraction=1.0, norms=None):
    """Lower bounds of the margins by one of `METHODS` (see the module;
    `chunk` and `fraction` as for `linear_bounds`; `norms` for BCP, by
    default `guaranteed_norms`)."""
    if method == "bcp":
        return bcp(steps, shapes, x, eps, labels, norms if norms is not None else guaranteed_norms(steps, shapes))
    if method == "ibp":
        return ibp(steps, shapes, x, eps, labels)
    if method == "crown_ibp":
        return linear_bounds(steps, shapes, x, eps, labels, rule="crown", hidden="ibp")
    return linear_bounds(steps, shapes, x, eps, labels, rule=method, hidden="linear", chunk=chunk, fraction=fraction)


def certify(method, model, x, eps, batch_size=256, chunk=4096, fraction=1.0):
    """Certifies a model's own predictions with a bound propagation method.

    A point is certified when the lower bound of every margin
    `f_j - f_i` (j the prediction, i != j) is positive.

    Args:
        method: one of `METHODS`.
        model: a logits model that `chain` reads.
        x: numpy inputs `(n,) + input_shape`.
        eps: the L2 radius.
        batch_size: points per call.
        chunk: hidden units per backward pass (KW, CROWN).
        fraction: share of hidden units bounded linearly (KW, CROWN; see
            `linear_bounds`).

    Returns:
        `(predictions, certified)`, numpy `(n,)` int and bool.
    """
    steps, shapes = chain(model)
    # BCP's norms depend on the weights alone: computed once, guaranteed.
    norms = guaranteed_norms(steps, shapes) if method == "bcp" else None
    predictions, certified = [], []
    for start in range(0, len(x), batch_size):
        xb = ops.convert_to_tensor(x[start : start + batch_size])
        logits = ops.convert_to_numpy(model(xb, training=False))
        pred = logits.argmax(axis=1)
        bounds = ops.convert_to_numpy(
            margin_bounds(method, steps, shapes, xb, eps, ops.convert_to_tensor(pred), chunk, fraction, norms)
        )
        others = np.ones_like(bounds, bool)
        others[np.arange(len(pred)), pred] = False
        # A tie has a margin of 0 and is never certified; non-finite
        # bounds fail the comparison.
        certified.append(np.all(np.where(others, bounds > 0, True), axis=1) & np.all(np.isfinite(logits), axis=1))
        predictions.append(pred)
    return np.concatenate(predictions), np.concatenate(certified)
