"""gloro.load_model refuses hostile .keras files at bounded cost, and removes
what a refused load extracted (on every backend)."""

import json
import os
import resource
import tempfile
import time
import zipfile

import keras
import pytest

import gloro
from gloro import layers


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    x = keras.Input((4, 4, 1))
    y = layers.Dense(3)(layers.Flatten()(x))
    path = tmp_path_factory.mktemp("model") / "small.keras"
    gloro.GloroNet(x, y, epsilon=0.1).save(path)
    return path


def _with_input_shape(source, target, shape):
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as edited:
        for item in archive.infolist():
            content = archive.read(item.filename)
            if item.filename == "config.json":
                text = json.dumps(json.loads(content)).replace("[null, 4, 4, 1]", json.dumps([None, *shape]))
                assert text != json.dumps(json.loads(content))
                content = text.encode()
            edited.writestr(item, content)


def test_a_huge_declared_input_is_refused_before_anything_is_built(small_model, tmp_path):
    hostile = tmp_path / "huge.keras"
    _with_input_shape(small_model, hostile, [16000, 16000, 1])
    assert hostile.stat().st_size < 100_000
    memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"declares an input of shape \(16000, 16000, 1\).*max_input_size"):
        gloro.load_model(hostile)
    assert time.perf_counter() - start < 2
    # ru_maxrss is in KiB: the 1 GiB power vector was never allocated.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - memory < 100 * 1024
    # The limit is the documented one: the same file loads when allowed.
    assert gloro.load_model(small_model, max_input_size=16).f.input_shape == (None, 4, 4, 1)
    with pytest.raises(ValueError, match="max_input_size"):
        gloro.load_model(small_model, max_input_size=15)


def test_an_archive_too_large_once_decompressed_is_refused(small_model):
    with pytest.raises(ValueError, match=r"decompresses to \d+ bytes.*max_archive_bytes"):
        gloro.load_model(small_model, max_archive_bytes=1000)


def test_a_refused_load_leaves_nothing_in_the_temporary_folder(small_model, monkeypatch):
    extracted = []

    def load_that_extracts_then_fails(path, safe_mode):
        # What Keras does with a file's assets before failing to load it.
        folder = tempfile.mkdtemp()
        with open(os.path.join(folder, "asset.bin"), "wb") as file:
            file.write(b"\0" * 1000)
        extracted.append(folder)
        raise OSError("unreadable weights")

    monkeypatch.setattr(keras.models, "load_model", load_that_extracts_then_fails)
    before = tempfile.gettempdir()
    with pytest.raises(ValueError, match="unreadable weights"):
        gloro.load_model(small_model)
    assert extracted and not os.path.exists(extracted[0])
    assert tempfile.gettempdir() == before
