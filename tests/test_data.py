"""Tests for gloro.data: local IDX/npz loading, tfds fallback, pipelines."""

import importlib
import os
import sys
import types

import numpy as np
import pytest
from idx_files import write_idx

# tf.data needs TensorFlow on any Keras backend.
tf = pytest.importorskip("tensorflow")

from gloro import data  # noqa: E402

# tf.data is the same on every Keras backend: the TensorFlow pass runs it.
pytestmark = pytest.mark.backend_neutral

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

TRAIN_SIZE, TEST_SIZE = 12, 5
HEIGHT, WIDTH = 5, 6


def make_split(num, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num, HEIGHT, WIDTH), dtype=np.uint8)
    # Pin the extremes so range checks see exactly 0 and 1.
    images[0, 0, 0], images[0, 0, 1] = 0, 255
    labels = np.arange(num, dtype=np.uint8) % 4
    return images, labels


TRAIN = make_split(TRAIN_SIZE, seed=1)
TEST = make_split(TEST_SIZE, seed=2)
# Only the test split holds class 4: num_classes must count all splits.
TEST[1][-1] = 4


def write_idx_dataset(
    folder, gz=True, splits=(("train", TRAIN), ("t10k", TEST))
):
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, (images, labels) in splits:
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)


def as_numpy(ds):
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in ds))
    return np.stack(images), np.array(labels)


def test_missing_tensorflow_says_what_to_install(monkeypatch):
    # A None entry makes `import tensorflow` fail as if it were not
    # installed; the fresh import of gloro.data is undone afterwards.
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.delitem(sys.modules, "gloro.data")
    with pytest.raises(ImportError, match="pip install tensorflow"):
        importlib.import_module("gloro.data")


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_files(tmp_path, gz):
    write_idx_dataset(tmp_path, gz=gz)
    for split, (images, labels) in [("train", TRAIN), ("test", TEST)]:
        ds, info = data.load("digits", split, data_dir=tmp_path)
        assert info == data.DatasetInfo(
            name="digits",
            split=split,
            num_classes=5,
            input_shape=(HEIGHT, WIDTH, 1),
            num_examples=len(labels),
        )
        assert ds.element_spec[0].shape == (HEIGHT, WIDTH, 1)
        assert ds.element_spec[0].dtype == tf.float32
        assert ds.element_spec[1].shape == ()
        assert ds.element_spec[1].dtype == tf.int64
        x, y = as_numpy(ds)
        np.testing.assert_allclose(x[..., 0], images / 255.0, rtol=1e-6)
        assert x.min() == 0.0 and x.max() == 1.0
        np.testing.assert_array_equal(y, labels)


def test_load_prefers_named_subfolder_and_accepts_dashed_name(tmp_path):
    # Debian installs Fashion-MNIST as .../fashion-mnist/.
    write_idx_dataset(tmp_path / "small-digits")
    write_idx_dataset(tmp_path, splits=[("train", make_split(3, seed=9))])
    _, info = data.load("small_digits", "train", data_dir=tmp_path)
    assert info.num_examples == TRAIN_SIZE


@pytest.mark.parametrize(
    "split, expected",
    [
        ("train[:4]", slice(None, 4)),
        ("train[3:7]", slice(3, 7)),
        ("train[-3:]", slice(-3, None)),
        ("train[25%:75%]", slice(3, 9)),
        ("test[:40%]", slice(None, 2)),
        ("test[60%:]", slice(3, None)),
    ],
)
def test_split_slices(tmp_path, split, expected):
    write_idx_dataset(tmp_path)
    ds, info = data.load("digits", split, data_dir=tmp_path)
    images, labels = TRAIN if split.startswith("train") else TEST
    x, y = as_numpy(ds)
    np.testing.assert_array_equal(y, labels[expected])
    np.testing.assert_allclose(x[..., 0], images[expected] / 255.0, rtol=1e-6)
    assert info.num_examples == len(labels[expected])
    assert info.split == split
    assert info.num_classes == 5


@pytest.mark.parametrize(
    "split, match",
    [
        ("validation", r"'validation'.*\['test', 'train'\]"),
        ("train[::2]", r"Malformed split 'train\[::2\]'"),
        ("train[:13]", r"out of range for 12 examples"),
    ],
)
def test_bad_split_raises(tmp_path, split, match):
    write_idx_dataset(tmp_path)
    with pytest.raises(ValueError, match=match):
        data.load("digits", split, data_dir=tmp_path)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "env" / "digits")
    write_idx_dataset(
        tmp_path / "arg" / "digits", splits=[("train", make_split(3, seed=9))]
    )
    monkeypatch.setenv("GLORO_DATA_DIR", str(tmp_path / "env"))
    _, info = data.load("digits", "train")
    assert info.num_examples == TRAIN_SIZE
    _, info = data.load("digits", "train", data_dir=str(tmp_path / "arg"))
    assert info.num_examples == 3


def test_load_keras_style_npz(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(7, 4, 3, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(2, 4, 3, 3), dtype=np.uint8)
    # keras.datasets.cifar10 stores labels as (N, 1).
    y_train = np.array([[0], [1], [2], [3], [4], [5], [0]], dtype=np.uint8)
    y_test = np.array([[6], [1]], dtype=np.uint8)
    np.savez(
        tmp_path / "tiny.npz",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
    )
    ds, info = data.load("tiny", "train[:5]", data_dir=tmp_path)
    assert info.input_shape == (4, 3, 3)
    assert info.num_classes == 7
    assert info.num_examples == 5
    x, y = as_numpy(ds)
    np.testing.assert_allclose(x, x_train[:5] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, y_train[:5, 0])
    assert y.dtype == np.int64


def test_load_per_split_npz(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    x = np.full((3, 2, 2), 51, dtype=np.uint8)
    np.savez(folder / "train.npz", x=x, y=np.array([0, 1, 2]))
    np.savez(folder / "valid.npz", x=x[:1], y=np.array([2]))
    ds, info = data.load("tiny", "valid", data_dir=tmp_path)
    assert info.input_shape == (2, 2, 1)
    assert (info.num_classes, info.num_examples) == (3, 1)
    x_out, _ = as_numpy(ds)
    np.testing.assert_allclose(x_out, 0.2, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\['train', 'valid'\]"):
        data.load("tiny", "test", data_dir=tmp_path)


def test_npz_with_float_images_raises(tmp_path):
    np.savez(
        tmp_path / "tiny.npz",
        x_train=np.zeros((2, 2, 2), np.float32),
        y_train=np.zeros(2, np.int64),
    )
    with pytest.raises(ValueError, match="tiny.npz.*uint8"):
        data.load("tiny", "train", data_dir=tmp_path)


def truncate(path, num_bytes):
    path.write_bytes(path.read_bytes()[:-num_bytes])


def corrupt_magic(path):
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])


@pytest.mark.parametrize(
    "filename, damage, match",
    [
        ("train-images-idx3-ubyte", lambda p: truncate(p, 7), "truncated"),
        ("train-labels-idx1-ubyte", lambda p: truncate(p, 1), "truncated"),
        ("train-images-idx3-ubyte.gz", lambda p: truncate(p, 9), "truncated"),
        ("train-images-idx3-ubyte", corrupt_magic, "magic number"),
    ],
)
def test_corrupt_idx_raises_naming_file(tmp_path, filename, damage, match):
    write_idx_dataset(tmp_path, gz=filename.endswith(".gz"))
    damage(tmp_path / filename)
    with pytest.raises(ValueError, match=match) as excinfo:
        data.load("digits", "train", data_dir=tmp_path)
    assert str(tmp_path / filename) in str(excinfo.value)


def test_idx_count_mismatch_raises(tmp_path):
    images, labels = TRAIN
    write_idx_dataset(tmp_path, splits=[("train", (images, labels[:-1]))])
    with pytest.raises(ValueError, match="12 images.*11 labels") as excinfo:
        data.load("digits", "train", data_dir=tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(excinfo.value)
    assert "train-labels-idx1-ubyte.gz" in str(excinfo.value)


def test_idx_images_without_labels_raises(tmp_path):
    write_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels") as excinfo:
        data.load("digits", "train", data_dir=tmp_path)
    assert "t10k-images-idx3-ubyte.gz" in str(excinfo.value)


# ------------------------------------------------------ tensorflow-datasets


@pytest.fixture
def tfds_offline(monkeypatch):
    """Makes any tfds download attempt fail with a connection error."""
    tfds = pytest.importorskip("tensorflow_datasets")

    def fail(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'")

    monkeypatch.setattr(tfds, "load", fail)
    return tfds


def assert_explains_both_fixes(message, name):
    assert f"{name!r}" in message
    assert "internet" in message
    assert "data_dir" in message and "GLORO_DATA_DIR" in message
    assert "train-images-idx3-ubyte.gz" in message
    assert ".npz" in message


@pytest.mark.parametrize("with_data_dir", [True, False])
def test_missing_unknown_dataset_explains_fixes(
    tmp_path, monkeypatch, tfds_offline, with_data_dir
):
    monkeypatch.delenv("GLORO_DATA_DIR", raising=False)
    data_dir = tmp_path if with_data_dir else None
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load("no_such_dataset_xyz", "train", data_dir=data_dir)
    message = str(excinfo.value)
    assert_explains_both_fixes(message, "no_such_dataset_xyz")
    if with_data_dir:
        assert str(tmp_path) in message
    else:
        assert "No local data directory" in message
    assert excinfo.value.__cause__ is not None


def test_offline_download_explains_fixes(tmp_path, monkeypatch, tfds_offline):
    monkeypatch.setattr(data, "_require_network", lambda: None)
    with pytest.raises(FileNotFoundError) as excinfo:
        data.load("fashion_mnist", "train", data_dir=tmp_path)
    message = str(excinfo.value)
    assert_explains_both_fixes(message, "fashion_mnist")
    assert "apt-get install dataset-fashion-mnist" in message
    assert DEBIAN_FASHION_MNIST in message
    assert isinstance(excinfo.value.__cause__, ConnectionError)


def test_unreachable_server_fails_before_tfds_download(
    tmp_path, monkeypatch, tfds_offline
):
    unreachable = OSError("Name or service not known")

    def require_network():
        raise unreachable

    monkeypatch.setattr(data, "_require_network", require_network)
    with pytest.raises(FileNotFoundError, match="Name or service") as excinfo:
        data.load("mnist", "train", data_dir=tmp_path)
    assert excinfo.value.__cause__ is unreachable


def test_tfds_fallback_maps_images_and_info(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    images = np.array([[[[0]], [[255]]], [[[51]], [[102]]]], np.uint8)
    labels = np.array([3, 1], np.int64)

    def fake_load(name, split, data_dir, as_supervised, with_info):
        assert (name, split, data_dir) == ("mnist", "train[:2]", tmp_path)
        assert as_supervised and with_info
        info = types.SimpleNamespace(
            supervised_keys=("image", "label"),
            features={
                "image": types.SimpleNamespace(shape=(2, 1, 1)),
                "label": types.SimpleNamespace(num_classes=10),
            },
            splits={"train[:2]": types.SimpleNamespace(num_examples=2)},
        )
        return tf.data.Dataset.from_tensor_slices((images, labels)), info

    monkeypatch.setattr(data, "_require_network", lambda: None)
    monkeypatch.setattr(tfds, "load", fake_load)
    ds, info = data.load("mnist", "train[:2]", data_dir=tmp_path)
    assert info == data.DatasetInfo("mnist", "train[:2]", 10, (2, 1, 1), 2)
    x, y = as_numpy(ds)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, labels)


# ----------------------------------------------------------------- pipeline


def indexed_dataset(num, height, width, channels, seed=0):
    """Images whose label is their index; content avoids a 2-px border."""
    rng = np.random.default_rng(seed)
    images = np.zeros((num, height, width, channels), np.float32)
    images[:, 2:-2, 2:-2] = rng.uniform(
        size=(num, height - 4, width - 4, channels)
    )
    images[:, 2, 2] = 1.0
    images[:, 3, 3] = 0.0
    labels = np.arange(num, dtype=np.int64)
    return tf.data.Dataset.from_tensor_slices((images, labels)), images


def test_pipeline_eval_batches_in_order():
    ds, images = indexed_dataset(10, 8, 8, 1)
    batches = list(data.pipeline(ds, 4, training=False, augmentation="all"))
    assert [b[0].shape for b in batches] == [(4, 8, 8, 1)] * 2 + [(2, 8, 8, 1)]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    np.testing.assert_array_equal(y, np.arange(10))
    np.testing.assert_array_equal(x, images)


def test_pipeline_training_shuffles_every_example_once():
    ds, _ = indexed_dataset(20, 8, 8, 1)
    batches = data.pipeline(ds, 8, training=True, seed=0, cache=False)
    y = np.concatenate([b[1] for b in batches])
    assert sorted(y) == list(range(20))
    assert list(y) != list(range(20))


def test_standard_translates_single_channel_images():
    ds, images = indexed_dataset(20, 9, 8, 1)
    batches = data.pipeline(ds, 8, training=True, augmentation="standard",
                            seed=3)
    moved = 0
    for x, y in batches:
        assert x.shape[1:] == (9, 8, 1)
        for image, label in zip(x.numpy(), y.numpy()):
            original = images[label]
            # Content is 2 px from the border, so a shift of at most 2 px
            # keeps every pixel and adds only zeros.
            np.testing.assert_array_equal(
                np.sort(image, axis=None), np.sort(original, axis=None)
            )
            found = [
                (dy, dx)
                for dy in range(-2, 3)
                for dx in range(-2, 3)
                if np.array_equal(np.roll(original, (dy, dx), (0, 1)), image)
            ]
            assert len(found) == 1
            moved += found[0] != (0, 0)
    assert moved > 0


def test_standard_flips_three_channel_images():
    ds, images = indexed_dataset(20, 6, 7, 3)
    batches = data.pipeline(ds, 8, training=True, augmentation="standard",
                            seed=3)
    flipped = kept = 0
    for x, y in batches:
        for image, label in zip(x.numpy(), y.numpy()):
            if np.array_equal(image, images[label]):
                kept += 1
            else:
                np.testing.assert_array_equal(image, images[label][:, ::-1])
                flipped += 1
    assert flipped > 0 and kept > 0


@pytest.mark.parametrize("channels", [1, 3])
def test_all_augmentation_keeps_range_and_shape(channels):
    ds, images = indexed_dataset(24, 10, 12, channels)
    batches = list(
        data.pipeline(ds, 10, training=True, augmentation="all", seed=1)
    )
    assert [b[0].shape[0] for b in batches] == [10, 10, 4]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.shape == (24, 10, 12, channels) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert not np.allclose(x, images[y])


def test_pipeline_is_deterministic_given_seed():
    ds, _ = indexed_dataset(16, 8, 8, 1)

    def run(seed):
        batches = data.pipeline(ds, 8, True, augmentation="all", seed=seed)
        epochs = [[x.numpy() for x, _ in batches] for _ in range(2)]
        return [np.concatenate(epoch) for epoch in epochs]

    first, second = run(7), run(7)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    # Each epoch gets a new order and new augmentations.
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], run(8)[0])


def test_bad_augmentation_raises():
    ds, _ = indexed_dataset(4, 8, 8, 1)
    with pytest.raises(ValueError, match="'flip'.*'none', 'standard', 'all'"):
        data.pipeline(ds, 2, training=True, augmentation="flip")


@pytest.mark.parametrize("batch_size", [0, -4, 2.5, "8", True, None])
def test_bad_batch_size_raises(batch_size):
    ds, _ = indexed_dataset(4, 8, 8, 1)
    with pytest.raises(ValueError, match="batch_size") as excinfo:
        data.pipeline(ds, batch_size, training=False)
    assert repr(batch_size) in str(excinfo.value)


# ------------------------------------------------------ Debian Fashion-MNIST


@pytest.mark.skipif(
    not os.path.isdir(DEBIAN_FASHION_MNIST),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist(monkeypatch):
    _, test_info = data.load("fashion_mnist", "test", DEBIAN_FASHION_MNIST)
    assert test_info.num_examples == 10_000
    # The parent folder works too, via the dashed folder name.
    monkeypatch.setenv("GLORO_DATA_DIR", os.path.dirname(DEBIAN_FASHION_MNIST))
    ds, info = data.load("fashion_mnist", "train")
    assert info == data.DatasetInfo(
        "fashion_mnist", "train", 10, (28, 28, 1), 60_000
    )
    batches = data.pipeline(
        ds, 256, training=True, augmentation="standard", seed=0, cache=False
    )
    for x, y in batches.take(2):
        assert x.shape == (256, 28, 28, 1) and y.shape == (256,)
        assert 0.0 <= float(tf.reduce_min(x)) <= float(tf.reduce_max(x)) <= 1
        assert set(y.numpy()) <= set(range(10))


# ------------------------------------------------- labels and dataset names


def test_known_dataset_name_must_match_its_files(tmp_path):
    # 5x6 images are not Fashion-MNIST's 28x28x1.
    write_idx_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"another dataset.*pass the name"):
        data.load("fashion_mnist", "train", data_dir=tmp_path)


def test_known_dataset_labels_must_be_below_its_classes(tmp_path):
    images = np.zeros((4, 28, 28), np.uint8)
    train = (images, np.array([0, 1, 2, 9], np.uint8))
    test = (images, np.array([0, 1, 255, 3], np.uint8))
    write_idx_dataset(tmp_path, splits=[("train", train), ("t10k", test)])
    with pytest.raises(ValueError, match=r"'test' split .* label 255, but 'mnist' has 10 classes"):
        data.load("mnist", "train", data_dir=tmp_path)
    write_idx_dataset(tmp_path, splits=[("train", train), ("t10k", (images, np.arange(4, dtype=np.uint8)))])
    assert data.load("mnist", "test", data_dir=tmp_path)[1].num_classes == 10


def test_a_stray_label_does_not_make_new_classes(tmp_path):
    train = (TRAIN[0], TRAIN[1].copy())
    train[1][0] = 255
    write_idx_dataset(tmp_path, splits=[("train", train), ("t10k", TEST)])
    with pytest.raises(ValueError, match=r"labels up to 255, but no split has label 5"):
        data.load("digits", "test", data_dir=tmp_path)
