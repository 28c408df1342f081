"""The TensorFlow backend: `tf.function`, `tf.GradientTape`, and the GloRo
logs on Keras' TensorFlow train and test steps (including under
`tf.distribute` strategies).

Example:

```python
from gloro import backend   # picks this module when KERAS_BACKEND=tensorflow

grad = backend.value_and_grad(lambda x: x ** 2)
y, dy = grad(x)             # dy == 2 * x
```
"""

import contextlib

import keras
import tensorflow as tf
from keras import ops

from gloro.backend import common


def compiled(fn):
    """Compiles a pure function of tensors once per input signature.

    Args:
        fn: a function whose result depends only on its tensor arguments.

    Returns:
        `tf.function(fn)`.
    """
    return tf.function(fn)


def compiled_reading(fn, variables):
    """Compiles `fn(*args, values)`, `values` being the list of values that
    `variables` hold at each call (inside a `keras.StatelessScope`, its
    values).

    Where the values are the variables themselves, the compiled function
    captures them and reads them inside, so a call passes only `args`: an
    eager call is one dispatch, whatever the number of variables (passing
    variables as arguments makes TensorFlow work out the call's signature
    anew, milliseconds a call). Values that are other tensors (a
    `StatelessScope`'s, autocast copies) are passed as arguments: a
    function that read the variables would ignore them. Inside another
    compiled function either is inlined.

    Args:
        fn: a function of tensors and a last argument, a list of tensors.
        variables: a list of Keras variables.

    Returns:
        a function of `args`.
    """
    # An eager caller may pass a new batch size each time.
    passing = tf.function(fn, reduce_retracing=True)
    reading = {}

    def call(*args):
        values = [v.value for v in variables]
        if not all(isinstance(value, tf.Variable) for value in values):
            return passing(*args, values)
        # Keyed by identity: a scope may stand other variables in for them.
        key = tuple(map(id, values))
        if key not in reading:
            reading[key] = tf.function(lambda *inputs: fn(*inputs, values), reduce_retracing=True)
        return reading[key](*args)

    return call


# Compiled here, where the comparisons fuse into the caller's graph.
all_equal = common.all_equal


def certificate_ops(logits):
    """Keras' ops: the ⊥ logit is compiled here (inside `compiled_reading` or
    a step), so their per-call conversions cost nothing per batch."""
    return common.KERAS_CERTIFICATE_OPS


filled_like = common.filled_like

# Keras layers run no torch hooks here.
forward_hook_site = common.forward_hook_site
runs_backward_hooks = common.runs_backward_hooks

predict_runs_call_eagerly = common.predict_runs_call_eagerly


# MinMax (gloro.layers.MinMax): TensorFlow's CPU kernels copy strided slices: MinMax
# networks predict about 40% faster with a reshape.
pair_min_max = common.reshaped_pair_min_max


def value_marks(variables):
    """Marks of the variables' current values for `values_unchanged`:
    none, since a TensorFlow variable changes in place and keeps no
    version that Python can read.

    Args:
        variables: Keras variables.

    Returns:
        None.
    """
    return None


def values_unchanged(variables, marks):
    """Always False here: every check compares the values (see
    `value_marks`)."""
    return False


def value_and_grad(fn):
    """Input gradient of a batched function.

    Args:
        fn: maps a tensor `x` to a tensor `y` (any shape).

    Returns:
        a function `x -> (y, g)` where `g` is the gradient of `sum(y)` with
        respect to `x` (for row-wise `fn`, each row's own gradient).
    """

    def tf_value_and_grad(x):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return y, tape.gradient(y, x)

    return tf_value_and_grad


def average_pooling_replicates_edges(pool_size, strides, padding, input_shape):
    """Whether Keras' 2-D average pooling here averages repeated edge inputs.

    On this backend a "same" window is divided by the number of real inputs
    it covers, and padding adds nothing.

    Args:
        pool_size, strides, padding, input_shape: as for
            `gloro.lipschitz.average_pooling_bound`.

    Returns:
        False.
    """
    return False


@contextlib.contextmanager
def full_precision():
    """Float32 matrix products and convolutions: TensorFlow runs float32 in
    TF32 on recent NVIDIA GPUs by default, and reads the switch when kernels
    run, process-wide, so it is turned off for the rest of the process."""
    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield


def top_k(x, k):
    """The `k` largest values along the last axis and their indices.

    Equal values come in the order of their indices, as TensorFlow and JAX
    document for their `top_k`.

    Args:
        x: tensor `(..., m)`.
        k: int, `1 <= k <= m`.

    Returns:
        `(values, indices)`, each `(..., k)`.
    """
    return ops.top_k(x, k)


class GloroSteps:
    """Adds the GloRo logs to Keras' TensorFlow train and test steps.

    `GloroNet` inherits it before `keras.Model`; it reads the model's
    `_lipschitz_logs`, `_estimate_tensor` and `_margin_lipschitz`.
    """

    def train_step(self, data):
        logs = super().train_step(data)
        return self._reducible({**logs, **self._lipschitz_logs(self._estimate_tensor())})

    def test_step(self, data):
        logs = super().test_step(data)
        return self._reducible({**logs, **self._lipschitz_logs(ops.max(self._margin_lipschitz))})

    def _reducible(self, logs):
        # Keras (3.15) averages a step's logs over the workers of a
        # MultiWorkerMirroredStrategy with `strategy.reduce(..., axis=0)`,
        # which fails on scalars (keras-team/keras#20585): give every log
        # a leading axis, which that reduction removes.
        strategy = self.distribute_strategy
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode():
            return {key: ops.expand_dims(value, 0) for key, value in logs.items()}
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (3.15) builds the model and metrics under a tf.distribute
        # strategy from a first batch that it averages over the replicas
        # with `strategy.reduce`, which fails for a tuple of per-replica
        # values once MultiWorkerMirroredStrategy has several workers
        # (keras-team/keras#20585). Only the batch's shapes and dtypes
        # are used, so this worker's first replica's batch serves.
        if iterator is not None and self._distribute_strategy is not None:
            for _, _, batches in iterator:
                local = self._distribute_strategy.experimental_local_results
                data_batch = keras.tree.map_structure(lambda v: local(v)[0], next(batches))
                break
            iterator = None
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
