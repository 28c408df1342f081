"""Layers with known Lipschitz bounds, and the table of plain Keras ones.

Every gloro layer answers one question itself: *what is my guaranteed L2
Lipschitz bound on my input shape?* It is the method `guaranteed_bound()`,
which returns a float proven to be at least the layer's true constant
(computed in NumPy float64 by `gloro.lipschitz`, never from an estimate).
`layer_bound(layer)` asks a layer for it, and looks plain Keras layers
(`ReLU`, `Flatten`, pooling, ...) up in this module's table; anything else is
refused with an error naming the layer.

`Dense` and `Conv2D` also train with power iteration: they cache, as
non-trainable weights saved with the model, a power-iteration vector, the
latest spectral-norm estimate and the latest guaranteed bound, and offer
`power_step` (a differentiable estimate for training) and `converge`.

Branches meet in `Add`, `Subtract`, `Average` or `Concatenate` (Keras' own
layers, re-exported here); `MERGE_BOUNDS` says how each combines its inputs'
bounds, and `gloro.graph` propagates them through the model.

Your own layer: give it a `guaranteed_bound(self)` method returning a float
that is at least its Lipschitz constant on its built input shape (and refuse
shapes or settings you cannot bound). `GloroNet` then accepts it; the bound
is recomputed whenever the model's weights change. Layers whose bound
depends on weights that training moves should subclass `SpectralNormCache`
as `Dense` and `Conv2D` do, or their bound is held fixed during training.

Example:

```python
import keras
from gloro import layers

x = keras.Input((28, 28, 1))
z = layers.Conv2D(16, 4, strides=2, padding="same")(x)
z = layers.MinMax()(z)
z = layers.Flatten()(z)
y = layers.Dense(10)(z)
layers.layer_bound(z._keras_history.operation)   # 1.0 (Flatten)
```
"""

import keras
import numpy as np
from keras import ops

from gloro import backend, lipschitz

ReLU = keras.layers.ReLU
Add = keras.layers.Add
Subtract = keras.layers.Subtract
Average = keras.layers.Average
Concatenate = keras.layers.Concatenate
Flatten = keras.layers.Flatten
Reshape = keras.layers.Reshape
AveragePooling2D = keras.layers.AveragePooling2D
MaxPooling2D = keras.layers.MaxPooling2D

# Activations a layer may apply (the `activation` argument of Dense/Conv2D or
# a keras.layers.Activation), with their Lipschitz constants.
ACTIVATION_BOUNDS = {"linear": 1.0, "relu": 1.0}

# Replicas hold identical weights, so each computes the same power-iteration
# update; keeping the first replica's value keeps the caches in sync under
# tf.distribute without a cross-replica reduction (see SpectralNormCache).
_CACHE_AGGREGATION = "only_first_replica"


def activation_bound(layer):
    """Lipschitz constant of a layer's `activation`.

    Args:
        layer: a layer with an `activation` attribute.

    Returns:
        float.

    Raises:
        ValueError: gloro does not know the activation's bound.
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


class SpectralNormCache:
    """Mixin for linear layers that train with power iteration.

    Subclasses define `_operator(kernel)` (a `gloro.lipschitz` operator),
    `_guaranteed_norm(kernel)` (a NumPy float64 bound of that operator) and
    `_operator_input_shape`, and call `_build_cache()` at the end of `build`.
    The layer's activation multiplies every number it reports: the operator
    norm times `activation_bound(self)`, fixed at build time.

    On several devices the caches stay identical on every replica after
    every step, because each update is a function of the kernel and of the
    previous vector alone, never of the batch, and both are already the same
    everywhere:

    - tf.distribute (`MirroredStrategy`, `MultiWorkerMirroredStrategy`): the
      kernel is a mirrored variable that the strategy's all-reduced update
      keeps equal, and the caches are created with
      `aggregation="only_first_replica"`, so an assignment inside a step
      writes the first replica's value to every copy, on every worker.
    - keras.distribution on JAX (`DataParallel`): variables are replicated
      over the device mesh and the training step is one SPMD program, so a
      cache is one logical array whose copies XLA keeps equal.

    Freezing (`GloroNet.freeze_lipschitz`) runs between steps, outside any
    replica: `converge` runs the compiled power iteration on the kernel's
    value and `guaranteed_bound` computes in NumPy float64 on the host, and
    each assigns its result to every copy. Each worker freezes from the same
    weights, and the guaranteed bounds depend on the weights alone, so the
    frozen constants are exactly those one device computes for them.
    """

    def _build_cache(self):
        self._activation_bound = activation_bound(self)
        self.power_vector = self._cache_weight(
            "power_vector", (1,) + tuple(self._operator_input_shape),
            keras.initializers.RandomNormal(seed=0),
        )
        self.lipschitz_estimate = self._cache_weight("lipschitz_estimate", (), "zeros")
        self.lipschitz_bound = self._cache_weight("lipschitz_bound", (), "zeros")
        self._converge_step = None

    def _cache_weight(self, name, shape, initializer):
        # float32 whatever the dtype policy: bounds must not be computed in
        # half precision.
        return self.add_weight(
            shape=shape,
            initializer=initializer,
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation=_CACHE_AGGREGATION,
            name=name,
        )

    @property
    def cache_variables(self):
        """The variables this layer derives from its kernel (not weights of
        the function it computes)."""
        return [self.power_vector, self.lipschitz_estimate, self.lipschitz_bound]

    # Keras' Dense and Conv2D save only their kernel and bias; the caches are
    # part of the certificate state, so every variable is saved, in order.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    def _unit_power_vector(self):
        v = ops.convert_to_tensor(self.power_vector)
        return v / ops.sqrt(ops.sum(ops.square(v)))

    def power_step(self, iterations=1):
        """Advances the cached power iteration; for use during training.

        Args:
            iterations: power-iteration steps to take.

        Returns:
            scalar tensor: the estimate of the layer's Lipschitz constant,
            differentiable with respect to the kernel. A lower bound, never a
            certificate.
        """
        kernel = ops.cast(self.kernel, "float32")
        sigma, v = lipschitz.power_step(self._operator(kernel), self._unit_power_vector(), iterations)
        self.power_vector.assign(v)
        self.lipschitz_estimate.assign(ops.stop_gradient(sigma))
        return sigma * self._activation_bound

    def estimate(self):
        """The cached estimate (from the latest `power_step` or `converge`),
        as a scalar tensor."""
        return ops.convert_to_tensor(self.lipschitz_estimate) * self._activation_bound

    def converge(self):
        """Runs power iteration to convergence and caches the estimate.

        Returns:
            float, the converged estimate (not a certificate).
        """
        if self._converge_step is None:
            # The kernel is an argument, so one compilation serves every
            # later refresh.
            self._converge_step = backend.compiled(
                lambda kernel, v: lipschitz.power_step(self._operator(kernel), v, lipschitz.CONVERGENCE_STEP_ITERATIONS)
            )
        kernel = ops.cast(self.kernel, "float32")
        sigma, v = lipschitz.power_converge(
            lambda v: self._converge_step(kernel, v), self._unit_power_vector()
        )
        self.power_vector.assign(v)
        self.lipschitz_estimate.assign(sigma)
        return sigma * self._activation_bound

    def guaranteed_bound(self):
        """Computes, caches and returns the guaranteed bound of this layer.

        Returns:
            float, at least the layer's Lipschitz constant on its input shape.
        """
        kernel = np.asarray(ops.convert_to_numpy(self.kernel), np.float64)
        stored = lipschitz.round_up_float32(self._guaranteed_norm(kernel))
        self.lipschitz_bound.assign(stored)
        return float(stored) * self._activation_bound


@keras.saving.register_keras_serializable(package="gloro")
class Dense(SpectralNormCache, keras.layers.Dense):
    """`keras.layers.Dense` that caches its spectral norm.

    Takes exactly the arguments of `keras.layers.Dense` and computes the same
    outputs. The activation, if any, must be `"linear"` or `"relu"`.

    Example:

    ```python
    y = gloro.layers.Dense(10)(z)
    ```
    """

    def build(self, input_shape):
        super().build(input_shape)
        self._operator_input_shape = (self.kernel.shape[0],)
        self._build_cache()

    def _operator(self, kernel):
        return lipschitz.DenseOperator(kernel)

    def _guaranteed_norm(self, kernel):
        return lipschitz.dense_bound(kernel)


@keras.saving.register_keras_serializable(package="gloro")
class Conv2D(SpectralNormCache, keras.layers.Conv2D):
    """`keras.layers.Conv2D` that caches its spectral norm.

    Takes exactly the arguments of `keras.layers.Conv2D` and computes the same
    outputs. The operator norm depends on the input's spatial size, stride,
    padding and dilation, so the layer needs a fixed spatial input shape,
    `channels_last` data and `groups=1`; the activation, if any, must be
    `"linear"` or `"relu"`.

    Example:

    ```python
    z = gloro.layers.Conv2D(32, 4, strides=2, padding="same")(x)
    ```
    """

    def build(self, input_shape):
        if self.data_format != "channels_last":
            raise ValueError(
                f"Layer '{self.name}': gloro.layers.Conv2D supports "
                "data_format='channels_last' only."
            )
        if self.groups != 1:
            raise ValueError(
                f"Layer '{self.name}': gloro.layers.Conv2D does not support "
                f"groups={self.groups}; use groups=1."
            )
        if input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                f"Layer '{self.name}': the spectral norm of a convolution depends "
                f"on its input size, but the input shape {tuple(input_shape)} has "
                "no fixed height and width. Give keras.Input a full shape."
            )
        super().build(input_shape)
        self._operator_input_shape = tuple(input_shape[1:])
        self._build_cache()

    def _operator(self, kernel):
        return lipschitz.ConvOperator(
            kernel,
            (1,) + self._operator_input_shape,
            self.strides,
            self.padding,
            self.dilation_rate,
        )

    def _guaranteed_norm(self, kernel):
        return lipschitz.conv_bound(
            kernel,
            self._operator_input_shape,
            self.strides,
            self.padding,
            self.dilation_rate,
        )


@keras.saving.register_keras_serializable(package="gloro")
class LiResNetBlock(Conv2D):
    """Affine residual block `x -> conv(x; I + W) + b` (LiResNet).

    The identity is folded into the kernel: the block is one convolution
    whose kernel is `W` plus the identity at its centre tap, so it is
    bounded by the spectral norm of that single operator (power iteration
    during training, `gloro.lipschitz.conv_bound` when frozen), which is far
    tighter than the `1 + ||W||` of a plain residual `x + conv(x; W)`.

    Stride 1, "same" padding, as many output channels as input channels, and
    no activation inside: put `MinMax` after it. `W` starts at zero, so a
    new block is the identity.

    Args:
        kernel_size: an odd int or pair of odd ints (the identity sits at the
            centre tap).
        **kwargs: the other arguments of `keras.layers.Conv2D` that keep the
            block's shape (`use_bias`, initializers, regularizers,
            constraints, `name`, `dtype`).

    Example:

    ```python
    z = gloro.layers.LiResNetBlock(3)(z)
    z = gloro.layers.MinMax()(z)
    ```
    """

    _FIXED = ("filters", "strides", "padding", "data_format", "dilation_rate", "groups", "activation")

    def __init__(self, kernel_size=3, kernel_initializer="zeros", **kwargs):
        fixed = sorted(set(kwargs) & set(self._FIXED))
        if fixed:
            raise ValueError(
                f"LiResNetBlock fixes {', '.join(fixed)}: it keeps the channels and "
                "the spatial size (stride 1, 'same' padding) and has no activation "
                "inside. Put a gloro.layers.MinMax after it."
            )
        super().__init__(
            filters=None, kernel_size=kernel_size, padding="same",
            kernel_initializer=kernel_initializer, **kwargs,
        )
        if any(size % 2 == 0 for size in self.kernel_size):
            raise ValueError(
                f"LiResNetBlock needs an odd kernel_size (the identity sits at its "
                f"centre tap), got {kernel_size!r}."
            )

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"Layer '{self.name}': the number of input channels must be known.")
        self.filters = channels
        super().build(input_shape)
        kh, kw = self.kernel_size
        identity = np.zeros((kh, kw, channels, channels), np.float32)
        identity[kh // 2, kw // 2] = np.eye(channels)
        self._identity = identity

    def folded_kernel(self, kernel=None):
        """`W` plus the identity at the centre tap: the block's kernel.

        Args:
            kernel: a value for `W` (a tensor or NumPy array); defaults to
                the layer's own.

        Returns:
            a tensor, or a NumPy float64 array when `kernel` is one.
        """
        kernel = self.kernel if kernel is None else kernel
        if isinstance(kernel, np.ndarray):
            return kernel + self._identity.astype(kernel.dtype)
        return kernel + ops.cast(self._identity, kernel.dtype)

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.folded_kernel())
        if self.use_bias:
            outputs = outputs + ops.cast(self.bias, outputs.dtype)
        return outputs

    def _operator(self, kernel):
        return super()._operator(self.folded_kernel(kernel))

    def _guaranteed_norm(self, kernel):
        return super()._guaranteed_norm(self.folded_kernel(kernel))

    def get_config(self):
        config = super().get_config()
        for key in self._FIXED:
            config.pop(key, None)
        return config


@keras.saving.register_keras_serializable(package="gloro")
class MinMax(keras.layers.Layer):
    """MinMax activation (GroupSort with groups of 2), 1-Lipschitz.

    Channels (the last axis) are taken in pairs `(c0, c1), (c2, c3), ...`; each
    pair is replaced by `(min, max)`. The number of channels must be even.

    Example:

    ```python
    z = gloro.layers.MinMax()(gloro.layers.Dense(128)(x))
    ```
    """

    def build(self, input_shape):
        if input_shape[-1] is None or input_shape[-1] % 2:
            raise ValueError(
                f"Layer '{self.name}': MinMax pairs channels, so it needs an even "
                f"number of channels; got input shape {tuple(input_shape)}."
            )

    def call(self, x):
        first, second = x[..., 0::2], x[..., 1::2]
        pairs = ops.stack([ops.minimum(first, second), ops.maximum(first, second)], axis=-1)
        return ops.reshape(pairs, ops.shape(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def guaranteed_bound(self):
        """A permutation within each pair: exactly 1."""
        return 1.0


@keras.saving.register_keras_serializable(package="gloro")
class InvertibleDownsampling(keras.layers.Layer):
    """Space-to-depth: `(h, w, c) -> (h / p, w / p, c * p * p)`, a permutation
    of the coordinates, hence 1-Lipschitz.

    Output channels are ordered as TensorFlow's `space_to_depth` orders them
    (block row, block column, channel).

    Args:
        pool_size: block size `p`; height and width must be divisible by it.

    Example:

    ```python
    z = gloro.layers.InvertibleDownsampling(2)(x)   # (32, 32, 3) -> (16, 16, 12)
    ```
    """

    def __init__(self, pool_size=2, **kwargs):
        super().__init__(**kwargs)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a positive int, got {pool_size!r}.")
        self.pool_size = pool_size

    def build(self, input_shape):
        for size in input_shape[1:3]:
            if size is None or size % self.pool_size:
                raise ValueError(
                    f"Layer '{self.name}': height and width must be fixed and "
                    f"divisible by pool_size={self.pool_size}; got input shape "
                    f"{tuple(input_shape)}."
                )

    def call(self, x):
        _, h, w, c = x.shape
        p = self.pool_size
        blocks = ops.reshape(x, (-1, h // p, p, w // p, p, c))
        blocks = ops.transpose(blocks, (0, 1, 3, 2, 4, 5))
        return ops.reshape(blocks, (-1, h // p, w // p, p * p * c))

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.pool_size
        return (b, h // p, w // p, c * p * p)

    def guaranteed_bound(self):
        """A permutation of coordinates: exactly 1."""
        return 1.0

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size}


@keras.saving.register_keras_serializable(package="gloro")
class Scaling(keras.layers.Layer):
    """Multiplies its input by a constant; `abs(scale)`-Lipschitz.

    Args:
        scale: a finite float.

    Example:

    ```python
    z = gloro.layers.Scaling(0.5)(z)
    ```
    """

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}.")
        self.scale = float(scale)

    def call(self, x):
        return x * ops.cast(self.scale, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def guaranteed_bound(self):
        """`abs(scale)`."""
        return abs(self.scale)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


# ------------------------------------------------- plain Keras layers


def _relu_bound(layer):
    if float(layer.negative_slope) > 1.0:
        raise ValueError(
            f"Layer '{layer.name}' is a ReLU with negative_slope="
            f"{layer.negative_slope} > 1, which gloro does not bound. Use "
            "a slope in [0, 1] or gloro.layers.MinMax."
        )
    return 1.0


def _check_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(
            f"Layer '{layer.name}' uses data_format='channels_first'; gloro "
            "bounds channels_last layers only."
        )


def _average_pooling_bound(layer):
    _check_channels_last(layer)
    return lipschitz.average_pooling_bound(
        layer.pool_size, layer.strides, layer.padding, tuple(layer.input.shape[1:])
    )


def _max_pooling_bound(layer):
    _check_channels_last(layer)
    return lipschitz.max_pooling_bound(layer.pool_size, layer.strides)


# How a merge combines the bounds of its inputs (see gloro.graph).
MERGE_BOUNDS = {
    keras.layers.Add: lipschitz.sum_bound,
    keras.layers.Subtract: lipschitz.sum_bound,
    keras.layers.Average: lipschitz.mean_bound,
    keras.layers.Concatenate: lipschitz.concatenation_bound,
}

# The known bounds of Keras' own layers, by class (subclasses included).
KERAS_LAYER_BOUNDS = {
    keras.layers.InputLayer: lambda layer: 1.0,
    keras.layers.Flatten: lambda layer: 1.0,
    keras.layers.Reshape: lambda layer: 1.0,
    keras.layers.ReLU: _relu_bound,
    keras.layers.Activation: activation_bound,
    keras.layers.AveragePooling2D: _average_pooling_bound,
    keras.layers.MaxPooling2D: _max_pooling_bound,
}

_REFUSAL_HINTS = {
    keras.layers.BatchNormalization: (
        " Batch statistics make its bound meaningless during training; remove "
        "it (orthogonal initialisation and MinMax train well without it)."
    ),
    keras.layers.Softmax: " GloroNet needs logits: remove the softmax.",
    keras.layers.Dropout: " Dropout rescales activations during training; remove it.",
}


def layer_bound(layer):
    """Guaranteed Lipschitz bound of a built layer on its input shape.

    A gloro layer (or any layer with a `guaranteed_bound()` method) answers
    itself; Keras' own layers are looked up in `KERAS_LAYER_BOUNDS`.

    Args:
        layer: a built Keras layer.

    Returns:
        float.

    Raises:
        ValueError: the layer's bound is not known; the message names the
            layer and says what to use instead.
    """
    if hasattr(layer, "guaranteed_bound"):
        return float(layer.guaranteed_bound())
    for cls, bound in KERAS_LAYER_BOUNDS.items():
        if isinstance(layer, cls):
            return float(bound(layer))
    hint = next((h for cls, h in _REFUSAL_HINTS.items() if isinstance(layer, cls)), "")
    raise ValueError(
        f"Layer '{layer.name}' ({type(layer).__name__}) has no Lipschitz bound "
        f"that gloro knows.{hint} Use the layers of gloro.layers (Dense, "
        "Conv2D, LiResNetBlock, MinMax, ReLU, Flatten, Reshape, "
        "AveragePooling2D, MaxPooling2D, InvertibleDownsampling, Scaling, "
        "and the merges Add, Subtract, Average, Concatenate), or give your layer "
        "a guaranteed_bound() method (see gloro.layers)."
    )
