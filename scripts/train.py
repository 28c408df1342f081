"""Trains a GloRo Net and writes the model, its certified results and logs.

Example:

    python scripts/train.py --dataset fashion_mnist --architecture cnn_2C2F \\
        --epsilon 0.3 --epochs 100 --data-dir /usr/share/datasets/fashion-mnist

LiResNet: `--architecture liresnet --depth 12 --width 128` (see
`gloro.architectures.liresnet`), often with `--loss emma`. `--depth` and
`--width` apply to `liresnet` only and are refused for other architectures.

Training uses `--epsilon` times `--epsilon-schedule` (by default a
logarithmic ramp from 1% to 110% of epsilon over the first half of training,
then held), the learning rate `--lr` times `--lr-schedule` (by default held
for the first half of training, then a half-cosine decay to 1% of `--lr`),
and for TRADES losses the loss's lambda times `--trades-schedule`. Schedules
use the syntax of `gloro.schedules`; the learning rate is a
`gloro.schedules.ScheduledLearningRate` of the optimizer. The final model
certifies at exactly `--epsilon`.

Runs on Keras' TensorFlow and JAX backends (`KERAS_BACKEND`); the input
pipeline is tf.data and the SavedModel export needs TensorFlow on either.

Files written into `--out` (default `runs/<dataset>_<architecture>`):

- `model.keras`: the GloroNet (load with `gloro.load_model`).
- `saved_model/`: TensorFlow SavedModel; `tf.saved_model.load(path).serve(x)`
  returns the `m + 1` logits (the last is ⊥) without gloro.
- `results.json`: train and test clean accuracy, VRA and rejection rate of
  the final model at `--epsilon`, its Lipschitz constant, seconds per epoch,
  peak memory, the configuration and library versions.
- `history.csv`: per-epoch training logs (loss, metrics, `lipschitz`,
  `epsilon`, `learning_rate` and `epoch_seconds` at the end of the epoch).
- `logs/`: TensorBoard logs.
- `backup/`: one file per epoch while training (the two newest are kept).
- `gloro_run.json`: the run's marker (see `gloro.runs`).

`--out` is the run's own: a new or empty folder, or one holding a run
(its `gloro_run.json`); anything else is refused. Every file appears whole
or not at all (written aside, then renamed), so a kill at any instant leaves
a folder that the same command resumes: from the last backed-up epoch, with
schedules, optimizer state and power-iteration caches where they were, or
from scratch when no epoch was backed up yet. A rerun with other settings
than the run's is refused with the first difference; so is a rerun of a
finished run, and of one that diverged (a non-finite loss or weights ends
the run with exit status 1 and no backup of that epoch). `--restart` starts
the run in `--out` over: it removes the files a run writes, and nothing else.

Inputs are checked before anything is written: labels within the dataset's
classes, train and test splits non-empty with equal image shapes, and every
flag.

`--strategy` trains on several devices or machines with the engine of the
backend; `--batch-size` is the global batch, split between the replicas:

- `none`: one device.
- `mirrored` (TensorFlow): `tf.distribute.MirroredStrategy` over the local
  GPUs (or the CPU).
- `multiworker` (TensorFlow): `tf.distribute.MultiWorkerMirroredStrategy`
  over the machines listed in the `TF_CONFIG` environment variable; start the
  same command on every worker, each with its own `TF_CONFIG`.
- `data_parallel` (JAX): `keras.distribution.DataParallel` over the local
  devices; over several processes when `KERAS_DISTRIBUTION_JOB_ADDRESSES`,
  `KERAS_DISTRIBUTION_NUM_PROCESSES` and `KERAS_DISTRIBUTION_PROCESS_ID` are
  set (see `keras.distribution.initialize`).

Run as a command with several workers, each worker runs in a child process
that this one supervises: `--worker-timeout` bounds the seconds from its
start to its first training step, which needs every worker, so a worker
that never comes ends the job with a one-line error instead of a silent
hang; SIGTERM and SIGINT stop it at any point, while it waits included. A
malformed `TF_CONFIG` or `KERAS_DISTRIBUTION_*` variable is refused in one
line before anything starts.

With several workers (or processes) only the chief (the `chief` task of
`TF_CONFIG`, else worker 0; process 0 on JAX) writes `--out`. Every other
worker runs the same steps but writes into `<out>.workertemp_<id>/`, its own
backup included, and removes that folder once training has finished. To
resume, restart every worker with the same command: each restores its own
backup, from the last epoch that every worker backed up.
"""

import contextlib
import csv
import functools
import importlib
import inspect
import json
import math
import os
import platform
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import keras
import numpy as np
import typer

# Lets `python scripts/train.py` run from a checkout without installing gloro.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gloro  # noqa: E402
from gloro import architectures, callbacks, data, losses, runs, schedules  # noqa: E402

Architecture = Literal[tuple(sorted(architectures.ARCHITECTURES))]
Activation = Literal[tuple(sorted(architectures.ACTIVATIONS))]
Augmentation = Literal[data.AUGMENTATIONS]
# What --depth and --width default to: the LiResNet builder's own defaults.
_LIRESNET_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(architectures.liresnet).parameters.items()
}
Strategy = Literal["none", "mirrored", "multiworker", "data_parallel"]
# mixed_float16 is left out: it needs loss scaling, which Keras only adds
# for a model whose own policy is mixed, and a GloroNet's own is float32.
DtypePolicy = Literal["float32", "mixed_bfloat16"]

# The backend each --strategy runs on.
_STRATEGY_BACKENDS = {"mirrored": "tensorflow", "multiworker": "tensorflow", "data_parallel": "jax"}


class _EpochLogs(keras.callbacks.Callback):
    """Adds `epoch_seconds` and the `learning_rate` reached to the epoch
    logs, so that history.csv, which survives a resume, holds them for every
    epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs["epoch_seconds"] = time.perf_counter() - self._start
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def _fail(flag, message):
    raise typer.BadParameter(message, param_hint=f"'{flag}'")


def _schedule(flag, spec):
    try:
        return schedules.parse(spec)
    except ValueError as err:
        _fail(flag, str(err))


def _optimizer(spec):
    """Parses `--optimizer`.

    Args:
        spec: `"adam"`, `"sgd"` or `"sgd.<momentum>"`.

    Returns:
        a function of `learning_rate` that builds the optimizer.
    """
    if spec == "adam":
        return keras.optimizers.Adam
    name, _, momentum = spec.partition(".")
    if name == "sgd":
        try:
            momentum = float(momentum or 0.0)
        except ValueError:
            pass
        else:
            if 0.0 <= momentum < 1.0:
                return functools.partial(keras.optimizers.SGD, momentum=momentum)
    _fail("--optimizer", f"expected 'adam', 'sgd' or 'sgd.<momentum>' with momentum in [0, 1), got {spec!r}.")


def _load(dataset, split, data_dir):
    try:
        return data.load(dataset, split, data_dir=data_dir)
    except (FileNotFoundError, ValueError) as err:
        _fail("--dataset", str(err).splitlines()[0])


def _peak_memory_mb():
    # ru_maxrss is in KiB on Linux.
    memory = {"host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    # Keras has no memory statistics of its own: ask the backend, which
    # knows them only for an accelerator.
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            memory["gpu_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    elif keras.backend.backend() == "jax":
        import jax

        stats = jax.local_devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            memory[f"{jax.default_backend()}_mb"] = stats["peak_bytes_in_use"] / 2**20
    return memory


def _versions():
    versions = {
        "gloro": gloro.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
    }
    # TensorFlow runs the tf.data input pipeline on every backend.
    for module in sorted({"tensorflow", keras.backend.backend()}):
        versions[module] = importlib.import_module(module).__version__
    return {**versions, "numpy": np.__version__, "python": platform.python_version()}


def _callbacks(run, epsilon, epsilon_multipliers, trades_multipliers, loss_fn):
    # Schedules get explicit base values: a restored model holds the
    # scheduled values, not the bases. The learning rate needs no callback:
    # the optimizer computes it from its step counter, which a resumed run
    # restores.
    schedule_callbacks = [callbacks.EpsilonScheduler(epsilon_multipliers, epsilon=epsilon)]
    if isinstance(loss_fn, losses.Trades):
        lam = float(keras.ops.convert_to_numpy(loss_fn.lam))
        schedule_callbacks.append(callbacks.TradesScheduler(trades_multipliers, lam=lam))
    return [
        _EpochLogs(),
        *schedule_callbacks,
        # Logging before backing up: an epoch logged but not backed up is
        # redone and its row replaced; the other order would lose the row.
        runs.HistoryCSV(run.path / "history.csv"),
        # After the log, per epoch: a resumed run restarts at an epoch,
        # never within one.
        runs.BackupAndResume(run),
        keras.callbacks.TensorBoard(str(run.path / "logs"), write_graph=False),
    ]


# The pipe a supervised worker reports on once it has joined its peers.
_JOINED_FD = "GLORO_TRAIN_JOINED_FD"


class _Joined(keras.callbacks.Callback):
    """Tells the supervising process (`_supervise`) that this worker has
    joined: training's first step needs every worker."""

    def __init__(self, fd):
        super().__init__()
        self._fd = fd

    def on_train_batch_end(self, batch, logs=None):
        if self._fd is not None:
            os.write(self._fd, b"1")
            os.close(self._fd)
            self._fd = None


def _die_with_parent():
    # Linux's prctl(PR_SET_PDEATHSIG, SIGKILL): a worker never outlives the
    # process that supervises it.
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _supervise(timeout):
    """Runs this command as a child process and stops it when told to.

    A worker waiting for a peer that never comes blocks inside TensorFlow
    or JAX, holding the interpreter lock, and TensorFlow's multi-worker
    runtime takes SIGTERM over for its own preemption notices: in that
    process neither a timer nor a signal handler can run. This process
    stays free to do both: it ends the worker when the worker has not
    joined its peers within `timeout` seconds, and on SIGTERM or SIGINT.

    Args:
        timeout: the `--worker-timeout` seconds.

    Returns:
        the exit status: the worker's, 1 after the timeout, or 128 plus the
        signal's number.
    """
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen(
        [sys.executable, *sys.argv],
        env={**os.environ, _JOINED_FD: str(write_fd)},
        pass_fds=(write_fd,),
    )
    os.close(write_fd)

    def stop(signum, frame):
        child.kill()
        child.wait()
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    ready, _, _ = select.select([read_fd], [], [], timeout)
    # Ready with no byte: the worker exited before joining; its status tells.
    if not ready:
        child.kill()
        child.wait()
        print(
            f"Error: the workers did not all join within {timeout:g} s (--worker-timeout); check that "
            "every worker runs, with its own TF_CONFIG or KERAS_DISTRIBUTION_PROCESS_ID, and can reach "
            "the addresses listed.",
            file=sys.stderr,
        )
        return 1
    return child.wait()


class _Distribution:
    """What `--strategy` set up.

    Attributes:
        strategy: the `tf.distribute.Strategy`, or None.
        scope: context manager to build and compile the model in.
        is_chief: whether this worker writes `--out`.
        worker_id: this worker's name in its temporary folder's name.
    """

    def __init__(self, strategy=None, is_chief=True, worker_id="0"):
        self.strategy = strategy
        self.scope = strategy.scope() if strategy else contextlib.nullcontext()
        self.is_chief = is_chief
        self.worker_id = worker_id


def _distribution(strategy):
    """Sets up `--strategy` before TensorFlow or JAX runs anything (a
    multi-worker strategy and a multi-process JAX runtime must be created
    first)."""
    if strategy == "none":
        return _Distribution()
    needed = _STRATEGY_BACKENDS[strategy]
    if keras.backend.backend() != needed:
        _fail(
            "--strategy",
            f"{strategy!r} needs the {needed} backend (KERAS_BACKEND={needed}); "
            f"this process runs on {keras.backend.backend()}.",
        )
    if strategy == "data_parallel":
        addresses, num_processes, process_id = _jax_processes()
        if addresses:
            keras.distribution.initialize(",".join(addresses), num_processes, process_id)
        # DataParallel splits each tf.data batch between the processes
        # itself (its auto_shard_dataset), so the pipeline stays as it is.
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        import jax

        return _Distribution(is_chief=jax.process_index() == 0, worker_id=str(jax.process_index()))
    import tensorflow as tf

    if strategy == "mirrored":
        return _Distribution(tf.distribute.MirroredStrategy())
    task_type, task_id, has_chief = _tf_config()
    distribute = tf.distribute.MultiWorkerMirroredStrategy()
    # tf.distribute's convention: the `chief` task if the cluster has one,
    # else worker 0.
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    return _Distribution(distribute, is_chief, f"{task_type}_{task_id}")


def _address(variable, address):
    """Checks a `host:port` address of a cluster variable; returns the port."""
    host, _, port = str(address).rpartition(":")
    if not (host and port.isdigit() and 0 < int(port) < 65536):
        _fail("--strategy", f"{variable} lists {address!r}, which is not a host:port address.")
    return int(port)


def _port_free(variable, port):
    # A port held by another process makes the runtime fail with an opaque
    # server error; SO_REUSEADDR keeps a port in TIME_WAIT usable, as the
    # runtimes themselves treat it.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as err:
            _fail("--strategy", f"port {port} of this worker's address in {variable} is in use ({err.strerror}).")


def _tf_config():
    """This worker's task type and index from TF_CONFIG, checked, and whether
    the cluster has a chief."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        _fail("--strategy", "'multiworker' reads the cluster from the TF_CONFIG environment variable, which is not set.")
    try:
        config = json.loads(raw)
    except ValueError as err:
        _fail("--strategy", f"TF_CONFIG is not valid JSON ({err}).")
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not (
        isinstance(cluster, dict)
        and cluster
        and all(isinstance(v, list) and v for v in cluster.values())
        and isinstance(task, dict)
    ):
        _fail(
            "--strategy",
            'TF_CONFIG must be {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}.',
        )
    task_type, task_id = task.get("type"), task.get("index")
    if task_type not in cluster:
        _fail("--strategy", f"TF_CONFIG's task type {task_type!r} is not in its cluster ({', '.join(cluster)}).")
    if not (isinstance(task_id, int) and 0 <= task_id < len(cluster[task_type])):
        _fail(
            "--strategy",
            f"TF_CONFIG's task index {task_id!r} is out of range: its cluster has "
            f"{len(cluster[task_type])} {task_type!r} task(s).",
        )
    for addresses in cluster.values():
        for address in addresses:
            _address("TF_CONFIG", address)
    _port_free("TF_CONFIG", _address("TF_CONFIG", cluster[task_type][task_id]))
    return task_type, task_id, "chief" in cluster


def _jax_processes():
    """The `KERAS_DISTRIBUTION_*` variables, checked: the addresses (empty
    when unset), the number of processes and this process's index."""
    raw = os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES", "")
    if not raw:
        return [], None, None
    addresses = raw.split(",")
    for address in addresses:
        _address("KERAS_DISTRIBUTION_JOB_ADDRESSES", address)
    numbers = []
    for name in ("KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID"):
        value = os.environ.get(name, "")
        if not value.isdigit():
            _fail("--strategy", f"{name} must be a whole number >= 0 next to KERAS_DISTRIBUTION_JOB_ADDRESSES, got {value!r}.")
        numbers.append(int(value))
    num_processes, process_id = numbers
    if num_processes < 1 or (len(addresses) > 1 and len(addresses) != num_processes):
        _fail(
            "--strategy",
            f"KERAS_DISTRIBUTION_NUM_PROCESSES is {num_processes}, but KERAS_DISTRIBUTION_JOB_ADDRESSES "
            f"lists {len(addresses)} address(es).",
        )
    if process_id >= num_processes:
        _fail("--strategy", f"KERAS_DISTRIBUTION_PROCESS_ID is {process_id}, not below the {num_processes} processes.")
    if process_id == 0:
        # Process 0 serves the coordinator, at the first address.
        _port_free("KERAS_DISTRIBUTION_JOB_ADDRESSES", _address("KERAS_DISTRIBUTION_JOB_ADDRESSES", addresses[0]))
    return addresses, num_processes, process_id


def _shard_by_data(ds):
    """Shards a dataset per worker element by element.

    tf.distribute's default (AUTO) first tries to give each worker its own
    input files. Local IDX and npz data is read into memory, so there are no
    files to split (AUTO falls back to DATA with a warning), and
    tensorflow-datasets splits small sets into fewer files than there may be
    workers, or into files of unequal sizes, which would give the workers
    unequal numbers of steps. DATA is asked for directly: every worker builds
    the whole pipeline and keeps its own share of each global batch, which
    needs every worker to read the examples in the same order, as the seeded
    shuffle does.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _agree_on_backup(distribute, run):
    """Rolls this worker's backup back to the epoch every worker has backed up.

    The workers back up one after another at the end of an epoch, so a worker
    that dies in between leaves backups an epoch apart; resuming from both
    would give the replicas different weights. The backup before the newest,
    which `gloro.runs.BackupAndResume` keeps, is then the epoch to resume
    from.
    """
    import tensorflow as tf

    epoch = run.backup_epoch()
    values = distribute.experimental_distribute_values_from_function(lambda _: tf.constant([epoch]))
    lowest = int(tf.reduce_min(distribute.gather(values, axis=0)))
    if epoch == lowest:
        return
    if lowest not in run.backups():
        raise SystemExit(
            f"Error: this worker's backup in {run.backup_dir()} is at epoch {epoch} and another worker's at "
            f"{lowest}, with no copy of epoch {lowest} here; restart every worker with --restart to start over."
        )
    print(f"Resuming from epoch {lowest}, the last one every worker backed up")
    run.keep_backup(lowest)


def _check_data(dataset, train_info, test_info):
    """Refuses data that would only fail, or mislead, after training."""
    for info in (train_info, test_info):
        if not info.num_examples:
            _fail("--dataset", f"the {info.split!r} split of {dataset} has no examples.")
    if train_info.input_shape != test_info.input_shape:
        _fail(
            "--dataset",
            f"{dataset}'s train images have shape {train_info.input_shape} but its test images "
            f"{test_info.input_shape}.",
        )


def _finite32(value):
    # The model computes in float32: 1e39 is finite in Python but inf there.
    return math.isfinite(value) and abs(value) <= float(np.finfo(np.float32).max)


# What a run's marker records and a resumed run must repeat: the flags that
# shape the model and its training (not where the data is read from, nor
# how the run reports, nor the devices it runs on).
_NOT_SETTINGS = ("data_dir", "out", "verbose", "strategy", "restart", "worker_timeout")
# tf.data and the step counter take batch sizes and seeds as 64-bit and
# 32-bit integers.
_MAX_BATCH_SIZE = 2**31 - 1
_MAX_SEED = 2**32 - 1


@contextlib.contextmanager
def _global_dtype_policy(policy):
    """Builds the layers made inside the block with `policy` (Keras reads the
    global policy when a layer is made), and restores the previous one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def train(
    dataset: Annotated[str, typer.Option(help="Dataset name for gloro.data.load.")] = "fashion_mnist",
    architecture: Annotated[
        Architecture, typer.Option(help="Network from gloro.architectures.")
    ] = "cnn_2C2F",
    activation: Annotated[Activation, typer.Option(help="Activation between layers.")] = "minmax",
    depth: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="LiResNet blocks (--architecture liresnet only).",
            show_default=str(_LIRESNET_DEFAULTS["depth"]),
        ),
    ] = None,
    width: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="LiResNet channels, even for minmax (--architecture liresnet only).",
            show_default=str(_LIRESNET_DEFAULTS["width"]),
        ),
    ] = None,
    epsilon: Annotated[float, typer.Option(help="Certified L2 radius of the final model.")] = 0.3,
    epsilon_schedule: Annotated[
        str, typer.Option(help="Training epsilon as multiples of --epsilon.")
    ] = "[0.01]-log-[50%:1.1]",
    loss: Annotated[
        str,
        typer.Option(help="gloro loss: crossentropy, emma, trades_kl.<lambda>, trades_ce.<lambda>."),
    ] = "crossentropy",
    trades_schedule: Annotated[
        str, typer.Option(help="TRADES lambda as multiples of the loss's lambda.")
    ] = "fixed",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 100,
    batch_size: Annotated[int, typer.Option(min=1, max=_MAX_BATCH_SIZE, help="Batch size.")] = 256,
    optimizer: Annotated[str, typer.Option(help="adam, sgd or sgd.<momentum>.")] = "adam",
    lr: Annotated[float, typer.Option(help="Base learning rate.")] = 1e-3,
    lr_schedule: Annotated[
        str, typer.Option(help="Learning rate as multiples of --lr.")
    ] = "[1.]-[50%:1.]-cos-[0.01]",
    augmentation: Annotated[Augmentation, typer.Option(help="Training augmentation.")] = "none",
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="Folder with the dataset.", show_default="$GLORO_DATA_DIR, else tensorflow-datasets"
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(help="Output folder.", show_default="runs/<dataset>_<architecture>"),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=_MAX_SEED, help="Seed of initialisation, shuffling and augmentation.")
    ] = 0,
    power_iterations: Annotated[
        int, typer.Option(min=1, help="Power-iteration steps per layer per step.")
    ] = gloro.model.DEFAULT_POWER_ITERATIONS,
    dtype_policy: Annotated[
        DtypePolicy,
        typer.Option(help="Dtype policy of the network's layers in training; certificates are float32 either way."),
    ] = "float32",
    verbose: Annotated[
        int, typer.Option(min=0, max=2, help="0 silent, 1 progress bar, 2 one line per epoch.")
    ] = 1,
    strategy: Annotated[
        Strategy,
        typer.Option(help="none, mirrored or multiworker (TensorFlow), data_parallel (JAX)."),
    ] = "none",
    worker_timeout: Annotated[
        float,
        typer.Option(
            min=1, help="Seconds a worker waits for the others to join (multiworker, data_parallel over processes)."
        ),
    ] = 600.0,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            show_default="False",
            help="Start the run in --out over, removing what it wrote (and nothing else).",
        ),
    ] = False,
):
    """Trains a GloRo Net; see the module docstring for the files written."""
    config = dict(locals())
    if not (_finite32(epsilon) and epsilon >= 0):
        _fail("--epsilon", f"must be a number >= 0, finite in float32 (below 3.4e38), got {epsilon}.")
    if not (_finite32(lr) and lr > 0):
        _fail("--lr", f"must be a number > 0, finite in float32 (below 3.4e38), got {lr}.")
    if not math.isfinite(worker_timeout):
        _fail("--worker-timeout", f"must be a finite number of seconds, got {worker_timeout}.")
    # Only given options reach the builder, so its defaults stay the defaults.
    options = {k: v for k, v in (("depth", depth), ("width", width)) if v is not None}
    for flag in options:
        if flag not in architectures.ARCHITECTURES[architecture]:
            _fail(f"--{flag}", f"applies to --architecture liresnet only, not {architecture!r}.")
    if options.get("width", 0) % 2 and activation == "minmax":
        _fail("--width", f"must be even with --activation minmax (it pairs channels), got {width}.")
    # results.json records the options the network is built with, defaults included.
    for name in architectures.ARCHITECTURES[architecture]:
        config[name] = options.get(name, _LIRESNET_DEFAULTS[name])
    epsilon_multipliers = _schedule("--epsilon-schedule", epsilon_schedule)
    lr_multipliers = _schedule("--lr-schedule", lr_schedule)
    trades_multipliers = _schedule("--trades-schedule", trades_schedule)
    try:
        loss_fn = losses.get(loss)
    except ValueError as err:
        _fail("--loss", str(err))
    if not type(loss_fn).__module__.startswith("gloro."):
        _fail("--loss", f"expected a gloro loss such as 'crossentropy' or 'trades_kl.1.5', got {loss!r}.")
    if not isinstance(loss_fn, losses.Trades) and trades_schedule != "fixed":
        _fail("--trades-schedule", f"needs a TRADES loss such as 'trades_kl.1.5', but --loss is {loss!r}.")
    make_optimizer = _optimizer(optimizer)
    out = Path(out or f"runs/{dataset}_{architecture}")
    config["out"] = str(out)
    settings = {k: v for k, v in config.items() if k not in _NOT_SETTINGS}
    try:
        runs.RunFolder.check(out, settings, restart)
    except runs.RunFolderError as err:
        _fail("--out", str(err))
    waits = strategy == "multiworker" or (
        strategy == "data_parallel" and os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES")
    )
    joined_fd = os.environ.pop(_JOINED_FD, None)
    if joined_fd is not None:
        # Set here rather than between fork and exec, which is unsafe in a
        # process running TensorFlow's threads.
        _die_with_parent()
    if waits and joined_fd is None and Path(sys.argv[0]).resolve() == Path(__file__).resolve():
        # Checked here, so that a malformed cluster is refused in one line.
        if strategy == "multiworker":
            _tf_config()
        else:
            _jax_processes()
        raise typer.Exit(_supervise(worker_timeout))
    distribution = _distribution(strategy)
    if not distribution.is_chief:
        out = Path(f"{out}.workertemp_{distribution.worker_id}")

    train_ds, info = _load(dataset, "train", data_dir)
    test_ds, test_info = _load(dataset, "test", data_dir)
    _check_data(dataset, info, test_info)

    def batches(ds, **kwargs):
        ds = data.pipeline(ds, batch_size, **kwargs)
        return _shard_by_data(ds) if strategy == "multiworker" else ds

    keras.utils.set_random_seed(seed)
    with distribution.scope:
        with _global_dtype_policy(dtype_policy):
            f = architectures.get(
                architecture, info.input_shape, info.num_classes, activation=activation, seed=seed, **options
            )
        g = gloro.GloroNet(model=f, epsilon=epsilon, power_iterations=power_iterations)
        total_steps = epochs * math.ceil(info.num_examples / batch_size)
        learning_rate = schedules.ScheduledLearningRate(lr_multipliers, lr, total_steps)
        g.compile(
            optimizer=make_optimizer(learning_rate=learning_rate),
            loss=loss_fn,
            metrics=["clean_acc", "vra", "rejection_rate"],
        )

    try:
        run = runs.RunFolder.open(out, settings, restart)
    except runs.RunFolderError as err:
        _fail("--out", str(err))
    if strategy == "multiworker":
        _agree_on_backup(distribution.strategy, run)
    if run.backup_epoch():
        print(f"Resuming from epoch {run.backup_epoch()} of the run in {out}")
    fit_callbacks = _callbacks(run, epsilon, epsilon_multipliers, trades_multipliers, loss_fn)
    try:
        g.fit(
            batches(train_ds, training=True, augmentation=augmentation, seed=seed),
            epochs=epochs,
            shuffle=False,  # the pipeline shuffles
            verbose=verbose,
            callbacks=fit_callbacks + [_Joined(int(joined_fd) if joined_fd else None)],
        )
    except runs.Diverged as err:
        run.mark("diverged", epoch=err.epoch)
        print(
            f"Error: {err}; nothing of that epoch was kept. Start over with --restart and other "
            "settings (a lower --lr, for instance).",
            file=sys.stderr,
        )
        raise typer.Exit(1) from None

    evaluations = {}
    for split, ds in (("train", train_ds), ("test", test_ds)):
        logs = g.evaluate(batches(ds, training=False, cache=False), verbose=0, return_dict=True)
        evaluations[split] = {k: float(logs[k]) for k in ("clean_acc", "vra", "rejection_rate", "loss")}
    with runs.atomic_path(out / "model.keras") as path:
        g.save(path)
    with runs.atomic_path(out / "saved_model") as path:
        g.export(str(path), verbose=False)

    with open(out / "history.csv", newline="") as file:
        epoch_seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(file)]
    results = {
        "dataset": dataset,
        "architecture": architecture,
        "epsilon": epsilon,
        **evaluations,
        "lipschitz_constant": float(np.max(g.lipschitz_constant())),
        "seconds_per_epoch": float(np.mean(epoch_seconds)),
        "epoch_seconds": epoch_seconds,
        "peak_memory": _peak_memory_mb(),
        "config": config,
        "versions": _versions(),
    }
    runs.write_json(out / "results.json", results)
    # Finished before the backups go: a kill in between leaves a finished
    # run, never one that restarts from scratch.
    run.mark("finished")
    run.remove_backups()
    if not distribution.is_chief:
        run.discard_outputs()
        (out / runs.MARKER).unlink()
        out.rmdir()
        return results
    print(
        f"test: clean accuracy {evaluations['test']['clean_acc']:.4f}, VRA {evaluations['test']['vra']:.4f} "
        f"at epsilon {epsilon}, rejection rate {evaluations['test']['rejection_rate']:.4f}; "
        f"{results['seconds_per_epoch']:.1f} s per epoch; results in {out}"
    )
    return results


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
app.command()(train)

if __name__ == "__main__":
    app()
