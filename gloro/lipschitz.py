"""Lipschitz bounds in the L2 norm: the one place where this math lives.

Two kinds of numbers come out of this module:

* **Estimates** (`power_step`, `power_converge`): power iteration on a linear
  operator. Cheap enough to run once per training step and differentiable,
  but they approach the spectral norm from *below*: `||A v|| <= sigma_max(A)`
  for every unit `v`. They drive training and are never used to certify.
* **Guaranteed bounds** (`dense_bound`, `conv_bound`, `pooling_bound`,
  `static_bound`): numbers proven to be at least the operator norm of the layer
  on its real input shape, computed in float64 and then inflated by
  `SAFETY_FACTOR`. Certificates are built only from these.

Why `SAFETY_FACTOR = 1 + 1e-5` suffices: the float64 SVDs and FFTs below are
backward stable, with relative errors of order `n * 2**-52` (below 1e-11 for
every size a layer can have here); the factor also absorbs the float32 storage
of the product (relative error 2**-24 per rounding, and the final rounding is
made upward anyway). The float32 rounding of the margin test itself is covered
by `gloro.certificates.MARGIN_SLACK`.
"""

import math

import keras
import numpy as np
import tensorflow as tf

SAFETY_FACTOR = 1.0 + 1e-5

# Above this many input (or output) dimensions, materialising a convolution as
# a matrix for an exact SVD costs more than it is worth; the FFT bound is used.
MAX_MATERIALISED_DIM = 2048

# Power iteration stops when the estimate moves by less than this (relative).
CONVERGENCE_TOLERANCE = 1e-7
MAX_CONVERGENCE_ITERATIONS = 5000

# Activations a Dense/Conv2D layer may carry, with their Lipschitz constants.
ACTIVATION_BOUNDS = {"linear": 1.0, "relu": 1.0}


def activation_bound(layer):
    """Lipschitz constant of the `activation` argument of a Dense/Conv2D layer.

    Args:
        layer: a layer with an `activation` attribute.

    Returns:
        float, the bound.

    Raises:
        ValueError: the activation's bound is not known.
    """
    name = keras.activations.serialize(layer.activation)
    if isinstance(name, dict):
        name = name.get("config", {}).get("name", name.get("class_name"))
    if name not in ACTIVATION_BOUNDS:
        raise ValueError(
            f"Layer '{layer.name}' uses activation {name!r}, whose Lipschitz "
            f"bound gloro does not know. Use one of {sorted(ACTIVATION_BOUNDS)}"
            " (or put a gloro.layers.MinMax layer after it)."
        )
    return ACTIVATION_BOUNDS[name]


# ---------------------------------------------------------------- operators


class DenseOperator:
    """`x -> x @ kernel` as a linear operator on row vectors."""

    def __init__(self, kernel):
        self.kernel = kernel

    def apply(self, v):
        return tf.matmul(v, self.kernel)

    def transpose(self, u):
        return tf.matmul(u, self.kernel, transpose_b=True)


class ConvOperator:
    """A 2-D convolution (no bias) on a fixed `(1, h, w, c)` input shape."""

    def __init__(self, kernel, input_shape, strides, padding, dilation_rate):
        self.kernel = kernel
        self.input_shape = tuple(input_shape)
        self.strides = tuple(strides)
        self.padding = padding.upper()
        self.dilation_rate = tuple(dilation_rate)

    def apply(self, v):
        return tf.nn.conv2d(
            v,
            self.kernel,
            strides=self.strides,
            padding=self.padding,
            dilations=self.dilation_rate,
        )

    def transpose(self, u):
        return tf.nn.conv2d_transpose(
            u,
            self.kernel,
            output_shape=self.input_shape,
            strides=self.strides,
            padding=self.padding,
            dilations=self.dilation_rate,
        )


def _normalize(w, fallback):
    # No epsilon in the denominator: it would bias the estimate down for small
    # weights. A zero vector (zero kernel) keeps the previous direction.
    norm = tf.norm(w)
    return tf.where(norm > 0, w / tf.where(norm > 0, norm, 1.0), fallback)


def power_step(operator, v, iterations=1):
    """Advances power iteration on `operator` from the unit vector `v`.

    Args:
        operator: a `DenseOperator` or `ConvOperator`.
        v: current unit vector, shaped like the operator's input.
        iterations: number of `v <- A^T A v / ||A^T A v||` steps.

    Returns:
        `(sigma, v)`: the new vector (gradient stopped) and the estimate
        `sigma = ||A v||`, through which gradients flow to the kernel. The
        estimate is a lower bound of the spectral norm.
    """
    v = tf.stop_gradient(v)
    for _ in range(iterations):
        v = _normalize(operator.transpose(operator.apply(v)), v)
    v = tf.stop_gradient(v)
    return tf.norm(operator.apply(v)), v


def power_converge(step, v):
    """Runs power iteration until the estimate stops moving.

    Args:
        step: a function `v -> (sigma, v)` taking 10 `power_step`
            iterations on the current kernel (compiled once by the caller:
            a new `tf.function` per call would retrace every time).
        v: starting unit vector.

    Returns:
        `(sigma, v)` as numpy float and tensor.
    """
    sigma, previous = 0.0, -1.0
    for _ in range(MAX_CONVERGENCE_ITERATIONS // 10):
        sigma_t, v = step(v)
        sigma = float(sigma_t)
        if abs(sigma - previous) <= CONVERGENCE_TOLERANCE * sigma:
            break
        previous = sigma
    return sigma, v


# --------------------------------------------------------- guaranteed bounds


def _inflate(value):
    return float(value) * SAFETY_FACTOR


def dense_bound(kernel):
    """Guaranteed bound of `||x @ kernel||` over unit `x`: the exact largest
    singular value in float64, inflated by `SAFETY_FACTOR`.

    Args:
        kernel: array `(k_in, k_out)`.

    Returns:
        float.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    return _inflate(np.linalg.norm(kernel, 2))


def pairwise_column_distances(kernel):
    """`D[j, i] = ||kernel[:, j] - kernel[:, i]||_2`, exactly, in float64.

    Args:
        kernel: array `(k, m)`, the logits layer's kernel.

    Returns:
        float64 array `(m, m)`, inflated by `SAFETY_FACTOR`.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    diff = kernel[:, :, None] - kernel[:, None, :]
    return np.sqrt(np.sum(diff * diff, axis=0)) * SAFETY_FACTOR


def pairwise_column_distances_tf(kernel):
    """Differentiable float32 version of `pairwise_column_distances`, for
    training (no inflation; the identity keeps the square root's gradient
    finite on the zero diagonal)."""
    diff = kernel[:, :, None] - kernel[:, None, :]
    eye = tf.eye(tf.shape(kernel)[1], dtype=kernel.dtype)
    return tf.sqrt(tf.reduce_sum(diff * diff, axis=0) + eye) - eye


def _same_padding(size, kernel, stride):
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0)


def _dilate(kernel, dilation_rate):
    dh, dw = dilation_rate
    kh, kw, cin, cout = kernel.shape
    dilated = np.zeros(((kh - 1) * dh + 1, (kw - 1) * dw + 1, cin, cout))
    dilated[::dh, ::dw] = kernel
    return dilated


def circular_conv_bound(kernel, input_shape, strides, padding, dilation_rate):
    """Norm of the *circular* convolution on the padded grid, which bounds the
    zero-padded convolution from above.

    The zero-padded input embeds isometrically into a circular grid of size
    `N >= padded size` (a multiple of the stride), where no kernel tap of a
    kept output wraps around; the real output is a crop (a contraction) of the
    circular one. Strides become a stride-1 convolution over space-to-depth
    blocks (the polyphase form), whose singular values are exactly those of the
    per-frequency matrices of its 2-D DFT (Sedghi et al., 2019).

    Returns:
        float, not inflated.
    """
    kernel = _dilate(np.asarray(kernel, np.float64), dilation_rate)
    kh, kw, cin, cout = kernel.shape
    grids = []
    for size, k, s in zip(input_shape[:2], (kh, kw), strides):
        pad = _same_padding(size, k, s) if padding == "same" else 0
        padded = size + pad
        grids.append(-(-padded // s))
    (mh, mw), (sh, sw) = grids, strides
    blocks_h, blocks_w = -(-kh // sh), -(-kw // sw)
    poly = np.zeros((blocks_h * sh, blocks_w * sw, cin, cout))
    poly[:kh, :kw] = kernel
    poly = poly.reshape(blocks_h, sh, blocks_w, sw, cin, cout)
    poly = poly.transpose(0, 2, 1, 3, 4, 5).reshape(
        blocks_h, blocks_w, sh * sw * cin, cout
    )
    # A kernel larger than the grid wraps onto itself; summing the wrapped
    # taps is exactly what the circular operator does.
    folded = np.zeros((mh, mw, sh * sw * cin, cout))
    for a in range(blocks_h):
        for b in range(blocks_w):
            folded[a % mh, b % mw] += poly[a, b]
    spectrum = np.fft.fft2(folded, axes=(0, 1)).reshape(-1, sh * sw * cin, cout)
    return float(np.max(np.linalg.svd(spectrum, compute_uv=False)))


def materialised_matrix(apply_fn, input_shape):
    """The matrix of a linear map on `input_shape`, one basis vector per row.

    Args:
        apply_fn: maps a float64 batch `(n,) + input_shape` to outputs.
        input_shape: shape of one input, without batch axis.

    Returns:
        float64 array `(prod(input_shape), prod(output_shape))`.
    """
    dim = int(np.prod(input_shape))
    basis = tf.reshape(tf.eye(dim, dtype=tf.float64), (dim,) + tuple(input_shape))
    return tf.reshape(apply_fn(basis), (dim, -1)).numpy()


def _matrix_norm(matrix):
    # The Gram matrix of the smaller side has the same top eigenvalue as
    # sigma_max^2 and is much cheaper than a full SVD.
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    eig = np.linalg.eigvalsh(matrix @ matrix.T)
    return math.sqrt(max(float(eig[-1]), 0.0))


def conv_bound(kernel, input_shape, strides, padding, dilation_rate):
    """Guaranteed bound of a convolution's operator norm on its input shape.

    The tightest of the sound bounds implemented: the exact norm of the
    materialised operator when it is small enough, and the circular-convolution
    bound (`circular_conv_bound`) always. Inflated by `SAFETY_FACTOR`.

    Args:
        kernel: array `(kh, kw, cin, cout)`.
        input_shape: `(h, w, cin)`.
        strides: `(sh, sw)`.
        padding: `"same"` or `"valid"`.
        dilation_rate: `(dh, dw)`.

    Returns:
        float.
    """
    bound = circular_conv_bound(kernel, input_shape, strides, padding, dilation_rate)
    kernel64 = tf.constant(np.asarray(kernel, np.float64))
    out_h, out_w = _conv_output_size(kernel.shape, input_shape, strides, padding, dilation_rate)
    in_dim = int(np.prod(input_shape))
    out_dim = out_h * out_w * kernel.shape[-1]
    if min(in_dim, out_dim) <= MAX_MATERIALISED_DIM and in_dim * out_dim <= 2**24:
        matrix = materialised_matrix(
            lambda x: tf.nn.conv2d(
                x, kernel64, strides=strides, padding=padding.upper(), dilations=dilation_rate
            ),
            input_shape,
        )
        bound = min(bound, _matrix_norm(matrix))
    return _inflate(bound)


def _conv_output_size(kernel_shape, input_shape, strides, padding, dilation_rate):
    sizes = []
    for size, k, s, d in zip(input_shape[:2], kernel_shape[:2], strides, dilation_rate):
        effective = (k - 1) * d + 1
        if padding == "same":
            sizes.append(-(-size // s))
        else:
            sizes.append(max(-(-(size - effective + 1) // s), 0))
    return sizes


def average_pooling_bound(pool_size, strides, padding, input_shape):
    """Guaranteed bound of average pooling on `input_shape`.

    `||A||_2 <= sqrt(||A||_1 ||A||_inf)`, with the largest column and row sums
    of the (non-negative) averaging matrix computed exactly as `A^T 1` and
    `A 1`. For non-overlapping windows this is the exact norm
    `1 / sqrt(ph * pw)`.

    Returns:
        float.
    """
    x = tf.ones((1,) + tuple(input_shape), tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.nn.avg_pool2d(x, pool_size, strides, padding.upper())
    column_sums = tape.gradient(y, x)
    row_sums = y
    return _inflate(
        math.sqrt(float(tf.reduce_max(column_sums)) * float(tf.reduce_max(row_sums)))
    )


def max_pooling_bound(pool_size, strides):
    """Bound of max pooling: `sqrt` of the most windows one input can sit in.

    Each window's max moves by at most the largest change inside it, so the
    squared output change is at most the squared input change counted once
    per window containing it.

    Returns:
        float.
    """
    (ph, pw), (sh, sw) = pool_size, strides
    return math.sqrt(math.ceil(ph / sh) * math.ceil(pw / sw))


def static_bound(layer):
    """Guaranteed bound of a layer without a spectral-norm cache.

    Args:
        layer: a built Keras layer.

    Returns:
        float.

    Raises:
        ValueError: the layer's bound is not known; the message names the
            layer and says what to use instead.
    """
    from gloro import layers as gloro_layers

    if isinstance(layer, (keras.layers.InputLayer, keras.layers.Flatten,
                          keras.layers.Reshape, gloro_layers.MinMax,
                          gloro_layers.InvertibleDownsampling)):
        return 1.0
    if isinstance(layer, gloro_layers.Scaling):
        return abs(float(layer.scale))
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) > 1.0:
            raise ValueError(
                f"Layer '{layer.name}' is a ReLU with negative_slope="
                f"{layer.negative_slope} > 1, which gloro does not bound. Use "
                "a slope in [0, 1] or gloro.layers.MinMax."
            )
        return 1.0
    if isinstance(layer, keras.layers.Activation):
        return activation_bound(layer)
    if isinstance(layer, keras.layers.AveragePooling2D):
        _check_channels_last(layer)
        return average_pooling_bound(
            layer.pool_size, layer.strides, layer.padding, layer.input.shape[1:]
        )
    if isinstance(layer, keras.layers.MaxPooling2D):
        _check_channels_last(layer)
        return max_pooling_bound(layer.pool_size, layer.strides)
    hint = ""
    if isinstance(layer, keras.layers.BatchNormalization):
        hint = (" Batch statistics make its bound meaningless during training;"
                " remove it (orthogonal initialisation and MinMax train well"
                " without it).")
    elif isinstance(layer, keras.layers.Softmax):
        hint = " GloroNet needs logits: remove the softmax."
    elif isinstance(layer, keras.layers.Dropout):
        hint = " Dropout rescales activations during training; remove it."
    raise ValueError(
        f"Layer '{layer.name}' ({type(layer).__name__}) has no Lipschitz bound "
        f"that gloro knows.{hint} Use the layers of gloro.layers (Dense, "
        "Conv2D, MinMax, ReLU, Flatten, Reshape, AveragePooling2D, "
        "MaxPooling2D, InvertibleDownsampling, Scaling)."
    )


def _check_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(
            f"Layer '{layer.name}' uses data_format='channels_first'; gloro "
            "bounds channels_last layers only."
        )
