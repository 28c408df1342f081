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


class DenseOperator:
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

    def frozen(self, scales=None):
        """The same operator with its kernel cut from the gradient and, if
        `scales` (one per kernel) is given, divided by them."""
        # A tensor first: Keras' torch stop_gradient takes no NumPy array.
        kernel = keras.ops.stop_gradient(keras.ops.convert_to_tensor(self.kernel))
        if scales is not None:
            kernel = kernel / (keras.ops.reshape(scales, (-1, 1, 1)) if self._stacked else scales[0])
        return DenseOperator(kernel)

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


class ConvOperator:
    """A 2-D convolution (no bias) on a fixed `(1, h, w, c)` input, in
    `keras.ops`.

    The dilation is applied to the kernel explicitly (zeros between taps) and
    every convolution runs with dilation 1: TensorFlow's CPU kernels have no
    dilated transposed convolution, and a single kernel for both directions
    keeps `transpose` the exact adjoint of `apply`.

    Vectors are `(1, h, w, c)` (one operator, `G = 1`). A stride-1, "same",
    undilated convolution with an odd kernel stacks with others of its
    spatial size and kernel size into a `GroupedConvOperator` (see `stack`),
    which is also the cheaper form of one.

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
        a convolution that stacks with none."""
        kh, kw = self.kernel.shape[:2]
        if (
            self.strides == (1, 1)
            and self.dilation_rate == (1, 1)
            and self.padding == "same"
            and kh % 2 == 1
            and kw % 2 == 1
        ):
            return ("conv_same", self.input_shape[1], self.input_shape[2], kh, kw)
        return None

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

    def frozen(self, scales=None):
        """The same operator with its kernel cut from the gradient and, if
        `scales` (one value) is given, divided by it."""
        kernel = keras.ops.stop_gradient(keras.ops.convert_to_tensor(self.kernel))
        if scales is not None:
            kernel = kernel / scales[0]
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


class GroupedConvOperator:
    """`G` stride-1, "same", undilated convolutions with odd kernels of one
    size, on inputs of one height and width, as one grouped convolution.

    Each kernel is padded with zeros to the largest input and output channel
    counts (which changes no operator norm: the added inputs are ignored and
    the added outputs are zero). The adjoint of a stride-1 "same"
    convolution with an odd kernel is the "same" convolution with the kernel
    flipped in space and its channel axes swapped (the padding is symmetric),
    so both directions are one grouped convolution for all `G`.

    Vectors are `(1, h, w, G, c_in)`: member `g` is `v[:, :, :, g]`.

    Args:
        kernels: list of tensors `(kh, kw, cin_g, cout_g)`.
        spatial_shape: `(h, w)` of the inputs.
    """

    def __init__(self, kernels, spatial_shape):
        self.kernels = list(kernels)
        self.members = len(self.kernels)
        self.spatial_shape = tuple(spatial_shape)
        self._cin = max(k.shape[2] for k in self.kernels)
        self._cout = max(k.shape[3] for k in self.kernels)
        self._in_channels = [k.shape[2] for k in self.kernels]
        padded = [
            keras.ops.pad(k, [(0, 0), (0, 0), (0, self._cin - k.shape[2]), (0, self._cout - k.shape[3])])
            for k in self.kernels
        ]
        self._forward = keras.ops.concatenate(padded, axis=-1) if len(padded) > 1 else padded[0]
        adjoints = [keras.ops.transpose(keras.ops.flip(k, axis=(0, 1)), (0, 1, 3, 2)) for k in padded]
        self._adjoint = keras.ops.concatenate(adjoints, axis=-1) if len(adjoints) > 1 else adjoints[0]

    def _conv(self, x, kernel, channels):
        h, w = self.spatial_shape
        groups = len(self.kernels)
        y = keras.ops.conv(keras.ops.reshape(x, (1, h, w, -1)), kernel, padding="same")
        return keras.ops.reshape(y, (1, h, w, groups, channels))

    def apply(self, v):
        """Each member's convolution of its vector."""
        return self._conv(v, self._forward, self._cout)

    def transpose(self, u):
        """Each member's adjoint, for `u` shaped like `apply`'s output."""
        return self._conv(u, self._adjoint, self._cin)

    def frozen(self, scales=None):
        """The same operator with its kernels cut from the gradient and, if
        `scales` (one per kernel) is given, divided by them."""
        # From the stacked kernels, scaled per member in one operation each,
        # rather than padding and stacking scaled copies anew.
        frozen = object.__new__(GroupedConvOperator)
        frozen.__dict__.update(self.__dict__)
        frozen.kernels = [keras.ops.stop_gradient(keras.ops.convert_to_tensor(k)) for k in self.kernels]
        forward = keras.ops.stop_gradient(self._forward)
        adjoint = keras.ops.stop_gradient(self._adjoint)
        if scales is not None:
            kh, kw = forward.shape[:2]
            per_member = keras.ops.reshape(scales, (1, 1, 1, self.members, 1))
            forward = keras.ops.reshape(
                keras.ops.reshape(forward, (kh, kw, self._cin, self.members, self._cout)) / per_member, forward.shape
            )
            adjoint = keras.ops.reshape(
                keras.ops.reshape(adjoint, (kh, kw, self._cout, self.members, self._cin)) / per_member, adjoint.shape
            )
        frozen._forward, frozen._adjoint = forward, adjoint
        return frozen

    def norm_range(self):
        """`(low, high)`, each `(G,)`: as `ConvOperator.norm_range`, per
        member."""
        kh, kw = self._forward.shape[:2]
        stacked = keras.ops.reshape(self._forward, (kh, kw, self._cin, self.members, self._cout))
        frobenius = keras.ops.sqrt(keras.ops.sum(keras.ops.square(stacked), axis=(0, 1, 2, 4)))
        fan_in = np.sqrt(np.asarray(self._in_channels, np.float32))
        return frobenius / fan_in, frobenius * math.sqrt(kh * kw)

    def squared_norms(self, x):
        """`(G,)`: each member's squared L2 norm."""
        return keras.ops.sum(keras.ops.square(x), axis=(0, 1, 2, 4))

    def per_member(self, values):
        """`(G,)` values shaped to broadcast against vectors."""
        return keras.ops.reshape(values, (1, 1, 1, -1, 1))

    def pack(self, vectors):
        """One vector per kernel, each `(1, h, w, cin_g)`, as this
        operator's `(1, h, w, G, c_in)`."""
        padded = [
            keras.ops.pad(v, [(0, 0), (0, 0), (0, 0), (0, self._cin - v.shape[3])]) for v in vectors
        ]
        return keras.ops.stack(padded, axis=3)

    def unpack(self, v):
        """The inverse of `pack`."""
        return [v[:, :, :, g, :channels] for g, channels in enumerate(self._in_channels)]


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
    return GroupedConvOperator([op.kernel for op in operators], key[1:3])


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


def power_step(operators, vectors, iterations=1, scales=None):
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
    length by `(sigma / scale) ** (2 k)`. Where they overflow or vanish (a
    first step with a scale far off, a zero kernel), the member keeps its
    previous vector and returns `||A v||` for it, and the next call, scaled
    by that estimate, moves on. `initial_scales` gives a first scale
    within reach of the norm. The
    direction is the same as with a normalisation after every step. The
    bookkeeping of all members (scales, norms, estimates) is done on one
    vector, so it costs a few operations, not a few per member.

    Args:
        operators: list of `DenseOperator`, `ConvOperator` or
            `GroupedConvOperator` (see `stack`); `N` members in all.
        vectors: the members' current unit vectors, one tensor per operator
            in its layout (`operator.pack`).
        iterations: number of `v <- A^T A v` steps.
        scales: `(N,)` tensor of positive numbers near each member's norm
            (the previous estimates); entries that are not finite and
            positive count as 1, and None means all 1.

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
    scales = keras.ops.where(keras.ops.isfinite(scales) & (scales > 0), scales, 1.0)
    iterates, previous = [], []
    for g, (op, v) in enumerate(zip(operators, vectors)):
        frozen = op.frozen(scales[offsets[g] : offsets[g + 1]])
        v = keras.ops.stop_gradient(keras.ops.convert_to_tensor(v))
        w = v
        for _ in range(iterations):
            w = frozen.transpose(frozen.apply(w))
        iterates.append(w)
        previous.append(v)
    squares = _squared_norms(operators, iterates)
    usable = keras.ops.isfinite(squares) & (squares > 0)
    norms = keras.ops.sqrt(keras.ops.where(usable, squares, 1.0))
    vectors = []
    for g, (op, w, v) in enumerate(zip(operators, iterates, previous)):
        part = slice(offsets[g], offsets[g + 1])
        w = w / op.per_member(norms[part])
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
