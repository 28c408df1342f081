"""What several backends share: formulations that are the fastest on some
backends, which each backend module picks from (it names the choice, this
module names no backend)."""

import contextlib
import types

import keras
import numpy as np
from keras import ops


def strided_pair_min_max(x):
    """MinMax on channel pairs `(c0, c1), (c2, c3), ...` of the last axis,
    with two strided slices.

    Args:
        x: tensor with an even last axis.

    Returns:
        tensor of `x`'s shape: each pair replaced by `(min, max)`.
    """
    first, second = x[..., 0::2], x[..., 1::2]
    pairs = ops.stack([ops.minimum(first, second), ops.maximum(first, second)], axis=-1)
    return ops.reshape(pairs, ops.shape(x))


def reshaped_pair_min_max(x):
    """MinMax on channel pairs, with the pairs as a trailing axis of 2 (a
    reshape, free) instead of two strided slices.

    Args:
        x: tensor with an even last axis.

    Returns:
        tensor of `x`'s shape: each pair replaced by `(min, max)`.
    """
    shape = ops.shape(x)
    pairs = ops.reshape(x, tuple(shape[:-1]) + (shape[-1] // 2, 2))
    first, second = pairs[..., 0], pairs[..., 1]
    return ops.reshape(ops.stack([ops.minimum(first, second), ops.maximum(first, second)], axis=-1), shape)


def all_equal(tensors, others):
    """Scalar bool tensor: each tensor equals its counterpart exactly (NaN
    equals nothing), in two operations per pair and two more.

    Args:
        tensors, others: equally long lists of tensors of equal shapes.

    Returns:
        scalar bool tensor.
    """
    return ops.all(ops.stack([ops.all(ops.equal(a, b)) for a, b in zip(tensors, others)]))


def predict_runs_call_eagerly(model):
    """Whether Keras' predict function runs `model.call` in Python at every
    batch: only with `run_eagerly` where the backend compiles it.

    Args:
        model: a compiled or uncompiled Keras model.

    Returns:
        bool.
    """
    return bool(model.run_eagerly)


def filled_like(tensor, value):
    """An array of `value`s with `tensor`'s shape and dtype (TensorFlow and
    JAX choose memory layouts themselves).

    Args:
        tensor: a tensor.
        value: a number.

    Returns:
        NumPy array.
    """
    return np.full(tuple(tensor.shape), value, keras.backend.standardize_dtype(tensor.dtype))


def finite_rows(x):
    """Bool `(n,)`: row `i` of the `(n, m)` tensor `x` holds no NaN or inf.

    Args:
        x: float tensor `(n, m)`.

    Returns:
        bool tensor `(n,)`.
    """
    return ops.all(ops.isfinite(x), axis=1)


# What `gloro.certificates.add_bottom_logit` calls besides tensor operators:
# Keras' own ops, where the ⊥ logit is compiled into the caller's graph.
KERAS_CERTIFICATE_OPS = types.SimpleNamespace(
    cast=ops.cast,
    convert_to_tensor=ops.convert_to_tensor,
    max=ops.max,
    argmax=ops.argmax,
    take=ops.take,
    where=ops.where,
    concatenate=ops.concatenate,
    finite_rows=finite_rows,
    quiet=contextlib.nullcontext,
)


def forward_hook_site(layers):
    """None: Keras layers run no forward hooks on TensorFlow and JAX (the
    torch backend's `forward_hook_site` says where its hooks would run)."""
    return None


def runs_backward_hooks(layer):
    """False: Keras layers run no backward hooks on TensorFlow and JAX."""
    return False
