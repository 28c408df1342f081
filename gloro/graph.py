"""Lipschitz bounds of functional Keras graphs.

`LipschitzGraph(model)` reads a single-input, single-output logits model as
a graph of layers and bounds the Lipschitz constant of its *features* (the
input of the last `Dense` layer, which gives the logits) by propagating one
bound per tensor, from the input on:

* the input has bound 1;
* a layer with one input multiplies its input's bound by its own
  (`gloro.layers.layer_bound`, or the training-time estimate);
* a merge combines its inputs' bounds with the rule in
  `gloro.layers.MERGE_BOUNDS`: `Add` sums them (a weighted sum is an `Add` of
  `gloro.layers.Scaling` branches, so its weights enter as their absolute
  values), `Concatenate` takes the square root of the sum of their squares.

Each layer is checked where it stands: it must be bounded on the shape of
its input at that node (`gloro.layers.check_layer`), a merge must be one of
the exact classes of `MERGE_BOUNDS`, and `Add`, `Subtract` and `Average`
need inputs of one shape (broadcasting copies a tensor, multiplying its
contribution to the norm), `Concatenate` a feature axis.

A chain is the special case where every node has one input, and its bound is
the product of the layers' bounds. The propagation takes the per-layer value
as a function, so the same walk gives the differentiable estimate during
training (tensors) and the guaranteed bound when freezing (float64).

Example:

```python
x = keras.Input((8, 8, 4))
z = gloro.layers.Conv2D(4, 3, padding="same")(x)
z = gloro.layers.Add()([x, z])                 # residual: 1 + L(conv)
z = gloro.layers.Flatten()(z)
y = gloro.layers.Dense(10)(z)
g = LipschitzGraph(keras.Model(x, y))
g.bound(gloro.layers.layer_bound)              # bound of x -> z
```
"""

import functools
import types

import keras
import numpy as np

from gloro import backend
from gloro import layers as gloro_layers

_PLAIN = {bool, int, float, str, type(None)}
_CALLABLES = {types.FunctionType, types.BuiltinFunctionType, types.MethodType}


# Attributes that never change the map: a layer's name, and on torch the
# train/eval flag of `torch.nn.Module`, which Keras flips around each loop.
_IGNORED_ATTRIBUTES = {"name", "training"}

# The classes whose `call` `LipschitzGraph.run` calls directly in inference.
_DIRECT_CLASSES = frozenset(
    [*gloro_layers.GLORO_LAYERS, *gloro_layers.KERAS_LAYER_BOUNDS, *gloro_layers.MERGE_BOUNDS]
)


def _plain_value(value):
    """A layer attribute's value as something comparable, or None for the
    attributes that cannot change the map (variables, initializers, ...).
    Exact type tests: this runs on every call, and `isinstance` on Keras
    variables is slow."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind in (tuple, list):
        return tuple(value) if all(type(v) in _PLAIN for v in value) else None
    if kind in _CALLABLES:
        return ("object", id(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, keras.layers.Layer):
        return ("object", id(value))
    return None


@functools.lru_cache(maxsize=1024)
def _settings_keys(keys):
    """The public attribute names among a layer's `keys` (a tuple, in
    order), less the ignored ones. Cached by the whole tuple: a layer's
    attributes rarely change, and building the tuple is one C-level copy,
    where filtering some 70 names in Python on every call was most of the
    structure check's cost."""
    return tuple(key for key in keys if key[0] != "_" and key not in _IGNORED_ATTRIBUTES)


def layer_state(layer):
    """What a layer computes, beyond its weights' values, as a comparable
    tuple: its class, its public settings (numbers, strings, functions and
    layers by identity, such as `activation`, `padding`, `scale`, or a `call`
    set on the instance), its quantization and LoRA state, and the identity
    of each of its variables (so a variable added later shows).

    Args:
        layer: a Keras layer.

    Returns:
        a tuple that compares equal as long as none of these changed.
    """
    attributes = vars(layer)
    settings = []
    for key in _settings_keys(tuple(attributes)):
        plain = _plain_value(attributes[key])
        # Attributes holding None or other objects cannot change the map
        # (Keras adds some during export); a value that becomes None still
        # shows, as a missing key.
        if plain is not None:
            settings.append((key, plain))
    return (
        type(layer),
        tuple(settings),
        getattr(layer, "quantization_mode", None),
        bool(getattr(layer, "lora_enabled", False)),
        tuple(id(v) for v in layer._trainable_variables + layer._non_trainable_variables),
    )


def _calls_directly(layer):
    """Whether `LipschitzGraph.run` may call the layer's `call` itself:
    a class gloro knows (none makes or reads masks), no activity
    regularizer and no torch backward hook (which only `__call__` runs)."""
    return (
        type(layer) in _DIRECT_CLASSES
        and layer.activity_regularizer is None
        and not backend.runs_backward_hooks(layer)
    )


def _cast_inputs(layer, args):
    """The positional arguments as `Layer.__call__` converts them: each
    tensor (also inside a merge's list) to the layer's input dtype where its
    policy says so."""
    if not layer._convert_input_args:
        return args
    policy, autocast, dtype = layer.dtype_policy, layer.autocast, layer.input_dtype
    return [
        [policy.convert_input(t, autocast, dtype) for t in arg] if isinstance(arg, (list, tuple))
        else policy.convert_input(arg, autocast, dtype)
        for arg in args
    ]


def _merge_rule(layer):
    if type(layer) in gloro_layers.MERGE_BOUNDS:
        return gloro_layers.MERGE_BOUNDS[type(layer)]
    if isinstance(layer, tuple(gloro_layers.MERGE_BOUNDS)):
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) subclasses a Keras merge; "
            "gloro bounds only the exact classes "
            f"{', '.join(c.__name__ for c in gloro_layers.MERGE_BOUNDS)}, since a "
            "subclass may compute something else."
        )
    return None


def _feature_shape(tensor):
    return tuple(tensor.shape[1:])


def _check_merge(layer, sources, model_name):
    shapes = [_feature_shape(source) for source in sources]
    if type(layer) is keras.layers.Concatenate:
        rank = len(shapes[0]) + 1
        if layer.axis % rank == 0:
            raise ValueError(
                f"Layer '{layer.name}' of '{model_name}' concatenates along the batch "
                "axis, which mixes examples; concatenate along a feature axis."
            )
        return
    if any(None in shape for shape in shapes) or len(set(shapes)) != 1:
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) of '{model_name}' merges "
            f"inputs of shapes {shapes}. Broadcasting copies an input, which "
            "multiplies its share of the Lipschitz bound; gloro needs inputs of "
            "one fully known shape. Reshape or tile them explicitly."
        )


class LipschitzGraph:
    """The layers of a logits model, ordered for bound propagation.

    Args:
        model: a built `keras.Model` (functional or `Sequential`) with one
            input and one output, whose output layer is a `Dense` layer.

    Attributes:
        head: the output `Dense` layer (the logits).
        layers: the layers between the input and the head that have a bound
            of their own (all but the merges), each after the layers it reads
            from.

    Raises:
        ValueError: several inputs or outputs, an unbuilt `Sequential`, a
            nested model, a layer used at several places, or a layer with
            several inputs that is not a known merge; the message names the
            layer.
    """

    def __init__(self, model):
        try:
            inputs, outputs = model.inputs, model.outputs
        except (AttributeError, ValueError):
            inputs = outputs = None
        if not inputs or not outputs:
            raise ValueError(
                f"Model '{model.name}' has no defined input; build it on a "
                "keras.Input (e.g. keras.Sequential([keras.Input(shape), ...]))."
            )
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"GloroNet needs a model with one input and one output; '{model.name}' "
                f"has {len(inputs)} inputs and {len(outputs)} outputs."
            )
        self._model_name = model.name
        self._input = inputs[0]
        self._output = outputs[0]
        self._slots = {id(self._input): 0}
        # Each step: (layer, slots of its inputs, merge rule or None).
        self._steps = []
        # The nodes that `run` calls, each after those it reads from.
        self._nodes = []
        self._seen = {}
        self._input_shapes = {}
        head_node = self._node(outputs[0])
        self.head = head_node.operation
        if isinstance(self.head, keras.layers.InputLayer):
            raise ValueError(f"Model '{model.name}' has no layers.")
        head_inputs = head_node.input_tensors
        if len(head_inputs) != 1:
            raise ValueError(
                f"The last layer '{self.head.name}' ({type(self.head).__name__}) "
                f"of '{model.name}' must be a Dense layer producing logits."
            )
        self._features = self._visit(head_inputs[0])
        self.layers = [layer for layer, _, rule in self._steps if rule is None]
        self._is_chain = all(rule is None for _, _, rule in self._steps)
        self._nodes.append(head_node)
        self._all_layers = [layer for layer, _, _ in self._steps] + [self.head]

    def _node(self, tensor):
        operation, node_index, _ = tensor._keras_history
        return operation._inbound_nodes[node_index]

    def _visit(self, tensor):
        """The slot holding `tensor`'s bound, adding the steps it needs."""
        slot = self._slots.get(id(tensor))
        if slot is not None:
            return slot
        node = self._node(tensor)
        layer = node.operation
        if isinstance(layer, keras.layers.InputLayer):
            raise ValueError(
                f"Model '{self._model_name}' reads a second input '{layer.name}'; "
                "GloroNet needs a single-input model."
            )
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"Layer '{layer.name}' of '{self._model_name}' is a nested model; "
                "build the network as one flat graph of layers for GloroNet."
            )
        if id(layer) in self._seen:
            raise ValueError(
                f"Layer '{layer.name}' of '{self._model_name}' is used at several "
                "places in the graph. GloroNet bounds each layer where it is "
                "used once; use a separate layer for each place."
            )
        rule = _merge_rule(layer)
        sources = node.input_tensors
        if rule is None and len(sources) != 1:
            raise ValueError(
                f"Layer '{layer.name}' ({type(layer).__name__}) of "
                f"'{self._model_name}' merges {len(sources)} tensors, and gloro "
                "knows no Lipschitz bound for that merge. Use "
                f"{', '.join(c.__name__ for c in gloro_layers.MERGE_BOUNDS)} "
                "(from gloro.layers)."
            )
        if rule is None:
            self._input_shapes[id(layer)] = gloro_layers.check_layer(layer, _feature_shape(sources[0]))
        else:
            _check_merge(layer, sources, self._model_name)
        input_slots = [self._visit(source) for source in sources]
        self._seen[id(layer)] = True
        self._steps.append((layer, input_slots, rule))
        self._nodes.append(node)
        # Several outputs of one layer share its bound.
        for output in node.output_tensors:
            self._slots[id(output)] = len(self._steps)
        return self._slots[id(tensor)]

    def run(self, x, training):
        """The model's output on `x`, computed as Keras' functional `call`
        computes it: the input converted to the model's input dtype, then
        each layer called on the arguments its node recorded, with
        `training` where its `call` takes it.

        The walk is this graph's own (every node feeds the output), which
        spares the functional call's generic handling of nested inputs and
        outputs. Outside training, the layers of the classes gloro knows are
        called through their `call` (their inputs cast as `__call__` casts
        them): what `__call__` adds around it there (masks, an activity
        regularizer's loss, a distribution's layouts, torch's backward hooks;
        a layer with one of these is called through `__call__`) changes no
        output, and costs about 0.4 ms per layer and call on eager torch
        (3 to 4 ms per batch of 512 on cnn_2C2F, as much as its
        convolutions).

        Args:
            x: a batch of the model's input, of its rank.
            training: bool or None, passed to the layers that take it.

        Returns:
            the output tensor.
        """
        tensors = {id(self._input): keras.ops.convert_to_tensor(x, dtype=self._input.dtype)}
        direct = not training and keras.distribution.distribution() is None
        for node in self._nodes:
            args, kwargs = node.arguments.fill_in(tensors)
            layer = node.operation
            if direct and _calls_directly(layer):
                # `__call__` passes `training` only to a `call` that takes it.
                if training is not None and layer._call_has_context_arg.get("training", False):
                    kwargs["training"] = training
                outputs = layer.call(*_cast_inputs(layer, args), **kwargs)
            else:
                if training is not None and "training" in layer._call_context_args:
                    kwargs["training"] = training
                outputs = layer(*args, **kwargs)
            for reference, value in zip(node.outputs, keras.tree.flatten(outputs)):
                tensors[id(reference)] = value
        return tensors[id(self._output)]

    def guaranteed_bound(self, layer):
        """`gloro.layers.layer_bound` of one of `layers`, on the shape of its
        input in this graph (not the shape it remembers)."""
        return gloro_layers.layer_bound(layer, self._input_shapes[id(layer)])

    def state(self):
        """`layer_state` of every layer, the merges and the head included:
        equal for as long as the network computes the same function of its
        weights."""
        return tuple(layer_state(layer) for layer in self._all_layers)

    def bound(self, layer_value):
        """Propagates per-layer bounds to the features.

        Args:
            layer_value: function of a layer (never a merge, the input or the
                head) returning its bound, a float or a scalar tensor.

        Returns:
            the bound of the map from the input to the features, of the type
            that `layer_value` returns (a float when every value is one).
        """
        values = [1.0]
        for layer, input_slots, rule in self._steps:
            inputs = [values[slot] for slot in input_slots]
            if rule is None:
                values.append(layer_value(layer) * inputs[0])
            else:
                values.append(rule(inputs))
        return values[self._features]

    def vector_bound(self, layers, values, layer_value):
        """`bound`, with the values of some layers in one tensor.

        On a chain (no merges) the bound is the product of every layer's
        value, taken over the tensor in one operation rather than one per
        layer: what a compiled training step launches grows with each
        per-layer operation.

        Args:
            layers: some of `self.layers`.
            values: `(len(layers),)` tensor, their values in order.
            layer_value: function giving the value of the other layers, a
                float.

        Returns:
            scalar tensor: the bound of the map from the input to the
            features.
        """
        if self._is_chain:
            given = {id(layer) for layer in layers}
            fixed = float(np.prod([layer_value(l) for l in self.layers if id(l) not in given]))
            # exp of a sum of logs rather than `prod`, whose gradient XLA
            # compiles to a cascade of partial products (six kernels for
            # seven values, against two). A zero stays (nearly) zero; its
            # own gradient is then zero, as `gloro.lipschitz.power_step`'s
            # estimate of a zero kernel already has.
            tiny = float(np.finfo(np.float32).tiny)
            product = keras.ops.exp(keras.ops.sum(keras.ops.log(keras.ops.maximum(values, tiny))))
            return product if fixed == 1.0 else product * fixed
        index = {id(layer): i for i, layer in enumerate(layers)}
        return self.bound(lambda l: values[index[id(l)]] if id(l) in index else layer_value(l))

