"""The torch backend: eager functions, `torch.autograd` input gradients, and
the GloRo logs on Keras' torch train and test steps.

On this backend a GloroNet is a `torch.nn.Module` whose Keras variables are
its `parameters()`, so it also trains in a plain PyTorch loop (README,
"Backends").

Example:

```python
from gloro import backend   # picks this module when KERAS_BACKEND=torch

grad = backend.value_and_grad(lambda x: x ** 2)
y, dy = grad(x)             # dy == 2 * x
```
"""

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import types

import keras
import numpy as np
import torch
import torch.nn.modules.module as torch_module
from keras import ops

from gloro.backend import common


def compiled(fn):
    """A pure function of tensors, run eagerly.

    Keras runs torch eagerly by default, and so does gloro: `torch.compile`
    would compile again for every new input shape, at a cost of seconds, for
    functions that run in milliseconds (a power-iteration refresh, one PGD
    batch). NumPy
    arguments become tensors first, as `tf.function` and `jax.jit` convert
    them, so callers pass the same arguments on every backend.

    Args:
        fn: a function whose result depends only on its tensor arguments.

    Returns:
        a function with `fn`'s arguments and result.
    """

    def eager(*args):
        return fn(*keras.tree.map_structure(_tensor, args))

    return eager


def _tensor(value):
    return ops.convert_to_tensor(value) if isinstance(value, np.ndarray) else value


def compiled_reading(fn, variables):
    """`fn(*args, values)`, run eagerly (see `compiled`), `values` being
    the list of values that `variables` hold at each call.

    Args:
        fn: a function of tensors and a last argument, a list of tensors.
        variables: a list of Keras variables.

    Returns:
        a function of `args`.
    """
    # Not through `compiled`: its conversion walks every argument's
    # structure, which costs more than the whole check here.
    return lambda *args: fn(*[_tensor(a) for a in args], [v.value for v in variables])


def all_equal(tensors, others):
    """Scalar bool tensor: each tensor equals its counterpart exactly (NaN
    equals nothing).

    Large pairs on the CPU are compared by NumPy on the same memory: its
    vectorised comparison reads a 157k-entry kernel in 40% of the time of
    `torch.equal`, and the check runs on every certifying call. Other pairs
    take one `torch.equal`, cheaper on small tensors.

    Args:
        tensors, others: equally long lists of tensors of equal shapes.

    Returns:
        scalar bool tensor.
    """
    return torch.tensor(all(_equal(a, b) for a, b in zip(tensors, others)))


def _numpy_view(tensor):
    """The tensor's memory as a NumPy array, or None where NumPy cannot read
    it: off the CPU, under `torch.compile` (which cannot trace NumPy), or a
    `torch.func` wrapper, for which torch has no public test (reading is
    the test, a microsecond)."""
    if tensor.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    try:
        return tensor.detach().numpy()
    except RuntimeError:
        return None


# Entries from which NumPy's comparison beats `torch.equal`'s fixed cost.
_NUMPY_EQUAL_FROM = 1 << 14


def _equal(a, b):
    if a.numel() >= _NUMPY_EQUAL_FROM:
        arrays = [_numpy_view(a), _numpy_view(b)]
        if all(array is not None for array in arrays):
            return np.array_equal(*arrays)
    return torch.equal(a, b)


def filled_like(tensor, value):
    """A tensor of `value`s with `tensor`'s shape, dtype, device and memory
    layout (strides): torch keeps some weights transposed (Keras'
    `Orthogonal` initializer), and comparing two tensors of different
    layouts reads one of them out of order, at twice the cost.

    Args:
        tensor: a tensor.
        value: a number.

    Returns:
        tensor.
    """
    return torch.full_like(tensor.detach(), value)


def _finite_rows(x):
    # From each row's minimum and maximum, in one reduction (torch's
    # minimum and maximum propagate NaN): on rows of 10, half the cost of
    # `all(isfinite(x))`.
    low, high = torch.aminmax(x, dim=1)
    return (low > -np.inf) & (high < np.inf)


@functools.lru_cache(maxsize=None)
def _torch_certificate_ops(device):
    """What `gloro.certificates.add_bottom_logit` calls on logits on
    `device`, as direct torch calls with the `keras.ops` semantics (Keras'
    torch backend calls the same functions after converting its arguments,
    which costs 2 to 10 times the operation itself on `(n, m)` tensors: 60
    µs to convert a `(10, 10)` array). `device` None: Keras' device, for
    logits that are not a tensor yet."""
    return types.SimpleNamespace(
        cast=lambda x, dtype: x.to(getattr(torch, dtype)) if torch.is_tensor(x) else ops.cast(x, dtype),
        convert_to_tensor=ops.convert_to_tensor if device is None else lambda x: torch.as_tensor(x, device=device),
        max=lambda x, axis: torch.amax(x, dim=axis),
        argmax=lambda x, axis: torch.argmax(x, dim=axis),
        take=lambda x, indices, axis: torch.index_select(x, axis, indices),
        where=torch.where,
        concatenate=lambda xs, axis: torch.cat(xs, dim=axis),
        finite_rows=_finite_rows,
        quiet=contextlib.nullcontext,
    )


def _column_major(x, dtype):
    # Column-major, so that reductions along the class axis walk memory in
    # order: on `(512, 10)` logits a row-major `max(axis=1)` costs ten times
    # as much (NumPy reduces each short row on its own).
    return np.asarray(x.detach().numpy() if torch.is_tensor(x) else x, dtype=dtype, order="F")


def _take_column_major(x, indices, axis):
    # Gathered through the transpose, so that the result is column-major too.
    return np.take(x.T, indices, axis=x.ndim - 1 - axis).T


def _row_major_tensor(xs, axis):
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(xs, axis=axis)))


# The same in NumPy, on the tensors' own memory, for logits that need no
# gradient on the CPU (`predict`, `predict_on_batch`, `evaluate`, calls under
# `torch.no_grad()`): a NumPy operation on `(n, m)` arrays costs a fraction
# of a torch one, and the ⊥ logit takes about 25 of them. IEEE float32
# arithmetic either way, so the outputs are the same bits
# (tests/test_certificates.py); only the result becomes a (row-major) tensor
# again.
_NUMPY_CERTIFICATE_OPS = types.SimpleNamespace(
    cast=_column_major,
    convert_to_tensor=np.asarray,
    max=lambda x, axis: np.max(x, axis=axis),
    argmax=lambda x, axis: np.argmax(x, axis=axis),
    take=_take_column_major,
    where=np.where,
    concatenate=_row_major_tensor,
    finite_rows=lambda x: np.isfinite(x).all(axis=1),
    # inf - inf and the like are expected in rows that are never certified.
    quiet=lambda: np.errstate(all="ignore"),
)


def certificate_ops(logits):
    """The functions `gloro.certificates.add_bottom_logit` calls on these
    logits: NumPy's on the same memory where no gradient is wanted and
    the tensor lives on the CPU, torch's otherwise (and under
    `torch.compile`, which cannot trace NumPy, or `torch.func` transforms,
    whose tensors have no memory of their own).

    Args:
        logits: the tensor (or array) the ⊥ logit is computed for.

    Returns:
        a namespace of `cast`, `convert_to_tensor`, `max`, `argmax`, `take`,
        `where`, `concatenate` (a torch tensor in both), `finite_rows` and
        `quiet`.
    """
    if torch.is_tensor(logits) and not logits.requires_grad and _numpy_view(logits) is not None:
        return _NUMPY_CERTIFICATE_OPS
    return _torch_certificate_ops(logits.device if torch.is_tensor(logits) else None)


def forward_hook_site(layers):
    """Where torch would run a forward hook or pre-hook around a call of
    one of `layers`: a hook may replace a layer's input or output, so the
    network it runs is not the one whose Lipschitz bound was computed.

    Reads torch's hook registries directly (there is no public query); a
    torch that renamed them fails here with an AttributeError rather than
    reporting no hooks.

    Args:
        layers: Keras layers (torch modules on this backend).

    Returns:
        None, or where a hook would run, for an error message: `"layer
        'name'"` for a layer's own hook, `"every module (a global hook)"`
        for one from `torch.nn.modules.module.register_module_forward_hook`.
    """
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return "every module (a global hook)"
    for layer in layers:
        if layer._forward_hooks or layer._forward_pre_hooks:
            return f"layer '{layer.name}'"
    return None


def runs_backward_hooks(layer):
    """Whether torch would run a backward hook registered on `layer` (or on
    every module) when the layer is called as a module: calling its `call`
    directly would skip it.

    Args:
        layer: a Keras layer (a torch module on this backend).

    Returns:
        bool.
    """
    return bool(
        torch_module._global_backward_hooks
        or torch_module._global_backward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
    )


def predict_runs_call_eagerly(model):
    """Whether Keras' predict function runs `model.call` in Python at every
    batch: always, unless the model was compiled with `jit_compile=True`
    (then `torch.compile` traces it).

    Args:
        model: a compiled or uncompiled Keras model.

    Returns:
        bool.
    """
    return bool(model.run_eagerly or not model.jit_compile)


# MinMax (gloro.layers.MinMax): as fast as a reshape on this backend's CPU kernels.
pair_min_max = common.strided_pair_min_max


def value_marks(variables):
    """Marks of the variables' current values for `values_unchanged`: each
    tensor with its version counter, which torch bumps on every in-place
    change made through autograd-visible operations (optimizer steps,
    `assign`, `copy_`). A change through `.data` bypasses the counter, so
    the marks only spare a comparison; they never stand in for one where a
    certificate depends on it.

    Args:
        variables: Keras variables.

    Returns:
        a list of `(tensor, version)` pairs.
    """
    return [(variable.value, variable.value._version) for variable in variables]


def values_unchanged(variables, marks):
    """Whether every variable still holds the tensor and version it held
    when `marks` were taken (`value_marks`); False when unsure."""
    return marks is not None and all(
        v.value is tensor and v.value._version == version for v, (tensor, version) in zip(variables, marks)
    )


def value_and_grad(fn):
    """Input gradient of a batched function.

    Args:
        fn: maps a tensor `x` to a tensor `y` (any shape).

    Returns:
        a function `x -> (y, g)` where `g` is the gradient of `sum(y)` with
        respect to `x` (for row-wise `fn`, each row's own gradient); `y` is
        detached from the graph.
    """

    def torch_value_and_grad(x):
        x = ops.convert_to_tensor(x).detach().requires_grad_(True)
        # Keras runs `predict` and `evaluate` under `torch.no_grad()`; the
        # gradient is wanted wherever this is called from.
        with torch.enable_grad():
            y = fn(x)
            if not y.requires_grad:
                return y, torch.zeros_like(x)
            (grad,) = torch.autograd.grad(y, x, grad_outputs=torch.ones_like(y), allow_unused=True)
        return y.detach(), torch.zeros_like(x) if grad is None else grad

    return torch_value_and_grad


def average_pooling_replicates_edges(pool_size, strides, padding, input_shape):
    """Whether Keras' 2-D average pooling here averages repeated edge inputs.

    Keras (3.15) on torch pools a "same" input whose padding is uneven on
    some axis (one more position after than before) by first padding every
    axis with copies of the edge inputs, then dividing each window by its
    full size; with even padding it leaves the padding out of the average,
    as TensorFlow and JAX always do. The two are different linear maps,
    with different norms, so the guaranteed bound must know which one runs.

    Args:
        pool_size: `(ph, pw)` or an int.
        strides: `(sh, sw)` or an int.
        padding: `"same"` or `"valid"`.
        input_shape: `(h, w, c)`.

    Returns:
        bool.
    """
    if padding.lower() != "same":
        return False
    pools = pool_size if isinstance(pool_size, (tuple, list)) else (pool_size, pool_size)
    steps = strides if isinstance(strides, (tuple, list)) else (strides, strides)
    for size, pool, stride in zip(input_shape[:2], pools, steps):
        out = -(-size // stride)
        if max((out - 1) * stride + pool - size, 0) % 2:
            return True
    return False


# Where `torch.autocast` can be on.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")

# torch's switches of the internal precision of float32 matrix products and
# convolutions (torch 2.9's API; `torch.set_float32_matmul_precision`
# writes them too), parents before their children: "ieee" is full float32,
# "tf32" and "bf16" round the operands, "none" inherits the parent's.
_PRECISION_SWITCHES = (
    torch.backends,
    torch.backends.cuda.matmul,
    torch.backends.cudnn,
    torch.backends.cudnn.conv,
    torch.backends.mkldnn,
    torch.backends.mkldnn.matmul,
    torch.backends.mkldnn.conv,
)


@contextlib.contextmanager
def full_precision():
    """Full float32 matrix products and convolutions inside the block,
    whatever the caller set: torch reads its precision switches when each
    operation runs, and by default runs cuDNN convolutions in TF32 on
    recent NVIDIA GPUs; `torch.set_float32_matmul_precision("medium")`
    also runs CPU matrix products in bfloat16 where the CPU has it. A
    caller's `torch.autocast` is switched off too (bfloat16 autocast on CPU
    moved logits by 0.015 on cnn_2C2F). Everything is restored afterwards.

    Only torch 2.9's switches (`fp32_precision`) are read and written: once
    a caller has used them, torch refuses to read the older `allow_tf32`
    flags.
    """
    saved = [switch.fp32_precision for switch in _PRECISION_SWITCHES]
    try:
        for switch in _PRECISION_SWITCHES:
            switch.fp32_precision = "ieee"
        with contextlib.ExitStack() as stack:
            for device in _AUTOCAST_DEVICES:
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
            yield
    finally:
        for switch, value in zip(_PRECISION_SWITCHES, saved):
            switch.fp32_precision = value


def top_k(x, k):
    """The `k` largest values along the last axis and their indices.

    Equal values come in the order of their indices, as on TensorFlow and
    JAX: `torch.topk` (Keras' `ops.top_k` here) leaves the order of ties
    unspecified, a stable descending sort does not.

    Args:
        x: tensor `(..., m)`.
        k: int, `1 <= k <= m`.

    Returns:
        `(values, indices)`, each `(..., k)`.
    """
    values, indices = torch.sort(ops.convert_to_tensor(x), dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


class GloroSteps:
    """Adds the GloRo logs to Keras' torch train and test steps.

    Keras' torch `train_step` is the pattern its guide documents for torch
    (`zero_grad()`, the forward pass with `training=True`, `compute_loss`,
    `loss.backward()`, `optimizer.apply` under `torch.no_grad()`, the
    metrics); `GloroNet.compute_loss` hands the margin constants of that
    forward pass to a loss that reads them (EMMA). The logs are read with
    no autograd graph. Keras' torch loops update the variables in place, so
    a loop that fails half-way leaves the model as its last step left it.
    """

    def train_step(self, data):
        logs = super().train_step(data)
        with torch.no_grad():
            extra = self._lipschitz_logs(self._estimate_tensor())
        return {**logs, **extra}

    def test_step(self, data):
        logs = super().test_step(data)
        return {**logs, **self._lipschitz_logs(ops.max(self._margin_lipschitz))}

    def export(self, filepath, format="tf_saved_model", verbose=None, **kwargs):
        """`keras.Model.export`; a TensorFlow SavedModel is written by the
        TensorFlow backend, in a subprocess.

        Keras (3.15) exports a SavedModel from torch through `torch_xla` and
        `torch.export`, which fails with torch 2.13 even for a plain Keras
        model. The `.keras` file carries the weights, and `gloro.load_model`
        recomputes the same constants from them on TensorFlow, so the
        SavedModel is the one TensorFlow would export for this model.
        """
        if format != "tf_saved_model":
            return super().export(filepath, format=format, verbose=verbose, **kwargs)
        if kwargs:
            raise TypeError(
                f"On the torch backend GloroNet.export writes the SavedModel with TensorFlow and takes "
                f"only `filepath` and `verbose`, not {sorted(kwargs)}."
            )
        import gloro

        with tempfile.TemporaryDirectory() as folder:
            model = os.path.join(folder, "model.keras")
            self.save(model)
            root = os.path.dirname(os.path.dirname(os.path.abspath(gloro.__file__)))
            env = {**os.environ, "KERAS_BACKEND": "tensorflow",
                   "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            # Keras exports only a model that has been called.
            code = (
                "import sys, numpy as np, gloro\n"
                "g = gloro.load_model(sys.argv[1])\n"
                "g.predict(np.zeros((1,) + tuple(g.f.input_shape[1:]), 'float32'), verbose=0)\n"
                "g.export(sys.argv[2], verbose=sys.argv[3] == 'True')\n"
            )
            result = subprocess.run([sys.executable, "-c", code, model, os.fspath(filepath), str(bool(verbose))],
                                    env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"Exporting the SavedModel on the TensorFlow backend failed:\n{result.stderr[-2000:]}")
        if verbose:
            print(result.stdout, end="")
