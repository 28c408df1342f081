"""The ⊥ logit, predictions, labels, radii and metrics against NumPy."""

import keras
import numpy as np
import pytest

from gloro import losses, metrics
from gloro.certificates import MARGIN_SLACK, add_bottom_logit, certified_radius, gloro_predictions, sparse_labels


def numpy(x):
    return keras.ops.convert_to_numpy(x)


def bottom(logits, k, epsilon, certify=True):
    return numpy(add_bottom_logit(logits, k, np.float32(epsilon), certify))


def margin_matrix(rng, m, scale=1.0):
    k = np.abs(rng.normal(size=(m, m))) * scale
    k = (k + k.T).astype("float32")
    np.fill_diagonal(k, 0.0)
    return k


def exact_certified(logits, k, epsilon):
    """float64 test `f_j - f_i > eps * K[j, i]` for all `i != j`, and whether
    the row is far enough from the threshold for float32 not to matter."""
    logits = logits.astype(np.float64)
    j = np.argmax(logits, axis=1)
    rows = np.arange(len(logits))
    gaps = logits[rows, j][:, None] - logits - epsilon * k.astype(np.float64)[j]
    gaps[rows, j] = np.inf
    scale = np.abs(logits).max(axis=1) + epsilon * k.max()
    clear = np.all(np.abs(gaps) > 1e-4 * scale[:, None], axis=1)
    return np.all(gaps > 0, axis=1), clear


def test_certification_matches_the_margin_test(rng):
    logits = rng.normal(size=(2000, 5)).astype("float32") * 3
    k = margin_matrix(rng, 5)
    for epsilon in (0.0, 0.1, 0.5, 2.0):
        out = bottom(logits, k, epsilon)
        assert out.shape == (2000, 6) and out.dtype == np.float32
        np.testing.assert_array_equal(out[:, :5], logits)
        certified, clear = exact_certified(logits, k, epsilon)
        granted = np.argmax(out, axis=1) != 5
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(granted[clear], certified[clear])
        # Near the threshold rounding may only refuse.
        assert not (granted & ~certified).any()
        # Where certified, argmax is the class itself.
        np.testing.assert_array_equal(np.argmax(out, axis=1)[granted], np.argmax(logits, axis=1)[granted])
        # The ⊥ logit is the best competitor at radius epsilon (up to the
        # nudge of rejected rows).
        j = np.argmax(logits, axis=1)
        competitors = logits.astype(np.float64) + epsilon * k.astype(np.float64)[j]
        competitors[np.arange(2000), j] = -np.inf
        np.testing.assert_allclose(out[granted, 5], competitors.max(axis=1)[granted], rtol=1e-6, atol=1e-6)


def test_ties_are_never_certified():
    logits = np.array([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 5.0, 5.0]], "float32")
    k = np.zeros((3, 3), "float32")  # even with constant margins and epsilon 0
    for epsilon in (0.0, 1.0):
        out = bottom(logits, k, epsilon)
        assert (np.argmax(out, axis=1) == 3).all()
        assert (out[:, 3] > out[:, :3].max(axis=1)).all()
        np.testing.assert_array_equal(numpy(gloro_predictions(out)), [3, 3, 3])


def test_exact_threshold_and_slack_refuse():
    # Margin exactly eps * K, and margins above it by less than the slack.
    k = np.array([[0.0, 1.0], [1.0, 0.0]], "float32")
    logits = np.array([
        [1.0, 0.0],
        [1.0 + 2.0**-21, 0.0],
        [1000.0, 0.0],
        [1.0, 0.0],
    ], "float32")
    epsilons = [1.0, 1.0, 1000.0 - 2.0**-12, 1.0 - 2.0**-10]
    predictions = [int(np.argmax(bottom(logits[i:i + 1], k, e)[0])) for i, e in enumerate(epsilons)]
    # The last one clears the margin by 2**-10 >> slack, so it is certified.
    assert predictions == [2, 2, 2, 0]


def test_rejection_nudge_survives_denormal_flushing():
    # top = 0 and a competitor exactly at 0: the ⊥ logit must be strictly
    # above 0 by a normal float, so argmax picks ⊥ even if denormals are
    # flushed.
    logits = np.array([[0.0, -1.0]], "float32")
    k = np.array([[0.0, 1.0], [1.0, 0.0]], "float32")
    out = bottom(logits, k, 1.0)
    assert out[0, 2] >= np.finfo(np.float32).tiny
    assert np.argmax(out[0]) == 2


def test_certify_false_certifies_nothing(rng):
    logits = rng.normal(size=(50, 4)).astype("float32") * 10
    k = margin_matrix(rng, 4, 0.01)
    assert (np.argmax(bottom(logits, k, 0.1), axis=1) != 4).all()
    off = bottom(logits, k, 0.1, keras.ops.convert_to_tensor(False))
    assert (np.argmax(off, axis=1) == 4).all()
    assert np.isposinf(off[:, 4]).all()
    np.testing.assert_array_equal(off[:, :4], logits)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows(bad):
    logits = np.array([[3.0, 0.0, 0.0], [3.0, bad, 0.0]], "float32")
    out = bottom(logits, np.zeros((3, 3), "float32"), 0.1)
    np.testing.assert_array_equal(out[0, :3], logits[0])
    assert np.all(out[1, :3] == -np.inf) and out[1, 3] == np.inf
    np.testing.assert_array_equal(numpy(gloro_predictions(out)), [0, 3])


def test_the_diagonal_of_the_constants_is_ignored(rng):
    # K[j, j] bounds f_j - f_j = 0: whatever it holds, the argmax's own
    # column is never a competitor.
    logits = rng.normal(size=(200, 5)).astype("float32") * 3
    k = margin_matrix(rng, 5, 0.2)
    shifted = k + np.diag(rng.uniform(1.0, 50.0, size=5)).astype("float32")
    np.testing.assert_array_equal(bottom(logits, shifted, 0.5), bottom(logits, k, 0.5))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_diagonal_that_is_not_finite_certifies_nothing(rng, bad):
    logits = rng.normal(size=(50, 4)).astype("float32") * 10
    k = margin_matrix(rng, 4, 0.01)
    np.fill_diagonal(k, bad)
    assert (np.argmax(bottom(logits, k, 0.1), axis=1) == 4).all()


def _certificate_namespaces(t):
    """Every namespace `backend.certificate_ops` picks for tensors like `t`:
    on torch, NumPy's for a tensor that needs no gradient and torch's for
    one that does; Keras' on the other backends."""
    from gloro import backend

    namespaces = [backend.certificate_ops(t)]
    if keras.backend.backend() == "torch":
        namespaces.append(backend.certificate_ops(t.clone().requires_grad_(True)))
        assert namespaces[0] is not namespaces[1]
    return namespaces


def test_certificate_ops_are_keras_ops():
    """`backend.certificate_ops` (direct torch or NumPy calls on torch) gives
    what `keras.ops` gives, NaN and infinities included."""
    ops = keras.ops
    x = np.array([[1.0, np.nan, -2.0], [np.inf, 3.0, 3.0], [-np.inf, -1.0, 0.0], [0.5, 0.5, -0.0]], "float32")
    t = ops.convert_to_tensor(x)
    rows = ops.argmax(ops.convert_to_tensor(np.nan_to_num(x)), axis=1)
    for xp in _certificate_namespaces(t):
        ours_t = xp.cast(t, "float32")
        mask = xp.cast(ops.convert_to_tensor(x > 0), "bool")
        ours_rows = xp.argmax(xp.cast(ops.convert_to_tensor(np.nan_to_num(x, nan=0.0)), "float32"), axis=1)
        pairs = [
            (ours_t, t),
            (xp.convert_to_tensor(x), ops.convert_to_tensor(x)),
            (xp.max(ours_t, axis=1), ops.max(t, axis=1)),
            (ours_rows, rows),
            (xp.take(ours_t, ours_rows, axis=0), ops.take(t, rows, axis=0)),
            (xp.finite_rows(ours_t), ops.all(ops.isfinite(t), axis=1)),
            (xp.where(mask, ours_t, np.inf), ops.where(x > 0, t, np.inf)),
            (xp.where(mask, ours_t, -ours_t), ops.where(x > 0, t, -t)),
            (xp.concatenate([ours_t, ours_t[:, :1]], axis=1), ops.concatenate([t, t[:, :1]], axis=1)),
        ]
        for ours, theirs in pairs:
            ours, theirs = numpy(ours), numpy(theirs)
            assert ours.shape == theirs.shape
            if ours.dtype.kind == "f":
                assert ours.dtype == theirs.dtype
            np.testing.assert_array_equal(ours, theirs)
        # The result is a tensor of the backend whatever computed it.
        assert ops.is_tensor(xp.concatenate([ours_t, ours_t], axis=1))


def test_the_bottom_logit_is_the_same_from_every_namespace(rng):
    """The ⊥ logit computed by each namespace `certificate_ops` picks (on
    torch: NumPy's for `predict`, torch's where gradients flow) is the same
    bits, on rows built to sit on every edge: ties, thresholds, zeros,
    denormals, huge and non-finite logits, bad epsilons and diagonals."""
    m = 6
    logits = (rng.normal(size=(400, m)) * 3).astype("float32")
    logits[:40, 1] = logits[:40, 0] = logits[:40].max(axis=1) + 1  # ties
    logits[40:60] = 0.0
    logits[60:80] *= 1e-40  # denormals
    logits[80:100] *= 1e37
    logits[100:110, 2] = np.nan
    logits[110:120, 3] = np.inf
    logits[120:130, 4] = -np.inf
    k = margin_matrix(rng, m, 0.3)
    k[0, 1] = k[1, 0] = 0.0
    bad_diagonal = k.copy()
    np.fill_diagonal(bad_diagonal, np.nan)
    t = keras.ops.convert_to_tensor(logits)
    namespaces = _certificate_namespaces(t)
    cases = [(k, e, c) for e in (0.0, 0.3, 1.0, 1e30, np.inf, np.nan, -0.5) for c in (True, False)]
    cases.append((bad_diagonal, 0.3, True))
    for constants, epsilon, certify in cases:
        args = (keras.ops.convert_to_tensor(constants), keras.ops.convert_to_tensor(np.float32(epsilon)),
                keras.ops.convert_to_tensor(certify))
        outputs = [numpy(add_bottom_logit(t, *args))]
        if len(namespaces) > 1:
            outputs.append(numpy(add_bottom_logit(t.clone().requires_grad_(True), *args).detach()))
        for out in outputs[1:]:
            assert out.dtype == outputs[0].dtype == np.float32
            np.testing.assert_array_equal(out.view(np.int32), outputs[0].view(np.int32))
        # The edges do reach both outcomes.
        granted = np.argmax(outputs[0], axis=1) != m
        if epsilon == 0.3 and certify and constants is k:
            assert 0 < granted.sum() < len(logits) - 40
            assert not granted[:40].any() and not granted[100:130].any()


def test_works_traced_with_a_dynamic_batch(rng):
    # Inside a model, predict compiles the function (tf.function with an
    # unknown batch size on TensorFlow, jit on JAX).
    k = margin_matrix(rng, 3)
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda z: add_bottom_logit(z, k, 0.2, True), output_shape=(4,))(inputs)
    model = keras.Model(inputs, outputs)
    logits = rng.normal(size=(37, 3)).astype("float32")
    traced, eager = model.predict(logits, batch_size=8, verbose=0), bottom(logits, k, 0.2)
    # A compiler may fuse the multiply-add (one rounding instead of two).
    np.testing.assert_array_equal(traced[:, :3], eager[:, :3])
    np.testing.assert_allclose(traced[:, 3], eager[:, 3], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.argmax(traced, axis=1), np.argmax(eager, axis=1))


def test_gloro_predictions_against_numpy(rng):
    y_pred = rng.normal(size=(100, 5)).astype("float32")
    y_pred[3, 1] = np.nan
    y_pred[7, 4] = np.nan  # NaN only in ⊥: the row is still read by argmax
    expected = np.argmax(np.nan_to_num(y_pred, nan=-np.inf), axis=1)
    expected[3] = 4
    got = numpy(gloro_predictions(y_pred))
    assert got.dtype == np.int32
    mask = np.arange(100) != 7
    np.testing.assert_array_equal(got[mask], expected[mask])


@pytest.mark.parametrize("form", ["flat", "column", "one_hot", "soft", "float"])
def test_sparse_labels(form, rng):
    labels = rng.integers(0, 4, 10)
    y = {
        "flat": labels,
        "column": labels[:, None],
        "one_hot": np.eye(4)[labels],
        "soft": np.eye(4)[labels] * 0.7 + 0.075,
        "float": labels.astype("float32"),
    }[form]
    got = numpy(sparse_labels(y, 4))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, labels)


def test_sparse_labels_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        sparse_labels(np.zeros((5, 3)), 4)


@pytest.mark.tensorflow
def test_sparse_labels_with_unknown_shapes():
    import tensorflow as tf

    labels = np.array([2, 0, 1], "int64")

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int64)])
    def unknown_rank(y):
        return sparse_labels(y, 3)

    @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.int64)])
    def unknown_batch(y):
        return sparse_labels(y, 3)

    np.testing.assert_array_equal(unknown_rank(labels[:, None]).numpy(), labels)
    np.testing.assert_array_equal(unknown_batch(labels[:, None]).numpy(), labels)


def test_certified_radius_is_the_threshold(rng):
    logits = rng.normal(size=(500, 4)).astype("float32") * 3
    k = margin_matrix(rng, 4)
    radius = certified_radius(logits, k)
    assert radius.dtype == np.float64 and (radius >= 0).all() and np.isfinite(radius).all()
    j = np.argmax(logits, axis=1)
    gaps = logits[np.arange(500), j][:, None].astype(np.float64) - logits
    ratio = np.where(np.arange(4) == j[:, None], np.inf, gaps / np.where(k[j] > 0, k[j], 1))
    exact = ratio.min(axis=1)
    # Below the exact threshold by no more than the documented slack.
    k_off = np.where(np.arange(4) == j[:, None], np.inf, k[j])
    slack = 2 * MARGIN_SLACK * 2 * np.abs(logits).max(axis=1) / k_off.min(axis=1)
    assert (radius <= exact).all()
    assert (exact - radius <= slack * (1 + 1e-6) + 1e-12).all()
    # Certified just below the radius, refused just above it.
    for i in np.flatnonzero(radius > 1e-3)[:50]:
        row = logits[i:i + 1]
        assert np.argmax(bottom(row, k, radius[i] * (1 - 1e-4))[0]) == j[i]
        assert np.argmax(bottom(row, k, radius[i] * (1 + 1e-4))[0]) == 4


def test_certified_radius_special_rows():
    k = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    logits = np.array([
        [1.0, 1.0, 0.0],      # tie
        [np.nan, 0.0, 0.0],   # non-finite
        [0.0, -1.0, 3.0],     # class 2: margin to 1 is 4 (K 1), to 0 constant
        [5.0, 1.0, 1.0],      # class 0: margin to 1 is 4 (K 1), to 2 constant
    ])
    radius = certified_radius(logits, k)
    assert radius[0] == 0 and radius[1] == 0
    assert radius[2] == pytest.approx(4.0, rel=1e-5) and radius[3] == pytest.approx(4.0, rel=1e-5)
    assert certified_radius(np.array([[3.0, 0.0]]), np.zeros((2, 2)))[0] == np.inf
    assert certified_radius(np.zeros((0, 3)), k).shape == (0,)
    assert MARGIN_SLACK == 2.0**-20


@pytest.mark.parametrize("labels_form", ["flat", "column", "one_hot"])
def test_metrics_against_numpy(rng, labels_form):
    y_pred = rng.normal(size=(64, 4)).astype("float32")
    y_pred[5, 0] = np.nan
    labels = rng.integers(0, 3, 64)
    y_true = {"flat": labels, "column": labels[:, None], "one_hot": np.eye(3)[labels]}[labels_form]
    finite = np.isfinite(y_pred[:, :3]).all(axis=1)
    clean = (np.argmax(np.nan_to_num(y_pred[:, :3], nan=-np.inf), axis=1) == labels) & finite
    predicted = np.where(finite, np.argmax(y_pred, axis=1), 3)
    expected = {
        metrics.CleanAccuracy: clean.mean(),
        metrics.VerifiedRobustAccuracy: (predicted == labels).mean(),
        metrics.RejectionRate: (predicted == 3).mean(),
    }
    for cls, value in expected.items():
        metric = cls()
        metric.update_state(y_true, y_pred)
        assert float(numpy(metric.result())) == pytest.approx(value, abs=1e-6), cls.__name__


def test_metric_shorthands_and_config():
    for name, cls in [("clean_acc", metrics.CleanAccuracy), ("vra", metrics.VerifiedRobustAccuracy),
                      ("rejection_rate", metrics.RejectionRate)]:
        metric = metrics.get(name)
        assert type(metric) is cls and metric.name == name
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
        assert type(clone) is cls and clone.name == name
    assert metrics.get("accuracy") == "accuracy"


def test_metrics_and_loss_in_a_compiled_model(rng):
    # Keras reshapes labels on their way to losses and metrics (and traces
    # them with an unknown batch size); the results must not depend on the
    # label layout.
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(4)(inputs))  # 3 classes and ⊥
    model.compile(loss=losses.Crossentropy(), metrics=[metrics.VerifiedRobustAccuracy(), metrics.RejectionRate()])
    x = rng.normal(size=(40, 4)).astype("float32")
    labels = rng.integers(0, 3, 40)
    y_pred = model.predict(x, verbose=0).astype(np.float64)
    predicted = np.argmax(y_pred, axis=1)
    shifted = y_pred - y_pred.max(axis=1, keepdims=True)
    log_q = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    for y in (labels, labels[:, None], np.eye(3, dtype="float32")[labels]):
        logs = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
        assert logs["loss"] == pytest.approx(-log_q[np.arange(40), labels].mean(), rel=1e-5)
        assert logs["vra"] == pytest.approx((predicted == labels).mean(), abs=1e-6)
        assert logs["rejection_rate"] == pytest.approx((predicted == 3).mean(), abs=1e-6)
