"""Writes the IDX files (the layout of Debian's Fashion-MNIST package) that
the tests read through `gloro.data` and the scripts."""

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path, array):
    """Writes an unsigned-byte IDX file, gzipped if `path` ends in .gz."""
    path = Path(path)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)
