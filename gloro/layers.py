"""Layers with known Lipschitz bounds.

`Dense` and `Conv2D` behave exactly like their Keras namesakes and also cache,
as non-trainable weights saved with the model, a power-iteration vector, the
latest spectral-norm estimate and the latest guaranteed bound (see
`gloro.lipschitz`). The other layers here are 1-Lipschitz or scale by a known
constant. `ReLU`, `Flatten`, `Reshape`, `AveragePooling2D` and `MaxPooling2D`
are Keras' own layers, re-exported so a model can be written against one
namespace; their bounds are computed by `gloro.lipschitz.static_bound`.

Example:

```python
import keras
from gloro import layers

x = keras.Input((28, 28, 1))
z = layers.Conv2D(16, 4, strides=2, padding="same")(x)
z = layers.MinMax()(z)
z = layers.Flatten()(z)
y = layers.Dense(10)(z)
```
"""

import keras
import numpy as np
import tensorflow as tf

from gloro import lipschitz

ReLU = keras.layers.ReLU
Flatten = keras.layers.Flatten
Reshape = keras.layers.Reshape
AveragePooling2D = keras.layers.AveragePooling2D
MaxPooling2D = keras.layers.MaxPooling2D

# Replicas hold identical weights, so each computes the same power-iteration
# update; keeping the first replica's value keeps the caches in sync under
# tf.distribute without a cross-replica reduction.
_CACHE_AGGREGATION = "only_first_replica"


class SpectralNormCache:
    """Mixin for linear layers that cache their spectral norm.

    Subclasses define `_operator(kernel)` and `_operator_input_shape`, and call
    `_build_cache()` at the end of `build`.
    """

    def _build_cache(self):
        self.power_vector = self._cache_weight(
            "power_vector", (1,) + tuple(self._operator_input_shape),
            keras.initializers.RandomNormal(seed=0),
        )
        self.lipschitz_estimate = self._cache_weight("lipschitz_estimate", (), "zeros")
        self.lipschitz_bound = self._cache_weight("lipschitz_bound", (), "zeros")

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

    # Keras' Dense and Conv2D save only their kernel and bias; the caches are
    # part of the certificate state, so every variable is saved, in order.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    def _kernel_tensor(self):
        return tf.cast(tf.convert_to_tensor(self.kernel), tf.float32)

    def _unit_power_vector(self):
        v = tf.convert_to_tensor(self.power_vector)
        return v / tf.norm(v)

    def power_step(self, iterations=1):
        """Advances the cached power iteration; for use during training.

        Args:
            iterations: power-iteration steps to take.

        Returns:
            scalar tensor: the spectral-norm estimate of the current kernel,
            differentiable with respect to it. A lower bound, never a
            certificate.
        """
        sigma, v = lipschitz.power_step(
            self._operator(self._kernel_tensor()), self._unit_power_vector(), iterations
        )
        self.power_vector.assign(v)
        self.lipschitz_estimate.assign(tf.stop_gradient(sigma))
        return sigma * lipschitz.activation_bound(self)

    def converge(self):
        """Runs power iteration to convergence and caches the estimate.

        Returns:
            float, the converged estimate times the activation's bound.
        """
        if getattr(self, "_converge_step", None) is None:
            # Reads the kernel variable when called, so one trace serves
            # every later refresh.
            self._converge_step = tf.function(
                lambda v: lipschitz.power_step(self._operator(self._kernel_tensor()), v, iterations=10)
            )
        sigma, v = lipschitz.power_converge(self._converge_step, self._unit_power_vector())
        self.power_vector.assign(v)
        self.lipschitz_estimate.assign(sigma)
        return sigma * lipschitz.activation_bound(self)

    def guaranteed_bound(self):
        """Computes, caches and returns the guaranteed bound of this layer.

        Returns:
            float, at least the operator norm of the layer on its input shape,
            times the activation's bound.
        """
        bound = self._guaranteed_norm(np.asarray(self.kernel.numpy(), np.float64))
        # Stored as float32 rounded up, so the cache never under-states it.
        stored = np.float32(bound)
        if stored < bound:
            stored = np.nextafter(stored, np.float32(np.inf))
        self.lipschitz_bound.assign(stored)
        return float(stored) * lipschitz.activation_bound(self)


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
        shape = tf.shape(x)
        pairs = tf.reshape(x, tf.concat([shape[:-1], [-1, 2]], axis=0))
        low = tf.reduce_min(pairs, axis=-1, keepdims=True)
        high = tf.reduce_max(pairs, axis=-1, keepdims=True)
        return tf.reshape(tf.concat([low, high], axis=-1), shape)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="gloro")
class InvertibleDownsampling(keras.layers.Layer):
    """Space-to-depth: `(h, w, c) -> (h / p, w / p, c * p * p)`, a permutation
    of the coordinates, hence 1-Lipschitz.

    Args:
        pool_size: block size `p`; height and width must be divisible by it.

    Example:

    ```python
    z = gloro.layers.InvertibleDownsampling(2)(x)   # (32, 32, 3) -> (16, 16, 12)
    ```
    """

    def __init__(self, pool_size=2, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(pool_size, int) or pool_size < 1:
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
        return tf.nn.space_to_depth(x, self.pool_size)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        p = self.pool_size
        return (b, h // p, w // p, c * p * p)

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
        return x * tf.cast(self.scale, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}
