import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Eager JAX compiles each operation for each new shape, and the suite's small
# models spend most of their JAX time compiling: XLA's cheapest optimisation
# level cut that by a quarter here, and one thread per process (two test
# processes share two cores) a little more. Set before Keras imports JAX.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if keras.backend.backend() == "torch":
    import torch

    # Each pass runs on two processes on a 2-core machine. torch's default,
    # one OpenMP thread per core in each process, oversubscribes the cores,
    # and its spinning threads then make small operations a hundred times
    # slower (3.7 ms instead of 0.02 ms for a 5x5 convolution). The
    # subprocesses some tests start inherit the setting.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def pytest_itemcollected(item):
    backend = keras.backend.backend()
    if (backend == "jax" and item.get_closest_marker("slow_on_jax")) or (
        backend != "tensorflow" and item.get_closest_marker("ops_only")
    ):
        item.add_marker(pytest.mark.slow)


def pytest_collection_modifyitems(config, items):
    # The backend is fixed per process: the README's test command runs the
    # suite once per backend, TensorFlow first. Only the TensorFlow pass runs
    # what needs TensorFlow and what no backend changes (marked
    # `backend_neutral`: NumPy math, tf.data, parsing); the JAX and torch
    # passes leave both out, so no test runs three times for one answer.
    if keras.backend.backend() == "tensorflow":
        return
    kept, left_out = [], []
    for item in items:
        neutral = item.get_closest_marker("tensorflow") or item.get_closest_marker("backend_neutral")
        (left_out if neutral else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
