"""The JAX backend: `jax.jit`, `jax.vjp`, the GloRo logs on Keras'
stateless JAX train and test steps, and loops that leave the model whole
when they fail.

Example:

```python
from gloro import backend   # picks this module when KERAS_BACKEND=jax

grad = backend.value_and_grad(lambda x: x ** 2)
y, dy = grad(x)             # dy == 2 * x
```
"""

import contextlib

import jax
import jax.numpy as jnp
import keras
from keras import ops

from gloro.backend import common


def compiled(fn):
    """Compiles a pure function of tensors once per input signature.

    Args:
        fn: a function whose result depends only on its tensor arguments (it
            must not read Keras variables: JAX would bake their values in).

    Returns:
        `jax.jit(fn)`.
    """
    return jax.jit(fn)


def compiled_reading(fn, variables):
    """Compiles `fn(*args, values)`, `values` being the list of values that
    `variables` hold at each call (inside a `keras.StatelessScope`, its
    values).

    JAX compiles pure functions, so the values are read here and passed
    as arguments: an eager call is one dispatch; inside another compiled
    function it is inlined.

    Args:
        fn: a function of tensors and a last argument, a list of tensors.
        variables: a list of Keras variables.

    Returns:
        a function of `args`.
    """
    jitted = jax.jit(fn)
    return lambda *args: jitted(*args, [v.value for v in variables])


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


# MinMax (gloro.layers.MinMax): as fast as a reshape on this backend's CPU kernels, and fewer kernels in XLA's
# compiled step.
pair_min_max = common.strided_pair_min_max


def value_marks(variables):
    """Marks of the variables' current values that `values_unchanged`
    compares: the arrays themselves. A JAX array never changes, and every
    assignment (an optimizer step, `assign`, loading) replaces it, so the
    same array object means the same value. Holding them also keeps their
    ids from being reused.

    Args:
        variables: Keras variables.

    Returns:
        a list of marks.
    """
    return [variable.value for variable in variables]


def values_unchanged(variables, marks):
    """Whether every variable still holds the value it held when `marks`
    were taken (`value_marks`); False when unsure."""
    return marks is not None and all(v.value is mark for v, mark in zip(variables, marks))


def value_and_grad(fn):
    """Input gradient of a batched function.

    Args:
        fn: maps a tensor `x` to a tensor `y` (any shape).

    Returns:
        a function `x -> (y, g)` where `g` is the gradient of `sum(y)` with
        respect to `x` (for row-wise `fn`, each row's own gradient).
    """

    def jax_value_and_grad(x):
        y, pullback = jax.vjp(fn, x)
        return y, pullback(jnp.ones_like(y))[0]

    return jax_value_and_grad


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
    """Float32 matrix products and convolutions for what is traced inside:
    JAX reads the precision when it traces, and may otherwise use TF32 on
    NVIDIA GPUs (certificates must not come from reduced precision)."""
    with jax.default_matmul_precision("highest"):
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
    """Adds the GloRo logs to Keras' stateless JAX train and test steps, and
    keeps the model's variables when `fit`, `evaluate` or `predict` fails.

    The variables hold stale values inside a JAX step, so the logs are read
    from the step's new state through a `keras.StatelessScope`.

    Keras' JAX loops (3.15) detach every variable's value for the length of
    the loop (to hold one copy of the state, which each step consumes) and
    attach the newest state when the loop ends. When something raises in
    between (a data source failing after a few batches, an interrupt),
    `evaluate` and `predict` never attach it, nor does `fit` when no step
    has finished: the variables stay empty and every later call fails with
    `TypeError: 'NoneType' object is not callable` (keras-team/keras#21019).
    Here the loops attach the newest state on the way out, and variables no
    step has replaced get back the value they had when the loop began.
    """

    def train_step(self, state, data):
        logs, state = super().train_step(state, data)
        with self._state_scope(state[0], state[1]):
            extra = self._lipschitz_logs(self._estimate_tensor())
        return {**logs, **extra}, state

    def test_step(self, state, data):
        logs, state = super().test_step(state, data)
        with self._state_scope(state[0], state[1]):
            extra = self._lipschitz_logs(ops.max(self._margin_lipschitz))
        return {**logs, **extra}, state

    def _state_scope(self, trainable, non_trainable):
        mapping = list(zip(self.trainable_variables, trainable))
        mapping += list(zip(self.non_trainable_variables, non_trainable))
        return keras.StatelessScope(state_mapping=mapping)

    def fit(self, *args, **kwargs):
        with self._variables_kept_on_error():
            return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self._variables_kept_on_error():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        with self._variables_kept_on_error():
            return super().predict(*args, **kwargs)

    @contextlib.contextmanager
    def _variables_kept_on_error(self):
        optimizer = getattr(self, "optimizer", None)
        variables = self.trainable_variables + self.non_trainable_variables + self.metrics_variables
        variables += list(optimizer.variables) if optimizer is not None else []
        # References, not copies: a loop that fails before its first step
        # has not consumed (donated) them; once a step has run, Keras' own
        # state holds the newer values and replaces these.
        values = [variable.value for variable in variables]
        try:
            yield
        except BaseException:
            if getattr(self, "_jax_state", None) is not None:
                self.jax_state_sync()
                self._jax_state = None
            for variable, value in zip(variables, values):
                if variable._value is None:
                    variable.assign(value)
            raise
