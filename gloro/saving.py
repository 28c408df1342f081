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

import json
import math
import os
import shutil
import tempfile
import zipfile

import keras
import numpy as np
from keras import ops

from gloro import backend
from gloro.model import GloroNet, check_epsilon


# What load_model accepts before it allocates anything: an input of at most
# 2**22 values per example (2048x2048x1, 1182x1182x3), and archives of at
# most 2 GiB once decompressed. The guaranteed bounds cost time and memory in
# proportion to the input's size, so a small file declaring a huge input
# would otherwise take minutes and gigabytes before anything is refused.
MAX_INPUT_SIZE = 2**22
MAX_ARCHIVE_BYTES = 2**31


def _check_declared_sizes(path, max_input_size, max_archive_bytes):
    """Refuses a `.keras` file whose declared sizes exceed the limits, from
    its zip directory and its config, before anything is built."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"Cannot load {path!r}: it is not a readable .keras model file ({error}).") from error
    with archive:
        size = sum(item.file_size for item in archive.infolist())
        if size > max_archive_bytes:
            raise ValueError(
                f"{path!r} decompresses to {size} bytes, more than the {max_archive_bytes} "
                "gloro.load_model accepts (max_archive_bytes)."
            )
        try:
            config = json.loads(archive.read("config.json"))
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"Cannot load {path!r}: it is not a readable .keras model file "
                f"(no readable config.json: {error})."
            ) from error
    for shape in _declared_shapes(config):
        values = math.prod(d for d in shape[1:] if isinstance(d, int))
        if values > max_input_size:
            raise ValueError(
                f"{path!r} declares an input of shape {tuple(shape[1:])} ({values} values per example), "
                f"more than the {max_input_size} gloro.load_model accepts (max_input_size)."
            )


def _declared_shapes(config):
    """Every input shape a Keras config declares, at any depth."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key in ("batch_shape", "batch_input_shape") and isinstance(value, list):
                yield value
            else:
                yield from _declared_shapes(value)
    elif isinstance(config, list):
        for value in config:
            yield from _declared_shapes(value)


def load_model(path, verify=True, max_input_size=MAX_INPUT_SIZE, max_archive_bytes=MAX_ARCHIVE_BYTES):
    """Loads a `GloroNet` saved with `g.save("m.keras")`.

    Args:
        path: path of a `.keras` file.
        verify: recompute the guaranteed constants now and refuse the file
            if its stored constants are lower; with False, they are
            recomputed before the first certificate instead, and a file
            with lowered constants is not noticed (but is not trusted).
        max_input_size: refuse a model whose declared input has more values
            per example, before building it.
        max_archive_bytes: refuse a file whose members decompress to more
            bytes, before reading them.

    Returns:
        the `GloroNet`, ready to predict and certify.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable `.keras` GloroNet, exceeds
            the size limits, its stored epsilon is negative or not finite,
            or its constants are lower than its weights prove.

    Example:

    ```python
    g = gloro.load_model("runs/fashion_mnist_cnn_2C2F/model.keras")
    ```
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model file at {path!r}.")
    _check_declared_sizes(path, max_input_size, max_archive_bytes)
    # Keras extracts a file's assets into a fresh temporary folder and
    # leaves it behind when loading fails; every temporary folder of this
    # load goes into one that is removed afterwards. (tempfile's folder is
    # process-wide: loads in other threads meanwhile use it too.)
    scratch = tempfile.mkdtemp(prefix="gloro-load-")
    previous, tempfile.tempdir = tempfile.tempdir, scratch
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except Exception as error:
        raise ValueError(
            f"Cannot load {path!r}: it is not a readable .keras model file "
            f"({type(error).__name__}: {error})."
        ) from error
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(scratch, ignore_errors=True)
    if not isinstance(model, GloroNet):
        raise ValueError(
            f"{path!r} holds a {type(model).__name__}, not a GloroNet; wrap the "
            "network with gloro.GloroNet(model=..., epsilon=...) to certify it."
        )
    if verify:
        _verify_constants(model, path)
    return model


def _verify_constants(model, path):
    try:
        check_epsilon(model.epsilon)
    except ValueError as error:
        raise ValueError(
            f"{path!r} stores an invalid epsilon ({error}); the file is corrupted or was edited."
        ) from error
    stored = ops.convert_to_numpy(model._margin_lipschitz).copy()
    # Guaranteed bounds only: converging the file's power-iteration vectors
    # (estimates for training, never certificates) could take thousands of
    # iterations on a hostile file.
    proven = model._freeze(converge=False)
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
