"""Relaxed robustness (RTK, affinity): the decision rule against a NumPy
brute force, agreement with GloroNet, attacks, metrics, saving, bad input."""

import keras
import numpy as np
import pytest
from keras import ops

import gloro
from gloro import backend, layers
from gloro.certificates import (
    MARGIN_SLACK,
    add_bottom_logit,
    add_relaxed_bottom_logit,
    certified_top_k,
    gloro_predictions,
)
from gloro.relaxations import AffinityGloroNet, RtkGloroNet

# keras.ops code with no backend-specific path: by default it runs in the
# TensorFlow pass; on JAX and torch in the long tier (`-m slow`).
pytestmark = pytest.mark.ops_only

M = 4
# Classes 0, 1 and classes 2, 3 are pairs of nearby blobs: closer than twice
# the radius, so a point is often certifiable only as "one of the pair".
CENTRES = np.array([[1.0, 0.0], [1.0, 0.35], [-1.0, 0.0], [-1.0, 0.35]])
EPSILON = 0.3
PAIRS = [[0], [1], [2], [3], [0, 1], [2, 3]]


def numpy(x):
    return ops.convert_to_numpy(x)


def margin_matrix(rng, m, scale=1.0):
    k = np.abs(rng.normal(size=(m, m))) * scale
    k = (k + k.T).astype("float32")
    np.fill_diagonal(k, 0.0)
    return k


def relaxed(logits, k_matrix, epsilon, k, certify=True, affinity=None):
    return numpy(add_relaxed_bottom_logit(logits, k_matrix, np.float32(epsilon), k, certify, affinity))


def membership(sets, m):
    matrix = np.zeros((len(sets), m), np.int32)
    for row, members in enumerate(sets):
        matrix[row, members] = 1
    return matrix


def brute_force(logits, k_matrix, epsilon, k, certify=True, sets=None):
    """Per row: the largest certified k' (0 if none) and its set, straight
    from the definition, one pair (j, i) at a time, in the float32 arithmetic
    the rule is specified in."""
    eps = np.float32(epsilon)
    sizes, chosen = [], []
    for row in logits:
        best, best_set = 0, set()
        order = np.argsort(-row.astype(np.float64), kind="stable")
        for size in range(1, k + 1):
            top = set(order[:size].tolist())
            if not (certify and np.all(np.isfinite(row))):
                break
            if sets is not None and top not in [set(s) for s in sets]:
                continue
            outside = [i for i in range(len(row)) if i not in top]
            holds = True
            for j in top:
                b = max(np.float32(row[i] + np.float32(eps * k_matrix[j, i])) for i in outside)
                margin = np.float32(row[j] - b)
                holds &= bool(margin > np.float32(np.float32(MARGIN_SLACK) * np.float32(abs(row[j]) + abs(b))))
            if holds:
                best, best_set = size, top
        sizes.append(best)
        chosen.append(best_set)
    return np.array(sizes), chosen


def tie_heavy_logits(rng, n, m):
    """Small integers (many ties, at the top and across set boundaries) and
    continuous rows."""
    ties = rng.integers(-2, 3, size=(n // 2, m)).astype("float32")
    smooth = (rng.normal(size=(n - n // 2, m)) * 3).astype("float32")
    return np.concatenate([ties, smooth])


# ------------------------------------------------------- the decision rule


@pytest.mark.parametrize("m,k", [(3, 1), (3, 2), (5, 2), (5, 4), (6, 3)])
def test_rtk_matches_brute_force(rng, m, k):
    logits = tie_heavy_logits(rng, 300, m)
    k_matrix = margin_matrix(rng, m, 0.5)
    outcomes = set()
    for epsilon in (0.0, 0.3, 1.0, 2.0):
        out = relaxed(logits, k_matrix, epsilon, k)
        sizes, sets = brute_force(logits, k_matrix, epsilon, k)
        np.testing.assert_array_equal(out[:, :m], logits)
        np.testing.assert_array_equal(numpy(certified_top_k(out)), sizes)
        # The classes above ⊥ are exactly the certified set, and the GloRo
        # prediction is the top class wherever a set is certified.
        for row, top in zip(out, sets):
            assert set(np.flatnonzero(row[:m] > row[m]).tolist()) == top
        expected = np.where(sizes > 0, np.argmax(logits, axis=1), m)
        np.testing.assert_array_equal(numpy(gloro_predictions(out)), expected)
        outcomes |= set(sizes.tolist())
    assert outcomes == set(range(k + 1))


def test_brute_force_sees_every_outcome(rng):
    # The parametrized comparison above is only meaningful if the cases
    # include certificates at every k', ties refused and ties certified in a
    # larger set.
    logits = tie_heavy_logits(rng, 300, 5)
    k_matrix = margin_matrix(rng, 5, 0.5)
    sizes, _ = brute_force(logits, k_matrix, 1.0, 4)
    assert set(sizes.tolist()) == {0, 1, 2, 3, 4}
    sizes, _ = brute_force(logits, k_matrix, 2.0, 2)
    top_ties = np.sum(logits == logits.max(axis=1, keepdims=True), axis=1) == 2
    assert set(sizes[top_ties].tolist()) == {0, 2}


@pytest.mark.parametrize("sets", [PAIRS, [[0, 1], [2, 3]], [[2], [0, 3], [1, 2, 3]], [[3, 1]]])
def test_affinity_matches_brute_force(rng, sets):
    logits = tie_heavy_logits(rng, 300, M)
    k_matrix = margin_matrix(rng, M, 0.5)
    k = max(len(s) for s in sets)
    for epsilon in (0.0, 0.3):
        out = relaxed(logits, k_matrix, epsilon, k, affinity=membership(sets, M))
        sizes, chosen = brute_force(logits, k_matrix, epsilon, k, sets=sets)
        np.testing.assert_array_equal(numpy(certified_top_k(out)), sizes)
        for row, top in zip(out, chosen):
            above = set(np.flatnonzero(row[:M] > row[M]).tolist())
            assert above == top and (not top or top in [set(s) for s in sets])
        assert (sizes > 0).any()


def test_bottom_value(rng):
    # Certified: f_(k*) minus the margin of the certified set where that lies
    # between the k*-th and (k*+1)-th logits. Rejected: above every class, at
    # f_(1) minus the best margin at any k'.
    logits = (rng.normal(size=(1000, 5)) * 3).astype("float32")
    k_matrix = margin_matrix(rng, 5, 0.5)
    out = relaxed(logits, k_matrix, 0.5, 2)
    sizes, _ = brute_force(logits, k_matrix, 0.5, 2)
    f = logits.astype(np.float64)
    order = np.argsort(-f, axis=1, kind="stable")
    margins = []
    for size in (1, 2):
        inside = np.zeros_like(f, bool)
        np.put_along_axis(inside, order[:, :size], True, axis=1)
        b = np.max(np.where(inside[:, None, :], -np.inf, f[:, None, :] + 0.5 * k_matrix[None]), axis=2)
        margins.append(np.min(np.where(inside, f - b, np.inf), axis=1))
    margins = np.stack(margins, axis=1)
    ranked = np.take_along_axis(f, order, axis=1)
    rows = np.arange(len(f))
    for size in (1, 2):
        at = sizes == size
        raw = ranked[rows, size - 1] - margins[rows, size - 1]
        inside = at & (raw > ranked[rows, size] + 1e-5) & (raw < ranked[rows, size - 1] - 1e-5)
        assert inside.sum() > 10
        np.testing.assert_allclose(out[inside, 5], raw[inside], rtol=1e-5, atol=1e-5)
    rejected = sizes == 0
    assert rejected.sum() > 10
    expected = np.maximum(ranked[:, 0] - margins.max(axis=1), ranked[:, 0])
    np.testing.assert_allclose(out[rejected, 5], expected[rejected], rtol=1e-5, atol=1e-5)
    assert (out[rejected, 5] > logits[rejected].max(axis=1)).all()


def test_bottom_separates_the_set_near_the_smallest_normals():
    # The nudges around ⊥ are as large as these logits: ⊥ must still leave
    # exactly the certified class above it.
    tiny = np.finfo(np.float32).tiny
    logits = np.array([[3 * tiny, tiny, -1.0], [0.0, -tiny, -1.0]], "float32")
    zeros = np.zeros((3, 3), "float32")
    out = relaxed(logits, zeros, 0.0, 1)
    plain = numpy(add_bottom_logit(logits, zeros, np.float32(0.0), True))
    np.testing.assert_array_equal(numpy(certified_top_k(out)), [1, 1])
    np.testing.assert_array_equal(numpy(gloro_predictions(out)), numpy(gloro_predictions(plain)))


def k1_and_singletons_agree_with_gloro(logits, k_matrix, epsilon, certify):
    plain = numpy(add_bottom_logit(logits, k_matrix, np.float32(epsilon), certify))
    m = logits.shape[1]
    for out in (
        relaxed(logits, k_matrix, epsilon, 1, certify),
        relaxed(logits, k_matrix, epsilon, 1, certify, affinity=np.eye(m)),
    ):
        np.testing.assert_array_equal(numpy(gloro_predictions(out)), numpy(gloro_predictions(plain)))
        np.testing.assert_array_equal(out[:, :m], plain[:, :m])
        np.testing.assert_allclose(out[:, m], plain[:, m], rtol=1e-6, atol=1e-6)
    # Singletons with a larger k: the pairs are computed but never match, so
    # the decisions are still GloroNet's (⊥ of rejected rows may differ: it
    # follows the best margin at any k').
    wider = relaxed(logits, k_matrix, epsilon, 2, certify, affinity=np.eye(m))
    np.testing.assert_array_equal(numpy(gloro_predictions(wider)), numpy(gloro_predictions(plain)))
    np.testing.assert_array_equal(numpy(certified_top_k(wider)), numpy(certified_top_k(plain)))
    return plain


def test_k1_and_singletons_are_gloro(rng):
    logits = tie_heavy_logits(rng, 400, 5)
    logits[7, 2] = np.nan
    logits[8, 0] = np.inf
    logits[9, 4] = -np.inf
    k_matrix = margin_matrix(rng, 5, 0.5)
    for epsilon in (0.0, 0.3):
        plain = k1_and_singletons_agree_with_gloro(logits, k_matrix, epsilon, True)
        assert 0.2 < (np.argmax(plain, axis=1) < 5).mean() < 0.8
    off = k1_and_singletons_agree_with_gloro(logits, k_matrix, 0.3, ops.convert_to_tensor(False))
    assert (np.argmax(off, axis=1) == 5).all()


def test_certify_false_and_non_finite_rows(rng):
    logits = (rng.normal(size=(50, 4)) * 10).astype("float32")
    k_matrix = margin_matrix(rng, 4, 0.01)
    assert (numpy(certified_top_k(relaxed(logits, k_matrix, 0.1, 3))) > 0).all()
    for affinity in (None, membership(PAIRS, 4)):
        off = relaxed(logits, k_matrix, 0.1, 3, ops.convert_to_tensor(False), affinity)
        assert (numpy(certified_top_k(off)) == 0).all()
        assert np.isposinf(off[:, 4]).all()
    for bad in (np.nan, np.inf, -np.inf):
        rows = np.array([[3.0, 0.0, 0.0, -5.0], [3.0, bad, 0.0, -5.0]], "float32")
        out = relaxed(rows, np.zeros((4, 4), "float32"), 0.1, 3)
        assert np.all(out[1, :4] == -np.inf) and out[1, 4] == np.inf
        np.testing.assert_array_equal(numpy(certified_top_k(out)), [3, 0])


# ------------------------------------------------------------------ models


def blobs(rng, n=320, spread=0.12):
    labels = rng.integers(0, M, size=n)
    x = CENTRES[labels] + spread * rng.normal(size=(n, 2))
    return x.astype("float32"), labels


def mlp(width=32):
    x = keras.Input((2,))
    z = layers.Dense(width)(x)
    z = layers.MinMax()(z)
    z = layers.Dense(width)(z)
    z = layers.MinMax()(z)
    return x, layers.Dense(M)(z)


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(1)
    x, y = blobs(rng)
    keras.utils.set_random_seed(1)
    g = RtkGloroNet(*mlp(), epsilon=EPSILON, k=2)
    g.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_crossentropy",
              metrics=["rtk_vra", "certified_k", "vra"])
    history = g.fit(x, y, epochs=12, batch_size=64, verbose=0)
    return g, x, y, history


def test_fit_logs_and_evaluate_matches_hand_computation(trained):
    g, x, y, history = trained
    for name in ("rtk_vra", "certified_k", "vra"):
        assert np.isfinite(history.history[name]).all()
    out = g.predict(x, verbose=0)
    results = g.evaluate(x, y, verbose=0, return_dict=True)
    above = out[:, :M] > out[:, M:]
    assert results["rtk_vra"] == pytest.approx(above[np.arange(len(y)), y].mean(), abs=1e-6)
    assert results["certified_k"] == pytest.approx(above.sum(axis=1).mean(), abs=1e-6)
    assert results["vra"] == pytest.approx((np.argmax(out, axis=1) == y).mean(), abs=1e-6)
    # The relaxation pays off on overlapping pairs of classes: the same
    # weights certify far fewer labels as single classes.
    plain = gloro.GloroNet(model=g.f, epsilon=EPSILON)
    plain_vra = (numpy(gloro_predictions(plain.predict(x, verbose=0))) == y).mean()
    assert results["rtk_vra"] > 0.9 and results["rtk_vra"] > plain_vra + 0.3


def test_model_decisions_match_the_rule_on_frozen_constants(trained):
    g, x, _, _ = trained
    logits = numpy(g.f(x))
    sizes, _ = brute_force(logits, g.lipschitz_constant(), EPSILON, 2)
    got = numpy(certified_top_k(g.predict(x, verbose=0)))
    np.testing.assert_array_equal(got, sizes)
    assert (sizes == 2).sum() >= 20


def set_gap(f, x, top):
    """`max_{i not in T} f_i - min_{j in T} f_j` per row (< 0: T intact)."""
    logits = ops.cast(f(x), "float32")
    inner = ops.min(ops.where(top, logits, np.inf), axis=1)
    outer = ops.max(ops.where(top, -np.inf, logits), axis=1)
    return outer - inner


def attack_sets(f, x, top, epsilon, steps=40, restarts=3, seed=0):
    """L2 PGD maximizing the set gap; returns the worst gap found per row and
    the attacked points."""
    rng = np.random.default_rng(seed)
    top_t = ops.convert_to_tensor(top)
    gap_and_grad = backend.value_and_grad(lambda z: set_gap(f, z, top_t))
    worst, worst_x = np.full(len(x), -np.inf), x.copy()
    radius = np.float32(epsilon * (1 - 1e-6))
    for restart in range(restarts):
        delta = np.zeros_like(x) if restart == 0 else rng.normal(size=x.shape).astype("float32") * radius / 2
        for _ in range(steps + 1):
            norms = np.linalg.norm(delta, axis=1, keepdims=True)
            delta = (delta * np.minimum(1.0, radius / np.maximum(norms, 1e-30))).astype("float32")
            point = x + delta
            gap, grad = gap_and_grad(ops.convert_to_tensor(point))
            gap, grad = numpy(gap), numpy(grad)
            better = gap > worst
            worst = np.where(better, gap, worst)
            worst_x[better] = point[better]
            step = grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-30)
            delta = delta + np.float32(epsilon / 8) * step.astype("float32")
    return worst, worst_x


def test_certified_sets_survive_attacks(trained):
    g, x, _, _ = trained
    out = g.predict(x, verbose=0)
    sizes = numpy(certified_top_k(out))
    chosen = sizes > 0
    assert (sizes == 2).sum() >= 20
    top = out[chosen, :M] > out[chosen, M:]
    worst, worst_x = attack_sets(g.f, x[chosen], top, EPSILON)
    assert np.all(np.linalg.norm(worst_x - x[chosen], axis=1) <= EPSILON)
    assert (worst < 0).all(), f"certified set broken at {np.flatnonzero(worst >= 0)}"
    # In particular the top class at any attacked point is in the set.
    attacked = numpy(g.f(worst_x))
    assert top[np.arange(len(top)), np.argmax(attacked, axis=1)].all()
    # The attack is not toothless: it gets closer to breaking the sets, and
    # breaks them at a larger radius.
    np.testing.assert_array_less(numpy(set_gap(g.f, x[chosen], top)), worst + 1e-6)
    assert (attack_sets(g.f, x[chosen], top, 4 * EPSILON, steps=30, restarts=1)[0] >= 0).any()


def wrappers(f, epsilon):
    return [
        gloro.GloroNet(model=f, epsilon=epsilon),
        RtkGloroNet(model=f, epsilon=epsilon, k=1),
        AffinityGloroNet(model=f, epsilon=epsilon, affinity_sets=[[c] for c in range(M)]),
    ]


def assert_same_outputs(outputs):
    plain = outputs[0]
    for out in outputs[1:]:
        np.testing.assert_array_equal(numpy(gloro_predictions(out)), numpy(gloro_predictions(plain)))
        np.testing.assert_array_equal(out[:, :M], plain[:, :M])
        np.testing.assert_allclose(out[:, M], plain[:, M], rtol=1e-6, atol=1e-6)


def test_k1_and_singleton_networks_are_gloro_nets(trained, rng):
    g, x, _, _ = trained
    # A smaller radius than trained for: some points are certified.
    nets = wrappers(g.f, 0.05)
    data = np.concatenate([x, [[np.nan, 0.0], [np.inf, 0.0]]]).astype("float32")
    outputs = [net.predict(data, verbose=0) for net in nets]
    assert_same_outputs(outputs)
    plain = outputs[0]
    assert (plain[-2:, M] == np.inf).all()
    assert 0.1 < (np.argmax(plain, axis=1) == M).mean() < 0.9

    # Constructed ties: a head whose columns 0 and 1 are equal makes the two
    # logits tie everywhere; and after a weight change nothing is certified.
    f = keras.Model(*mlp())
    kernel = f.layers[-1].kernel
    tied = numpy(kernel)
    tied[:, 1] = tied[:, 0]
    tied[:, 0] *= 3
    tied[:, 1] *= 3
    kernel.assign(tied)
    f.layers[-1].bias.assign(np.array([0.5, 0.5, 0.0, 0.0], "float32"))
    nets = wrappers(f, 0.0)
    points = rng.normal(size=(64, 2)).astype("float32") * 0.1
    outputs = [net.predict(points, verbose=0) for net in nets]
    assert_same_outputs(outputs)
    logits = numpy(f(points))
    tie_rows = (logits[:, 0] == logits[:, 1]) & (logits[:, 0] == logits.max(axis=1))
    assert tie_rows.sum() > 10
    assert (np.argmax(outputs[0][tie_rows], axis=1) == M).all()
    kernel.assign(tied * 1.01)
    stale = [numpy(net(points)) for net in nets]
    assert_same_outputs(stale)
    assert (numpy(certified_top_k(stale[1])) == 0).all()


def test_affinity_network_certifies_only_its_sets(trained):
    g, x, y, _ = trained
    # A radius at which both a pair and a single class get certified.
    a = AffinityGloroNet(model=g.f, epsilon=0.1, affinity_sets=[[0, 1], [2]])
    a.compile(metrics=["affinity_vra", "certified_k"])
    out = a.predict(x, verbose=0)
    logits = numpy(g.f(x))
    sizes, chosen = brute_force(logits, a.lipschitz_constant(), 0.1, 2, sets=[[0, 1], [2]])
    np.testing.assert_array_equal(numpy(certified_top_k(out)), sizes)
    assert {frozenset(s) for s in chosen if s} == {frozenset({0, 1}), frozenset({2})}
    results = a.evaluate(x, y, verbose=0, return_dict=True)
    above = out[:, :M] > out[:, M:]
    assert results["affinity_vra"] == pytest.approx(above[np.arange(len(y)), y].mean(), abs=1e-6)
    assert results["certified_k"] == pytest.approx(sizes.mean(), abs=1e-6)
    assert a.k == 2 and a.affinity_sets == [[0, 1], [2]]


# ----------------------------------------------------------------- metrics


def test_metrics_by_hand():
    y_pred = np.array([
        [3.0, 2.0, 0.0, 1.0],     # certified {0, 1}
        [3.0, 2.0, 0.0, 4.0],     # rejected
        [1.0, 5.0, 2.0, 1.5],     # certified {1, 2}
        [np.nan, 5.0, 2.0, 1.5],  # non-finite: nothing
        [0.0, 5.0, 2.0, 2.0],     # certified {1}: class 2 ties ⊥, not above
    ], "float32")
    labels = np.array([1, 0, 2, 1, 2])
    rtk = gloro.metrics.get("rtk_vra")
    rtk.update_state(labels, y_pred)
    assert float(rtk.result()) == pytest.approx(2 / 5)
    certified = gloro.metrics.get("certified_k")
    certified.update_state(labels, y_pred)
    assert float(certified.result()) == pytest.approx((2 + 0 + 2 + 0 + 1) / 5)
    affinity = gloro.metrics.get("affinity_vra")
    affinity.update_state(np.eye(3)[labels], y_pred, sample_weight=np.array([1, 1, 0, 0, 0]))
    assert affinity.name == "affinity_vra" and float(affinity.result()) == pytest.approx(1 / 2)
    np.testing.assert_array_equal(numpy(certified_top_k(y_pred)), [2, 0, 2, 0, 1])


def test_metrics_on_plain_gloro_outputs_mean_k1(trained):
    g, x, y, _ = trained
    plain = gloro.GloroNet(model=g.f, epsilon=EPSILON)
    plain.compile(metrics=["rtk_vra", "certified_k", "vra", "rejection_rate"])
    results = plain.evaluate(x, y, verbose=0, return_dict=True)
    assert results["rtk_vra"] == pytest.approx(results["vra"], abs=1e-6)
    assert results["certified_k"] == pytest.approx(1 - results["rejection_rate"], abs=1e-6)


# ------------------------------------------------------------------ saving


def test_save_and_load(trained, tmp_path):
    g, x, _, _ = trained
    a = AffinityGloroNet(model=g.f, epsilon=EPSILON, affinity_sets=PAIRS)
    for net in (g, a):
        path = tmp_path / f"{net.name}.keras"
        net.save(path)
        loaded = gloro.load_model(path)
        assert type(loaded) is type(net) and loaded.k == net.k
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), net.predict(x, verbose=0))
    assert loaded.affinity_sets == PAIRS
    assert keras.saving.get_registered_name(RtkGloroNet) == "gloro>RtkGloroNet"


@pytest.mark.tensorflow
def test_export_serves_the_same_outputs(trained, tmp_path):
    g, x, _, _ = trained
    g.export(tmp_path / "served", verbose=False)
    served = gloro.load_saved_model(tmp_path / "served")
    out = served.serve(x).numpy()
    expected = g.predict(x, verbose=0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(numpy(certified_top_k(out)), numpy(certified_top_k(expected)))


# --------------------------------------------------------------- arguments


@pytest.mark.parametrize("k,match", [
    (0, "1 <= k < m = 4"), (4, "1 <= k < m = 4"), (-1, "1 <= k"),
    (2.0, "must be an int"), (True, "must be an int"), (None, "must be an int"),
])
def test_bad_k(k, match):
    with pytest.raises(ValueError, match=match):
        RtkGloroNet(*mlp(width=4), epsilon=0.1, k=k)


@pytest.mark.parametrize("sets,match", [
    ([], "non-empty list of lists"),
    ([[0], []], r"Affinity set 1 must be a non-empty"),
    ([[0, 4]], r"Affinity set 0 \[0, 4\] holds 4"),
    ([[-1]], r"holds -1"),
    ([[1, 1]], r"\[1, 1\] lists a class twice"),
    ([[0], [0, 1, 2, 3]], r"Affinity set 1 \[0, 1, 2, 3\] holds all 4"),
    ([[0], ["1"]], r"holds '1'"),
    ("01", "non-empty list of lists"),
])
def test_bad_affinity_sets(sets, match):
    with pytest.raises(ValueError, match=match):
        AffinityGloroNet(*mlp(width=4), epsilon=0.1, affinity_sets=sets)


def test_bad_arguments_to_the_function():
    logits = np.zeros((2, 3), "float32")
    with pytest.raises(ValueError, match="1 <= k < m = 3"):
        add_relaxed_bottom_logit(logits, np.zeros((3, 3)), 0.1, 3)
    with pytest.raises(ValueError, match=r"shape \(s, 3\)"):
        add_relaxed_bottom_logit(logits, np.zeros((3, 3)), 0.1, 2, affinity=np.eye(4))
