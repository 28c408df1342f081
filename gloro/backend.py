"""What differs between Keras backends, in one place.

The rest of `gloro` is written with `keras.ops` and NumPy; the few things
Keras does not abstract (compiling a pure function, an input gradient, the
TensorFlow-only features) are answered here, so that no other module needs
to name a backend. Supported backends: TensorFlow (the default) and JAX.

Example:

```python
from gloro import backend

step = backend.compiled(lambda kernel, v: ...)   # tf.function or jax.jit
tf = backend.require_tensorflow("SavedModel export")
```
"""

import contextlib

import keras

SUPPORTED = ("tensorflow", "jax")


def name():
    """The Keras backend of this process, e.g. `"tensorflow"` or `"jax"`."""
    return keras.backend.backend()


def compiled(fn):
    """Compiles a pure function of tensors once per input signature.

    Args:
        fn: a function whose result depends only on its tensor arguments (it
            must not read Keras variables: JAX would bake their values in).

    Returns:
        `tf.function(fn)` on TensorFlow, `jax.jit(fn)` on JAX, `fn` otherwise.
    """
    if name() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if name() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def value_and_grad(fn):
    """Input gradient of a batched function.

    Args:
        fn: maps a tensor `x` to a tensor `y` (any shape).

    Returns:
        a function `x -> (y, g)` where `g` is the gradient of `sum(y)` with
        respect to `x` (for row-wise `fn`, each row's own gradient).

    Raises:
        NotImplementedError: on a backend other than TensorFlow and JAX.
    """
    if name() == "tensorflow":
        import tensorflow as tf

        def tf_value_and_grad(x):
            x = tf.convert_to_tensor(x)
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return y, tape.gradient(y, x)

        return tf_value_and_grad
    if name() == "jax":
        import jax
        import jax.numpy as jnp

        def jax_value_and_grad(x):
            y, pullback = jax.vjp(fn, x)
            return y, pullback(jnp.ones_like(y))[0]

        return jax_value_and_grad
    raise NotImplementedError(
        f"gloro computes input gradients on {' and '.join(SUPPORTED)}, not on "
        f"Keras' '{name()}' backend. Set KERAS_BACKEND=tensorflow or jax."
    )


def require_tensorflow(what):
    """Imports TensorFlow for a feature that needs it.

    Args:
        what: the feature, named in the error (e.g. `"SavedModel export"`).

    Returns:
        the `tensorflow` module.

    Raises:
        ImportError: TensorFlow is not installed; the message says what to
            install.
    """
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(
            f"{what} needs TensorFlow, which is not installed. Install it with "
            "`pip install tensorflow` (the rest of gloro runs without it on "
            "the JAX backend)."
        ) from error
    return tf


@contextlib.contextmanager
def full_precision():
    """Float32 matrix products and convolutions inside the block.

    On recent NVIDIA GPUs each backend may run float32 products in TF32
    (10-bit mantissa) by default, which is half precision as far as a
    certificate is concerned. JAX reads its setting when a function is
    traced, PyTorch when an operation runs; TensorFlow's switch is
    process-wide and read when kernels run, so it is turned off for the rest
    of the process. No effect on CPUs.

    Example:

    ```python
    with backend.full_precision():
        logits = model(x)
    ```
    """
    if name() == "jax":
        import jax

        with jax.default_matmul_precision("highest"):
            yield
    elif name() == "torch":
        import torch

        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
        yield
