"""Input pipelines for image classification.

`load()` returns an unbatched `tf.data.Dataset` of `(image, label)` pairs,
with float32 images in `[0, 1]` of shape `(H, W, C)` and int64 scalar labels,
together with a `DatasetInfo`. `pipeline()` turns such a dataset into
cached, shuffled, batched, augmented and prefetched batches.

Lookup order of `load(name, split, data_dir)`:

1. The data directory is the `data_dir` argument, else the `GLORO_DATA_DIR`
   environment variable, else none (skip to step 3).
2. Local files in the data directory, first match wins. `<name>` is tried as
   given and with `_` replaced by `-` (Debian spells Fashion-MNIST
   `fashion-mnist`):
   a. `<data_dir>/<name>/` holding MNIST-format IDX files
      (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
      `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally
      gzipped as `*.gz`); split `"train"` reads `train-*`, `"test"` reads
      `t10k-*`. This is the layout of Debian's `dataset-fashion-mnist`
      package (`/usr/share/datasets/fashion-mnist`).
   b. `<data_dir>/<name>/<split>.npz` files, each with arrays `x` and `y`;
      every `.npz` file in the folder is a split.
   c. `<data_dir>/<name>.npz` with arrays `x_train`, `y_train`, `x_test`,
      `y_test` (the layout of `keras.datasets` npz files).
   d. IDX files as in (a) directly in `<data_dir>/`.
   Local images must be uint8 arrays of shape `(N, H, W)` or `(N, H, W, C)`;
   they are held in memory as uint8 and scaled to float32 lazily.
   A dataset tensorflow-datasets knows (`KNOWN_DATASETS`: `mnist`,
   `fashion_mnist`, `cifar10`, ...) must have its image shape in every
   local split, and its labels must be below its number of classes: the
   name must match the files. For any other name, `num_classes` is one more
   than the largest label over all local splits, and every class below it
   must occur in some split (a stray label such as 255 among labels 0 to 9
   is refused rather than read as a 256-class problem).
3. `tensorflow_datasets.load(name, split=split, data_dir=data_dir)`, which
   reads a prepared copy or downloads and prepares one. When the data is not
   prepared yet, the download server is probed first, because offline the
   tensorflow-datasets downloader retries for minutes before giving up.

If none of these provides the dataset, a `FileNotFoundError` explains how to
make it available.

Splits are `"train"`, `"test"` (or any split name of a tfds dataset or of a
folder of per-split `.npz` files), optionally sliced in tensorflow-datasets
syntax: `"train[:1000]"`, `"train[-10%:]"`, `"test[25%:75%]"`. Percentages
are rounded to the closest example, as tensorflow-datasets does.

The pipelines are `tf.data`, which Keras accepts on every backend, so this
module needs TensorFlow even when Keras runs on JAX; without it, importing
the module raises an `ImportError` that says what to install.
"""

import dataclasses
import functools
import gzip
import math
import os
import re
import socket
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gloro import backend

# tf.data feeds Keras on every backend; only this module needs TensorFlow.
tf = backend.require_tensorflow("gloro.data (tf.data input pipelines)")

AUGMENTATIONS = ("none", "standard", "all")

_ENV_DATA_DIR = "GLORO_DATA_DIR"

# Keys are gloro split names, values the file prefixes used by MNIST IDX sets.
_IDX_PREFIXES = {"train": "train", "test": "t10k"}
_IDX_UNSIGNED_BYTE = 0x08

# tensorflow-datasets fetches prepared datasets from Google Cloud Storage
# first, so this host being unreachable means the download cannot work.
_TFDS_DOWNLOAD_HOST = ("storage.googleapis.com", 443)
_NETWORK_TIMEOUT_S = 5.0

_SPLIT_RE = re.compile(
    r"^(?P<base>[\w-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$"
)

_MAX_SHUFFLE_BUFFER = 10_000
# Translation for 1-channel images, in pixels, in each direction.
_TRANSLATE_PIXELS = 2
# "all": zoom crops a window of this fraction of height and width, up to 1.
_MIN_ZOOM_SCALE = 0.8
# "all": contrast factor is drawn from [1 - delta, 1 + delta].
_CONTRAST_DELTA = 0.2


# Image shape and number of classes of the tensorflow-datasets sets that
# local files most often stand in for; local files under one of these names
# must agree with them.
KNOWN_DATASETS = {
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "kmnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
    "svhn_cropped": ((32, 32, 3), 10),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static description of a loaded dataset split.

    Attributes:
        name: dataset name as passed to `load()`.
        split: split as passed to `load()`, including any slice.
        num_classes: number of label classes.
        input_shape: image shape `(height, width, channels)`.
        num_examples: number of examples in the (sliced) split.
    """

    name: str
    split: str
    num_classes: int
    input_shape: tuple[int, int, int]
    num_examples: int


def load(name, split, data_dir=None):
    """Loads one split of an image classification dataset.

    See the module docstring for where the data is looked up.

    Args:
        name: dataset name, e.g. `"mnist"`, `"fashion_mnist"`, `"cifar10"`.
        split: split name, optionally sliced, e.g. `"train"`, `"test"`,
            `"train[:10%]"`, `"train[:5000]"`.
        data_dir: folder with local dataset files or tensorflow-datasets
            data. Defaults to the `GLORO_DATA_DIR` environment variable.

    Returns:
        A tuple `(dataset, info)`: an unbatched `tf.data.Dataset` of
        `(image, label)` with float32 images in `[0, 1]` of shape
        `info.input_shape` and int64 scalar labels, and a `DatasetInfo`.

    Raises:
        ValueError: for an unknown split of a local dataset, a malformed
            split, or corrupt or inconsistent local files (the message names
            the file).
        FileNotFoundError: if the dataset is neither found locally nor
            available through tensorflow-datasets, or if a local IDX images
            file lacks its labels file or vice versa.

    Example:

    >>> ds, info = load("fashion_mnist", "train",
    ...                 data_dir="/usr/share/datasets/fashion-mnist")
    >>> info.input_shape, info.num_classes, info.num_examples
    ((28, 28, 1), 10, 60000)
    """
    if data_dir is None:
        data_dir = os.environ.get(_ENV_DATA_DIR) or None
    searched = []
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        local = _find_local(name, data_dir, searched)
        if local is not None:
            return _load_local(name, split, *local)
    return _load_tfds(name, split, data_dir, searched)


def pipeline(
    ds, batch_size, training, augmentation="none", seed=None, cache=True
):
    """Batches a dataset from `load()` for training or evaluation.

    The steps are: cache (if `cache`) -> shuffle (if `training`) -> batch ->
    augment (if `training`) -> prefetch. Augmentations act on whole batches,
    draw independent parameters per image, and keep values in `[0, 1]`:

    - `"none"`: no augmentation.
    - `"standard"`: 3-channel images are flipped left-right with
      probability 1/2. Images with another number of channels (digits,
      clothing) are instead translated by a random whole number of pixels in
      `[-2, 2]` along each axis (zero padding by 2 px, then a random crop back
      to the original size); they are not flipped.
    - `"all"`: first a random zoom (a window spanning the same random
      fraction, 80% to 100%, of the image height and width, at a random
      position, resized back to full size bilinearly), then
      `"standard"`, then a random contrast change (each channel is scaled
      about its per-image mean by a factor in `[0.8, 1.2]`) and clipping to
      `[0, 1]`.

    Args:
        ds: unbatched dataset of `(image, label)` as returned by `load()`.
            Augmentation needs a fully known image shape `(H, W, C)`.
        batch_size: positive int. The last batch may be smaller.
        training: whether to shuffle and augment. With `training=False`,
            `augmentation` is only validated.
        augmentation: one of `"none"`, `"standard"`, `"all"`.
        seed: int seed making shuffling and augmentation reproducible; each
            epoch still gets a new order and new augmentations. `None` for
            nondeterministic.
        cache: whether to cache the decoded examples in memory (float32:
            about 190 MB for Fashion-MNIST train, 615 MB for CIFAR-10 train).

    Returns:
        A batched, prefetched `tf.data.Dataset` of `(images, labels)`.

    Raises:
        ValueError: for a `batch_size` that is not a positive int, or an
            unknown `augmentation`.

    Example:

    >>> ds, info = load("mnist", "train", data_dir="/data")
    >>> train = pipeline(ds, batch_size=256, training=True,
    ...                  augmentation="standard", seed=0)
    >>> model.fit(train, epochs=10)
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size <= 0
    ):
        raise ValueError(
            f"batch_size must be a positive integer, got {batch_size!r}."
        )
    if augmentation not in AUGMENTATIONS:
        raise ValueError(
            f"Unknown augmentation {augmentation!r}; expected one of "
            f"{', '.join(repr(a) for a in AUGMENTATIONS)}."
        )
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(
            _shuffle_buffer_size(ds), seed=seed, reshuffle_each_iteration=True
        )
    ds = ds.batch(int(batch_size))
    if training and augmentation != "none":
        ds = _augment(ds, augmentation, seed)
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- local files


@dataclasses.dataclass(frozen=True)
class _LocalSplit:
    # Returns validated (images (N, H, W, C) uint8, labels (N,) int64).
    read: Callable[[], tuple[np.ndarray, np.ndarray]]
    # Returns validated labels only, to count classes without reading images.
    read_labels: Callable[[], np.ndarray]


def _find_local(name, data_dir, searched):
    """Returns `(location, {split: _LocalSplit})`, or None if not found.

    Appends every location looked at to `searched`, for error messages.
    """
    for folder_name in dict.fromkeys([name, name.replace("_", "-")]):
        folder = data_dir / folder_name
        searched.append(str(folder) + os.sep)
        splits = _idx_splits(folder)
        if splits:
            return str(folder), splits
        npz_files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
        if npz_files:
            return str(folder), {
                path.stem: _npz_split(path, "x", "y") for path in npz_files
            }
        path = data_dir / f"{folder_name}.npz"
        searched.append(str(path))
        if path.is_file():
            return str(path), _npz_splits(path)
    searched.append(str(data_dir) + os.sep)
    splits = _idx_splits(data_dir)
    if splits:
        return str(data_dir), splits
    return None


def _npz_split(path, x_key, y_key):
    return _LocalSplit(
        read=functools.partial(_read_npz, path, x_key, y_key),
        read_labels=functools.partial(_read_npz_labels, path, y_key),
    )


def _npz_splits(path):
    """Returns `{split: _LocalSplit}` for the `x_<split>, y_<split>` pairs."""
    with _open_npz(path) as arrays:
        keys = set(arrays.files)
    splits = {}
    for x_key in sorted(keys):
        split, y_key = x_key[2:], f"y_{x_key[2:]}"
        if x_key.startswith("x_") and y_key in keys:
            splits[split] = _npz_split(path, x_key, y_key)
    if not splits:
        raise ValueError(
            f"{path} holds no x_<split>, y_<split> array pairs (such as "
            f"x_train, y_train); it holds {sorted(keys)}."
        )
    return splits


def _idx_splits(folder):
    """Returns `{split: _LocalSplit}` for the IDX files in `folder`."""
    splits = {}
    for split, prefix in _IDX_PREFIXES.items():
        images = _find_idx_file(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            splits[split] = _LocalSplit(
                read=functools.partial(_read_idx_pair, images, labels),
                read_labels=functools.partial(_read_idx_labels, labels),
            )
        elif images or labels:
            missing = "labels" if images else "images"
            raise FileNotFoundError(
                f"Found {images or labels} but no matching {prefix}-{missing}"
                f" IDX file next to it."
            )
    return splits


def _find_idx_file(folder, stem):
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _read_idx(path, ndim):
    """Parses an unsigned-byte IDX file into an array of `ndim` dimensions."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"Cannot decompress IDX file {path}: {err}. The file is "
                f"truncated or corrupt."
            ) from err
    # Header: two zero bytes, a type code, the number of dimensions, then one
    # big-endian uint32 per dimension.
    header_size = 4 + 4 * ndim
    if len(raw) < header_size or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path} is not a valid IDX file: bad magic number or truncated "
            f"header."
        )
    if raw[2] != _IDX_UNSIGNED_BYTE or raw[3] != ndim:
        raise ValueError(
            f"{path}: expected {ndim}-D unsigned-byte IDX data (type 0x08), "
            f"found {raw[3]}-D data of type 0x{raw[2]:02x}."
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected_size = header_size + math.prod(shape)
    if len(raw) != expected_size:
        raise ValueError(
            f"{path}: header announces shape {shape} ({expected_size} bytes) "
            f"but the file has {len(raw)} bytes. The file is truncated or "
            f"corrupt."
        )
    return np.frombuffer(raw, np.uint8, offset=header_size).reshape(shape)


def _read_idx_labels(path):
    return _as_labels(_read_idx(path, 1), str(path))


def _read_idx_pair(images_path, labels_path):
    images = _read_idx(images_path, 3)
    labels = _read_idx_labels(labels_path)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} "
            f"holds {len(labels)} labels."
        )
    return images[..., np.newaxis], labels


def _open_npz(path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"Cannot read npz file {path}: {err}") from err


def _get_npz_array(arrays, key, path):
    if key not in arrays.files:
        raise ValueError(
            f"{path} has no array {key!r}; it holds {sorted(arrays.files)}."
        )
    return arrays[key]


def _read_npz_labels(path, y_key):
    with _open_npz(path) as arrays:
        labels = _get_npz_array(arrays, y_key, path)
    return _as_labels(labels, f"{path}[{y_key!r}]")


def _read_npz(path, x_key, y_key):
    with _open_npz(path) as arrays:
        images = _get_npz_array(arrays, x_key, path)
        labels = _get_npz_array(arrays, y_key, path)
    source = f"{path}[{x_key!r}]"
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"{source} must be a uint8 array of shape (N, H, W) or "
            f"(N, H, W, C), got {images.dtype} array of shape {images.shape}."
        )
    labels = _as_labels(labels, f"{path}[{y_key!r}]")
    if len(images) != len(labels):
        raise ValueError(
            f"{source} holds {len(images)} images but {path}[{y_key!r}] "
            f"holds {len(labels)} labels."
        )
    if images.ndim == 3:
        images = images[..., np.newaxis]
    return images, labels


def _as_labels(labels, source):
    # keras.datasets stores some label arrays as (N, 1).
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if (
        labels.ndim != 1
        or not np.issubdtype(labels.dtype, np.integer)
        or (labels.size and labels.min() < 0)
    ):
        raise ValueError(
            f"{source} must hold non-negative integer labels of shape (N,), "
            f"got {labels.dtype} array of shape {labels.shape}."
        )
    return labels.astype(np.int64)


def _load_local(name, split, location, splits):
    base, start, stop = _parse_split(split)
    if base not in splits:
        raise ValueError(
            f"Unknown split {split!r} for dataset {name!r} in {location}; "
            f"valid splits are {sorted(splits)} (optionally sliced, e.g. "
            f"'train[:10%]')."
        )
    images, labels = splits[base].read()
    input_shape = tuple(int(d) for d in images.shape[1:])
    num_classes = _local_num_classes(name, location, input_shape, splits)
    selection = _split_slice(split, start, stop, len(labels))
    images, labels = images[selection], labels[selection]
    info = DatasetInfo(
        name=name,
        split=split,
        num_classes=num_classes,
        input_shape=input_shape,
        num_examples=len(labels),
    )
    # Keeping uint8 in the dataset and scaling in `map` avoids a float32 copy
    # of the whole array.
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    return ds.map(_scale_image, num_parallel_calls=tf.data.AUTOTUNE), info


def _local_num_classes(name, location, input_shape, splits):
    """The number of classes of local files, checked against the labels of
    every split and, for a known dataset, against its metadata."""
    labels = {split: local.read_labels() for split, local in splits.items()}
    known = KNOWN_DATASETS.get(name.replace("-", "_"))
    if known is not None:
        shape, num_classes = known
        if input_shape != shape:
            raise ValueError(
                f"{location} holds images of shape {input_shape}, but "
                f"{name!r} has images of shape {shape}: these files are "
                f"another dataset; pass the name that matches them."
            )
        for split, split_labels in labels.items():
            if split_labels.size and split_labels.max() >= num_classes:
                raise ValueError(
                    f"The {split!r} split in {location} has label "
                    f"{int(split_labels.max())}, but {name!r} has "
                    f"{num_classes} classes (labels 0 to {num_classes - 1})."
                )
        return num_classes
    present = np.unique(np.concatenate(list(labels.values())))
    num_classes = int(present.max(initial=-1)) + 1
    if len(present) != num_classes:
        missing = sorted(set(range(num_classes)) - set(present.tolist()))
        raise ValueError(
            f"{location} has labels up to {num_classes - 1}, but no split "
            f"has label {missing[0]} ({len(missing)} of the classes below "
            f"the largest label never occur): a stray label would make a "
            f"{num_classes}-class model. Fix the labels."
        )
    return num_classes


def _parse_split(split):
    """Splits `"base[start:stop]"` into base and the two bound strings."""
    match = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if match is None:
        raise ValueError(
            f"Malformed split {split!r}; expected e.g. 'train', 'test', "
            f"'train[:1000]' or 'train[10%:20%]'."
        )
    return match["base"], match["start"], match["stop"]


def _split_slice(split, start, stop, num_examples):
    """Converts tfds-style slice bounds into a Python `slice`."""

    def to_index(bound):
        if bound is None:
            return None
        if bound.endswith("%"):
            return round(int(bound[:-1]) * num_examples / 100)
        return int(bound)

    bounds = [to_index(start), to_index(stop)]
    if any(b is not None and abs(b) > num_examples for b in bounds):
        raise ValueError(
            f"Split {split!r} is out of range for {num_examples} examples."
        )
    return slice(*bounds)


def _scale_image(image, label):
    return tf.cast(image, tf.float32) / 255.0, tf.cast(label, tf.int64)


# ------------------------------------------------------- tensorflow-datasets


def _load_tfds(name, split, data_dir, searched):
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise FileNotFoundError(
            _missing_dataset_message(name, data_dir, searched, err)
        ) from err
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            _require_network()
        ds, tfds_info = tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            as_supervised=True,
            with_info=True,
        )
    # ImportError: tfds lacks an optional dependency its downloader needs.
    except (tfds.core.DatasetNotFoundError, ImportError, OSError) as err:
        raise FileNotFoundError(
            _missing_dataset_message(name, data_dir, searched, err)
        ) from err
    image_key, label_key = tfds_info.supervised_keys
    shape = tuple(tfds_info.features[image_key].shape)
    if len(shape) != 3 or None in shape:
        raise ValueError(
            f"Dataset {name!r} has images of shape {shape}; only datasets "
            f"with a fixed (height, width, channels) shape are supported."
        )
    info = DatasetInfo(
        name=name,
        split=split,
        num_classes=int(tfds_info.features[label_key].num_classes),
        input_shape=tuple(int(d) for d in shape),
        num_examples=int(tfds_info.splits[split].num_examples),
    )
    return ds.map(_scale_image, num_parallel_calls=tf.data.AUTOTUNE), info


def _require_network():
    """Raises OSError if the tfds download server cannot be reached."""
    socket.create_connection(
        _TFDS_DOWNLOAD_HOST, timeout=_NETWORK_TIMEOUT_S
    ).close()


def _missing_dataset_message(name, data_dir, searched, err):
    reason = (str(err).splitlines() or [""])[0][:300]
    if searched:
        local = "No local copy was found in: " + ", ".join(searched) + "."
    else:
        local = (
            f"No local data directory was given (data_dir argument or "
            f"{_ENV_DATA_DIR} environment variable)."
        )
    message = (
        f"Dataset {name!r} is not available. {local} tensorflow-datasets "
        f"could not provide it either ({type(err).__name__}: {reason}).\n"
        f"To fix this, either:\n"
        f"  1. run on a machine with internet access, so that "
        f"tensorflow-datasets can download {name!r}"
        f"{f' into {data_dir}' if data_dir is not None else ''}; or\n"
        f"  2. pass data_dir=... or set {_ENV_DATA_DIR} to a folder holding "
        f"the dataset as MNIST-format IDX files (train-images-idx3-ubyte.gz, "
        f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz), directly or in a '{name}' subfolder, "
        f"or as .npz files ('{name}.npz' with x_train, y_train, x_test, "
        f"y_test, or '{name}/<split>.npz' with x, y)."
    )
    if name.replace("-", "_") == "fashion_mnist":
        message += (
            "\nOn Debian/Ubuntu, `apt-get install dataset-fashion-mnist` "
            "installs Fashion-MNIST as IDX files in "
            "/usr/share/datasets/fashion-mnist: pass that as data_dir."
        )
    return message


# --------------------------------------------------------------- augmentation


def _shuffle_buffer_size(ds):
    # Unknown or infinite cardinality is negative; fall back to the maximum.
    num_examples = int(ds.cardinality())
    if num_examples <= 0:
        return _MAX_SHUFFLE_BUFFER
    return min(num_examples, _MAX_SHUFFLE_BUFFER)


def _augment(ds, augmentation, seed):
    image_shape = ds.element_spec[0].shape[1:]
    if not image_shape.is_fully_defined() or image_shape.rank != 3:
        raise ValueError(
            f"Augmentation needs images of a known (H, W, C) shape, got "
            f"{image_shape}."
        )
    channels = image_shape[-1]
    # Stateless ops fed from a seeded random stream make augmentation
    # reproducible, while rerandomizing gives every epoch new parameters.
    seeds = tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=True
    ).batch(2, drop_remainder=True)

    def augment_batch(batch, batch_seed):
        images, labels = batch
        zoom_seed, standard_seed, contrast_seed = tf.unstack(
            tf.random.experimental.stateless_split(batch_seed, num=3)
        )
        if augmentation == "all":
            images = _random_zoom(images, zoom_seed)
        if channels == 3:
            images = _random_flip(images, standard_seed)
        else:
            images = _random_translate(images, standard_seed)
        if augmentation == "all":
            images = _random_contrast(images, contrast_seed)
        return images, labels

    return tf.data.Dataset.zip(ds, seeds).map(
        augment_batch, num_parallel_calls=tf.data.AUTOTUNE
    )


def _random_flip(images, seed):
    batch = tf.shape(images)[0]
    flip = tf.random.stateless_uniform([batch, 1, 1, 1], seed) < 0.5
    return tf.where(flip, tf.reverse(images, axis=[2]), images)


def _random_translate(images, seed):
    pad = _TRANSLATE_PIXELS
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    offsets = tf.random.stateless_uniform(
        [batch, 2], seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32
    )
    # Per-image crops via gathered row and column indices keep the whole
    # batch in one op, with exact pixel values (no interpolation).
    rows = offsets[:, :1] + tf.range(height)
    cols = offsets[:, 1:] + tf.range(width)
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(images, cols, axis=2, batch_dims=1)


def _random_zoom(images, seed):
    scale_seed, offset_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2)
    )
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    scale = tf.random.stateless_uniform(
        [batch, 1], scale_seed, minval=_MIN_ZOOM_SCALE, maxval=1.0
    )
    offset = (
        tf.random.stateless_uniform([batch, 2], offset_seed)
        * (1 - scale)
        * [height - 1, width - 1]
    )
    # Each row maps output pixel (x, y) to input (scale * x + offset_x,
    # scale * y + offset_y), inside the image, so no fill value shows up.
    # Unlike tf.image.crop_and_resize, this op does not make grappler log a
    # cost-estimation warning every time the pipeline is iterated.
    zeros = tf.zeros_like(scale)
    offset_y, offset_x = tf.split(offset, 2, axis=1)
    transforms = tf.concat(
        [scale, zeros, offset_x, zeros, scale, offset_y, zeros, zeros], axis=1
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=[height, width],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def _random_contrast(images, seed):
    batch = tf.shape(images)[0]
    factor = tf.random.stateless_uniform(
        [batch, 1, 1, 1],
        seed,
        minval=1 - _CONTRAST_DELTA,
        maxval=1 + _CONTRAST_DELTA,
    )
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    return tf.clip_by_value((images - mean) * factor + mean, 0.0, 1.0)
