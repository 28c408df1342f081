"""Timing, peak memory and result files, shared by benchmarks that report
rows of measurements.

Peak memory is the TensorFlow allocator's peak on the CPU device when the
backend is TensorFlow and the allocator tracks it (it counts tensors, not
the process; TensorFlow tracks CPU memory only with
`TF_CPU_ALLOCATOR_USE_BFC=true` set before it loads), else the process's
peak resident set (`VmHWM`, reset before the measured call), both above the
level just before the call.
"""

import json
import os
import time

import keras

from benchmarks._subset import machine


def _vm_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _allocator():
    """TensorFlow's memory statistics, or None where they are not kept."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except ValueError:
        return None
    return tf.config.experimental


def measure(fn):
    """Runs `fn()` once.

    Returns:
        `(result, seconds, peak_mb)`: what `fn` returned, its wall time, and
        the peak memory it added (see the module docstring for which).
    """
    stats = _allocator()
    if stats is not None:
        before = stats.get_memory_info("CPU:0")["current"]
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
        peak = stats.get_memory_info("CPU:0")["peak"] - before
        return result, seconds, peak / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _vm_kb("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, (_vm_kb("VmHWM") - before) / 1024


def memory_method():
    """Says how `measure` counts memory on this backend."""
    if _allocator() is not None:
        return "TensorFlow allocator peak on CPU:0 above the level before the call"
    return "peak resident set (VmHWM) above the RSS before the call"


def write(path, rows, **meta):
    """Writes `{"machine": ..., **meta, "rows": rows}` as JSON."""
    report = {"machine": machine(), "keras_backend": keras.backend.backend(), **meta, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def markdown_table(rows, columns):
    """A Markdown table of `rows` (dicts); `columns` is a list of
    `(heading, key, format)` with format a format spec, a function of the
    value returning the cell, or None (`str`)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            if value is None:
                cells.append("—")
            elif callable(spec):
                cells.append(spec(value))
            else:
                cells.append(format(value, spec) if spec else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
