"""Loading GloRo Nets with clear errors and re-verified certificates.

`keras.models.load_model` already restores a `GloroNet` from a `.keras` file
(with `gloro` imported) in Keras' safe mode, which never runs code from the
file. Whichever way a GloroNet's variables arrive (this module, Keras'
loader, `set_weights`, `load_weights`), its stored Lipschitz constants are
treated as claims: nothing is certified until they are recomputed from the
weights and the graph (the graph rebuilt from the file's config, with every
layer bounded on the shape at its node, so an edited `build_config` cannot
shrink a bound). `load_model` adds what a certifier needs on top: a clear
`ValueError` for a missing, truncated, corrupted or unrelated file, a stored
epsilon that is not a valid radius, or stored constants below what the
weights prove (a file that was edited).
"""

import os

import keras
import numpy as np
from keras import ops

from gloro import backend
from gloro.model import GloroNet


def load_model(path, verify=True):
    """Loads a `GloroNet` saved with `g.save("m.keras")`.

    Args:
        path: path of a `.keras` file.
        verify: recompute the guaranteed constants now and refuse the file
            if its stored constants are lower; with False, they are
            recomputed before the first certificate instead, and a file
            with lowered constants is not noticed (but is not trusted).

    Returns:
        the `GloroNet`, ready to predict and certify.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable `.keras` GloroNet, its
            stored epsilon is negative or not finite, or its constants are
            lower than its weights prove.

    Example:

    ```python
    g = gloro.load_model("runs/fashion_mnist_cnn_2C2F/model.keras")
    ```
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model file at {path!r}.")
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except Exception as error:
        raise ValueError(
            f"Cannot load {path!r}: it is not a readable .keras model file "
            f"({type(error).__name__}: {error})."
        ) from error
    if not isinstance(model, GloroNet):
        raise ValueError(
            f"{path!r} holds a {type(model).__name__}, not a GloroNet; wrap the "
            "network with gloro.GloroNet(model=..., epsilon=...) to certify it."
        )
    if verify:
        _verify_constants(model, path)
    return model


def _verify_constants(model, path):
    epsilon = model.epsilon
    if not (np.isfinite(np.float32(epsilon)) and epsilon >= 0):
        raise ValueError(
            f"{path!r} stores epsilon {epsilon}, which is not a finite radius >= 0; "
            "the file is corrupted or was edited."
        )
    stored = ops.convert_to_numpy(model._margin_lipschitz).copy()
    proven = model.freeze_lipschitz()
    # Same weights, same computation: equal up to float64 rounding in the
    # SVD/FFT, which the safety factor dwarfs.
    if np.any(stored < proven * (1 - 1e-6)):
        raise ValueError(
            f"{path!r} stores Lipschitz constants below what its weights "
            "prove; the file is corrupted or was edited. Refusing to "
            "certify with it."
        )


def load_saved_model(path):
    """Loads an exported GloroNet SavedModel (no gloro needed to serve it).

    Args:
        path: the directory written by `g.export(path)`.

    Returns:
        the loaded object; `obj.serve(x)` returns the `m + 1` logits.

    Raises:
        FileNotFoundError: no such directory.
        ValueError: not a readable SavedModel with a `serve` endpoint.
        ImportError: TensorFlow is not installed.
    """
    tf = backend.require_tensorflow("gloro.load_saved_model")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No SavedModel directory at {path!r}.")
    try:
        served = tf.saved_model.load(path)
    except Exception as error:
        raise ValueError(
            f"Cannot load the SavedModel at {path!r} ({type(error).__name__}: {error})."
        ) from error
    if not hasattr(served, "serve"):
        raise ValueError(f"The SavedModel at {path!r} has no 'serve' endpoint.")
    return served
