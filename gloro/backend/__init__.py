"""What differs between Keras backends, in one place.

The rest of `gloro` is written with `keras.ops` and NumPy; the few things
Keras does not abstract are answered by one module per backend in this
package (`tensorflow.py`, `jax.py`, `torch.py`), chosen once at import time,
as Keras chooses its own backend modules. Each exposes the same interface:

- `compiled(fn)`: compiles a pure function of tensors (`tf.function`,
  `jax.jit`; run eagerly on torch);
- `compiled_reading(fn, variables)`: compiles a function of tensors and of
  the current values of some variables, which an eager call does not pass;
- `value_and_grad(fn)`: the input gradient of a batched function;
- `all_equal(tensors, others)`: whether tensors equal others exactly, as a
  scalar bool tensor (the stale-weight check);
- `certificate_ops(logits)`: the functions the ⊥ logit calls on these
  logits (`keras.ops` semantics: `cast`, `convert_to_tensor`, `max`,
  `argmax`, `take`, `where`, `concatenate`; `finite_rows`; `quiet`, a
  context for its arithmetic), without Keras' argument conversion where
  the ⊥ logit runs eagerly;
- `filled_like(tensor, value)`: a constant with a tensor's shape, dtype
  and, where the backend lets us choose, memory layout;
- `top_k(x, k)`: `keras.ops.top_k` with ties in the order of their indices;
- `full_precision()`: a context in which float32 matrix products and
  convolutions run in full float32 (no TF32 on NVIDIA GPUs), for the
  certifying forward pass;
- `average_pooling_replicates_edges(...)`: which linear map Keras' 2-D
  average pooling is on this backend, for its guaranteed bound;
- `GloroSteps`: a mixin that `GloroNet` inherits before `keras.Model`,
  adding the GloRo logs to Keras' own train and test steps in the pattern
  of that backend's trainer, and whatever the backend's training loops need
  so that a GloroNet survives them;
- `forward_hook_site(layers)`: where a torch forward hook would change
  what a layer computes (None on TensorFlow and JAX);
- `runs_backward_hooks(layer)`: whether torch would run a backward hook
  around a call of the layer (False on TensorFlow and JAX);
- `pair_min_max(x)`: MinMax in the formulation fastest on that backend;
- `predict_runs_call_eagerly(model)`: whether Keras' predict function runs
  the model's `call` in Python at every batch (not compiled);
- `value_marks(variables)` / `values_unchanged(variables, marks)`: cheap
  marks of variables' values that can spare a comparison (never a
  certificate's).

Adding a backend means adding one module with these names. Only this
package names a backend; `require_tensorflow` serves the TensorFlow-only
features (SavedModel export, `gloro.data`) on every backend.

Example:

```python
from gloro import backend

step = backend.compiled(lambda kernel, v: ...)   # tf.function, jax.jit or eager
tf = backend.require_tensorflow("SavedModel export")
```
"""

import importlib

import keras

SUPPORTED = ("tensorflow", "jax", "torch")


def name():
    """The Keras backend of this process: `"tensorflow"`, `"jax"` or `"torch"`."""
    return keras.backend.backend()


if name() not in SUPPORTED:
    raise ImportError(
        f"gloro runs on Keras' {', '.join(SUPPORTED)} backends, not on '{name()}'. "
        "Set KERAS_BACKEND to one of them before importing Keras."
    )

_impl = importlib.import_module(f"gloro.backend.{name()}")

compiled = _impl.compiled
compiled_reading = _impl.compiled_reading
value_and_grad = _impl.value_and_grad
top_k = _impl.top_k
full_precision = _impl.full_precision
average_pooling_replicates_edges = _impl.average_pooling_replicates_edges
GloroSteps = _impl.GloroSteps
value_marks = _impl.value_marks
pair_min_max = _impl.pair_min_max
predict_runs_call_eagerly = _impl.predict_runs_call_eagerly
all_equal = _impl.all_equal
certificate_ops = _impl.certificate_ops
filled_like = _impl.filled_like
forward_hook_site = _impl.forward_hook_site
runs_backward_hooks = _impl.runs_backward_hooks
values_unchanged = _impl.values_unchanged


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
            "the JAX and torch backends)."
        ) from error
    return tf
