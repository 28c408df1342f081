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

Interrupted runs resume: running the same command again continues from the
last finished epoch, with schedules, optimizer state and power-iteration
caches restored from `out/backup/`, which is deleted once every file above is
written. Without a backup the run starts from scratch and replaces earlier
results in `--out`.

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
import shutil
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
from gloro import architectures, callbacks, data, losses, schedules  # noqa: E402

Architecture = Literal[tuple(sorted(architectures.ARCHITECTURES))]
Activation = Literal[tuple(sorted(architectures.ACTIVATIONS))]
Augmentation = Literal[data.AUGMENTATIONS]
# What --depth and --width default to: the LiResNet builder's own defaults.
_LIRESNET_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(architectures.liresnet).parameters.items()
}
Strategy = Literal["none", "mirrored", "multiworker", "data_parallel"]

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


class _HistoryLogger(keras.callbacks.CSVLogger):
    """A `CSVLogger` that appends across resumed runs, each epoch once.

    A run killed after logging an epoch but before backing it up redoes that
    epoch when resumed, so the rows from the first epoch of a run on are
    dropped (all of them when a run starts from scratch).
    """

    def __init__(self, filename):
        super().__init__(filename, append=True)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._first_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch:
            return
        self._first_epoch = False
        path = Path(self.filename)
        lines = path.read_text().splitlines(keepends=True)
        rows = [line for line in lines[1:] if int(line.split(",", 1)[0]) < epoch]
        # CSVLogger's handle is in append mode: its next row lands at the
        # end of the rewritten file.
        path.write_text("".join(lines[:1] + rows) if rows else "")
        self.append_header = not rows


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


def _callbacks(out, epsilon, epsilon_multipliers, trades_multipliers, loss_fn):
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
        _HistoryLogger(str(out / "history.csv")),
        # Backups are per epoch: Keras 3.15 restores a mid-epoch backup's
        # epoch but not its batch. A second copy survives a kill while
        # writing one, and the backup outlives fit so that a run killed while
        # saving its results resumes there instead of starting over.
        keras.callbacks.BackupAndRestore(
            str(out / "backup"), double_checkpoint=True, delete_checkpoint=False
        ),
        keras.callbacks.TensorBoard(str(out / "logs"), write_graph=False),
    ]


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
        if os.environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES"):
            keras.distribution.initialize()
        # DataParallel splits each tf.data batch between the processes
        # itself (its auto_shard_dataset), so the pipeline stays as it is.
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        import jax

        return _Distribution(is_chief=jax.process_index() == 0, worker_id=str(jax.process_index()))
    import tensorflow as tf

    if strategy == "mirrored":
        return _Distribution(tf.distribute.MirroredStrategy())
    if not os.environ.get("TF_CONFIG"):
        _fail("--strategy", "'multiworker' reads the cluster from the TF_CONFIG environment variable, which is not set.")
    distribute = tf.distribute.MultiWorkerMirroredStrategy()
    resolver = distribute.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    # tf.distribute's convention: the `chief` task if the cluster has one,
    # else worker 0.
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    is_chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief)
    return _Distribution(distribute, is_chief, f"{task_type}_{task_id}")


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


def _agree_on_backup(distribute, backup):
    """Rolls this worker's backup back to the epoch every worker has backed up.

    The workers back up one after another at the end of an epoch, so a worker
    that dies in between leaves backups an epoch apart; resuming from both
    would give the replicas different weights. The previous backup, which
    `double_checkpoint` keeps, is then the epoch to resume from. Keras'
    `BackupAndRestore` names its files `latest.weights.h5` and
    `training_metadata.json`, and the previous copies `<name>.bkp`.
    """
    import tensorflow as tf

    epoch = _backed_up_epoch(backup / "training_metadata.json")
    values = distribute.experimental_distribute_values_from_function(lambda _: tf.constant([epoch]))
    lowest = int(tf.reduce_min(distribute.gather(values, axis=0)))
    if epoch == lowest:
        return
    if _backed_up_epoch(backup / "training_metadata.json.bkp") != lowest:
        raise SystemExit(
            f"Error: this worker's backup in {backup} is at epoch {epoch} and another worker's at "
            f"{lowest}, with no copy of epoch {lowest} here; delete every worker's backup to start over."
        )
    print(f"Resuming from epoch {lowest}, the last one every worker backed up")
    for name in ("latest.weights.h5", "training_metadata.json"):
        os.replace(backup / f"{name}.bkp", backup / name)


def _backed_up_epoch(metadata):
    """The number of epochs a BackupAndRestore metadata file records, 0 if
    none, None if the file cannot be read."""
    try:
        return int(json.loads(metadata.read_text())["epoch"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError):
        return None


def _repair_backup(backup):
    """Falls back to the previous backup when the latest one was cut short.

    Keras' `BackupAndRestore` writes the weights, then the metadata file; a
    kill while it writes the metadata leaves that file truncated, and Keras
    then fails to resume (it recovers from unreadable weights only). The
    previous pair (`<name>.bkp`, kept by `double_checkpoint`) is complete;
    without one the run starts over.
    """
    metadata = backup / "training_metadata.json"
    if not metadata.exists() or _backed_up_epoch(metadata) is not None:
        return
    previous = backup / "training_metadata.json.bkp"
    if _backed_up_epoch(previous) and (backup / "latest.weights.h5.bkp").exists():
        for name in ("latest.weights.h5", "training_metadata.json"):
            os.replace(backup / f"{name}.bkp", backup / name)
        print(f"The latest backup in {backup} was cut short; resuming from the one before it")
    else:
        shutil.rmtree(backup)
        print(f"The only backup in {backup} was cut short; starting over")


def _write_json(path, value):
    # Atomic, so that a kill never leaves a truncated results.json.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


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
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 256,
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
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling and augmentation.")] = 0,
    power_iterations: Annotated[
        int, typer.Option(min=1, help="Power-iteration steps per layer per step.")
    ] = gloro.model.DEFAULT_POWER_ITERATIONS,
    verbose: Annotated[
        int, typer.Option(min=0, max=2, help="0 silent, 1 progress bar, 2 one line per epoch.")
    ] = 1,
    strategy: Annotated[
        Strategy,
        typer.Option(help="none, mirrored or multiworker (TensorFlow), data_parallel (JAX)."),
    ] = "none",
):
    """Trains a GloRo Net; see the module docstring for the files written."""
    config = dict(locals())
    if not (math.isfinite(epsilon) and epsilon >= 0):
        _fail("--epsilon", f"must be a finite number >= 0, got {epsilon}.")
    if not (math.isfinite(lr) and lr > 0):
        _fail("--lr", f"must be a finite number > 0, got {lr}.")
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
    distribution = _distribution(strategy)
    if not distribution.is_chief:
        out = Path(f"{out}.workertemp_{distribution.worker_id}")

    train_ds, info = _load(dataset, "train", data_dir)
    test_ds, _ = _load(dataset, "test", data_dir)

    def batches(ds, **kwargs):
        ds = data.pipeline(ds, batch_size, **kwargs)
        return _shard_by_data(ds) if strategy == "multiworker" else ds

    keras.utils.set_random_seed(seed)
    with distribution.scope:
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

    backup = out / "backup"
    _repair_backup(backup)
    if strategy == "multiworker":
        _agree_on_backup(distribution.strategy, backup)
    if backup.exists():
        print(f"Resuming from {backup}")
    else:
        # A new run's TensorBoard curves must not mix with an earlier run's.
        shutil.rmtree(out / "logs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    g.fit(
        batches(train_ds, training=True, augmentation=augmentation, seed=seed),
        epochs=epochs,
        shuffle=False,  # the pipeline shuffles
        verbose=verbose,
        callbacks=_callbacks(out, epsilon, epsilon_multipliers, trades_multipliers, loss_fn),
    )

    evaluations = {}
    for split, ds in (("train", train_ds), ("test", test_ds)):
        logs = g.evaluate(batches(ds, training=False, cache=False), verbose=0, return_dict=True)
        evaluations[split] = {k: float(logs[k]) for k in ("clean_acc", "vra", "rejection_rate", "loss")}
    g.save(out / "model.keras")
    g.export(str(out / "saved_model"), verbose=False)

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
    _write_json(out / "results.json", results)
    shutil.rmtree(backup)
    if not distribution.is_chief:
        shutil.rmtree(out)
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
