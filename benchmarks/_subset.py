"""Shared pieces of the power-iteration comparison (numpy and the standard
library only, so that both `power_iterations.py` (Keras 3) and
`original_gloro.py` (the original library on TensorFlow 2.15) can import it).

The data are the first `TRAIN_EXAMPLES` training and first `TEST_EXAMPLES`
test images of Fashion-MNIST, read from gzipped IDX files and scaled to
[0, 1].
"""

import gzip
import os
import platform
import struct
import time

import numpy as np

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
TRAIN_EXAMPLES = 8_000
TEST_EXAMPLES = 2_000

RECIPE = {
    "network": "cnn_2C2F: Conv(16,4,s2,same) MinMax, Conv(32,4,s2,same) MinMax, Flatten, Dense(100) MinMax, Dense(10)",
    "init": "orthogonal",
    "optimizer": "Adam(1e-3)",
    "batch_size": 128,
    "epsilon": 0.3,
    "epochs": 2,
    "train_examples": TRAIN_EXAMPLES,
    "test_examples": TEST_EXAMPLES,
    "data": "Fashion-MNIST, first examples of each split, scaled to [0, 1]",
}


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(data_dir, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no {stem}[.gz] in {data_dir}")


def load(data_dir=DEFAULT_DATA_DIR, train_examples=TRAIN_EXAMPLES, test_examples=TEST_EXAMPLES):
    """Returns `(x_train, y_train, x_test, y_test)`: float32 images
    `(n, 28, 28, 1)` in [0, 1] and int32 labels `(n,)`."""
    out = []
    for prefix, n in (("train", train_examples), ("t10k", test_examples)):
        images = _read_idx(_find(data_dir, f"{prefix}-images-idx3-ubyte"))[:n]
        labels = _read_idx(_find(data_dir, f"{prefix}-labels-idx1-ubyte"))[:n]
        out.append((images.astype(np.float32) / 255.0)[..., None])
        out.append(labels.astype(np.int32))
    return tuple(out)


def machine():
    """Facts about the machine the numbers were measured on."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


class EpochClock:
    """Wall and process-CPU seconds of each epoch (`on_epoch_begin` to
    `on_epoch_end`), as a mixin for a Keras callback class."""

    def on_train_begin(self, logs=None):
        self.wall, self.cpu = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, epoch, logs=None):
        self.wall.append(time.perf_counter() - self._t0[0])
        self.cpu.append(time.process_time() - self._t0[1])


def median(values):
    values = sorted(values)
    n = len(values)
    if n == 0:
        return float("nan")
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])
