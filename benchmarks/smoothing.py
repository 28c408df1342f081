"""Randomized smoothing: CERTIFY of Cohen, Rosenfeld & Kolter (ICML 2019).

The smoothed classifier `g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)` is
robust at `x` within the L2 radius `sigma * Phi^-1(pA)` whenever `pA` is a
lower bound of the top class's probability. CERTIFY picks the top class from
`n0` noisy samples, then bounds its probability from `n` fresh samples with a
one-sided Clopper-Pearson interval at level `alpha`, and abstains when the
bound is at most 1/2. The selection and estimation samples are separate, so
the guarantee holds with probability `1 - alpha` per point.

The sampling is `keras.ops` (any backend); the binomial bound and `Phi^-1`
are SciPy's.
"""

import keras
import numpy as np
from keras import ops
from scipy import stats

N0 = 100
N = 100_000
ALPHA = 0.001


def _counts(model, x, sigma, num, num_classes, batch_size, seed):
    """How often each class wins on `num` noisy copies of one point."""
    counts = np.zeros(num_classes, np.int64)
    remaining = num
    while remaining > 0:
        b = min(batch_size, remaining)
        noise = keras.random.normal((b,) + tuple(x.shape), stddev=sigma, seed=seed)
        logits = model(ops.convert_to_tensor(x)[None] + noise, training=False)
        counts += np.bincount(ops.convert_to_numpy(ops.argmax(logits, axis=1)), minlength=num_classes)
        remaining -= b
    return counts


def lower_confidence_bound(successes, trials, alpha):
    """One-sided `1 - alpha` Clopper-Pearson lower bound of a binomial
    proportion."""
    if successes == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, successes, trials - successes + 1))


def certify_point(model, x, sigma, num_classes, n0=N0, n=N, alpha=ALPHA, batch_size=10_000, seed=None):
    """CERTIFY for one point.

    Args:
        model: the base classifier, inputs to logits.
        x: one input (numpy, no batch axis).
        sigma: the noise level.
        num_classes: number of logits.
        n0: samples that choose the class.
        n: samples that bound its probability.
        alpha: failure probability.
        batch_size: noisy copies per forward pass.
        seed: a `keras.random.SeedGenerator` (or int) for the noise.

    Returns:
        `(prediction, radius)`: the class and its certified L2 radius, or
        `(-1, 0.0)` when CERTIFY abstains.
    """
    top = int(np.argmax(_counts(model, x, sigma, n0, num_classes, batch_size, seed)))
    hits = int(_counts(model, x, sigma, n, num_classes, batch_size, seed)[top])
    p_lower = lower_confidence_bound(hits, n, alpha)
    if p_lower <= 0.5:
        return -1, 0.0
    return top, float(sigma * stats.norm.ppf(p_lower))


def certify(model, x, sigma, radius, num_classes, n0=N0, n=N, alpha=ALPHA, batch_size=10_000, seed=0):
    """CERTIFY on each point of `x`; certified means a radius above `radius`.

    Args:
        model, sigma, num_classes, n0, n, alpha, batch_size: as for
            `certify_point`.
        x: numpy inputs `(points,) + input_shape`.
        radius: the L2 radius to certify.
        seed: int seed of the noise.

    Returns:
        `(predictions, certified)`, numpy `(points,)` int (-1: abstained)
        and bool.
    """
    generator = keras.random.SeedGenerator(seed)
    answers = [certify_point(model, xi, sigma, num_classes, n0, n, alpha, batch_size, generator) for xi in x]
    predictions = np.array([a[0] for a in answers], np.int64)
    certified = np.array([a[0] >= 0 and a[1] > radius for a in answers], bool)
    return predictions, certified
