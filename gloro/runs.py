"""Training-run folders that never lose work.

A run folder holds one training run: the files the run writes and a marker,
`gloro_run.json`, that records the run's identity, the settings that shape
its model and training, and whether it is training, finished or diverged.
Three rules make such a folder safe to kill at any instant and to run the
same command in again:

1. **Ownership.** `RunFolder.open` writes only into a folder it creates, an
   empty one, or one whose marker says it holds a run. It refuses any other
   folder, and it only ever removes the names a run writes (`RUN_FILES`, the
   event files of `logs/`, the backups in `backup/`), never anything else a
   user put there.
2. **Atomic files.** Every file appears whole or not at all:
   `atomic_path(path)` yields a name beside `path` (`model.keras` is written
   as `model.partial.keras`) and renames it into place once it is complete.
   A kill leaves at most such a partial file, which the next `open` removes.
   TensorBoard's event files in `logs/` are the one exception: they are
   append-only streams, whose readers skip a record cut short.
3. **Backups that belong to the run.** `BackupAndResume` backs the model,
   optimizer and power-iteration caches up at the end of each epoch as one
   atomically written file per epoch, tagged with the run's identity, and
   restores the newest one when training starts. It never backs up
   non-finite weights or a non-finite loss: it stops training instead, so a
   diverged run is never resumed blindly.

Example:

```python
run = gloro.runs.RunFolder.open("runs/fm", settings={"epochs": 10, "lr": 1e-3})
history = gloro.runs.HistoryCSV(run.path / "history.csv")
try:
    g.fit(x, y, epochs=10, callbacks=[history, gloro.runs.BackupAndResume(run)])
except gloro.runs.Diverged as err:
    run.mark("diverged", epoch=err.epoch)
    raise
with gloro.runs.atomic_path(run.path / "model.keras") as path:
    g.save(path)
run.mark("finished")
run.remove_backups()
```
"""

import contextlib
import csv
import io
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import h5py
import keras
import numpy as np

MARKER = "gloro_run.json"
# What a run writes into its folder, besides the marker.
RUN_FILES = ("model.keras", "saved_model", "results.json", "history.csv", "logs", "backup")
_BACKUP = re.compile(r"^epoch_(\d+)\.weights\.h5$")
# Backups kept: two, so that workers an epoch apart share one.
_BACKUPS_KEPT = 2


class RunFolderError(Exception):
    """A run folder cannot be used as asked; the message says why and what
    to do."""


def partial_path(path):
    """The name `path` is written under before it is renamed into place.

    Args:
        path: the final path.

    Returns:
        a `Path` in the same folder, with `.partial` after the part of the
        name before its first dot (suffixes such as `.keras` or
        `.weights.h5`, which Keras requires, are kept).

    Example:

    >>> partial_path(Path("runs/fm/model.keras"))
    PosixPath('runs/fm/model.partial.keras')
    """
    path = Path(path)
    stem, dot, rest = path.name.partition(".")
    return path.with_name(f"{stem}.partial{dot}{rest}")


@contextlib.contextmanager
def atomic_path(path):
    """Writes a file or folder aside and renames it into place when complete.

    Args:
        path: the final path. A folder already there is removed just before
            the rename (a folder cannot be replaced in one step); a file is
            replaced in one step.

    Yields:
        the `Path` to write (see `partial_path`). Whatever is left there
        from an earlier, killed attempt is removed first. If the block
        raises, the partial file is removed and `path` is left as it was.

    Example:

    ```python
    with atomic_path(out / "model.keras") as tmp:
        g.save(tmp)
    ```
    """
    path = Path(path)
    tmp = partial_path(path)
    _remove(tmp)
    try:
        yield tmp
        _sync(tmp)
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _sync_dir(path.parent)


def write_text(path, text):
    """Writes `text` to `path` atomically (see `atomic_path`).

    Example:

    >>> write_text(Path("results.json"), "{}\\n")
    """
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, value):
    """Writes `value` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def _sync(path):
    # A rename is only as durable as the data it publishes.
    if path.is_file():
        with open(path, "rb+") as file:
            os.fsync(file.fileno())


def _sync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_matching(folder, pattern):
    """Removes the files under `folder` whose names match `pattern`, then the
    folders left empty; anything else stays."""
    if not folder.is_dir():
        return
    for root, _, names in os.walk(folder, topdown=False):
        root = Path(root)
        for name in names:
            if pattern.match(name):
                (root / name).unlink()
        if root != folder and not any(root.iterdir()):
            root.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


# TensorBoard writes logs/<train|validation>/events.out.tfevents.*.
_EVENTS = re.compile(r"^events\.out\.tfevents\.")
_PARTIAL_BACKUP = re.compile(r"^epoch_\d+\.partial\.weights\.h5$")
_BACKUP_OR_PARTIAL = re.compile(rf"{_BACKUP.pattern}|{_PARTIAL_BACKUP.pattern}")


def writable_folder(path):
    """Why `path` cannot become a run folder, or None if it can.

    Args:
        path: the folder asked for; it may not exist yet.

    Returns:
        a one-line reason (an existing file, or a place this process cannot
        create or write into), or None.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder."
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{path} cannot be created: {existing} is a file."
    # Trying is the only test that holds for root, read-only mounts and
    # pseudo file systems alike; the probe leaves nothing behind.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gloro-probe-", dir=existing))
    except OSError as err:
        return f"{path} cannot be created or written: {err.strerror} in {existing}."
    return None


class RunFolder:
    """A folder holding one training run, identified by its marker file.

    Create one with `RunFolder.open`.

    Attributes:
        path: the folder.
        run_id: random identity of the run; backups carry it, so a backup
            left by another run (before `--restart`) is never restored.
        settings: the settings that shape the run, as recorded.
        state: `"training"`, `"finished"` or `"diverged"`.
    """

    def __init__(self, path, marker):
        self.path = Path(path)
        self.run_id = marker["run_id"]
        self.settings = marker["settings"]
        self.state = marker["state"]
        self.diverged_epoch = marker.get("diverged_epoch")

    @classmethod
    def open(cls, path, settings, restart=False):
        """Opens `path` for a run with `settings`, creating it if needed.

        Args:
            path: the folder.
            settings: JSON-serialisable dict of what shapes the model and
                its training (architecture, epochs, learning rate, ...).
            restart: start the run over, removing what an earlier run wrote.

        Returns:
            the `RunFolder`. `backup_epoch()` says whether it resumes.

        Raises:
            RunFolderError: the folder holds files that are not a run's; or
                holds a finished or diverged run, or one started with other
                settings, and `restart` is False.

        Example:

        ```python
        run = RunFolder.open("runs/fm", {"epochs": 10})
        ```
        """
        path = Path(path)
        marker = cls.check(path, settings, restart)
        path.mkdir(parents=True, exist_ok=True)
        _remove_partials(path)
        if marker is not None and not restart:
            run = cls(path, marker)
            if not run.backups():
                # Killed before its first backup: it starts from scratch.
                run.discard_outputs()
            return run
        run = cls(path, {"run_id": secrets.token_hex(8), "settings": settings, "state": "training"})
        # The new identity comes first: a kill after it leaves the earlier
        # run's backups unusable and its files due for removal.
        run._write_marker()
        run.discard_outputs()
        return run

    @classmethod
    def check(cls, path, settings, restart=False):
        """What `open` checks, without writing anything.

        Args:
            path, settings, restart: as for `open`.

        Returns:
            the folder's marker (a dict), or None if it holds no run yet.

        Raises:
            RunFolderError: as for `open`.
        """
        path = Path(path)
        reason = writable_folder(path)
        if reason:
            raise RunFolderError(reason)
        if not path.exists():
            return None
        marker = _read_marker(path)
        if marker is None:
            # A kill before its marker was in place leaves only the marker's
            # partial.
            foreign = sorted(p.name for p in path.iterdir() if p.name != partial_path(MARKER).name)
            if foreign:
                raise RunFolderError(
                    f"{path} holds files that no gloro run wrote (such as {foreign[0]!r}); "
                    "pass a new or empty folder to --out."
                )
        elif not restart:
            cls(path, marker)._check(settings)
        return marker

    def _check(self, settings):
        differences = [
            f"{key} is {_show(settings.get(key))} but the run in {self.path} was started with "
            f"{_show(self.settings.get(key))}"
            for key in sorted(set(settings) | set(self.settings))
            if settings.get(key) != self.settings.get(key)
        ]
        if differences:
            raise RunFolderError(
                f"{differences[0]}{f' (and {len(differences) - 1} more)' if len(differences) > 1 else ''}; "
                "rerun with the same settings to resume, or start over with --restart."
            )
        if self.state == "finished":
            raise RunFolderError(
                f"{self.path} holds a finished run; certify its model.keras, pass another --out, "
                "or train it again from scratch with --restart."
            )
        if self.state == "diverged":
            raise RunFolderError(
                f"the run in {self.path} diverged (non-finite loss or weights) in epoch "
                f"{self.diverged_epoch}, and resuming it with the same settings would diverge again; "
                "start over with --restart and other settings (a lower --lr, for instance)."
            )

    def _write_marker(self):
        marker = {"run_id": self.run_id, "state": self.state, "settings": self.settings}
        if self.diverged_epoch is not None:
            marker["diverged_epoch"] = self.diverged_epoch
        write_json(self.path / MARKER, marker)

    def mark(self, state, epoch=None):
        """Records the run's state: `"finished"` once every output is
        written, `"diverged"` (with the epoch) when training diverged."""
        self.state = state
        self.diverged_epoch = epoch
        self._write_marker()

    def backup_dir(self):
        return self.path / "backup"

    def backups(self):
        """`{epoch: path}` of this run's complete backups."""
        found = {}
        folder = self.backup_dir()
        if folder.is_dir():
            for item in folder.iterdir():
                match = _BACKUP.match(item.name)
                if match and _backup_run_id(item) == self.run_id:
                    found[int(match[1])] = item
        return found

    def backup_epoch(self):
        """The epoch of the newest backup of this run, or 0."""
        return max(self.backups(), default=0)

    def keep_backup(self, epoch):
        """Removes the backups newer than `epoch` (so that every worker of a
        job resumes from the same one)."""
        for newer, path in self.backups().items():
            if newer > epoch:
                path.unlink()

    def remove_backups(self):
        _remove_matching(self.backup_dir(), _BACKUP_OR_PARTIAL)

    def discard_outputs(self):
        """Removes what an earlier attempt of the run wrote, before it
        starts from scratch: a run's own files only."""
        self.remove_backups()
        _remove_matching(self.path / "logs", _EVENTS)
        for name in RUN_FILES:
            if name not in ("logs", "backup"):
                _remove(self.path / name)


def _show(value):
    return "unset" if value is None else repr(value)


def _read_marker(path):
    try:
        marker = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as err:
        raise RunFolderError(f"cannot read {path / MARKER} ({err}); it was not written by gloro.") from err
    if not (isinstance(marker, dict) and {"run_id", "settings", "state"} <= set(marker)):
        raise RunFolderError(f"{path / MARKER} is not a gloro run marker.")
    return marker


def _own_partials(path):
    """What a killed run may have left half-written in `path` (not a user's
    `notes.partial.txt`)."""
    names = {partial_path(Path(name)).name for name in (MARKER, *RUN_FILES)}
    found = [path / name for name in names if (path / name).exists()]
    if (path / "backup").is_dir():
        found += [item for item in (path / "backup").iterdir() if _PARTIAL_BACKUP.match(item.name)]
    return found


def _remove_partials(path):
    for item in _own_partials(path):
        _remove(item)


def _backup_run_id(path):
    try:
        with h5py.File(path, "r") as file:
            return file.attrs.get("gloro_run_id")
    except OSError:
        return None


class Diverged(RuntimeError):
    """Training reached a non-finite loss or weights.

    Attributes:
        epoch: the epoch it happened in, counted from 1.
    """

    def __init__(self, epoch, loss):
        super().__init__(f"training diverged in epoch {epoch} (loss {loss}, or non-finite weights)")
        self.epoch = epoch


class BackupAndResume(keras.callbacks.Callback):
    """Backs a run up after every epoch and resumes from its newest backup.

    Unlike `keras.callbacks.BackupAndRestore`, every backup is one file,
    `backup/epoch_<n>.weights.h5` (model, optimizer and power-iteration
    state), written aside and renamed into place, and tagged with the run's
    identity: a kill at any instant leaves either the new backup or the one
    before it, never a cut-short file that stops the next run. The two
    newest are kept. An epoch that ends with a non-finite loss or weights is
    not backed up: `fit` stops with `Diverged`.

    Args:
        run: the `RunFolder`.

    Example:

    ```python
    try:
        g.fit(x, y, epochs=10, callbacks=[BackupAndResume(run)])
    except Diverged as err:
        run.mark("diverged", epoch=err.epoch)
    ```
    """

    def __init__(self, run):
        super().__init__()
        self.run = run

    def on_train_begin(self, logs=None):
        backups = self.run.backups()
        if not backups:
            return
        epoch = max(backups)
        if self.model.optimizer is not None and not self.model.optimizer.built:
            # The optimizer's variables must exist to receive their state.
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(backups[epoch])
        if not _finite(self.model):
            raise RunFolderError(
                f"the backup {backups[epoch]} holds non-finite weights; start over with --restart."
            )
        # How keras.callbacks.BackupAndRestore makes fit start at an epoch.
        self.model._initial_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if (loss is not None and not math.isfinite(float(loss))) or not _finite(self.model):
            # Raised, not a stop: the callbacks that end training would
            # compute bounds from non-finite weights.
            raise Diverged(epoch + 1, loss)
        folder = self.run.backup_dir()
        folder.mkdir(exist_ok=True)
        with atomic_path(folder / f"epoch_{epoch + 1}.weights.h5") as tmp:
            self.model.save_weights(tmp)
            with h5py.File(tmp, "a") as file:
                file.attrs["gloro_run_id"] = self.run.run_id
        for older in sorted(self.run.backups())[:-_BACKUPS_KEPT]:
            (folder / f"epoch_{older}.weights.h5").unlink()


def _finite(model):
    return all(
        np.all(np.isfinite(keras.ops.convert_to_numpy(v)))
        for v in model.trainable_variables
    )


class HistoryCSV(keras.callbacks.Callback):
    """Per-epoch logs in a CSV file that is rewritten whole at every epoch.

    Rows are `epoch` and the sorted log keys, as `keras.callbacks.CSVLogger`
    writes them. A resumed run keeps the rows of the epochs before the one
    it starts with and replaces the rest (an epoch logged but not backed up
    before a kill is redone). The file is written aside and renamed, so a
    kill never leaves half a row.

    Args:
        path: the CSV file.

    Example:

    ```python
    g.fit(x, y, epochs=10, callbacks=[HistoryCSV("runs/fm/history.csv")])
    ```
    """

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)

    def on_epoch_end(self, epoch, logs=None):
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as file:
                rows = [row for row in csv.DictReader(file) if int(row["epoch"]) < epoch]
        rows.append({"epoch": epoch, **{k: _csv_value(v) for k, v in sorted((logs or {}).items())}})
        keys = list(rows[-1])
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.path, buffer.getvalue())


def _csv_value(value):
    value = keras.ops.convert_to_numpy(value) if not isinstance(value, (int, float, str)) else value
    return value.item() if isinstance(value, np.ndarray) and value.size == 1 else value
