"""The few things that differ between Keras backends, in one place.

Minimal version for the scripts branch (compiling a pure function, an input
gradient, importing TensorFlow for what needs it); the lead's module of the
same name and API replaces it.
"""

import keras


def compiled(fn):
    """Compiles a function that is pure in its tensor arguments.

    Args:
        fn: a function whose result depends only on its arguments. It must
            not read Keras variables: JAX would bake their values in.

    Returns:
        `tf.function(fn)` on TensorFlow, `jax.jit(fn)` on JAX, `fn` as is on
        any other backend.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    return fn


def value_and_grad(fn):
    """Input gradient of a function of one tensor.

    Args:
        fn: maps a tensor `x` to a tensor `y` of any shape.

    Returns:
        a function `x -> (y, g)`, where `g` is the gradient of `sum(y)` with
        respect to `x`; for a row-wise `fn`, each row's own gradient.

    Raises:
        NotImplementedError: on a backend other than TensorFlow and JAX.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        def tensorflow_value_and_grad(x):
            x = tf.convert_to_tensor(x)
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return y, tape.gradient(y, x)

        return tensorflow_value_and_grad
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        def jax_value_and_grad(x):
            y, pullback = jax.vjp(fn, x)
            return y, pullback(jnp.ones_like(y))[0]

        return jax_value_and_grad
    raise NotImplementedError(
        "gloro computes input gradients on the TensorFlow and JAX backends, "
        f"not on '{keras.backend.backend()}'. Set KERAS_BACKEND=tensorflow or jax."
    )


def require_tensorflow(what):
    """Imports TensorFlow for a feature that needs it.

    Args:
        what: the feature, named in the error message.

    Returns:
        the `tensorflow` module.

    Raises:
        ImportError: TensorFlow is not installed; the message says what to
            install.
    """
    try:
        import tensorflow as tf
    except ImportError as error:
        raise ImportError(f"{what} needs TensorFlow: pip install tensorflow") from error
    return tf
