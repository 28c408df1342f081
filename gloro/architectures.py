"""The GloRo paper's architectures, as plain logits models of gloro layers.

Convolutions are `(filters, kernel, stride)` with `"same"` padding; every
hidden layer is followed by the activation; weights start orthogonal; the last
`Dense` gives the logits (no softmax). Wrap the result in `gloro.GloroNet`.

| name | layers |
|---|---|
| `cnn_2C2F` | (16,4,2) (32,4,2) Dense 100 |
| `cnn_4C3F` | (32,3,1) (32,4,2) (64,3,1) (64,4,2) Dense 512, 512 |
| `cnn_6C2F` | (32,3,1) (32,3,1) (32,4,2) (64,3,1) (64,3,1) (64,4,2) Dense 512 |
| `cnn_8C2F` | (64,3,1) (64,3,1) (64,4,2) (128,3,1) (128,4,2) (256,3,1) (256,4,2) Dense 256 |
| `mlp` | Dense 512, 256, 128 (inputs are flattened first) |

Example:

```python
f = gloro.architectures.get("cnn_2C2F", input_shape=(28, 28, 1), num_classes=10)
g = gloro.GloroNet(model=f, epsilon=0.3)
```
"""

import keras

from gloro import layers

ARCHITECTURES = {
    "cnn_2C2F": ([(16, 4, 2), (32, 4, 2)], [100]),
    "cnn_4C3F": ([(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512]),
    "cnn_6C2F": (
        [(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)],
        [512],
    ),
    "cnn_8C2F": (
        [(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 4, 2), (256, 3, 1), (256, 4, 2)],
        [256],
    ),
    "mlp": ([], [512, 256, 128]),
}

ACTIVATIONS = {"minmax": layers.MinMax, "relu": layers.ReLU}


def get(name, input_shape, num_classes, activation="minmax", seed=None):
    """Builds a named architecture.

    Args:
        name: one of `ARCHITECTURES` (`"cnn_2C2F"`, `"cnn_4C3F"`,
            `"cnn_6C2F"`, `"cnn_8C2F"`, `"mlp"`).
        input_shape: shape of one input, e.g. `(28, 28, 1)`.
        num_classes: number of logits.
        activation: `"minmax"` or `"relu"`.
        seed: seed of the orthogonal initialisers.

    Returns:
        a functional `keras.Model` mapping inputs to logits.

    Raises:
        ValueError: unknown name or activation (the message lists the valid
            ones).
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    convs, denses = ARCHITECTURES[name]
    counter = iter(range(10**6))

    def init():
        return keras.initializers.Orthogonal(seed=None if seed is None else seed + next(counter))

    inputs = keras.Input(tuple(input_shape))
    z = inputs
    for filters, kernel, stride in convs:
        z = layers.Conv2D(filters, kernel, strides=stride, padding="same", kernel_initializer=init())(z)
        z = ACTIVATIONS[activation]()(z)
    z = layers.Flatten()(z)
    for units in denses:
        z = layers.Dense(units, kernel_initializer=init())(z)
        z = ACTIVATIONS[activation]()(z)
    outputs = layers.Dense(num_classes, kernel_initializer=init())(z)
    return keras.Model(inputs, outputs, name=name)
