"""Layers with known Lipschitz bounds, and the table of plain Keras ones.

Every gloro layer answers one question itself: *what is my guaranteed L2
Lipschitz bound on my input shape?* It is the method `guaranteed_bound()`,
which returns a float proven to be at least the layer's true constant
(computed in NumPy float64 by `gloro.lipschitz`, never from an estimate).
`layer_bound(layer, input_shape)` asks a layer for it, and looks plain Keras
layers (`ReLU`, `Flatten`, pooling, ...) up in this module's table; anything
else is refused with an error naming the layer.

What is accepted is accepted exactly, because each way around it has
certified a point that was not robust:

* table bounds and gloro's own bounds belong to a class, not its
  subclasses: a subclass may override `call`, so it needs a
  `guaranteed_bound()` of its own;
* activations are recognised by identity (`keras.activations.relu`,
  `keras.activations.linear`), never by name;
* a bound holds for one input shape: a layer used on a shape other than the
  one it was built for is refused, and pooling is bounded on the shape at
  its place in the graph;
* a quantized layer or one with LoRA enabled computes with more than its
  kernel, and is refused;
* a bound that is not a finite number >= 0 is an error.

`Dense` and `Conv2D` also train with power iteration: they cache, as
non-trainable weights saved with the model, a power-iteration vector, the
latest spectral-norm estimate and the latest guaranteed bound, and offer
`power_step` (a differentiable estimate for training) and `converge`;
`power_steps` advances many such layers together, stacking those of one
shape into one operation per step.

Branches meet in `Add`, `Subtract`, `Average` or `Concatenate` (Keras' own
layers, re-exported here); `MERGE_BOUNDS` says how each combines its inputs'
bounds, and `gloro.graph` propagates them through the model.

Your own layer: define a `guaranteed_bound(self)` method in its class,
returning a float that is at least its Lipschitz constant on its built input
shape (and refuse shapes or settings you cannot bound). `GloroNet` then
accepts it; the bound is recomputed whenever the model's weights change.
Layers whose bound depends on weights that training moves should subclass
`SpectralNormCache` as `Dense` and `Conv2D` do, or their bound is held fixed
during training.

Example:

```python
import keras
from gloro import layers

x = keras.Input((28, 28, 1))
z = layers.Conv2D(16, 4, strides=2, padding="same")(x)
z = layers.MinMax()(z)
z = layers.Flatten()(z)
y = layers.Dense(10)(z)
layers.layer_bound(z._keras_history.operation, (7, 7, 16))   # 1.0 (Flatten)
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
# a keras.layers.Activation), with their Lipschitz constants. Recognised by
# identity: a function of another module that happens to be called "relu"
# is not this one.
ACTIVATION_BOUNDS = {keras.activations.linear: 1.0, keras.activations.relu: 1.0}

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
        ValueError: the activation is not one of `ACTIVATION_BOUNDS` (the
            very functions `keras.activations.relu` and `.linear`, which the
            strings "relu", "linear" and None resolve to).
    """
    activation = layer.activation
    try:
        return ACTIVATION_BOUNDS[activation]
    except (KeyError, TypeError):
        pass
    described = getattr(activation, "__qualname__", None) or type(activation).__name__
    module = getattr(activation, "__module__", "")
    raise ValueError(
        f"Layer '{layer.name}' uses activation {module + '.' if module else ''}"
        f"{described}, whose Lipschitz bound gloro does not know (gloro "
        "recognises activations by identity, not by name). Use \"relu\" or "
        "None (linear), or put a gloro.layers.MinMax layer after it."
    )


def _unit_random_normal(shape, dtype=None):
    # Power iteration expects unit vectors and normalises only its result.
    v = keras.initializers.RandomNormal(seed=0)(shape, dtype)
    return v / ops.sqrt(ops.sum(ops.square(v)))


def power_steps(layers, iterations=1):
    """Advances the cached power iteration of several layers at once.

    Layers whose operators stack (`gloro.lipschitz.stack`: Dense kernels of
    one shape; "same" convolutions of one output size and one kernel size
    once written as stride-1 convolutions, strided ones on their input cut
    into blocks, whatever their channels) share one operation per step, so
    a step of a network costs a few operations, not a few per layer. Each
    layer's kernels are scaled by its previous estimate, and the steps are
    shifted (see `gloro.lipschitz.power_step`).

    Args:
        layers: `SpectralNormCache` layers.
        iterations: power-iteration steps to take.

    Returns:
        `(N,)` tensor, in the order of `layers`: each layer's estimate
        (times its activation's bound), differentiable with respect to its
        kernel. Lower bounds, never certificates. One tensor rather than a
        scalar per layer, so that what the caller computes from them (the
        product of a chain) is one operation, not one per layer.
    """
    if not layers:
        return ops.zeros((0,), "float32")
    groups = {}
    for layer in layers:
        operator = layer._operator(ops.cast(layer.kernel, "float32"))
        key = operator.stack_key
        groups.setdefault(id(layer) if key is None else key, []).append((layer, operator))
    members = [[layer for layer, _ in group] for group in groups.values()]
    operators = [lipschitz.stack([op for _, op in group]) for group in groups.values()]
    vectors = [
        op.pack([ops.convert_to_tensor(layer.power_vector) for layer in group])
        for op, group in zip(operators, members)
    ]
    ordered = [layer for group in members for layer in group]
    scales = ops.concatenate([layer._scale() for layer in ordered])
    sigma, vectors = lipschitz.power_step(operators, vectors, iterations, scales, shifted=True)
    for op, group, v in zip(operators, members, vectors):
        for layer, vector in zip(group, op.unpack(v)):
            layer.power_vector.assign(vector)
    frozen = ops.stop_gradient(sigma)
    for g, layer in enumerate(ordered):
        layer.lipschitz_estimate.assign(frozen[g])
    bounds = np.array([layer._activation_bound for layer in ordered], np.float32)
    if np.any(bounds != 1.0):
        sigma = sigma * bounds
    position = {id(layer): g for g, layer in enumerate(ordered)}
    order = [position[id(layer)] for layer in layers]
    if order != list(range(len(layers))):
        sigma = ops.take(sigma, np.array(order, np.int32))
    return sigma


class SpectralNormCache:
    """Mixin for linear layers that train with power iteration.

    Subclasses define `_operator(kernel)` (a `gloro.lipschitz` operator),
    `_guaranteed_norm(kernel)` (a NumPy float64 bound of that operator) and
    `_operator_input_shape`, and call `_build_cache()` at the end of `build`.
    The layer's activation multiplies every number it reports: the operator
    norm times `activation_bound(self)`, fixed at build time.

    On several devices the caches stay identical on every replica after
    every step, because each update is a function of the kernel, the
    previous vector and the previous estimate alone, never of the batch, and
    all are already the same everywhere:

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
            "power_vector", (1,) + tuple(self._operator_input_shape), _unit_random_normal,
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

    def _scale(self):
        return ops.reshape(ops.convert_to_tensor(self.lipschitz_estimate), (1,))

    def power_step(self, iterations=1):
        """Advances the cached power iteration; for use during training.

        Args:
            iterations: power-iteration steps to take.

        Returns:
            scalar tensor: the estimate of the layer's Lipschitz constant,
            differentiable with respect to the kernel. A lower bound, never a
            certificate.
        """
        return power_steps([self], iterations)[0]

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
            def step(kernel, v, scales):
                operator = lipschitz.stack([self._operator(kernel)])
                return lipschitz.power_step([operator], v, lipschitz.CONVERGENCE_STEP_ITERATIONS, scales)

            self._converge_step = backend.compiled(step)
        kernel = ops.cast(self.kernel, "float32")
        operator = lipschitz.stack([self._operator(kernel)])
        sigma, (v,) = lipschitz.power_converge(
            lambda v, scales: self._converge_step(kernel, v, scales),
            [operator.pack([ops.convert_to_tensor(self.power_vector)])],
            lipschitz.initial_scales([operator], self._scale()),
        )
        (v,) = operator.unpack(v)
        self.power_vector.assign(v)
        self.lipschitz_estimate.assign(sigma[0])
        return float(sigma[0]) * self._activation_bound

    def guaranteed_bound(self):
        """Computes, caches and returns the guaranteed bound of this layer.

        Returns:
            float, at least the layer's Lipschitz constant on its input shape.
        """
        kernel = np.asarray(ops.convert_to_numpy(self.kernel), np.float64)
        stored = lipschitz.round_up_float32(self._guaranteed_norm(kernel))
        self.lipschitz_bound.assign(stored)
        # Asked again, not the value cached at build: the activation is an
        # attribute anyone can reassign.
        return float(stored) * activation_bound(self)


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
        return backend.pair_min_max(x)

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


def _relu_bound(layer, input_shape):
    # Keras' ReLU jumps by `threshold` at the threshold: not Lipschitz at
    # all unless it is 0. Clipping at `max_value` keeps it continuous.
    if float(layer.threshold) != 0.0:
        raise ValueError(
            f"Layer '{layer.name}' is a ReLU with threshold={layer.threshold}: it "
            "jumps at the threshold, so no Lipschitz bound exists. Use threshold=0."
        )
    if not 0.0 <= float(layer.negative_slope) <= 1.0:
        raise ValueError(
            f"Layer '{layer.name}' is a ReLU with negative_slope="
            f"{layer.negative_slope}, which gloro does not bound. Use a slope "
            "in [0, 1] or gloro.layers.MinMax."
        )
    if layer.max_value is not None and not float(layer.max_value) >= 0.0:
        raise ValueError(f"Layer '{layer.name}' is a ReLU with max_value={layer.max_value}; use None or a value >= 0.")
    return 1.0


def _check_channels_last(layer):
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(
            f"Layer '{layer.name}' uses data_format='channels_first'; gloro "
            "bounds channels_last layers only."
        )


def _check_spatial(layer, input_shape):
    if len(input_shape) != 3 or any(size is None for size in input_shape):
        raise ValueError(
            f"Layer '{layer.name}': its Lipschitz bound depends on the input's "
            f"height and width, but its input shape here is {tuple(input_shape)}. "
            "Give keras.Input a full shape."
        )


def _average_pooling_bound(layer, input_shape):
    _check_channels_last(layer)
    _check_spatial(layer, input_shape)
    return lipschitz.average_pooling_bound(layer.pool_size, layer.strides, layer.padding, input_shape)


def _max_pooling_bound(layer, input_shape):
    _check_channels_last(layer)
    return lipschitz.max_pooling_bound(layer.pool_size, layer.strides)


def _identity_bound(layer, input_shape):
    return 1.0


# How a merge combines the bounds of its inputs (see gloro.graph). Matched by
# exact class: a subclass may compute something else.
MERGE_BOUNDS = {
    keras.layers.Add: lipschitz.sum_bound,
    keras.layers.Subtract: lipschitz.sum_bound,
    keras.layers.Average: lipschitz.mean_bound,
    keras.layers.Concatenate: lipschitz.concatenation_bound,
}

# The known bounds of Keras' own layers, as functions of the layer and its
# input shape (without the batch axis). Matched by exact class: a subclass
# may override `call`, and then the table says nothing about it.
KERAS_LAYER_BOUNDS = {
    keras.layers.InputLayer: _identity_bound,
    keras.layers.Flatten: _identity_bound,
    keras.layers.Reshape: _identity_bound,
    keras.layers.ReLU: _relu_bound,
    keras.layers.Activation: lambda layer, input_shape: activation_bound(layer),
    keras.layers.AveragePooling2D: _average_pooling_bound,
    keras.layers.MaxPooling2D: _max_pooling_bound,
}

# gloro's own layers whose `guaranteed_bound()` is trusted on their class
# alone; a subclass is trusted only if it defines `guaranteed_bound` itself.
GLORO_LAYERS = (Dense, Conv2D, LiResNetBlock, MinMax, InvertibleDownsampling, Scaling)

_REFUSAL_HINTS = {
    keras.layers.BatchNormalization: (
        " Batch statistics make its bound meaningless during training; remove "
        "it (orthogonal initialisation and MinMax train well without it)."
    ),
    keras.layers.Softmax: " GloroNet needs logits: remove the softmax.",
    keras.layers.Dropout: " Dropout rescales activations during training; remove it.",
}

_SUPPORTED = (
    "Use the layers of gloro.layers (Dense, Conv2D, LiResNetBlock, MinMax, "
    "ReLU, Flatten, Reshape, AveragePooling2D, MaxPooling2D, "
    "InvertibleDownsampling, Scaling, and the merges Add, Subtract, Average, "
    "Concatenate), or give your layer a guaranteed_bound() method (see "
    "gloro.layers)."
)


def check_weights_are_plain(layer):
    """Refuses layers whose map is not their float kernel (quantization, LoRA).

    Args:
        layer: a Keras layer.

    Raises:
        ValueError: the layer is quantized (its kernel is scaled outside the
            kernel variable) or has LoRA enabled (its kernel is a sum of
            variables added after the fact).
    """
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None:
        raise ValueError(
            f"Layer '{layer.name}' is quantized ({mode!r}); gloro bounds float "
            "layers only. Build the GloroNet on the float model, and certify "
            "with it."
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer '{layer.name}' has LoRA enabled; gloro bounds the kernel "
            "variable alone. Merge the LoRA factors into the kernel (or train "
            "the kernel itself) and build a new GloroNet."
        )


def _built_shape(layer):
    shapes = getattr(layer, "_build_shapes_dict", None)
    if not shapes or len(shapes) != 1:
        return None
    shape = next(iter(shapes.values()))
    return tuple(shape[1:]) if isinstance(shape, (tuple, list)) else None


def _trusted_own_bound(layer):
    cls = type(layer)
    return cls in GLORO_LAYERS or "guaranteed_bound" in vars(cls)


def _check_bound(layer, value):
    value = float(value)
    if not (np.isfinite(value) and value >= 0.0):
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) has Lipschitz bound "
            f"{value}, which is not a finite number >= 0: its weights hold inf "
            "or NaN, or its guaranteed_bound() is wrong. Nothing can be "
            "certified with it."
        )
    return value


def check_layer(layer, input_shape=None):
    """Refuses a layer whose bound gloro cannot guarantee on `input_shape`.

    Cheap: gloro's own layers are checked without computing their bound.

    Args:
        layer: a built Keras layer.
        input_shape: the shape of the layer's input at its place in the
            network, without the batch axis; defaults to the shape the layer
            was built for.

    Returns:
        the input shape the bound is for (a tuple, or None where the layer
        does not record one).

    Raises:
        ValueError: as `layer_bound`.
    """
    check_weights_are_plain(layer)
    built = _built_shape(layer)
    input_shape = tuple(input_shape) if input_shape is not None else built
    if hasattr(layer, "guaranteed_bound") and _trusted_own_bound(layer):
        if built is not None and input_shape is not None and built != input_shape:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) was built for inputs "
                f"of shape {built} but is used on {input_shape} here; its bound "
                "holds for the shape it was built for. Use a new layer for this "
                "input shape."
            )
        if hasattr(layer, "activation"):
            activation_bound(layer)
        return input_shape
    bound = KERAS_LAYER_BOUNDS.get(type(layer))
    if bound is not None:
        if input_shape is None:
            raise ValueError(f"Layer '{layer.name}' is not built; call it on an input first.")
        _check_bound(layer, bound(layer, input_shape))
        return input_shape
    if hasattr(layer, "guaranteed_bound"):
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) inherits guaranteed_bound() "
            "from a class whose call it may have changed. Define guaranteed_bound() "
            f"in {type(layer).__name__} itself if its bound still holds."
        )
    hint = next((h for cls, h in _REFUSAL_HINTS.items() if isinstance(layer, cls)), "")
    inherited = next((cls for cls in KERAS_LAYER_BOUNDS if isinstance(layer, cls)), None)
    if inherited is not None:
        hint += (
            f" It subclasses {inherited.__name__}, but gloro bounds only that "
            "exact class (a subclass may compute something else); define "
            "guaranteed_bound() in your class."
        )
    raise ValueError(
        f"Layer '{layer.name}' ({type(layer).__name__}) has no Lipschitz bound "
        f"that gloro knows.{hint} {_SUPPORTED}"
    )


def layer_bound(layer, input_shape=None):
    """Guaranteed Lipschitz bound of a built layer on an input shape.

    A gloro layer (or a layer whose own class defines `guaranteed_bound()`)
    answers itself, on the shape it was built for, which must be
    `input_shape`; Keras' own layers of the exact classes in
    `KERAS_LAYER_BOUNDS` are bounded on `input_shape`. Anything else is
    refused.

    Args:
        layer: a built Keras layer.
        input_shape: the shape of the layer's input at its place in the
            network, without the batch axis; defaults to the shape the layer
            was built for.

    Returns:
        float, finite and >= 0.

    Raises:
        ValueError: the layer's bound is not known, does not cover this
            input shape, or is not a finite number >= 0; the message names
            the layer and says what to use instead.

    Example:

    ```python
    layer_bound(keras.layers.AveragePooling2D(2), (8, 8, 3))   # 0.5
    ```
    """
    input_shape = check_layer(layer, input_shape)
    bound = KERAS_LAYER_BOUNDS.get(type(layer))
    if bound is not None and not _trusted_own_bound(layer):
        return _check_bound(layer, bound(layer, input_shape))
    # The class's method, not an attribute set on the instance.
    return _check_bound(layer, type(layer).guaranteed_bound(layer))
