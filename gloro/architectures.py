"""The GloRo paper's architectures and LiResNet, as plain logits models of
gloro layers.

Convolutions are `(filters, kernel, stride)` with `"same"` padding; every
hidden layer is followed by the activation; weights start orthogonal; the last
`Dense` gives the logits (no softmax). Wrap the result in `gloro.GloroNet`.

| name | layers |
|---|---|
| `cnn_2C2F` | (16,4,2) (32,4,2) Dense 100 |
| `cnn_4C3F` | (32,3,1) (32,4,2) (64,3,1) (64,4,2) Dense 512, 512 |
| `cnn_6C2F` | (32,3,1) (32,3,1) (32,4,2) (64,3,1) (64,3,1) (64,4,2) Dense 512 |
| `cnn_8C2F` | (64,3,1) (64,3,1) (64,4,2) (128,3,1) (128,4,2) (256,3,1) (256,4,2) Dense 256 |
| `liresnet` | stem (width,3,1); `depth` x `LiResNetBlock(3)`; neck (2 width,4,4) Dense 512 |
| `mlp` | Dense 512, 256, 128 (inputs are flattened first) |

`liresnet` (Hu et al., NeurIPS 2023) takes two options, `depth` (default 6)
and `width` (default 64); its blocks `x -> conv(x; I + W) + b` start as the
identity (`W = 0`) rather than orthogonal, and are bounded as one operator
each. The other architectures take no options.

Example:

```python
f = gloro.architectures.get("cnn_2C2F", input_shape=(28, 28, 1), num_classes=10)
g = gloro.GloroNet(model=f, epsilon=0.3)
r = gloro.architectures.get("liresnet", (32, 32, 3), 10, depth=12, width=128)
```
"""

import keras

from gloro import layers

# name -> (convolutions, dense layers) of the plain chains.
CHAINS = {
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

# Hidden units of LiResNet's dense layer, between the neck and the logits.
LIRESNET_DENSE_UNITS = 512


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")


def _orthogonal(seed):
    """A function returning a fresh orthogonal initialiser per call, each
    with its own seed derived from `seed` (None: unseeded)."""
    counter = iter(range(10**6))

    def init():
        return keras.initializers.Orthogonal(seed=None if seed is None else seed + next(counter))

    return init


def _chain(name, input_shape, num_classes, activation="minmax", seed=None):
    _check_activation(activation)
    convs, denses = CHAINS[name]
    init = _orthogonal(seed)
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


def liresnet(input_shape, num_classes, depth=6, width=64, activation="minmax", seed=None):
    """Builds a LiResNet: a residual network whose blocks are bounded tightly.

    Layers, each but the last followed by the activation: a stem
    `Conv2D(width, 3)`; `depth` blocks `LiResNetBlock(3)`
    (`x -> conv(x; I + W) + b`, which keep the shape); a neck
    `Conv2D(2 * width, 4, strides=4)` that divides the height and width by 4
    (rounding up); `Flatten`; `Dense(512)`; the logits `Dense(num_classes)`.
    Convolutions use "same" padding. The stem, neck and dense kernels start
    orthogonal; the blocks start as the identity (`W = 0`).

    Args:
        input_shape: shape of one input `(height, width, channels)`, e.g.
            `(32, 32, 3)`.
        num_classes: number of logits.
        depth: number of LiResNet blocks, an int >= 0.
        width: channels of the stem and the blocks, an int >= 1 (even for
            `"minmax"`, which pairs channels).
        activation: `"minmax"` or `"relu"`.
        seed: seed of the orthogonal initialisers.

    Returns:
        a functional `keras.Model` named `"liresnet"`, mapping inputs to
        logits.

    Raises:
        ValueError: a bad depth, width or activation (the message says which).

    Example:

    ```python
    f = gloro.architectures.liresnet((32, 32, 3), 10, depth=12, width=128)
    g = gloro.GloroNet(model=f, epsilon=36 / 255)
    ```
    """
    _check_activation(activation)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"LiResNet depth must be an int >= 0, got {depth!r}.")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"LiResNet width must be an int >= 1, got {width!r}.")
    if activation == "minmax" and width % 2:
        raise ValueError(f"LiResNet width must be even with the minmax activation (it pairs channels), got {width}.")
    init = _orthogonal(seed)
    act = ACTIVATIONS[activation]
    inputs = keras.Input(tuple(input_shape))
    z = act()(layers.Conv2D(width, 3, padding="same", kernel_initializer=init())(inputs))
    for _ in range(depth):
        z = act()(layers.LiResNetBlock(3)(z))
    z = act()(layers.Conv2D(2 * width, 4, strides=4, padding="same", kernel_initializer=init())(z))
    z = layers.Flatten()(z)
    z = act()(layers.Dense(LIRESNET_DENSE_UNITS, kernel_initializer=init())(z))
    outputs = layers.Dense(num_classes, kernel_initializer=init())(z)
    return keras.Model(inputs, outputs, name="liresnet")


# Every name `get` builds, with the options (keyword arguments) it takes.
ARCHITECTURES = {**{name: () for name in CHAINS}, "liresnet": ("depth", "width")}


def get(name, input_shape, num_classes, activation="minmax", seed=None, **options):
    """Builds a named architecture.

    Args:
        name: one of `ARCHITECTURES` (`"cnn_2C2F"`, `"cnn_4C3F"`,
            `"cnn_6C2F"`, `"cnn_8C2F"`, `"liresnet"`, `"mlp"`).
        input_shape: shape of one input, e.g. `(28, 28, 1)`.
        num_classes: number of logits.
        activation: `"minmax"` or `"relu"`.
        seed: seed of the orthogonal initialisers.
        **options: the architecture's own options: `depth` and `width` for
            `"liresnet"` (see `liresnet`); the others take none.

    Returns:
        a functional `keras.Model` mapping inputs to logits.

    Raises:
        ValueError: unknown name or activation, an option the architecture
            does not take, or a bad option value (the message says which).

    Example:

    ```python
    f = gloro.architectures.get("liresnet", (28, 28, 1), 10, depth=4, width=32)
    ```
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}.")
    unknown = sorted(set(options) - set(ARCHITECTURES[name]))
    if unknown:
        takes = f"takes only {', '.join(ARCHITECTURES[name])}" if ARCHITECTURES[name] else "takes no options"
        raise ValueError(f"Architecture {name!r} {takes}; got {', '.join(unknown)}.")
    if name == "liresnet":
        return liresnet(input_shape, num_classes, activation=activation, seed=seed, **options)
    return _chain(name, input_shape, num_classes, activation=activation, seed=seed)
