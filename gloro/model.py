"""`GloroNet`: a Keras model that certifies its own predictions."""

import contextlib

import keras
import numpy as np
from keras import ops

from gloro import backend, certificates, graph, layers as gloro_layers, lipschitz, losses
from gloro import metrics as gloro_metrics
from gloro.callbacks import LipschitzRefresh


def check_epsilon(value):
    """Validates a certified radius: a number >= 0, finite in float32.

    Returns:
        the radius as a float.

    Raises:
        TypeError, ValueError: not such a number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"epsilon must be a number, got {value!r} of type {type(value).__name__}.")
    # Certificates are computed in float32, where 1e39 is already inf.
    if not np.isfinite(value) or value < 0 or value > np.finfo(np.float32).max:
        raise ValueError(f"epsilon must be a number >= 0 that is finite in float32, got {value!r}.")
    return float(value)


def _to_gloro_layer(layer):
    """Plain Keras Dense/Conv2D become their caching gloro versions."""
    if type(layer) is keras.layers.Dense:
        return gloro_layers.Dense.from_config(layer.get_config())
    if type(layer) is keras.layers.Conv2D:
        return gloro_layers.Conv2D.from_config(layer.get_config())
    return layer.__class__.from_config(layer.get_config())


def _functional(model):
    """`model` as the functional model a GloroNet runs: itself if it is
    one, the functional model of the same layers if it is a `Sequential`
    (whose `pop` and `add` would otherwise change the network under the
    GloroNet's bound).

    Raises:
        ValueError: `model` is a subclass of `keras.Model` (functional or
            `Sequential`): its own methods could compute something other
            than the graph of layers the bound covers.
    """
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        return model  # `graph.LipschitzGraph` says what is missing.
    functional = keras.Model(inputs, outputs, name=model.name)
    if type(model) is type(functional):
        return model
    if type(model) is not keras.Sequential:
        raise ValueError(
            f"Model '{model.name}' is a {type(model).__name__}, a subclass of keras.Model. A GloroNet "
            "runs and bounds the graph of layers of a functional or Sequential model, and a subclass's "
            "own methods (`call`, ...) could compute something else. To certify its graph of layers, "
            "pass keras.Model(model.inputs, model.outputs)."
        )
    return functional


def _with_gloro_layers(model):
    """`model` itself if its linear layers cache their norms, else a clone
    whose plain Dense/Conv2D layers are gloro layers with the same weights."""
    if not any(type(l) in (keras.layers.Dense, keras.layers.Conv2D) for l in model.layers):
        return model
    clone = keras.models.clone_model(model, clone_function=_to_gloro_layer)
    originals = {l.name: l for l in model.layers}
    for new in clone.layers:
        if isinstance(new, keras.layers.InputLayer):
            continue
        for old_weight, new_weight in zip(originals[new.name].weights, new.weights):
            # A copy: on JAX, sharing the array would let a step that
            # donates the clone's buffers delete the original's weights.
            new_weight.assign(ops.convert_to_numpy(old_weight))
    return clone


def _check_input_dtype(model):
    dtype = keras.backend.standardize_dtype(model.inputs[0].dtype)
    if dtype not in ("float32", "float64"):
        raise ValueError(
            f"Model '{model.name}' takes {dtype} inputs. Rounding its inputs to "
            f"{dtype} makes the network a step function of the real input, which "
            "a bound on its Lipschitz constant does not cover: use a float32 "
            "keras.Input (the default) and cast inside the model if needed."
        )


@contextlib.contextmanager
def _full_precision(model):
    """Runs `model` in float32 with full-precision products, whatever its
    layers' dtype policies: certificates from half-precision logits are not
    sound (gloro-method.md, "Precision"). Policies are read when a call is
    traced, so compiled inference keeps float32 while training keeps the
    user's policy."""
    switched = [
        (layer, layer.dtype_policy)
        for layer in [model] + model.layers
        if layer.compute_dtype not in ("float32", "float64")
    ]
    for layer, _ in switched:
        layer.dtype_policy = "float32"
    try:
        with backend.full_precision():
            yield
    finally:
        for layer, policy in switched:
            layer.dtype_policy = policy


# Power-iteration steps per layer per training step. The estimate only
# approaches the norm from below and lags behind the moving weights (17% at
# the end of a 2-epoch run with 1 plain step, 3-4% with 5 or more). The
# steps are shifted (`gloro.lipschitz.training_shifts`), which makes 4 do the
# work of about 8 plain ones at the cost of 4: their VRA equals that of 8
# plain steps, the previous default, over 20 seeds at the recipe of
# benchmarks/power_iterations.md (0.6437 against 0.6439; BENCHMARKS.md).
DEFAULT_POWER_ITERATIONS = 4


# Keras' train and test steps with the GloRo logs, in the pattern of this
# process's backend (gloro/backend/<name>.py).
_GloroSteps = backend.GloroSteps


@keras.saving.register_keras_serializable(package="gloro")
class GloroNet(_GloroSteps, keras.Model):
    """A globally-robust network: the logits of `f` plus a ⊥ logit.

    For an input `x` with prediction `j = argmax f(x)`, the ⊥ logit is
    `max_{i != j} f_i(x) + epsilon * K[j, i]`, where `K[j, i]` bounds the
    Lipschitz constant of `f_j - f_i` (the product of the hidden layers'
    bounds times `||w_j - w_i||` of the logits layer). The output's argmax is
    `j` only when no input within L2 distance `epsilon` of `x` can change the
    prediction; otherwise it is ⊥ (index `m`). Ties and NaN/inf are never
    certified (see `gloro.certificates`).

    During training, the bounds are differentiable power-iteration estimates
    (`power_iterations` steps per layer per training step). Certificates
    (`evaluate`, `predict`, `save`, `export`, and calls with
    `training=False`) use guaranteed bounds computed by `freeze_lipschitz`.

    Certificates never outlive the weights they were computed for: freezing
    stores, next to the constants, a copy of every weight of `f` they depend
    on, and each inference call compares the weights with that copy inside
    the compiled graph. Whatever changed a weight (training, `assign`,
    `set_weights`, `load_weights`, a custom optimizer loop on `g.f`), the
    call certifies nothing (its ⊥ logit is `+inf` on every row) until the
    constants are frozen again, which `fit`, `predict`, `predict_on_batch`,
    `evaluate`, `save`, `export`, `certified_radius` and
    `lipschitz_constant` do by themselves. Constants that arrive with the
    variables (loading, `set_weights`, `load_weights`) are never trusted:
    they are recomputed the same way. A change to anything else the
    network computes with (a layer's settings, its quantization or LoRA
    state, a new variable) makes every call raise a `ValueError`.

    Under a half-precision dtype policy, training runs in the policy's
    dtype, and inference (every certificate) in float32 on the same weights.

    The network is any single-input functional graph (or `Sequential`) of
    layers with known bounds (see `gloro.layers`), whose branches meet in
    `Add`, `Subtract`, `Average` or `Concatenate` (see `gloro.graph`), ending
    in a linear `Dense` logits layer on flat features. Plain Keras
    `Dense` / `Conv2D` layers are swapped for the gloro versions, with the same
    weights; `g.f` is the model actually used, a functional model (a
    `Sequential` becomes the functional model of its layers, and a subclass
    of `keras.Model`, whose methods could compute something other than its
    graph, is refused). The GloroNet runs `f`'s graph itself, layer by layer
    as Keras' functional `call` does, whatever `call` or `forward` is set on
    the instance.

    Args:
        inputs, outputs: as for a functional `keras.Model` (the logits model).
        model: alternatively, an existing logits model.
        epsilon: the certified L2 radius, a number >= 0.
        power_iterations: power-iteration steps per layer per training step
            (more track fast-moving weights better, at a small cost per step).
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    x = keras.Input((28, 28, 1))
    z = gloro.layers.Conv2D(16, 4, strides=2, padding="same")(x)
    z = gloro.layers.MinMax()(z)
    z = gloro.layers.Flatten()(z)
    y = gloro.layers.Dense(10)(z)
    g = gloro.GloroNet(x, y, epsilon=0.3)
    g.compile(optimizer="adam", loss="sparse_crossentropy",
              metrics=["clean_acc", "vra", "rejection_rate"])
    g.fit(x_train, y_train, epochs=5)
    g.predict(x_test)   # (n, 11): 10 classes and ⊥
    ```
    """

    def __init__(self, inputs=None, outputs=None, *, model=None, epsilon, power_iterations=DEFAULT_POWER_ITERATIONS, **kwargs):
        kwargs.setdefault("dtype", "float32")
        if kwargs.pop("autocast", False):
            raise ValueError(
                "GloroNet never autocasts its variables (autocast=False): it compares every weight "
                "with its frozen copy in the weight's own dtype. Leave `autocast` unset."
            )
        # Called inside a mixed-precision layer, Keras would otherwise read
        # every variable rounded to the caller's dtype: a float64 weight
        # changed below float32's resolution kept certifying with the
        # constants of the old weight. Each layer of `f` still autocasts as
        # its own policy says.
        super().__init__(autocast=False, **kwargs)
        self._check_own_dtype()
        if model is None:
            if inputs is None or outputs is None:
                raise ValueError("GloroNet needs either `inputs` and `outputs`, or `model=`.")
            model = keras.Model(inputs, outputs)
        elif inputs is not None or outputs is not None:
            raise ValueError("Pass either `inputs` and `outputs`, or `model=`, not both.")
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
        if isinstance(power_iterations, bool) or not isinstance(power_iterations, int) or power_iterations < 1:
            raise ValueError(f"power_iterations must be a positive int, got {power_iterations!r}.")
        self.power_iterations = power_iterations
        # Before cloning: a quantized layer's config does not even clone on
        # every backend.
        for layer in model.layers:
            gloro_layers.check_weights_are_plain(layer)
        self.f = _with_gloro_layers(_functional(model))
        self._graph = graph.LipschitzGraph(self.f)
        _check_input_dtype(self.f)
        self._head = self._graph.head
        self._check_head()
        self.num_classes = self._head.units
        self._spectral = [l for l in self._graph.layers if isinstance(l, gloro_layers.SpectralNormCache)]
        # Fixed for training; freezing asks every layer again.
        self._static_bounds = {
            id(l): self._graph.guaranteed_bound(l) for l in self._graph.layers if l not in self._spectral
        }
        # What the network computes besides its weights' values; any change
        # (a new variable, an activation, a padding) is refused, see
        # `_check_structure`.
        self._structure = self._graph.state()
        # The margin constants and epsilon of the latest forward pass, which
        # `compute_loss` hands to a loss that reads them (EMMA) in the same
        # step and then drops, as `predict_step` does: no later call may see
        # another trace's tensors.
        self._forward_margins = None
        self._frozen_check = None
        self._frozen_marks = None
        self._certifier = None
        self._epsilon = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(check_epsilon(epsilon)),
            trainable=False, dtype="float32", aggregation="only_first_replica", name="epsilon",
        )
        self._margin_lipschitz = self.add_weight(
            shape=(self.num_classes, self.num_classes), initializer="zeros",
            trainable=False, dtype="float32", aggregation="only_first_replica",
            name="margin_lipschitz",
        )
        caches = {id(v) for l in self._spectral + [self._head] for v in getattr(l, "cache_variables", [])}
        # The constants themselves are compared too: a direct assignment to
        # them is a change like any other.
        self._certified_for = [v for v in self.f.weights if id(v) not in caches] + [self._margin_lipschitz]
        # Nothing certifies before the first freeze: weights equal to these
        # copies would all be infinite, the logits layer's kernel included,
        # so every logit would be inf or NaN, which never certifies. (Not NaN:
        # JAX checks that every process creates a variable with equal
        # values, and NaN never equals itself.) Each copy is laid out in
        # memory as its weight is (torch keeps an `Orthogonal` kernel
        # transposed), so that the comparison on every certifying call
        # reads both in one order.
        self._certified_copies = [
            self.add_weight(
                shape=v.shape, initializer=lambda shape, dtype, v=v: backend.filled_like(v.value, np.inf),
                trainable=False, dtype=v.dtype, aggregation="only_first_replica",
                name=f"certified_copy_{i}",
            )
            for i, v in enumerate(self._certified_for)
        ]
        self.build(self.f.input_shape)

    def _check_head(self):
        head = self._head
        if type(head) not in (gloro_layers.Dense, keras.layers.Dense):
            hint = ""
            if isinstance(head, (keras.layers.Softmax, keras.layers.Activation)):
                hint = " Remove the final activation: GloroNet needs logits (a softmax does not change the prediction)."
            raise ValueError(
                f"The last layer '{head.name}' ({type(head).__name__}) must be a "
                "Dense layer producing logits (exactly gloro.layers.Dense or "
                f"keras.layers.Dense: a subclass may compute something else).{hint}"
            )
        gloro_layers.check_weights_are_plain(head)
        if head.activation is not keras.activations.linear:
            activation = getattr(head.activation, "__qualname__", type(head.activation).__name__)
            raise ValueError(
                f"The last layer '{head.name}' has activation {activation!r}; "
                "GloroNet needs linear logits (activation=None). Remove the "
                "activation (a softmax does not change the prediction)."
            )
        shape = self.f.output_shape
        if len(shape) != 2 or len(head.input.shape) != 2:
            raise ValueError(
                f"GloroNet needs logits of shape (batch, m) from a Dense layer on "
                f"flat features; the model outputs {shape}. Add a Flatten layer "
                "before the last Dense layer."
            )
        if head.units < 2:
            raise ValueError(f"GloroNet needs at least 2 classes; the last layer has {head.units} unit.")

    def build(self, input_shape):
        self.built = True

    # ------------------------------------------------------------ epsilon

    @property
    def epsilon(self):
        """The certified L2 radius; settable at any time, also during `fit`."""
        return float(ops.convert_to_numpy(self._epsilon))

    @epsilon.setter
    def epsilon(self, value):
        self._epsilon.assign(check_epsilon(value))

    # -------------------------------------------------------------- call

    def call(self, x, training=False):
        """Logits of `f` followed by the ⊥ logit.

        Args:
            x: a batch of inputs shaped like `f`'s input.
            training: if True, the constants are differentiable estimates
                from more power-iteration steps per layer.

        Returns:
            float32 tensor `(n, m + 1)`; the last column is ⊥.
        """
        self._check_input(x)
        self._check_structure()
        if training:
            logits = self._logits(x, training=True)
        else:
            with _full_precision(self.f):
                logits = self._logits(x, training=False)
        epsilon = ops.convert_to_tensor(self._epsilon)
        if training:
            estimates = gloro_layers.power_steps(self._spectral, self.power_iterations)
            lipschitz_h = self._graph.vector_bound(
                self._spectral, estimates, lambda layer: self._static_bounds[id(layer)]
            )
            kernel = ops.cast(self._head.kernel, "float32")
            margin_lipschitz = lipschitz_h * lipschitz.pairwise_column_distances_ops(kernel)
            self._forward_margins = (margin_lipschitz, epsilon)
            return self._add_bottom_logit(logits, margin_lipschitz, epsilon, ops.convert_to_tensor(True))
        self._forward_margins = (ops.convert_to_tensor(self._margin_lipschitz), epsilon)
        if self._certifier is None:
            self._certifier = backend.compiled_reading(
                self._certified_outputs,
                [self._margin_lipschitz, self._epsilon, *self._certified_for, *self._certified_copies],
            )
        return self._certifier(logits)

    def _logits(self, x, training):
        """`f`'s logits from the graph of layers the bound covers, walked
        as `f`'s functional `call` walks it: `self.f(x)` would also run a
        `call` or a torch `forward` set on the instance."""
        return self._graph.run(x, training)

    def _certified_outputs(self, logits, values):
        """The inference outputs from `values`, the margin constants, epsilon,
        the weights and their copies: certified only while the weights equal
        the copies taken when the constants were frozen.

        One compiled function, so that an eager call pays one dispatch for
        the certificate and its stale-weight check, not one per operation.
        Where the weights differ, ⊥ is `+inf` on every row, which tells
        `predict_on_batch` to freeze again (rows with NaN/inf logits are
        the only other rows with a `+inf` ⊥)."""
        margin_lipschitz, epsilon, *weights_and_copies = values
        count = len(self._certified_for)
        current = self._weights_are_certified(weights_and_copies[:count], weights_and_copies[count:])
        return self._add_bottom_logit(logits, margin_lipschitz, epsilon, current)

    def _add_bottom_logit(self, logits, margin_lipschitz, epsilon, certify):
        """The `m + 1` outputs from the logits; subclasses relax the notion
        of robustness here (see `gloro.relaxations`)."""
        return certificates.add_bottom_logit(logits, margin_lipschitz, epsilon, certify)

    def _features_bound(self, spectral_value):
        """Bound of the features (the logits layer's input): the graph's
        propagation of `spectral_value(layer)` for the power-iterated layers
        and the fixed bounds of the others."""
        return self._graph.bound(
            lambda layer: spectral_value(layer) if layer in self._spectral else self._static_bounds[id(layer)]
        )

    def _check_structure(self):
        """Refuses to go on once the network computes something other than
        what it did when this GloroNet was built.

        Raises:
            ValueError: a layer gained or lost a variable (LoRA,
                quantization) or changed a setting (activation, padding,
                scale, ...), or, on torch, a forward hook would run around
                a layer or the GloroNet; the message names it.
        """
        self._check_own_dtype()
        # Not `self.f`: its `call` runs without its own `__call__`, so a hook
        # on it never runs here (`_logits`).
        hooked = backend.forward_hook_site([self, *self._graph._all_layers])
        if hooked is not None:
            raise ValueError(
                f"A torch forward hook or pre-hook would run on {hooked} in GloroNet "
                f"'{self.name}'. A hook can replace what a layer reads or returns, which the "
                "Lipschitz bound does not cover, so the GloroNet neither certifies nor trains "
                "with one. Remove it (`handle.remove()` on the handle that "
                "register_forward_hook returned); to read activations, build a Keras model "
                "on them instead (keras.Model(g.f.inputs, layer.output))."
            )
        current = self._graph.state()
        if current == self._structure:
            return
        changed = next(
            layer.name for layer, now, then in zip(self._graph._all_layers, current, self._structure) if now != then
        )
        raise ValueError(
            f"Layer '{changed}' of GloroNet '{self.name}' changed after the GloroNet "
            "was built (a setting, LoRA, quantization or a new variable), so its "
            "Lipschitz bound no longer covers it. Build a new GloroNet on the "
            "changed model."
        )

    def _check_own_dtype(self):
        """Refuses a dtype policy other than float32 on the GloroNet itself
        (at construction, or set later): Keras would round its inputs, its
        constants and the weights it compares to the policy's dtype before
        `call`, and a certificate for a rounded input, from rounded
        constants, or for weights that differ below the rounding, is not
        proven.

        Raises:
            ValueError: another policy; the message says where mixed
                precision belongs instead.
        """
        policy = self.dtype_policy
        if policy.compute_dtype != "float32" or policy.variable_dtype != "float32":
            raise ValueError(
                f"GloroNet '{self.name}' has dtype policy '{policy.name}'; the GloroNet itself "
                "runs in float32 (Keras would round its inputs, constants and weight checks to "
                "the policy's dtype, and certify what is not proven). Give mixed precision to "
                "the layers of the logits model instead (keras.config.set_dtype_policy before "
                "building it, or dtype= on its layers): training then runs in that dtype and "
                "every certificate in float32."
            )

    def _weights_are_certified(self, weights, copies):
        """Scalar bool tensor: every weight equals the copy taken when the
        constants were frozen."""
        return backend.all_equal(weights, copies)

    def _check_input(self, x):
        expected = tuple(self.f.input_shape[1:])
        shape = tuple(x.shape[1:])
        if len(shape) != len(expected) or any(
            e is not None and s is not None and e != s for s, e in zip(shape, expected)
        ):
            raise ValueError(
                f"GloroNet '{self.name}' expects inputs of shape (batch,) + "
                f"{expected}, got {tuple(x.shape)}."
            )
        try:
            dtype = keras.backend.standardize_dtype(x.dtype)
        except ValueError:
            dtype = str(x.dtype)
        if not ("float" in dtype or "int" in dtype):
            raise TypeError(f"GloroNet '{self.name}' expects numeric inputs, got dtype {dtype}.")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes + 1)

    # -------------------------------------------------------- Lipschitz

    @property
    def lipschitz_frozen(self):
        """True while inference uses guaranteed bounds for the current weights."""
        return self._weights_match_frozen(trust_marks=False)

    def _weights_match_frozen(self, trust_marks):
        """Compares every weight with its frozen copy, in one compiled call
        (run eagerly, the comparison would dispatch two operations per
        weight, milliseconds per `predict` on a GPU).

        Args:
            trust_marks: skip the comparison where the backend's value marks
                say that nothing changed since the last one that passed.
                Only for callers whose certificates come from the comparison
                inside the compiled call anyway (`predict`, `evaluate`, ...):
                marks can miss a change made behind the framework's back (a
                write through torch's `.data` or a NumPy view).
        """
        if trust_marks and backend.values_unchanged(self._certified_for, self._frozen_marks):
            return True
        if self._frozen_check is None:
            self._frozen_check = backend.compiled(backend.all_equal)
        marks = backend.value_marks(self._certified_for)
        # Tensors, not variables: TensorFlow would otherwise work out the
        # call's signature from each variable anew, milliseconds a call.
        values = [ops.convert_to_tensor(v.value) for v in self._certified_for]
        copies = [ops.convert_to_tensor(v.value) for v in self._certified_copies]
        frozen = bool(ops.convert_to_numpy(self._frozen_check(values, copies)))
        self._frozen_marks = marks if frozen else None
        return frozen

    def refresh_lipschitz(self):
        """Runs every layer's power iteration to convergence.

        Returns:
            float, the converged *estimate* of the Lipschitz constant of the
            penultimate layer (a lower bound of the layers' product; not used
            to certify).
        """
        converged = {id(layer): layer.converge() for layer in self._spectral}
        return float(self._features_bound(lambda layer: converged[id(layer)]))

    def freeze_lipschitz(self):
        """Converges the estimates, then stores guaranteed margin constants.

        Inference then certifies with bounds proven to be at least the true
        operator norms (see `gloro.lipschitz`), runs no power iteration, and
        certifies only while the weights equal the ones frozen here.

        Returns:
            numpy `(m, m)`, the frozen `K[j, i]`.
        """
        return self._freeze(converge=True)

    def _freeze(self, converge):
        """`freeze_lipschitz`; with `converge=False` the power-iteration
        estimates are left as they are (they never enter a certificate)."""
        self._check_structure()
        # Copied before the bounds are computed: should a weight change in
        # between, the copy disagrees with it and nothing is certified.
        snapshot = [ops.convert_to_numpy(w) for w in self._certified_for[:-1]]
        if converge:
            self.refresh_lipschitz()
        bound = float(self._graph.bound(self._graph.guaranteed_bound))
        # Covers the float64 rounding of the propagation itself.
        bound *= lipschitz.SAFETY_FACTOR
        kernel = np.asarray(ops.convert_to_numpy(self._head.kernel), np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            stored = lipschitz.round_up_float32(bound * lipschitz.pairwise_column_distances(kernel))
        if not np.all(np.isfinite(stored)):
            raise ValueError(
                f"The logits layer '{self._head.name}' of GloroNet '{self.name}' "
                "holds inf or NaN weights (or the network's bound overflows "
                "float32): nothing can be certified. Retrain from finite weights."
            )
        self._margin_lipschitz.assign(stored)
        for copy, value in zip(self._certified_copies, snapshot + [stored]):
            copy.assign(value)
        return stored

    def _forget_constants(self):
        """Marks the constants as unproven: stored constants (from a file,
        `set_weights`, `load_weights`) are claims, so nothing certifies
        until they are recomputed from the weights, which the next
        `predict`, `evaluate`, `save`, ... does by itself."""
        self._frozen_marks = None
        for copy in self._certified_copies:
            copy.assign(np.full(copy.shape, np.inf, keras.backend.standardize_dtype(copy.dtype)))

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self._forget_constants()

    def set_weights(self, weights):
        """`keras.Model.set_weights`; the constants are recomputed before the
        next certificate, never taken from `weights`."""
        super().set_weights(weights)
        self._forget_constants()

    def load_weights(self, *args, **kwargs):
        """`keras.Model.load_weights`; the constants are recomputed before
        the next certificate, never taken from the file."""
        result = super().load_weights(*args, **kwargs)
        self._forget_constants()
        return result

    def _ensure_frozen(self, trust_marks=False):
        """Freezes unless the constants belong to the current weights; see
        `_weights_match_frozen` for `trust_marks`."""
        self._check_structure()
        if not self._weights_match_frozen(trust_marks):
            self.freeze_lipschitz()

    def lipschitz_constant(self):
        """Margin Lipschitz constants used to certify.

        Returns:
            numpy `(m, m)`: entry `[i, j]` bounds the Lipschitz constant of
            `f_i - f_j` (zero diagonal). Freezes first if needed.
        """
        self._ensure_frozen()
        return ops.convert_to_numpy(self._margin_lipschitz)

    def lipschitz_report(self):
        """Per-layer cost of the guarantee.

        Returns:
            list of dicts with `layer`, `estimate` (converged power
            iteration), `bound` (guaranteed, used to certify) and `ratio`
            (`bound / estimate`); static layers have equal estimate and bound.
        """
        self._ensure_frozen()
        rows = []
        for layer in self._graph.layers:
            bound = self._graph.guaranteed_bound(layer)
            estimate = float(ops.convert_to_numpy(layer.estimate())) if layer in self._spectral else bound
            ratio = bound / estimate if estimate > 0 else float("inf")
            rows.append({"layer": layer.name, "estimate": estimate, "bound": bound, "ratio": ratio})
        return rows

    def features_lipschitz(self):
        """The whole network's price of the guarantee, where
        `lipschitz_report` gives each layer's.

        Returns:
            dict with `estimate` (the converged power-iteration estimates,
            propagated through the graph like the bounds), `bound` (the
            guaranteed bounds, propagated), `ratio` (`bound / estimate`),
            for the map from the input to the logits layer's input, and
            `layers`, the rows of `lipschitz_report` they come from.
        """
        rows = self.lipschitz_report()
        by_layer = {id(layer): row for layer, row in zip(self._graph.layers, rows)}
        estimate = float(self._graph.bound(lambda layer: by_layer[id(layer)]["estimate"]))
        bound = float(self._graph.bound(lambda layer: by_layer[id(layer)]["bound"]))
        ratio = bound / estimate if estimate > 0 else float("inf")
        return {"estimate": estimate, "bound": bound, "ratio": ratio, "layers": rows}

    def certified_radius(self, x, batch_size=256):
        """Largest L2 radius at which each prediction is certified.

        Args:
            x: inputs `(n,) + input_shape`.
            batch_size: batch size of the forward pass.

        Returns:
            numpy `(n,)`: `min_{i != j} (f_j - f_i) / K[j, i]`; 0 for ties and
            NaN/inf.
        """
        margin_lipschitz = self.lipschitz_constant()
        x = np.asarray(x)
        self._check_input(x)
        if len(x) == 0:
            logits = np.zeros((0, self.num_classes), np.float32)
        else:
            # The GloroNet's own forward pass: float32 logits whatever the
            # dtype policy (rows it cannot certify come back non-finite).
            logits = self.predict(x, batch_size=batch_size, verbose=0)[:, : self.num_classes]
        return certificates.certified_radius(logits, margin_lipschitz)

    # ----------------------------------------- Keras API with soundness

    def compile(self, optimizer="adam", loss="sparse_crossentropy", metrics=None, **kwargs):
        """`keras.Model.compile`, also taking gloro's shorthands.

        Args:
            optimizer: as for Keras.
            loss: a `gloro.losses` shorthand (`"crossentropy"`,
                `"sparse_crossentropy"`, `"trades_kl.<lambda>"`, `"emma"`,
                ...) or a loss object on logits.
            metrics: list of `gloro.metrics` shorthands (`"clean_acc"`,
                `"vra"`, `"rejection_rate"`, and for relaxed robustness
                `"rtk_vra"`, `"affinity_vra"`, `"certified_k"`) or Keras
                metrics.
            **kwargs: passed to `keras.Model.compile`.

        Raises:
            ValueError: a loss that reads the outputs as probabilities (see
                `gloro.losses.get`).
        """
        if metrics is not None:
            metrics = [gloro_metrics.get(m) for m in metrics]
        super().compile(optimizer=optimizer, loss=losses.get(loss), metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a loaded model (Keras skips this for custom `compile`)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """`keras.Model.compute_loss`; a loss that reads the margin constants
        (`gloro.losses.Emma`) gets those of the forward pass that gave
        `y_pred`.

        Raises:
            ValueError: an EMMA loss with no forward pass before it.
        """
        forward, self._forward_margins = self._forward_margins, None
        if not isinstance(self.loss, losses.Emma):
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if forward is None:
            raise ValueError(
                "The EMMA loss reads the margin constants of the forward pass "
                "that gave y_pred: pass the output of calling the model on x."
            )
        with self.loss.margins(*forward):
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)

    @property
    def metrics_variables(self):
        # A loss's own variables (the TRADES weight, which a callback
        # schedules) ride with the metrics' state: JAX compiles the step as a
        # pure function of that state and would otherwise bake them in.
        return super().metrics_variables + list(getattr(self.loss, "variables", ()))

    def _estimate_tensor(self):
        estimate = ops.cast(self._features_bound(lambda layer: layer.estimate()), "float32")
        head = ops.cast(self._head.kernel, "float32")
        return estimate * ops.max(lipschitz.pairwise_column_distances_ops(head))

    def _lipschitz_logs(self, value):
        return {"lipschitz": value, "epsilon": ops.convert_to_tensor(self._epsilon)}

    def _check_arrays(self, x, y=None):
        # Keras relaxes traced input shapes, so an array of the wrong shape
        # could reach the graph and fail deep inside it (on JAX, leaving the
        # model's variables emptied by the interrupted loop): check here.
        if isinstance(x, np.ndarray) or ops.is_tensor(x):
            self._check_input(x)
        if isinstance(y, np.ndarray) or ops.is_tensor(y):
            certificates.sparse_labels(y, self.num_classes)

    def fit(self, x=None, y=None, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`; adds `gloro.callbacks.LipschitzRefresh` unless
        one is given, so constants are guaranteed before each validation pass
        and frozen when `fit` returns."""
        self._check_arrays(x, y)
        callbacks = list(callbacks or [])
        if not any(isinstance(c, LipschitzRefresh) for c in callbacks):
            callbacks.append(LipschitzRefresh())
        return super().fit(x, y, *args, callbacks=callbacks, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate` with guaranteed constants."""
        self._check_arrays(x, y)
        self._ensure_frozen(trust_marks=True)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict` with guaranteed constants: `(n, m + 1)`."""
        self._check_arrays(x)
        self._ensure_frozen(trust_marks=True)
        if (isinstance(x, np.ndarray) or ops.is_tensor(x)) and x.shape[0] == 0:
            return np.zeros((0, self.num_classes + 1), np.float32)
        return super().predict(x, *args, **kwargs)

    def predict_step(self, *args, **kwargs):
        outputs = super().predict_step(*args, **kwargs)
        self._forward_margins = None
        return outputs

    def predict_on_batch(self, x):
        """`keras.Model.predict_on_batch` with guaranteed constants: `(n, m + 1)`.

        No check before the batch: the call compares the weights with their
        frozen copy anyway, and marks a mismatch with a `+inf` ⊥ on every
        row. Only then (or when a row's logits are NaN/inf) are the weights
        compared here, and the batch run again on freshly frozen constants.
        """
        if not backend.predict_runs_call_eagerly(self):
            # A compiled predict function runs `call`'s own check only when
            # it is traced.
            self._check_structure()
        outputs = super().predict_on_batch(x)
        if np.isposinf(outputs[:, -1]).any() and not self._weights_match_frozen(trust_marks=False):
            self.freeze_lipschitz()
            outputs = super().predict_on_batch(x)
        return outputs

    def test_on_batch(self, *args, **kwargs):
        self._ensure_frozen(trust_marks=True)
        return super().test_on_batch(*args, **kwargs)

    def save(self, *args, **kwargs):
        """`keras.Model.save` with the constants frozen first."""
        self._ensure_frozen(trust_marks=True)
        return super().save(*args, **kwargs)

    def export(self, filepath, *args, **kwargs):
        """`keras.Model.export` (TensorFlow SavedModel by default) with the
        constants frozen first; the `serve` endpoint returns the `m + 1`
        logits and needs no gloro to load. Needs TensorFlow installed, on
        either backend."""
        backend.require_tensorflow("GloroNet.export (TensorFlow SavedModel)")
        self._ensure_frozen(trust_marks=True)
        return super().export(filepath, *args, **kwargs)

    # ------------------------------------------------------- serialization

    def get_config(self):
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.f),
            "epsilon": self.epsilon,
            "power_iterations": self.power_iterations,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)
