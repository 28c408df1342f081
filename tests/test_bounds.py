"""`gloro.lipschitz` against exact answers, on whichever backend Keras runs.

Exact norms come from matrices built here, independently of the library: a
plain loop convolution, and Keras' own operations applied to basis vectors.
"""

import math
import os
import subprocess
import sys
from fractions import Fraction

import keras
import numpy as np
import pytest

from gloro import lipschitz

# Relative rounding allowed for results computed in float32 by a backend.
FLOAT32_REL = 1e-5


# ------------------------------------------------------------------ helpers


def compiled(fn):
    """Compiles `fn` with the backend's compiler, as a layer would."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def gradient(fn, x):
    """`d sum(fn(x)) / dx` as a NumPy array."""
    x = keras.ops.convert_to_tensor(x)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(fn(x))
        return tape.gradient(total, x).numpy()
    if keras.backend.backend() == "jax":
        import jax

        # Compiled whole: eager JAX would compile each operation separately.
        return np.asarray(jax.jit(jax.grad(lambda t: keras.ops.sum(fn(t))))(x))
    import torch

    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(keras.ops.sum(fn(x)), x)[0].numpy()


def reference_conv_matrix(kernel, input_shape, strides, padding, dilation):
    """The convolution's matrix by a plain loop over outputs and taps.

    Keras' "same" padding: `ceil(size / stride)` outputs and `total // 2`
    zeros before the input, the rest after.
    """
    kernel = np.asarray(kernel, np.float64)
    kh, kw, cin, cout = kernel.shape
    h, w, _ = input_shape
    (sh, sw), (dh, dw) = np.broadcast_to(strides, 2), np.broadcast_to(dilation, 2)
    geometry = []
    for size, taps, s, d in ((h, kh, sh, dh), (w, kw, sw, dw)):
        extent = (taps - 1) * d + 1
        if padding == "same":
            out = math.ceil(size / s)
            before = max((out - 1) * s + extent - size, 0) // 2
        else:
            out = (size - extent) // s + 1 if size >= extent else 0
            before = 0
        geometry.append((out, before))
    (oh, top), (ow, left) = geometry
    dim = h * w * cin
    basis = np.eye(dim).reshape(dim, h, w, cin)
    out = np.zeros((dim, oh, ow, cout))
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for b in range(kw):
                    r, c = i * sh + a * dh - top, j * sw + b * dw - left
                    if 0 <= r < h and 0 <= c < w:
                        out[:, i, j] += basis[:, r, c] @ kernel[a, b]
    return out.reshape(dim, -1)


def exact_norm(matrix):
    return float(np.linalg.svd(matrix, compute_uv=False)[0]) if matrix.size else 0.0


def keras_matrix(fn, input_shape):
    """The matrix of a linear Keras operation, one float32 basis vector per row."""
    dim = int(np.prod(input_shape))
    basis = np.eye(dim, dtype=np.float32).reshape((dim,) + tuple(input_shape))
    out = keras.ops.convert_to_numpy(compiled(fn)(basis))
    return out.reshape(dim, -1).astype(np.float64)


def unit(rng, shape):
    v = rng.normal(size=shape).astype(np.float32)
    return v / np.linalg.norm(v)


CONV_CASES = [
    # (input_shape, filters, kernel, strides, padding, dilation)
    ((6, 6, 2), 3, 3, 1, "same", 1),
    ((6, 6, 2), 3, 3, 1, "valid", 1),
    ((7, 7, 2), 4, 3, 2, "same", 1),
    ((7, 7, 2), 4, 3, 2, "valid", 1),
    ((8, 8, 1), 4, 4, 2, "same", 1),
    ((8, 8, 1), 4, 4, 2, "valid", 1),
    ((5, 9, 3), 2, (2, 3), (1, 2), "same", 1),
    ((9, 9, 2), 2, 3, 1, "same", 2),
    ((4, 4, 2), 3, 5, 1, "same", 1),
    ((10, 10, 2), 3, 3, 3, "same", 1),
    # Dilation differing per axis, also with a stride (which Keras' Conv2D
    # refuses, but the math covers).
    ((9, 11, 2), 3, 3, 1, "same", (2, 3)),
    ((9, 11, 2), 3, 3, 2, "same", (2, 3)),
    ((9, 11, 2), 3, 3, 2, "valid", (2, 3)),
    ((8, 8, 1), 2, 2, 2, "valid", 2),
    # Kernels smaller than the stride (rows no window reads or writes).
    ((7, 7, 2), 3, 1, 2, "same", 1),
    ((8, 7, 1), 2, 2, 3, "valid", 1),
    # "Same" with an input the stride divides, whose adjoint is Keras'
    # "same" transposed convolution: even kernels pad unevenly.
    ((6, 6, 2), 2, 4, 1, "same", 1),
    ((12, 12, 2), 2, 4, 4, "same", 1),
    ((8, 8, 2), 3, 2, 2, "same", 1),
]
CASE_IDS = [f"case{i}" for i in range(len(CONV_CASES))]


def conv_case(case, rng, scale=1.0):
    input_shape, filters, kernel_size, strides, padding, dilation = case
    kh, kw = np.broadcast_to(kernel_size, 2)
    kernel = (rng.normal(size=(kh, kw, input_shape[-1], filters)) * scale).astype(np.float32)
    strides, dilation = tuple(np.broadcast_to(strides, 2)), tuple(np.broadcast_to(dilation, 2))
    return input_shape, kernel, strides, padding, dilation


# ------------------------------------------------------------- convolutions


@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_matrix_matches_loop_and_keras(case, rng):
    input_shape, kernel, strides, padding, dilation = conv_case(case, rng)
    matrix = lipschitz.conv_matrix(kernel, input_shape, strides, padding, dilation)
    assert matrix.dtype == np.float64
    reference = reference_conv_matrix(kernel, input_shape, strides, padding, dilation)
    np.testing.assert_array_equal(matrix, reference)
    if max(strides) > 1 and max(dilation) > 1:
        # Keras refuses this combination; a stride-1-dilation convolution of
        # the kernel with zeros between its taps is the same operator.
        kh, kw, cin, cout = kernel.shape
        spread = np.zeros(((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1, cin, cout))
        spread[:: dilation[0], :: dilation[1]] = kernel
        keras_kernel, keras_dilation = spread.astype(np.float32), 1
    else:
        keras_kernel, keras_dilation = kernel, dilation
    by_keras = keras_matrix(
        lambda x: keras.ops.conv(x, keras_kernel, strides, padding, dilation_rate=keras_dilation),
        input_shape,
    )
    np.testing.assert_allclose(matrix, by_keras, rtol=0, atol=1e-5 * np.abs(kernel).max())


@pytest.mark.backend_neutral
@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e3])
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_bound_is_tight_upper_bound(case, scale, rng):
    input_shape, kernel, strides, padding, dilation = conv_case(case, rng, scale)
    exact = exact_norm(reference_conv_matrix(kernel, input_shape, strides, padding, dilation))
    bound = lipschitz.conv_bound(kernel, input_shape, strides, padding, dilation)
    assert isinstance(bound, float)
    assert exact <= bound <= exact * 1.001


@pytest.mark.backend_neutral
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_circular_bound_is_an_upper_bound(case, rng):
    input_shape, kernel, strides, padding, dilation = conv_case(case, rng)
    exact = exact_norm(reference_conv_matrix(kernel, input_shape, strides, padding, dilation))
    circular = lipschitz.circular_conv_bound(kernel, input_shape, strides, padding, dilation)
    assert circular >= exact * (1 - 1e-12)


@pytest.mark.backend_neutral
def test_circular_bound_is_exact_without_boundary(rng):
    # A 1x1 convolution never reaches the padding: circular and zero-padded
    # operators coincide.
    kernel = rng.normal(size=(1, 1, 5, 3))
    exact = exact_norm(reference_conv_matrix(kernel, (4, 4, 5), (1, 1), "same", (1, 1)))
    circular = lipschitz.circular_conv_bound(kernel, (4, 4, 5), (1, 1), "same", (1, 1))
    assert circular == pytest.approx(exact, rel=1e-12)


@pytest.mark.backend_neutral
def test_conv_too_large_to_materialise_is_still_bounded(rng):
    # 23 * 23 * 4 = 2116 dimensions on both sides: only the FFT bound applies.
    # The kernel is separable, p[a] q[b] C[i, o], so the operator is the
    # Kronecker product of two 1-D convolutions and a channel mixing, and its
    # exact norm is the product of three small dense SVDs (an SVD of the full
    # 2116 x 2116 matrix would take most of this file's time budget).
    h, w, channels = 23, 23, 4
    assert h * w * channels > lipschitz.MAX_MATERIALISED_DIM
    p, q, mixing = rng.normal(size=3), rng.normal(size=3), rng.normal(size=(channels, channels))
    kernel = p[:, None, None, None] * q[None, :, None, None] * mixing
    rows = reference_conv_matrix(p.reshape(3, 1, 1, 1), (h, 1, 1), 1, "same", 1)
    cols = reference_conv_matrix(q.reshape(1, 3, 1, 1), (1, w, 1), 1, "same", 1)
    full = reference_conv_matrix(kernel, (h, w, channels), 1, "same", 1)
    np.testing.assert_allclose(full, np.kron(np.kron(rows, cols), mixing), rtol=0, atol=1e-12)
    exact = exact_norm(rows) * exact_norm(cols) * exact_norm(mixing)
    bound = lipschitz.conv_bound(kernel, (h, w, channels), 1, "same", 1)
    assert exact <= bound <= exact * 1.1


@pytest.mark.backend_neutral
@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_bound_without_materialising(case, rng, monkeypatch):
    # Above the size limit only the circular bound is left; it must still
    # cover the exact norm.
    monkeypatch.setattr(lipschitz, "MAX_MATERIALISED_DIM", 0)
    input_shape, kernel, strides, padding, dilation = conv_case(case, rng)
    exact = exact_norm(reference_conv_matrix(kernel, input_shape, strides, padding, dilation))
    bound = lipschitz.conv_bound(kernel, input_shape, strides, padding, dilation)
    circular = lipschitz.circular_conv_bound(kernel, input_shape, strides, padding, dilation)
    assert bound == lipschitz.inflate(circular)
    assert bound >= exact


@pytest.mark.backend_neutral
def test_conv_with_empty_output_has_zero_norm():
    kernel = np.ones((5, 5, 1, 2))
    matrix = lipschitz.conv_matrix(kernel, (3, 3, 1), 1, "valid", 1)
    assert matrix.shape == (9, 0)
    assert lipschitz.conv_bound(kernel, (3, 3, 1), 1, "valid", 1) >= 0.0


# ----------------------------------------------------------------- dense


@pytest.mark.backend_neutral
@pytest.mark.parametrize("shape", [(5, 3), (20, 7), (3, 30)])
@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e4])
def test_dense_bound_is_tight_upper_bound(shape, scale, rng):
    kernel = (rng.normal(size=shape) * scale).astype(np.float32)
    exact = exact_norm(kernel.astype(np.float64))
    bound = lipschitz.dense_bound(kernel)
    assert exact <= bound <= exact * 1.001


# -------------------------------------------------------------- operators


@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_transpose_is_the_exact_adjoint(case, rng):
    input_shape, kernel, strides, padding, dilation = conv_case(case, rng)
    operator = lipschitz.ConvOperator(kernel, (1,) + input_shape, strides, padding, dilation)
    reference = reference_conv_matrix(kernel, input_shape, strides, padding, dilation)
    v = rng.normal(size=(1,) + input_shape).astype(np.float32)
    av = keras.ops.convert_to_numpy(compiled(operator.apply)(v)).astype(np.float64)
    # One call transposes a random u and every output basis vector.
    output_dim = reference.shape[1]
    u = rng.normal(size=(1, output_dim)).astype(np.float32)
    batch = np.concatenate([u, np.eye(output_dim, dtype=np.float32)])
    transposed = keras.ops.convert_to_numpy(
        compiled(operator.transpose)(batch.reshape((-1,) + av.shape[1:]))
    ).astype(np.float64)
    assert transposed.shape[1:] == input_shape
    transposed = transposed.reshape(1 + output_dim, -1)
    lhs, rhs = np.sum(av.reshape(-1) * u), np.sum(v.reshape(-1) * transposed[0])
    assert abs(lhs - rhs) <= FLOAT32_REL * np.linalg.norm(av) * np.linalg.norm(u)
    # The transpose of each output basis vector is the matching column of
    # the reference matrix.
    np.testing.assert_allclose(
        transposed[1:], reference.T, rtol=0, atol=1e-5 * np.abs(kernel).max()
    )


def test_dilated_operator_needs_no_dilated_convolution(rng, monkeypatch):
    # Some CPUs' TensorFlow has no dilated transposed convolution ("Current
    # CPU implementations do not yet support dilation rates larger than 1",
    # issue 8); this one may have it, so refuse dilation here to stand in.
    def undilated(op):
        def call(*args, **kwargs):
            assert kwargs.get("dilation_rate", 1) in (1, (1, 1)), "dilated call"
            return op(*args, **kwargs)

        return call

    monkeypatch.setattr(keras.ops, "conv", undilated(keras.ops.conv))
    monkeypatch.setattr(keras.ops, "conv_transpose", undilated(keras.ops.conv_transpose))
    input_shape, kernel, strides, padding, dilation = conv_case(CONV_CASES[11], rng)
    operator = lipschitz.ConvOperator(kernel, (1,) + input_shape, strides, padding, dilation)
    image = operator.transpose(operator.apply(unit(rng, (1,) + input_shape)))
    assert tuple(image.shape) == (1,) + input_shape


def test_dense_transpose_is_the_adjoint(rng):
    kernel = rng.normal(size=(6, 4)).astype(np.float32)
    operator = lipschitz.DenseOperator(kernel)
    v = rng.normal(size=(1, 6)).astype(np.float32)
    u = rng.normal(size=(1, 4)).astype(np.float32)
    lhs = np.sum(keras.ops.convert_to_numpy(operator.apply(v)) * u)
    rhs = np.sum(v * keras.ops.convert_to_numpy(operator.transpose(u)))
    assert lhs == pytest.approx(rhs, rel=FLOAT32_REL)


# -------------------------------------------------------- power iteration


def check_power_iteration(operator, v, exact):
    # Every estimate on the way to convergence, including single steps as
    # training takes them, stays below the norm (up to float32 rounding).
    # Compiled once, as layers run it.
    @compiled
    def steps(v, scales):
        single, _ = lipschitz.power_step([operator], v, 1, scales)
        sigma, v = lipschitz.power_step([operator], v, lipschitz.CONVERGENCE_STEP_ITERATIONS, scales)
        return single, sigma, v

    estimates = []

    def step(v, scales):
        single, sigma, v = steps(v, scales)
        estimates.extend(float(keras.ops.convert_to_numpy(s)[0]) for s in (single, sigma))
        return sigma, v

    sigma, _ = lipschitz.power_converge(step, [v])
    assert max(estimates) <= exact * (1 + FLOAT32_REL)
    assert sigma[0] == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("case", CONV_CASES, ids=CASE_IDS)
def test_conv_power_iteration_converges_from_below(case, rng):
    input_shape, kernel, strides, padding, dilation = conv_case(case, rng)
    exact = exact_norm(reference_conv_matrix(kernel, input_shape, strides, padding, dilation))
    operator = lipschitz.ConvOperator(kernel, (1,) + input_shape, strides, padding, dilation)
    check_power_iteration(operator, unit(rng, (1,) + input_shape), exact)


@pytest.mark.parametrize("scale", [1e-5, 1.0, 1e4])
def test_dense_power_iteration_converges_from_below(scale, rng):
    # Small weights would expose an epsilon in the normalisation.
    kernel = (rng.normal(size=(20, 7)) * scale).astype(np.float32)
    exact = exact_norm(kernel.astype(np.float64))
    check_power_iteration(lipschitz.DenseOperator(kernel), unit(rng, (1, 20)), exact)


def test_power_step_gradient_flows_through_sigma_only(rng):
    # With v held constant, d||v K|| / dK = v^T (v K) / ||v K||.
    kernel = rng.normal(size=(5, 3)).astype(np.float32)
    v0 = unit(rng, (1, 5))
    _, (v,) = lipschitz.power_step([lipschitz.DenseOperator(kernel)], [v0], 3)
    v = keras.ops.convert_to_numpy(v).astype(np.float64)
    grad = gradient(
        lambda k: lipschitz.power_step([lipschitz.DenseOperator(k)], [v0], 3)[0][0], kernel
    )
    image = v @ kernel
    expected = v.T @ image / np.linalg.norm(image)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_power_step_gradient_reaches_dilated_taps(rng):
    # The explicit dilation must pass gradients back to the original taps:
    # compare with central differences of ||v @ conv_matrix(K)|| in float64.
    input_shape, kernel, strides, padding, dilation = conv_case(CONV_CASES[7], rng)
    v0 = unit(rng, (1,) + input_shape)

    def sigma(k):
        operator = lipschitz.ConvOperator(k, (1,) + input_shape, strides, padding, dilation)
        return lipschitz.power_step([operator], [v0], 2)

    _, (v,) = sigma(kernel)
    v = keras.ops.convert_to_numpy(v).astype(np.float64).reshape(-1)
    grad = gradient(lambda k: sigma(k)[0][0], kernel)
    expected = np.zeros(kernel.shape)
    step = 1e-6
    for index in np.ndindex(kernel.shape):
        shift = np.zeros(kernel.shape)
        shift[index] = step
        norms = [
            np.linalg.norm(v @ lipschitz.conv_matrix(k, input_shape, strides, padding, dilation))
            for k in (kernel + shift, kernel - shift)
        ]
        expected[index] = (norms[0] - norms[1]) / (2 * step)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)


def test_power_step_on_zero_kernel_keeps_direction():
    kernel = np.zeros((4, 3), np.float32)
    v0 = np.full((1, 4), 0.5, np.float32)
    sigma, (v,) = lipschitz.power_step([lipschitz.DenseOperator(kernel)], [v0], 2)
    assert float(keras.ops.convert_to_numpy(sigma)[0]) == 0.0
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), v0)
    grad = gradient(lambda k: lipschitz.power_step([lipschitz.DenseOperator(k)], [v0])[0][0], kernel)
    assert np.all(np.isfinite(grad))


# ---------------------------------------------------------------- pooling

AVERAGE_POOL_CASES = [
    # (pool, strides, padding, input_shape)
    (2, 2, "valid", (6, 6, 2)),
    (2, 1, "valid", (5, 5, 1)),
    (3, 2, "same", (7, 7, 1)),
    (2, 1, "same", (4, 4, 1)),
    (3, 1, "same", (5, 6, 2)),
    ((2, 3), (1, 2), "same", (6, 7, 1)),
    (3, 3, "same", (7, 8, 1)),
]


@pytest.mark.parametrize("pool,strides,padding,input_shape", AVERAGE_POOL_CASES)
def test_average_pooling_bound_is_the_exact_norm(pool, strides, padding, input_shape):
    # Keras divides a "same" window by its number of real inputs on every
    # backend; the bound must match the operator Keras actually applies.
    matrix = keras_matrix(
        lambda x: keras.ops.average_pool(x, pool, strides, padding), input_shape
    )
    exact = exact_norm(matrix)
    bound = lipschitz.average_pooling_bound(pool, strides, padding, input_shape)
    assert exact <= bound <= exact * lipschitz.SAFETY_FACTOR * (1 + FLOAT32_REL)
    if pool == strides and padding == "valid":
        assert bound == pytest.approx(1 / pool, rel=2e-5)


MAX_POOL_CASES = [
    (2, 2, "valid", (6, 6, 1)),
    (3, 1, "same", (5, 5, 1)),
    (3, 2, "valid", (7, 7, 1)),
]


@pytest.mark.parametrize("pool,strides,padding,input_shape", MAX_POOL_CASES)
def test_max_pooling_bound_covers_random_pairs(pool, strides, padding, input_shape, rng):
    bound = lipschitz.max_pooling_bound(pool, strides)
    x = rng.normal(size=(200,) + input_shape).astype(np.float32)
    d = rng.normal(size=x.shape).astype(np.float32) * 1e-2

    def pool_fn(t):
        return keras.ops.convert_to_numpy(keras.ops.max_pool(t, pool, strides, padding))

    change = (pool_fn(x + d) - pool_fn(x)).reshape(200, -1)
    ratios = np.linalg.norm(change, axis=1) / np.linalg.norm(d.reshape(200, -1), axis=1)
    assert ratios.max() <= bound
    assert (bound == 1.0) == (pool == strides)


def test_overlapping_max_pooling_worst_case():
    # Raising the centre pixel, the max of all four overlapping 2x2 windows,
    # moves four outputs by 1: the change has norm 2.
    x = np.zeros((1, 3, 3, 1), np.float32)
    y = x.copy()
    y[0, 1, 1, 0] = 1.0
    change = keras.ops.max_pool(y, 2, 1, "valid") - keras.ops.max_pool(x, 2, 1, "valid")
    ratio = float(np.linalg.norm(keras.ops.convert_to_numpy(change)))
    assert ratio == pytest.approx(2.0)
    assert lipschitz.max_pooling_bound((2, 2), (1, 1)) >= ratio


@pytest.mark.backend_neutral
@pytest.mark.parametrize("pool,strides,windows", [
    ((2, 1), (1, 1), 2), ((3, 3), (1, 2), 6), ((3, 2), (2, 1), 4), ((2, 2), (2, 2), 1),
])
def test_max_pooling_bound_is_at_least_the_exact_root(pool, strides, windows):
    bound = lipschitz.max_pooling_bound(pool, strides)
    # Exact rational arithmetic: bound**2 >= the window count, barely.
    assert Fraction(bound) ** 2 >= windows
    assert bound <= math.sqrt(windows) * (1 + 1e-15)


# ------------------------------------------------ rounding and inflation


@pytest.mark.backend_neutral
def test_inflate():
    assert lipschitz.inflate(2.0) == 2.0 * lipschitz.SAFETY_FACTOR
    assert isinstance(lipschitz.inflate(np.float32(2.0)), float)
    np.testing.assert_array_equal(
        lipschitz.inflate(np.array([1.0, 3.0])), np.array([1.0, 3.0]) * lipschitz.SAFETY_FACTOR
    )


def check_rounded_up(values):
    values = np.asarray(values, np.float64)
    rounded = lipschitz.round_up_float32(values)
    assert rounded.dtype == np.float32 and rounded.shape == values.shape
    assert np.all(rounded.astype(np.float64) >= values)
    # Smallest such float32: the one below is below the value.
    below = np.nextafter(rounded, np.float32(-np.inf)).astype(np.float64)
    assert np.all(below < values)


@pytest.mark.backend_neutral
def test_round_up_float32_on_random_values(rng):
    magnitudes = 10.0 ** rng.uniform(-40, 38, size=2000)
    check_rounded_up(magnitudes * rng.choice([-1.0, 1.0], size=2000))
    check_rounded_up(rng.uniform(0, 10, size=(50, 40)))


@pytest.mark.backend_neutral
def test_round_up_float32_near_float32_values(rng):
    grid = rng.uniform(0.5, 100, size=500).astype(np.float32).astype(np.float64)
    for values in (grid, np.nextafter(grid, np.inf), np.nextafter(grid, -np.inf)):
        check_rounded_up(values)
    # A value that is a float32 already comes back unchanged.
    np.testing.assert_array_equal(lipschitz.round_up_float32(grid), grid.astype(np.float32))


@pytest.mark.backend_neutral
def test_round_up_float32_scalars():
    for value in (0.1, 1.0 / 3.0, 2.0, 1e-45, 3.4e38, -0.1):
        rounded = lipschitz.round_up_float32(value)
        assert isinstance(rounded, np.float32)
        assert float(rounded) >= value
        assert float(np.nextafter(rounded, np.float32(-np.inf))) < value
    assert lipschitz.round_up_float32(0.0) == 0.0
    assert lipschitz.round_up_float32(np.float64(1e39)) == np.inf


# ------------------------------------------------------- pairwise distances


def test_pairwise_column_distances(rng):
    kernel = rng.normal(size=(8, 5))
    expected = np.array(
        [[np.linalg.norm(kernel[:, j] - kernel[:, i]) for i in range(5)] for j in range(5)]
    )
    distances = lipschitz.pairwise_column_distances(kernel)
    assert distances.dtype == np.float64
    np.testing.assert_allclose(distances, expected * lipschitz.SAFETY_FACTOR, rtol=1e-14)
    assert np.all(distances >= expected)
    ops_distances = keras.ops.convert_to_numpy(
        lipschitz.pairwise_column_distances_ops(kernel.astype(np.float32))
    )
    np.testing.assert_allclose(ops_distances, expected, rtol=FLOAT32_REL, atol=1e-6)


def test_pairwise_column_distances_ops_gradient(rng):
    kernel = rng.normal(size=(8, 5)).astype(np.float32)
    grad = gradient(lipschitz.pairwise_column_distances_ops, kernel)
    assert np.all(np.isfinite(grad))
    # d sum_{i,j} ||k_j - k_i|| / dk_j = 2 sum_{i != j} (k_j - k_i) / ||k_j - k_i||.
    k = kernel.astype(np.float64)
    diff = k[:, :, None] - k[:, None, :]
    norms = np.sqrt(np.sum(diff * diff, axis=0)) + np.eye(5)
    expected = 2 * np.sum(diff / norms, axis=2)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------- packaging


# Like tests/test_schedules.py's subprocess check: in the long tier, since
# tests/test_backends.py runs the core without TensorFlow by default.
@pytest.mark.slow
@pytest.mark.backend_neutral
def test_module_imports_no_tensorflow():
    # Loaded as a standalone file on the JAX backend, so that only this
    # module's own imports count.
    path = os.path.join(os.path.dirname(__file__), "..", "gloro", "lipschitz.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('lipschitz', {path!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print('tensorflow' in sys.modules)\n"
    )
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False"


# ------------------------------------------------------ stacked operators


def test_grouped_conv_is_each_member_and_its_exact_adjoint(rng):
    # Kernels of different channel counts, padded into one grouped
    # convolution: each member must compute exactly its own convolution,
    # and `transpose` must be each member's adjoint (materialised operators).
    shapes = [(3, 3, 2, 4), (3, 3, 4, 4), (3, 3, 4, 3)]
    kernels = [rng.normal(size=s).astype(np.float32) for s in shapes]
    singles = [lipschitz.ConvOperator(k, (1, 5, 6, k.shape[2]), 1, "same", 1) for k in kernels]
    assert len({op.stack_key for op in singles}) == 1
    grouped = lipschitz.stack(singles)
    assert isinstance(grouped, lipschitz.GroupedConvOperator) and grouped.members == 3
    vectors = [rng.normal(size=(1, 5, 6, k.shape[2])).astype(np.float32) for k in kernels]
    images = keras.ops.convert_to_numpy(grouped.apply(grouped.pack(vectors)))
    for g, (v, k) in enumerate(zip(vectors, kernels)):
        image = images[:, :, :, g]
        expected = v.reshape(1, -1).astype(np.float64) @ lipschitz.conv_matrix(k, (5, 6, k.shape[2]), 1, "same", 1)
        # Output channels beyond a narrower kernel's are zero.
        np.testing.assert_array_equal(image[..., k.shape[3]:], 0.0)
        np.testing.assert_allclose(image[..., : k.shape[3]].reshape(1, -1), expected, rtol=1e-4, atol=1e-4)
    outputs = [rng.normal(size=(1, 5, 6, 4)).astype(np.float32) for _ in kernels]
    back = grouped.unpack(grouped.transpose(keras.ops.stack(outputs, axis=3)))
    for u, b, k in zip(outputs, back, kernels):
        reference = lipschitz.conv_matrix(k, (5, 6, k.shape[2]), 1, "same", 1)
        # Padded output channels of a narrower kernel are zero and ignored.
        u_real = u[..., : k.shape[3]].reshape(1, -1).astype(np.float64)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(b).reshape(1, -1), u_real @ reference.T, rtol=1e-4, atol=1e-4
        )


def test_stacked_power_step_equals_each_member_alone(rng):
    # Stacking changes the number of operations, not the numbers: two Dense
    # kernels and two convolutions, stepped together and one by one.
    dense = [rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2)]
    convs = [rng.normal(size=(3, 3, 2, 3)).astype(np.float32), rng.normal(size=(3, 3, 3, 3)).astype(np.float32)]
    dense_ops = [lipschitz.DenseOperator(k) for k in dense]
    conv_ops = [lipschitz.ConvOperator(k, (1, 4, 4, k.shape[2]), 1, "same", 1) for k in convs]
    dense_v = [unit(rng, (1, 6)) for _ in dense]
    conv_v = [unit(rng, (1, 4, 4, k.shape[2])) for k in convs]
    scales = np.array([2.0, 0.5, 1.5, 3.0], np.float32)
    stacked = [lipschitz.stack(dense_ops), lipschitz.stack(conv_ops)]
    sigma, vectors = lipschitz.power_step(
        stacked, [stacked[0].pack(dense_v), stacked[1].pack(conv_v)], 5, scales
    )
    together = keras.ops.convert_to_numpy(sigma)
    alone = []
    for g, (op, v) in enumerate(zip(dense_ops + conv_ops, dense_v + conv_v)):
        s, (w,) = lipschitz.power_step([op], [v], 5, scales[g : g + 1])
        alone.append(float(keras.ops.convert_to_numpy(s)[0]))
        stacked_op = stacked[0] if g < 2 else stacked[1]
        mine = stacked_op.unpack(vectors[0] if g < 2 else vectors[1])[g % 2]
        np.testing.assert_allclose(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(w), atol=1e-5)
    np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_power_step_without_normalising_each_step_follows_exact_iteration(rng):
    # Against float64 power iteration on the materialised operator, with a
    # normalisation after every step: the same direction and estimate.
    kernel = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    matrix = lipschitz.conv_matrix(kernel, (5, 5, 2), 1, "same", 1)
    v0 = unit(rng, (1, 5, 5, 2))
    x = v0.reshape(1, -1).astype(np.float64)
    for _ in range(6):
        x = x @ matrix @ matrix.T
        x /= np.linalg.norm(x)
    operator = lipschitz.stack([lipschitz.ConvOperator(kernel, (1, 5, 5, 2), 1, "same", 1)])
    sigma, (v,) = lipschitz.power_step([operator], [operator.pack([v0])], 6, np.array([2.0], np.float32))
    (v,) = operator.unpack(v)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(v).reshape(1, -1), x, atol=1e-5)
    assert float(keras.ops.convert_to_numpy(sigma)[0]) == pytest.approx(np.linalg.norm(x @ matrix), rel=1e-5)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_power_step_stays_in_float32_from_any_previous_estimate(scale, rng):
    # Whatever the previous estimate (a scale that makes the unnormalised
    # iterates overflow or vanish, none at all), the vector stays finite and
    # unit, the estimate a lower bound, and steps scaled by the returned
    # estimates converge; from `initial_scales` at once.
    kernel = (rng.normal(size=(8, 5)) * scale).astype(np.float32)
    exact = exact_norm(kernel.astype(np.float64))
    operator = lipschitz.DenseOperator(kernel)
    for previous in (1e-30, 1.0, 1e30, np.nan, 0.0):
        v0 = unit(rng, (1, 8))
        for scales in (np.array([previous], np.float32), lipschitz.initial_scales([operator], [previous])):
            sigma, (v,) = lipschitz.power_step([operator], [v0], 8, scales)
            v = keras.ops.convert_to_numpy(v)
            assert np.linalg.norm(v) == pytest.approx(1.0, rel=1e-5)
            assert float(keras.ops.convert_to_numpy(sigma)[0]) <= exact * (1 + FLOAT32_REL)
            for _ in range(6):
                sigma, (v,) = lipschitz.power_step([operator], [v], 8, sigma)
            assert float(keras.ops.convert_to_numpy(sigma)[0]) == pytest.approx(exact, rel=1e-3)


def test_power_step_keeps_its_vector_on_a_zero_kernel(rng):
    # Nothing to iterate: the vector stays, the estimate is 0.
    v0 = unit(rng, (1, 4, 4, 2))
    operator = lipschitz.stack([lipschitz.ConvOperator(np.zeros((3, 3, 2, 2), np.float32), (1, 4, 4, 2), 1, "same", 1)])
    sigma, (v,) = lipschitz.power_step([operator], [operator.pack([v0])], 8, np.array([1.0], np.float32))
    assert float(keras.ops.convert_to_numpy(sigma)[0]) == 0.0
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(operator.unpack(v)[0]), v0)


@pytest.mark.parametrize(
    "kernel_size,strides,dilation,spatial",
    [(4, 2, 1, (8, 6)), (3, 2, 1, (6, 8)), ((5, 3), (3, 2), 1, (9, 4)), (2, 2, 1, (4, 4)),
     (1, 2, 1, (4, 6)), (4, 1, 1, (5, 6)), (3, 1, 2, (5, 5))],
)
def test_same_convolution_in_blocks_is_the_exact_operator_and_adjoint(kernel_size, strides, dilation, spatial, rng):
    # A "same" convolution stacks as a stride-1 convolution on its input
    # cut into blocks of its strides (strided, even and dilated kernels
    # alike): against the materialised operator, both directions.
    kh, kw = lipschitz._pair(kernel_size)
    kernel = rng.normal(size=(kh, kw, 3, 4)).astype(np.float32)
    op = lipschitz.ConvOperator(kernel, (1,) + spatial + (3,), strides, "same", dilation)
    assert op.stack_key is not None
    grouped = lipschitz.stack([op])
    matrix = lipschitz.conv_matrix(kernel, spatial + (3,), strides, "same", dilation)
    v = rng.normal(size=(1,) + spatial + (3,)).astype(np.float32)
    image = keras.ops.convert_to_numpy(grouped.apply(grouped.pack([v])))[:, :, :, 0]
    np.testing.assert_allclose(image.reshape(1, -1), v.reshape(1, -1) @ matrix, rtol=1e-4, atol=1e-4)
    u = rng.normal(size=image.shape).astype(np.float32)
    (back,) = grouped.unpack(grouped.transpose(u[:, :, :, None, :]))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(back).reshape(1, -1), u.reshape(1, -1) @ matrix.T, rtol=1e-4, atol=1e-4
    )


def test_strided_convolution_stacks_with_the_stride_one_ones_of_its_output_size(rng):
    strided = lipschitz.ConvOperator(rng.normal(size=(4, 4, 2, 3)).astype(np.float32), (1, 8, 8, 2), 2, "same", 1)
    plain = lipschitz.ConvOperator(rng.normal(size=(3, 3, 3, 3)).astype(np.float32), (1, 4, 4, 3), 1, "same", 1)
    assert strided.stack_key == plain.stack_key
    assert lipschitz.stack([strided, plain]).members == 2


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (2, 5, 5)])
def test_shifted_dense_iteration_is_the_shifted_power_polynomial(shape, rng):
    # Against float64 steps `A^T A w - c w` with the training shifts.
    kernel = rng.normal(size=shape).astype(np.float32)
    stacked = kernel if len(shape) == 3 else kernel[None]
    v = rng.normal(size=(stacked.shape[0], shape[-2])).astype(np.float32)
    shifts = lipschitz.training_shifts(3)
    got = keras.ops.convert_to_numpy(lipschitz.DenseOperator(kernel).iterate(v, shifts))
    w = v.astype(np.float64)
    for shift in shifts:
        w = np.einsum("gi,gio,gjo->gj", w, stacked, stacked) - shift * w
    np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_shifted_grouped_steps_are_exact(rng):
    # The shift rides in the two convolutions (an identity copied through):
    # against (A^T A - c I) w on the materialised operators, per member.
    kernels = [rng.normal(size=(4, 4, 3, 5)).astype(np.float32), rng.normal(size=(3, 3, 12, 4)).astype(np.float32)]
    singles = [
        lipschitz.ConvOperator(kernels[0], (1, 8, 6, 3), 2, "same", 1),
        lipschitz.ConvOperator(kernels[1], (1, 4, 3, 12), 1, "same", 1),
    ]
    grouped = lipschitz.stack(singles)
    vectors = [rng.normal(size=(1, 8, 6, 3)).astype(np.float32), rng.normal(size=(1, 4, 3, 12)).astype(np.float32)]
    # Two shifts, one of them twice: each step uses its own shift's kernels.
    shifts = lipschitz.training_shifts(3)
    stepped = grouped.unpack(grouped.iterate(grouped.pack(vectors), shifts))
    for v, k, op, got in zip(vectors, kernels, singles, stepped):
        matrix = lipschitz.conv_matrix(k, op.input_shape[1:], op.strides, "same", 1)
        w = v.reshape(1, -1).astype(np.float64)
        for shift in shifts:
            w = w @ matrix @ matrix.T - shift * w
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got).reshape(1, -1), w, rtol=1e-4, atol=1e-3)


def test_shifted_power_step_converges_to_the_norm_from_below(rng):
    # Shifted steps, scaled by the previous estimate as in training: every
    # estimate is a lower bound, and they reach the exact norm.
    kernel = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    exact = exact_norm(lipschitz.conv_matrix(kernel, (6, 6, 4), 1, "same", 1))
    operator = lipschitz.stack([lipschitz.ConvOperator(kernel, (1, 6, 6, 4), 1, "same", 1)])
    v = [operator.pack([unit(rng, (1, 6, 6, 4))])]
    sigma = lipschitz.initial_scales([operator], [0.0])
    for _ in range(60):
        sigma, v = lipschitz.power_step([operator], v, 4, sigma, shifted=True)
        assert float(keras.ops.convert_to_numpy(sigma)[0]) <= exact * (1 + FLOAT32_REL)
    assert float(keras.ops.convert_to_numpy(sigma)[0]) == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("distinct", [1, 2])
@pytest.mark.parametrize("iterations", range(1, 11))
def test_training_shifts_damp_the_spectrum_below_the_top(iterations, distinct):
    # Their polynomial is well below its value at the top eigenvalue (1)
    # everywhere on the damped range, and shrinks the top cluster's other
    # members faster than unshifted steps do.
    shifts = np.array(lipschitz.training_shifts(iterations, distinct))
    assert len(shifts) == iterations
    if distinct == 1:
        assert len(set(shifts.tolist())) == 1

    def gain(lam):
        return np.abs(np.prod(lam[:, None] - shifts, axis=1)) / np.prod(1 - shifts)

    damped = np.linspace(0.0, lipschitz.DAMPED_RANGE, 2001)
    bound = 0.82 ** iterations if distinct == 1 else 0.51 ** (iterations // 2) * 0.82 ** (iterations % 2)
    assert gain(damped).max() < bound
    assert gain(np.array([0.99]))[0] < 0.99 ** (1.7 * iterations)


def test_shifted_steps_of_a_convolution_that_stacks_with_none(rng):
    # A "valid" convolution runs alone, its shifts as subtractions: against
    # the materialised operator.
    kernel = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    op = lipschitz.stack([lipschitz.ConvOperator(kernel, (1, 6, 5, 2), 2, "valid", 1)])
    assert isinstance(op, lipschitz.ConvOperator) and op.stack_key is None
    matrix = lipschitz.conv_matrix(kernel, (6, 5, 2), 2, "valid", 1)
    v = rng.normal(size=(1, 6, 5, 2)).astype(np.float32)
    shifts = lipschitz.training_shifts(3, op.distinct_shifts)
    w = v.reshape(1, -1).astype(np.float64)
    for shift in shifts:
        w = w @ matrix @ matrix.T - shift * w
    got = keras.ops.convert_to_numpy(op.iterate(v, shifts)).reshape(1, -1)
    np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
