"""Lipschitz bounds in the L2 norm: the math, with no knowledge of layers.

Two kinds of numbers come out of this module:

* **Estimates** (`power_step`, `power_converge`): power iteration on linear
  operators, written with `keras.ops` so that it runs on every backend.
  Operators of one shape `stack` into one, so that a step of all of them is
  one operation. Cheap enough to run once per training step and
  differentiable, but it approaches the spectral norm from *below*
  (`||A v|| <= sigma_max(A)` for every unit `v`). Estimates drive training
  and never certify anything.
* **Guaranteed bounds** (`dense_bound`, `conv_bound`, `average_pooling_bound`,
  `max_pooling_bound`, `pairwise_column_distances`, and the rules that
  combine branches: `sum_bound`, `mean_bound`, `concatenation_bound`):
  numbers proven to be at least the operator norm on the real input shape. They are computed in NumPy
  float64, never in a backend, so every backend certifies with the same
  constants; the results of floating-point algorithms are multiplied by
  `SAFETY_FACTOR` (`inflate`), and `round_up_float32` is the one place where a
  bound is stored in float32.

Why `SAFETY_FACTOR = 1 + 1e-5` is enough: the float64 SVDs, symmetric
eigenvalue solvers and FFTs used here are backward stable, and forming a Gram
matrix of side `n <= MAX_MATERIALISED_DIM` perturbs it by at most about
`n**2 * 2**-53` of its norm; every computed norm is therefore within about
1e-9 (relative) of the exact one, four orders of magnitude inside the factor,
which also absorbs the float64 products of a few such numbers. The float32
rounding of the margin test itself is handled by
`gloro.certificates.MARGIN_SLACK`.

Convolutions follow Keras' conventions: kernels `(kh, kw, cin, cout)`, data
`channels_last`, and "same" padding that puts `total // 2` zeros before the
input and the rest (the odd one, if any) after it.
"""

import functools
import math

import keras
import numpy as np

from gloro import backend

SAFETY_FACTOR = 1.0 + 1e-5

# Above this many input (or output) dimensions, materialising a convolution as
# a matrix for an exact norm costs more than it is worth, and only the FFT
# bound is used.
MAX_MATERIALISED_DIM = 2048
# Largest number of entries of a materialised matrix (128 MiB in float64).
MAX_MATERIALISED_ENTRIES = 2**24

# Power iteration stops when the estimate moves by less than this (relative)
# over one call of the convergence step.
CONVERGENCE_TOLERANCE = 1e-7
MAX_CONVERGENCE_ITERATIONS = 5000
# Iterations one call of the convergence step takes (see `power_converge`).
CONVERGENCE_STEP_ITERATIONS = 10
# Training-time power-iteration steps damp the spectrum of the scaled
# `A^T A` below this (see `training_shifts`).
DAMPED_RANGE = 0.9


# ------------------------------------------------------------------ rounding


def inflate(value):
    """Multiplies a computed bound by `SAFETY_FACTOR`.

    Args:
        value: a non-negative number or array, computed in float64.

    Returns:
        float for a scalar, float64 ndarray for an array.
    """
    if np.ndim(value) == 0:
        return float(value) * SAFETY_FACTOR
    return np.asarray(value, np.float64) * SAFETY_FACTOR


def round_up_float32(value):
    """The smallest float32 that is at least `value`, elementwise.

    Casting to float32 rounds to nearest, which can go down; a bound stored
    that way could under-state the true one. Values beyond the float32 range
    become `inf`, which is still an upper bound.

    Args:
        value: a float or array of floats (converted to float64 first).

    Returns:
        `np.float32` for a scalar, float32 ndarray for an array.
    """
    exact = np.asarray(value, np.float64)
    with np.errstate(over="ignore"):
        stored = exact.astype(np.float32)
    # The float32 -> float64 widening in the comparison is exact.
    stored = np.where(stored < exact, np.nextafter(stored, np.float32(np.inf)), stored)
    stored = stored.astype(np.float32)
    return stored[()] if stored.ndim == 0 else stored


# --------------------------------------------------------- shapes, padding


def _pair(value):
    if np.ndim(value) == 0:
        return (int(value), int(value))
    return tuple(int(v) for v in value)


def _window_geometry(size, window, stride, padding):
    """Output length and zeros added before the input, along one axis.

    Args:
        size: input length.
        window: extent of the (dilated) kernel or pooling window.
        stride: step between windows.
        padding: `"same"` or `"valid"`.

    Returns:
        `(out, pad_before)`. Output `i` reads padded positions
        `i * stride + t` for `0 <= t < window`, that is input positions
        `i * stride + t - pad_before`.
    """
    padding = padding.lower()
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + window - size, 0)
        return out, total // 2
    if padding == "valid":
        return max(-(-(size - window + 1) // stride), 0), 0
    raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}.")


def _conv_geometry(kernel_shape, input_shape, strides, padding, dilation_rate):
    """`_window_geometry` of a convolution, for each of the two spatial axes."""
    return [
        _window_geometry(size, (taps - 1) * d + 1, s, padding)
        for size, taps, d, s in zip(
            input_shape[:2], kernel_shape[:2], _pair(dilation_rate), _pair(strides)
        )
    ]


# --------------------------------------------------------- guaranteed bounds


def _matrix_norm(matrix):
    """Largest singular value of a float64 matrix.

    The Gram matrix of the smaller side has `sigma_max**2` as its top
    eigenvalue and is much cheaper to decompose than the matrix itself.
    """
    if matrix.size == 0:
        return 0.0
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    top = np.linalg.eigvalsh(matrix @ matrix.T)[-1]
    return math.sqrt(max(float(top), 0.0))


def dense_bound(kernel):
    """Guaranteed bound of `x -> x @ kernel` over unit `x`.

    Args:
        kernel: array `(k_in, k_out)`.

    Returns:
        float, the largest singular value computed in float64, inflated.
    """
    kernel = np.asarray(kernel, np.float64)
    return inflate(np.linalg.norm(kernel, 2))


def conv_matrix(kernel, input_shape, strides, padding, dilation_rate):
    """The matrix of a zero-padded 2-D convolution (no bias) on one input.

    Built directly from the kernel taps: output position `(i, j)` and tap
    `(a, b)` read input position `(i * sh + a * dh - pad_top,
    j * sw + b * dw - pad_left)`; taps that land in the padding contribute
    nothing.

    Args:
        kernel: array `(kh, kw, cin, cout)`.
        input_shape: `(h, w, cin)`.
        strides: `(sh, sw)` or an int.
        padding: `"same"` or `"valid"`.
        dilation_rate: `(dh, dw)` or an int.

    Returns:
        float64 array `(h * w * cin, oh * ow * cout)` such that the flattened
        output is `x.reshape(-1) @ matrix`.
    """
    kernel = np.asarray(kernel, np.float64)
    kh, kw, cin, cout = kernel.shape
    h, w = input_shape[:2]
    (sh, sw), (dh, dw) = _pair(strides), _pair(dilation_rate)
    (oh, top), (ow, left) = _conv_geometry(
        kernel.shape, input_shape, strides, padding, dilation_rate
    )
    matrix = np.zeros((h * w, cin, oh * ow, cout))
    out_rows, out_cols = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
    out_rows, out_cols = out_rows.ravel(), out_cols.ravel()
    for a in range(kh):
        for b in range(kw):
            rows = out_rows * sh + a * dh - top
            cols = out_cols * sw + b * dw - left
            inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
            source = rows[inside] * w + cols[inside]
            target = out_rows[inside] * ow + out_cols[inside]
            # For a fixed output position distinct taps read distinct inputs,
            # so no (input, output) pair is written twice by the same tap.
            matrix[source, :, target, :] += kernel[a, b]
    return matrix.reshape(h * w * cin, oh * ow * cout)


def _dilate_numpy(kernel, dilation_rate):
    dh, dw = _pair(dilation_rate)
    kh, kw, cin, cout = kernel.shape
    dilated = np.zeros(((kh - 1) * dh + 1, (kw - 1) * dw + 1, cin, cout))
    dilated[::dh, ::dw] = kernel
    return dilated


def circular_conv_bound(kernel, input_shape, strides, padding, dilation_rate):
    """Spectral norm of the *circular* convolution on a grid that contains the
    padded input: an upper bound for the zero-padded convolution.

    Why it bounds the real operator: write the zero-padded input on a
    periodic grid of size `N` per axis, with `N` a multiple of the stride and
    at least the padded size. Placing the input into that grid is an
    isometry, and no tap of an output that Keras keeps reaches past the padded
    input, so it never wraps around; the real output is therefore a crop of
    the circular output, and cropping cannot increase the norm. The strided
    circular convolution equals a stride-1 circular convolution over
    space-to-depth blocks of the input (polyphase form); its singular values
    are those of the `cin*sh*sw x cout` matrices obtained by a 2-D DFT of the
    block kernel (Sedghi, Gupta and Long, 2019), computed here in float64.

    Args:
        kernel: array `(kh, kw, cin, cout)`.
        input_shape: `(h, w, cin)`.
        strides: `(sh, sw)` or an int.
        padding: `"same"` or `"valid"`.
        dilation_rate: `(dh, dw)` or an int.

    Returns:
        float, not inflated.
    """
    kernel = _dilate_numpy(np.asarray(kernel, np.float64), dilation_rate)
    kh, kw, cin, cout = kernel.shape
    sh, sw = _pair(strides)
    grid = []
    for size, window, stride in zip(input_shape[:2], (kh, kw), (sh, sw)):
        out, _ = _window_geometry(size, window, stride, padding)
        # The padded input: everything the windows read, or the whole input
        # if they read less of it ("valid" with a stride that skips the end).
        padded = max(size, (out - 1) * stride + window)
        grid.append(-(-padded // stride))
    grid_h, grid_w = grid
    blocks_h, blocks_w = -(-kh // sh), -(-kw // sw)
    poly = np.zeros((blocks_h * sh, blocks_w * sw, cin, cout))
    poly[:kh, :kw] = kernel
    poly = poly.reshape(blocks_h, sh, blocks_w, sw, cin, cout)
    poly = poly.transpose(0, 2, 1, 3, 4, 5).reshape(blocks_h, blocks_w, sh * sw * cin, cout)
    # A block kernel larger than the grid wraps onto itself; adding the
    # wrapped blocks is exactly what the circular operator does.
    folded = np.zeros((grid_h, grid_w, sh * sw * cin, cout))
    for a in range(blocks_h):
        for b in range(blocks_w):
            folded[a % grid_h, b % grid_w] += poly[a, b]
    spectrum = np.fft.fft2(folded, axes=(0, 1)).reshape(-1, sh * sw * cin, cout)
    return float(np.max(np.linalg.svd(spectrum, compute_uv=False)))


def conv_bound(kernel, input_shape, strides, padding, dilation_rate):
    """Guaranteed bound of a convolution's operator norm on its input shape.

    The smaller of two sound bounds: the exact norm of the materialised
    operator (`conv_matrix`) when it is small enough, and the circular bound
    (`circular_conv_bound`) always. Computed in NumPy float64, inflated.

    Args:
        kernel: array `(kh, kw, cin, cout)`.
        input_shape: `(h, w, cin)`.
        strides: `(sh, sw)` or an int.
        padding: `"same"` or `"valid"`.
        dilation_rate: `(dh, dw)` or an int.

    Returns:
        float.
    """
    kernel = np.asarray(kernel, np.float64)
    bound = circular_conv_bound(kernel, input_shape, strides, padding, dilation_rate)
    (oh, _), (ow, _) = _conv_geometry(
        kernel.shape, input_shape, strides, padding, dilation_rate
    )
    in_dim = int(np.prod(input_shape))
    out_dim = oh * ow * kernel.shape[-1]
    if (
        min(in_dim, out_dim) <= MAX_MATERIALISED_DIM
        and in_dim * out_dim <= MAX_MATERIALISED_ENTRIES
    ):
        matrix = conv_matrix(kernel, input_shape, strides, padding, dilation_rate)
        bound = min(bound, _matrix_norm(matrix))
    return inflate(bound)


def _average_pooling_matrix_1d(size, pool, stride, padding, replicate_edges=False):
    """The averaging matrix `(out, size)` of 1-D average pooling.

    Each window is divided by the number of real (non-padding) inputs it
    covers, as Keras' average pooling does with "same" padding on TensorFlow
    and JAX; "valid" windows are always full. With `replicate_edges` (Keras
    on torch, see `gloro.backend.average_pooling_replicates_edges`) every
    padding position repeats the nearest edge input and each window is
    divided by its full size.
    """
    out, pad_before = _window_geometry(size, pool, stride, padding)
    matrix = np.zeros((out, size))
    for i in range(out):
        start = i * stride - pad_before
        if replicate_edges:
            for position in range(start, start + pool):
                matrix[i, min(max(position, 0), size - 1)] += 1.0 / pool
        else:
            lo, hi = max(start, 0), min(start + pool, size)
            matrix[i, lo:hi] = 1.0 / (hi - lo)
    return matrix


def average_pooling_bound(pool_size, strides, padding, input_shape):
    """Guaranteed bound of 2-D average pooling on `input_shape`.

    A rectangular window meets the (rectangular) input in a rectangle, so the
    number of real inputs it averages is the product of the counts along each
    axis, and the operator is the Kronecker product `A_h (x) A_w (x) I_c` of
    the 1-D averaging matrices. The spectral norm of a Kronecker product is
    the product of the norms, so this is the exact norm (computed in float64,
    inflated); for non-overlapping windows it is `1 / sqrt(ph * pw)`.

    Args:
        pool_size: `(ph, pw)` or an int.
        strides: `(sh, sw)` or an int.
        padding: `"same"` or `"valid"`.
        input_shape: `(h, w, c)`.

    Returns:
        float.
    """
    # The operator Keras applies on this process's backend.
    replicate = backend.average_pooling_replicates_edges(pool_size, strides, padding, input_shape)
    norm = 1.0
    for size, pool, stride in zip(input_shape[:2], _pair(pool_size), _pair(strides)):
        norm *= _matrix_norm(_average_pooling_matrix_1d(size, pool, stride, padding, replicate))
    return inflate(norm)


def max_pooling_bound(pool_size, strides):
    """Bound of max pooling: `sqrt` of the most windows one input can sit in.

    The maximum of a window moves by at most the largest change inside that
    window, so the squared change of the output is at most the sum of the
    squared input changes, each counted once per window that contains it.
    Along an axis an input belongs to at most `ceil(p / s)` windows.

    The count is an exact integer; its square root is exact when the count is
    a perfect square (1 for non-overlapping windows) and otherwise the next
    float above the correctly rounded root, which is at least the true root.

    Args:
        pool_size: `(ph, pw)` or an int.
        strides: `(sh, sw)` or an int.

    Returns:
        float.
    """
    (ph, pw), (sh, sw) = _pair(pool_size), _pair(strides)
    windows = -(-ph // sh) * -(-pw // sw)
    root = math.isqrt(windows)
    if root * root == windows:
        return float(root)
    return math.nextafter(math.sqrt(windows), math.inf)


def sum_bound(bounds):
    """Bound of a sum of branches (`Add`, `Subtract`): the sum of theirs.

    `||sum_b (g_b(x) - g_b(x'))|| <= sum_b L_b ||x - x'||` by the triangle
    inequality. Works on floats and on scalar tensors alike.

    Args:
        bounds: the branches' bounds.

    Returns:
        their sum.
    """
    total = bounds[0]
    for bound in bounds[1:]:
        total = total + bound
    return total


def mean_bound(bounds):
    """Bound of the mean of branches (`Average`): the mean of theirs."""
    return sum_bound(bounds) / len(bounds)


def concatenation_bound(bounds):
    """Bound of branches concatenated along a feature axis.

    The squared norm of a concatenation is the sum of its parts' squared
    norms, so `sqrt(sum_b L_b**2)` bounds it. Works on floats and on scalar
    tensors alike.

    Args:
        bounds: the branches' bounds.

    Returns:
        `sqrt(sum_b L_b**2)`.
    """
    return sum_bound([bound * bound for bound in bounds]) ** 0.5


def pairwise_column_distances(kernel):
    """`D[j, i] = ||kernel[:, j] - kernel[:, i]||_2` in float64.

    Args:
        kernel: array `(k, m)`, the logits layer's kernel.

    Returns:
        float64 array `(m, m)`, inflated.
    """
    kernel = np.asarray(kernel, np.float64)
    diff = kernel[:, :, None] - kernel[:, None, :]
    return inflate(np.sqrt(np.sum(diff * diff, axis=0)))


def pairwise_column_distances_ops(kernel):
    """Differentiable version of `pairwise_column_distances` for training.

    Not inflated, in the kernel's dtype. The square root has an infinite
    derivative at zero; adding the identity inside it (and removing it
    outside) keeps the gradient finite on the diagonal, where the distance
    is always zero.

    Args:
        kernel: tensor `(k, m)`.

    Returns:
        tensor `(m, m)`.
    """
    diff = keras.ops.expand_dims(kernel, 2) - keras.ops.expand_dims(kernel, 1)
    eye = keras.ops.eye(kernel.shape[1], dtype=kernel.dtype)
    return keras.ops.sqrt(keras.ops.sum(diff * diff, axis=0) + eye) - eye


# ---------------------------------------------------------------- operators


class _Operator:
    """Power-iteration steps of an operator that has `apply` and
    `transpose`."""

    # Different shifts a training step takes (see `training_shifts`): a
    # shift costs this operator the same operation whatever its value.
    distinct_shifts = 2

    def step(self, w, shift=0.0):
        """One power-iteration step, `A^T A w - shift w`.

        The shift costs an operation of its own here (XLA fuses no
        elementwise operation into a matrix product or a convolution);
        `GroupedConvOperator` carries it in its convolutions instead.
        """
        image = self.transpose(self.apply(w))
        return image - shift * w if shift else image

    def iterate(self, w, shifts):
        """One step from `w` per entry of `shifts` (see `power_step`),
        unnormalised."""
        for shift in shifts:
            w = self.step(w, shift)
        return w


class DenseOperator(_Operator):
    """`x -> x @ kernel` as a linear operator on row vectors, in `keras.ops`;
    or `G` such operators of one shape, stacked, that power iteration
    advances together.

    Vectors are `(G, k_in)`: one row per kernel.

    Args:
        kernel: tensor `(k_in, k_out)`, or `(G, k_in, k_out)` for a stack.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._stacked = keras.ops.ndim(kernel) == 3
        self.members = kernel.shape[0] if self._stacked else 1

    @property
    def stack_key(self):
        """Operators with equal keys stack into one (see `stack`)."""
        return ("dense",) + tuple(self.kernel.shape[-2:])

    def apply(self, v):
        """`v @ kernel`, row by row."""
        if self._stacked:
            return keras.ops.einsum("gi,gio->go", v, self.kernel)
        return keras.ops.matmul(v, self.kernel)

    def transpose(self, u):
        """The adjoint: `u @ kernel^T`, row by row."""
        if self._stacked:
            return keras.ops.einsum("go,gio->gi", u, self.kernel)
        return keras.ops.matmul(u, keras.ops.transpose(self.kernel))

    def scaled(self, factors):
        """The same operator with each kernel multiplied by its factor."""
        return DenseOperator(self.kernel * (keras.ops.reshape(factors, (-1, 1, 1)) if self._stacked else factors[0]))

    def frozen(self):
        """The same operator with its kernel cut from the gradient."""
        # A tensor first: Keras' torch stop_gradient takes no NumPy array.
        return DenseOperator(keras.ops.stop_gradient(keras.ops.convert_to_tensor(self.kernel)))

    def norm_range(self):
        """`(low, high)`, each `(G,)`: `||K||_F / sqrt(k_in) <= ||K||_2 <=
        ||K||_F` for each kernel (a range for scaling, not a bound)."""
        frobenius = keras.ops.sqrt(keras.ops.sum(keras.ops.square(self.kernel), axis=(-2, -1)))
        frobenius = keras.ops.reshape(frobenius, (-1,))
        return frobenius / math.sqrt(self.kernel.shape[-2]), frobenius

    def squared_norms(self, x):
        """`(G,)`: each row's squared L2 norm."""
        return keras.ops.sum(keras.ops.square(x), axis=1)

    def per_member(self, values):
        """`(G,)` values shaped to broadcast against vectors."""
        return keras.ops.reshape(values, (-1, 1))

    def pack(self, vectors):
        """One vector per kernel, each `(1, k_in)`, as this operator's `(G, k_in)`."""
        return keras.ops.concatenate(vectors, axis=0) if len(vectors) > 1 else vectors[0]

    def unpack(self, v):
        """The inverse of `pack`."""
        return [v[g : g + 1] for g in range(v.shape[0])]


def _dilate_ops(kernel, dilation_rate):
    """Inserts `d - 1` zeros between taps, with `keras.ops` so that gradients
    reach the original taps."""
    dh, dw = dilation_rate
    if (dh, dw) == (1, 1):
        return kernel
    kh, kw, cin, cout = kernel.shape
    spread = keras.ops.reshape(kernel, (kh, 1, kw, 1, cin, cout))
    spread = keras.ops.pad(spread, [(0, 0), (0, dh - 1), (0, 0), (0, dw - 1), (0, 0), (0, 0)])
    spread = keras.ops.reshape(spread, (kh * dh, kw * dw, cin, cout))
    return spread[: (kh - 1) * dh + 1, : (kw - 1) * dw + 1]


def _assemble(parts, shape):
    """Zeros of `shape` with each `(tensor, offsets)` of `parts` written at
    its offsets (one per axis), as a sum of zero-padded tensors.

    XLA fuses pads into a sum, one kernel in all; a concatenation of padded
    parts costs a kernel per part, and a large concatenation may be left as
    an operation of its own.
    """
    return sum(
        keras.ops.pad(t, [(o, size - o - n) for o, n, size in zip(offsets, t.shape, shape)])
        for t, offsets in parts
    )


@functools.lru_cache(maxsize=64)
def _centre_identity(kh, kw, channels, factor):
    """`factor` times the identity on `channels` at the centre tap of a
    `(kh, kw, channels, 1, channels)` kernel, read-only. Cached: an eager
    training step (torch) asks for the same few in every step."""
    identity = np.zeros((kh, kw, channels, 1, channels), np.float32)
    identity[kh // 2, kw // 2, :, 0, :] = factor * np.eye(channels, dtype=np.float32)
    identity.flags.writeable = False
    return identity


def _block_reach(window, stride, pad_before):
    """`D` such that output `i` of a "same" convolution reads only blocks
    `i - D .. i + D` of its input cut into blocks of `stride`."""
    return max(-(-pad_before // stride), (window - 1 - pad_before) // stride)


def _blocked_kernel(kernel, strides, pad_before):
    """The kernel of a "same" convolution as the stride-1 "same" kernel
    that computes it on the input's space-to-depth (`space_to_depth`).

    Output `i` reads input `s i + t - p` (tap `t`), which is element
    `(t - p) mod s` of block `i + floor((t - p) / s)`. Placing tap `t` at
    `t - p + s D` of an axis of `s (2 D + 1)` zeros and splitting that axis
    into `(2 D + 1, s)` gives each block offset its `s` sub-taps; those
    become input channels, in `space_to_depth`'s order. Exact, with
    `keras.ops`, so gradients reach the original taps.

    Args:
        kernel: tensor `(kh, kw, cin, cout)` (dilation already applied).
        strides: `(sh, sw)`.
        pad_before: `(ph, pw)`, the zeros "same" padding adds before the input.

    Returns:
        tensor `(2 Dh + 1, 2 Dw + 1, sh sw cin, cout)`.
    """
    kh, kw, cin, cout = kernel.shape
    (sh, sw), (ph, pw) = strides, pad_before
    dh, dw = _block_reach(kh, sh, ph), _block_reach(kw, sw, pw)
    spread = _assemble(
        [(kernel, (sh * dh - ph, sw * dw - pw, 0, 0))], (sh * (2 * dh + 1), sw * (2 * dw + 1), cin, cout)
    )
    spread = keras.ops.reshape(spread, (2 * dh + 1, sh, 2 * dw + 1, sw, cin, cout))
    spread = keras.ops.transpose(spread, (0, 2, 1, 3, 4, 5))
    return keras.ops.reshape(spread, (2 * dh + 1, 2 * dw + 1, sh * sw * cin, cout))


def space_to_depth(x, block):
    """`(1, h, w, c)` as `(1, h / bh, w / bw, bh bw c)`: each block of
    `block = (bh, bw)` pixels becomes one pixel of its `bh bw c` values (a
    permutation, so it keeps every norm)."""
    _, h, w, c = x.shape
    bh, bw = block
    if (bh, bw) == (1, 1):
        return x
    x = keras.ops.reshape(x, (1, h // bh, bh, w // bw, bw, c))
    return keras.ops.reshape(keras.ops.transpose(x, (0, 1, 3, 2, 4, 5)), (1, h // bh, w // bw, bh * bw * c))


def depth_to_space(x, block):
    """The inverse of `space_to_depth`."""
    _, hb, wb, channels = x.shape
    bh, bw = block
    if (bh, bw) == (1, 1):
        return x
    c = channels // (bh * bw)
    x = keras.ops.reshape(x, (1, hb, wb, bh, bw, c))
    return keras.ops.reshape(keras.ops.transpose(x, (0, 1, 3, 2, 4, 5)), (1, hb * bh, wb * bw, c))


class ConvOperator(_Operator):
    """A 2-D convolution (no bias) on a fixed `(1, h, w, c)` input, in
    `keras.ops`.

    The dilation is applied to the kernel explicitly (zeros between taps) and
    every convolution runs with dilation 1: TensorFlow's CPU kernels have no
    dilated transposed convolution, and a single kernel for both directions
    keeps `transpose` the exact adjoint of `apply`.

    Vectors are `(1, h, w, c)` (one operator, `G = 1`). A "same"
    convolution whose input height and width are multiples of its strides
    is a stride-1 "same" convolution with an odd kernel on the input's
    `space_to_depth` (`blocked_kernel`); as such it stacks with others of
    its output size and (blocked) kernel size into a `GroupedConvOperator`
    (see `stack`), which is also the cheaper form of one: a network's
    strided convolutions join the stride-1 ones of their output size.

    Args:
        kernel: tensor `(kh, kw, cin, cout)`.
        input_shape: `(1, h, w, cin)`.
        strides: `(sh, sw)` or an int.
        padding: `"same"` or `"valid"`.
        dilation_rate: `(dh, dw)` or an int.
    """

    def __init__(self, kernel, input_shape, strides, padding, dilation_rate):
        self.kernel = kernel
        self.input_shape = tuple(input_shape)
        self.strides = _pair(strides)
        self.padding = padding.lower()
        self.dilation_rate = _pair(dilation_rate)
        self.members = 1
        self._dilated = _dilate_ops(kernel, self.dilation_rate)
        # Zeros the forward pass adds before the input, per axis.
        self._pad_before = tuple(
            _window_geometry(size, window, stride, self.padding)[1]
            for size, window, stride in zip(
                self.input_shape[1:3], self._dilated.shape[:2], self.strides
            )
        )

    @property
    def stack_key(self):
        """Operators with equal keys stack into one (see `stack`); None for
        a convolution that stacks with none (a "valid" one, or one whose
        input does not divide into blocks of its strides)."""
        h, w = self.input_shape[1:3]
        (sh, sw), (ph, pw) = self.strides, self._pad_before
        if self.padding != "same" or h % sh or w % sw:
            return None
        kh, kw = self._dilated.shape[:2]
        reach_h, reach_w = _block_reach(kh, sh, ph), _block_reach(kw, sw, pw)
        return ("conv_same", h // sh, w // sw, 2 * reach_h + 1, 2 * reach_w + 1)

    def blocked_kernel(self):
        """The stride-1 "same" kernel of this convolution on the input's
        `space_to_depth` by its strides (see `_blocked_kernel`); only for
        an operator with a `stack_key`."""
        return _blocked_kernel(self._dilated, self.strides, self._pad_before)

    def apply(self, v):
        """The convolution of `v`, shaped `input_shape`."""
        return keras.ops.conv(v, self._dilated, strides=self.strides, padding=self.padding)

    def transpose(self, u):
        """The adjoint of `apply`, for `u` shaped like its output.

        A forward pass is a "valid" convolution of the zero-padded input, so
        its adjoint is the "valid" transposed convolution (which scatters each
        output back over the padded grid) followed by the adjoint of the zero
        padding, a crop. Keras may return a padded grid shorter than the
        input (rows no window reads) or longer (trailing rows no window
        writes, when the kernel is smaller than the stride); both are zero
        in the adjoint, hence the padding at the end before cropping.
        """
        h, w = self.input_shape[1:3]
        if self.padding == "same" and h % self.strides[0] == 0 and w % self.strides[1] == 0:
            # The output then has exactly the input's size, and Keras'
            # "same" transposed convolution is the gradient of its "same"
            # convolution: one operation, no crop.
            return keras.ops.conv_transpose(u, self._dilated, strides=self.strides, padding="same")
        grid = keras.ops.conv_transpose(
            u, self._dilated, strides=self.strides, padding="valid"
        )
        top, left = self._pad_before
        extra_h = max(top + h - grid.shape[1], 0)
        extra_w = max(left + w - grid.shape[2], 0)
        if extra_h or extra_w:
            grid = keras.ops.pad(grid, [(0, 0), (0, extra_h), (0, extra_w), (0, 0)])
        return grid[:, top : top + h, left : left + w, :]

    def scaled(self, factors):
        """The same operator with its kernel multiplied by `factors[0]`."""
        return self._with_kernel(self.kernel * factors[0])

    def frozen(self):
        """The same operator with its kernel cut from the gradient."""
        return self._with_kernel(keras.ops.stop_gradient(keras.ops.convert_to_tensor(self.kernel)))

    def _with_kernel(self, kernel):
        return ConvOperator(kernel, self.input_shape, self.strides, self.padding, self.dilation_rate)

    def norm_range(self):
        """`(low, high)`, each `(1,)`: about where the operator norm lies,
        from the kernel's Frobenius norm (`high = sqrt(taps) ||K||_F` bounds
        it; `low = ||K||_F / sqrt(cin)` is its value on a lone interior
        pixel, a range for scaling, not a bound)."""
        kh, kw, cin, _ = self.kernel.shape
        frobenius = keras.ops.reshape(keras.ops.sqrt(keras.ops.sum(keras.ops.square(self.kernel))), (1,))
        return frobenius / math.sqrt(cin), frobenius * math.sqrt(kh * kw)

    def squared_norms(self, x):
        """`(1,)`: the squared L2 norm of `x`."""
        return keras.ops.reshape(keras.ops.sum(keras.ops.square(x)), (1,))

    def per_member(self, values):
        """`(1,)` values shaped to broadcast against vectors."""
        return keras.ops.reshape(values, (1, 1, 1, 1))

    def pack(self, vectors):
        """`[v]` as this operator's vector."""
        (v,) = vectors
        return v

    def unpack(self, v):
        """The inverse of `pack`."""
        return [v]


class GroupedConvOperator(_Operator):
    """`G` stride-1, "same" convolutions with odd kernels of one size, on
    inputs of one height and width, as one grouped convolution; a member
    may be a strided convolution in its blocked form (see `ConvOperator`),
    whose vectors it then cuts into blocks (`space_to_depth`) and back.

    Each kernel is padded with zeros to the largest input and output channel
    counts (which changes no operator norm: the added inputs are ignored and
    the added outputs are zero). The adjoint of a stride-1 "same"
    convolution with an odd kernel is the "same" convolution with the kernel
    flipped in space and its channel axes swapped (the padding is symmetric),
    so both directions are one grouped convolution for all `G`.

    Vectors are `(1, h, w, G, c_in)`: member `g` is `v[:, :, :, g]`, in
    blocks for a blocked member.

    Args:
        kernels: list of tensors `(kh, kw, cin_g, cout_g)`, each the
            stride-1 kernel on its (blocked) input.
        spatial_shape: `(h, w)` of the (blocked) inputs.
        blocks: `(bh, bw)` per member, the blocks its vectors are cut
            into; None for all `(1, 1)`.
    """

    def __init__(self, kernels, spatial_shape, blocks=None):
        kernels = list(kernels)
        self.members = len(kernels)
        self.spatial_shape = tuple(spatial_shape)
        self._blocks = [tuple(b) for b in blocks] if blocks is not None else [(1, 1)] * self.members
        self._cin = max(k.shape[2] for k in kernels)
        self._cout = max(k.shape[3] for k in kernels)
        self._in_channels = [k.shape[2] for k in kernels]
        kh, kw = kernels[0].shape[:2]
        self._forward = _assemble(
            [(k, (0, 0, 0, g * self._cout)) for g, k in enumerate(kernels)],
            (kh, kw, self._cin, self.members * self._cout),
        )
        self._shifted_forward, self._shifted_adjoints = None, {}

    def _per_member(self, kernel, channels):
        """A grouped kernel `(kh, kw, c, G * channels)` as `(kh, kw, c, G, channels)`."""
        kh, kw, c = kernel.shape[:3]
        return keras.ops.reshape(kernel, (kh, kw, c, self.members, channels))

    @functools.cached_property
    def _adjoint(self):
        """The grouped kernel of every member's adjoint: each member's
        kernel flipped in space, its channel axes swapped. From the one
        stacked kernel (not per member), so that it costs one operation;
        on first use, so that an eager caller pays for it only where it is
        used."""
        kh, kw = self._forward.shape[:2]
        stacked = keras.ops.flip(self._per_member(self._forward, self._cout), axis=(0, 1))
        return keras.ops.reshape(
            keras.ops.transpose(stacked, (0, 1, 4, 3, 2)), (kh, kw, self._cout, self.members * self._cin)
        )

    def _conv(self, x, kernel, channels):
        h, w = self.spatial_shape
        groups = self.members
        y = keras.ops.conv(keras.ops.reshape(x, (1, h, w, -1)), kernel, padding="same")
        return keras.ops.reshape(y, (1, h, w, groups, channels))

    def apply(self, v):
        """Each member's convolution of its vector."""
        return self._conv(v, self._forward, self._cout)

    def transpose(self, u):
        """Each member's adjoint, for `u` shaped like `apply`'s output."""
        return self._conv(u, self._adjoint, self._cin)

    # Each shift's kernels are built anew in every training step, a kernel
    # launch each: one shift for all steps (see `training_shifts`).
    distinct_shifts = 1

    def step(self, w, shift=0.0):
        """One power-iteration step, `A^T A w - shift w`, as two grouped
        convolutions whatever the shift.

        The shift rides in the convolutions rather than in an operation of
        its own (which would cost a kernel launch per step): the first also
        copies `w` to extra output channels (an identity at the centre tap),
        and the second maps those channels to `-shift w`. Its kernels are
        built once per shift (`_shifted_kernels`).
        """
        if not shift:
            return self.transpose(self.apply(w))
        forward, adjoint = self._shifted_kernels(shift)
        return self._conv(self._conv(w, forward, self._cout + self._cin), adjoint, self._cin)

    def _identity(self, factor):
        """`factor` times one member's identity at the centre tap,
        broadcast to every member: a constant that XLA fuses into the
        kernel that reads it (a constant for each kernel: one shared
        broadcast would be a kernel launch of its own)."""
        kh, kw = self._forward.shape[:2]
        identity = _centre_identity(kh, kw, self._cin, factor)
        return keras.ops.broadcast_to(identity, (kh, kw, self._cin, self.members, self._cin))

    def _shifted_kernels(self, shift):
        """The two grouped kernels of `step`: the forward one with the
        identity beside it (one for every shift), the adjoint one with
        `-shift` times the identity below it."""
        kh, kw = self._forward.shape[:2]
        cin, cout, members = self._cin, self._cout, self.members
        if self._shifted_forward is None:
            forward = _assemble(
                [(self._per_member(self._forward, cout), (0, 0, 0, 0, 0)), (self._identity(1.0), (0, 0, 0, 0, cout))],
                (kh, kw, cin, members, cout + cin),
            )
            self._shifted_forward = keras.ops.reshape(forward, (kh, kw, cin, members * (cout + cin)))
        if shift not in self._shifted_adjoints:
            adjoint = _assemble(
                [(keras.ops.reshape(self._adjoint, (kh, kw, cout, members, cin)), (0, 0, 0, 0, 0)),
                 (self._identity(-shift), (0, 0, cout, 0, 0))],
                (kh, kw, cout + cin, members, cin),
            )
            self._shifted_adjoints[shift] = keras.ops.reshape(adjoint, (kh, kw, cout + cin, members * cin))
        return self._shifted_forward, self._shifted_adjoints[shift]

    def scaled(self, factors):
        """The same operator with each kernel multiplied by its factor."""
        per_member = keras.ops.reshape(factors, (1, 1, 1, self.members, 1))
        return self._with_forward(
            keras.ops.reshape(self._per_member(self._forward, self._cout) * per_member, self._forward.shape)
        )

    def frozen(self):
        """The same operator with its kernels cut from the gradient."""
        return self._with_forward(keras.ops.stop_gradient(self._forward))

    def _with_forward(self, forward):
        # From the stacked kernel, rather than padding and stacking kernels
        # anew.
        operator = object.__new__(GroupedConvOperator)
        operator.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_adjoint"})
        operator._forward = forward
        operator._shifted_forward, operator._shifted_adjoints = None, {}
        return operator

    def norm_range(self):
        """`(low, high)`, each `(G,)`: as `ConvOperator.norm_range`, per
        member."""
        kh, kw = self._forward.shape[:2]
        stacked = self._per_member(self._forward, self._cout)
        frobenius = keras.ops.sqrt(keras.ops.sum(keras.ops.square(stacked), axis=(0, 1, 2, 4)))
        # A lone pixel of the unblocked input: its channels alone.
        fan_in = np.sqrt(np.asarray(
            [c / (bh * bw) for c, (bh, bw) in zip(self._in_channels, self._blocks)], np.float32
        ))
        return frobenius / fan_in, frobenius * math.sqrt(kh * kw)

    def squared_norms(self, x):
        """`(G,)`: each member's squared L2 norm."""
        return keras.ops.sum(keras.ops.square(x), axis=(0, 1, 2, 4))

    def per_member(self, values):
        """`(G,)` values shaped to broadcast against vectors."""
        return keras.ops.reshape(values, (1, 1, 1, -1, 1))

    def pack(self, vectors):
        """One vector per kernel, each shaped like its convolution's input,
        as this operator's `(1, h, w, G, c_in)`."""
        h, w = self.spatial_shape
        return _assemble(
            [(keras.ops.expand_dims(space_to_depth(v, block), 3), (0, 0, 0, g, 0))
             for g, (v, block) in enumerate(zip(vectors, self._blocks))],
            (1, h, w, self.members, self._cin),
        )

    def unpack(self, v):
        """The inverse of `pack`."""
        return [
            depth_to_space(v[:, :, :, g, :channels], block)
            for g, (channels, block) in enumerate(zip(self._in_channels, self._blocks))
        ]


def stack(operators):
    """One operator that runs `operators` (of equal, non-None `stack_key`,
    or a single one) together.

    Args:
        operators: a list of `DenseOperator` or `ConvOperator`.

    Returns:
        a `DenseOperator` (stacked for two or more), a
        `GroupedConvOperator`, or the one `ConvOperator` that stacks with
        none.
    """
    key = operators[0].stack_key
    if len(operators) > 1 and (key is None or any(op.stack_key != key for op in operators)):
        raise ValueError("Only operators of one stack_key stack together.")
    if key is None:
        return operators[0]
    if key[0] == "dense":
        if len(operators) == 1:
            return operators[0]
        return DenseOperator(keras.ops.stack([op.kernel for op in operators]))
    return GroupedConvOperator(
        [op.blocked_kernel() for op in operators], key[1:3], [op.strides for op in operators]
    )


# ------------------------------------------------------------ power iteration


def _safe_sqrt(squares):
    # sqrt has an infinite derivative at 0 (a zero kernel): there the
    # gradient is taken as 0 instead of NaN.
    positive = squares > 0
    return keras.ops.where(positive, keras.ops.sqrt(keras.ops.where(positive, squares, 1.0)), 0.0)


def _squared_norms(operators, tensors):
    """One vector of every member's squared norm, in order."""
    squares = [op.squared_norms(x) for op, x in zip(operators, tensors)]
    return keras.ops.concatenate(squares) if len(squares) > 1 else squares[0]


def initial_scales(operators, scales):
    """Scales for `power_step` that are within reach of the norms: the
    previous estimates `scales`, clipped to each operator's `norm_range`
    (its kernel's Frobenius norm), which also stands in for estimates that
    are missing (0) or not finite.

    Returns:
        `(N,)` tensor.
    """
    ranges = [op.frozen().norm_range() for op in operators]
    low = keras.ops.concatenate([r[0] for r in ranges])
    high = keras.ops.concatenate([r[1] for r in ranges])
    scales = keras.ops.convert_to_tensor(scales, "float32")
    valid = keras.ops.isfinite(scales) & (scales > 0)
    return keras.ops.where(valid, keras.ops.clip(scales, low, high), low)


def training_shifts(iterations, distinct=2):
    """The shifts of `iterations` training-time power-iteration steps (see
    `power_step`) that damp the spectrum on `[0, DAMPED_RANGE]`.

    With one distinct shift, the range's midpoint: a step multiplies a
    component of eigenvalue `lambda` by `|lambda - c|`, at most `c` on the
    range against `1 - c` at the top, and the cluster just below 1 (the
    spectrum of the near-orthogonal kernels of a trained Lipschitz network)
    by about `lambda ** 1.8`: a step does the work of 1.8 unshifted ones.
    With two, the roots of the degree-2 Chebyshev polynomial on the range
    in turn (and the midpoint for an odd last step): a pair multiplies
    `lambda` by at most `DAMPED_RANGE**2 / 8` on the range, half its value
    at the top, and the cluster by about `lambda ** 5.5` (0.946 at
    `lambda = 0.99`).

    Args:
        iterations: number of steps.
        distinct: the operator's `distinct_shifts`: 1 for one shift, 2 for
            the pairs (an odd last step adds the midpoint).

    Returns:
        list of `iterations` floats.
    """
    half = DAMPED_RANGE / 2
    if distinct == 1:
        return [half] * iterations
    pair = [half * (1 + math.sqrt(0.5)), half * (1 - math.sqrt(0.5))]
    return [pair[i % 2] for i in range(iterations - iterations % 2)] + [half] * (iterations % 2)


def power_step(operators, vectors, iterations=1, scales=None, shifted=False):
    """Advances power iteration on several operators at once.

    The iterations run on copies of the operators whose kernels are cut
    from the gradient, so no second-order graph is built; the gradient
    reaches the kernels only through `sigma = ||A v||` with the new `v` held
    constant.

    The iterates are normalised once, after the last step, not after every
    one: a step costs two operator applications and nothing else. They are
    kept near unit length by dividing the kernels by `scales`, estimates of
    their norms (the previous estimates, which trail the norm by a few
    percent while training moves the weights), so `k` steps change their
    length by at most `(sigma / scale) ** (2 k)`. Where they overflow or
    vanish (a
    first step with a scale far off, a zero kernel), the member keeps its
    previous vector and returns `||A v||` for it, and the next call, scaled
    by that estimate, moves on. `initial_scales` gives a first scale
    within reach of the norm. The
    direction is the same as with a normalisation after every step. The
    bookkeeping of all members (scales, norms, estimates) is done on one
    vector, so it costs a few operations, not a few per member.

    A shift `c` makes a step `w <- (B - c I) w`, with `B = A^T A /
    scale^2`: the same eigenvectors and, with the scale near the norm, `B`'s
    top eigenvalue near 1 and the others in `[0, 1]`. Steps with shifts
    `c_1 .. c_k` multiply a component of eigenvalue `lambda` by
    `prod (lambda - c_i)`, which `training_shifts` keeps small on
    `[0, DAMPED_RANGE]` against its value at 1: more convergence per step
    than `lambda ** k`, at the same cost (see `GroupedConvOperator.step`).
    Each operator takes as many distinct shifts as cost it nothing more
    (its `distinct_shifts`).
    That holds while the top eigenvalue is above the damped range, that is
    while the scale is at most 5% above the norm. A scale from a weight that
    shrank more in one step sends the vector the wrong way for one call; its
    lower estimate rescales the next. Either way the estimate is `||A v||`
    for a unit `v`: never above the norm.

    Args:
        operators: list of `DenseOperator`, `ConvOperator` or
            `GroupedConvOperator` (see `stack`); `N` members in all.
        vectors: the members' current unit vectors, one tensor per operator
            in its layout (`operator.pack`).
        iterations: number of steps.
        scales: `(N,)` tensor of positive numbers near each member's norm
            (the previous estimates); entries that are not finite and
            positive count as 1, and None means all 1.
        shifted: whether the steps are shifted (`training_shifts`), or
            plain power iteration (`v <- A^T A v`).

    Returns:
        `(sigma, vectors)`: the estimates, an `(N,)` tensor (each at most
        its member's spectral norm, up to float rounding), and the new unit
        vectors, one tensor per operator (gradient stopped).
    """
    sizes = [op.members for op in operators]
    offsets = np.cumsum([0] + sizes)
    if scales is None:
        scales = np.ones(sum(sizes), np.float32)
    scales = keras.ops.stop_gradient(keras.ops.convert_to_tensor(scales, "float32"))
    # Reciprocals of the whole vector, then a slice per operator: a slice
    # fuses into the product that reads it, a division by it would not.
    factors = 1.0 / keras.ops.where(keras.ops.isfinite(scales) & (scales > 0), scales, 1.0)
    iterates, previous = [], []
    for g, (op, v) in enumerate(zip(operators, vectors)):
        frozen = op.frozen().scaled(factors[offsets[g] : offsets[g + 1]])
        v = keras.ops.stop_gradient(keras.ops.convert_to_tensor(v))
        shifts = training_shifts(iterations, frozen.distinct_shifts) if shifted else [0.0] * iterations
        w = frozen.iterate(v, shifts)
        iterates.append(w)
        previous.append(v)
    squares = _squared_norms(operators, iterates)
    usable = keras.ops.isfinite(squares) & (squares > 0)
    inverse_norms = 1.0 / keras.ops.sqrt(keras.ops.where(usable, squares, 1.0))
    vectors = []
    for g, (op, w, v) in enumerate(zip(operators, iterates, previous)):
        part = slice(offsets[g], offsets[g + 1])
        w = w * op.per_member(inverse_norms[part])
        vectors.append(keras.ops.stop_gradient(keras.ops.where(op.per_member(usable[part]), w, v)))
    images = [op.apply(v) for op, v in zip(operators, vectors)]
    return _safe_sqrt(_squared_norms(operators, images)), vectors


def power_converge(step, v, scales=None):
    """Runs power iteration until every estimate stops moving.

    Args:
        step: a function `(v, scales) -> (sigma, v)` taking
            `CONVERGENCE_STEP_ITERATIONS` `power_step` iterations on the
            current kernels (`v` as `power_step`'s `vectors`); the caller
            compiles it once, since compiling it anew for every call would
            retrace each time.
        v: starting unit vectors.
        scales: `(G,)` estimates of the norms for the first call (see
            `power_step`); later calls use the previous estimates.

    Returns:
        `(sigma, v)`: the estimates as a NumPy float64 array `(G,)` and the
        last vectors.
    """
    scales = np.ones(1, np.float32) if scales is None else keras.ops.convert_to_numpy(scales)
    previous = np.full(np.shape(scales), -1.0)
    for _ in range(MAX_CONVERGENCE_ITERATIONS // CONVERGENCE_STEP_ITERATIONS):
        sigma_t, v = step(v, scales)
        sigma = np.asarray(keras.ops.convert_to_numpy(sigma_t), np.float64)
        if np.all(np.abs(sigma - previous) <= CONVERGENCE_TOLERANCE * sigma):
            break
        previous, scales = sigma, sigma.astype(np.float32)
    return sigma, v
