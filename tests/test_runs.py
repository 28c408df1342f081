"""Run folders (`gloro.runs`) and scripts/train.py killed at every file
operation.

The kill is injected rather than timed: every rename and removal under the
run's folder goes through `os.replace`, `os.unlink`, `os.rmdir` or
`shutil.rmtree`. One uninterrupted run copies its folder aside before each
of them: the folder a kill just before that operation leaves (writes go to
`*.partial*` names before their rename, so a kill during a write leaves the
same folder as a kill just before the rename that follows it). Every copy
must open as a run folder that resumes, restarts or stays finished; the
same command then runs on one copy of each kind (by state and newest
backup) and must end with the figures of the uninterrupted run, which an
untrained model would not have. Only the folder outlives a kill, so the
copies stand for kills of the process at those instants.
"""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from idx_files import write_idx

tf = pytest.importorskip("tensorflow")

from typer.testing import CliRunner  # noqa: E402

from gloro import runs  # noqa: E402

# File operations of a run: the backend does not change them (the scripts'
# runs on JAX and torch are in test_scripts_jax.py).
pytestmark = [pytest.mark.backend_neutral, pytest.mark.slow]

TRAIN = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
EPOCHS = 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """4 classes of 8x8 images, 64 to train on and 32 to test."""
    rng = np.random.default_rng(0)
    prototypes = rng.random((4, 8, 8))
    folder = tmp_path_factory.mktemp("data") / "tiny"
    folder.mkdir()
    for prefix, n in (("train", 64), ("t10k", 32)):
        labels = np.arange(n) % 4
        images = 255 * (0.5 * prototypes[labels] + 0.5 * rng.random((n, 8, 8)))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return folder.parent


def _train_module():
    spec = importlib.util.spec_from_file_location("_train_runs", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_train = None


def _invoke(*args):
    global _train
    _train = _train or _train_module()
    return CliRunner().invoke(_train.app, [str(a) for a in args])


def _args(data_dir, out, *extra):
    return [
        "--dataset", "tiny", "--data-dir", data_dir, "--out", out, "--architecture", "mlp",
        "--epochs", EPOCHS, "--batch-size", 64, "--epsilon", 0.1, "--verbose", 0, *extra,
    ]


def _figures(out):
    results = json.loads((out / "results.json").read_text())
    return [results[split][k] for split in ("train", "test") for k in ("clean_acc", "vra", "loss")]


class _FileOperations:
    """Records the renames and removals under `root`, copying the folder
    into `snapshots/<n>` before the n-th."""

    def __init__(self, monkeypatch, root, snapshots):
        self.root, self.snapshots, self.names = Path(root), snapshots, []
        for module, name in ((os, "replace"), (os, "unlink"), (os, "rmdir"), (shutil, "rmtree")):
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name))
        self._copy = shutil.copytree

    def _wrap(self, operation, name):
        def wrapped(path, *args, **kwargs):
            if self.root in Path(os.fspath(path)).parents:
                self.names.append(f"{name} {Path(path).relative_to(self.root)}")
                self._copy(self.root, self.snapshots / str(len(self.names)))
            return operation(path, *args, **kwargs)

        return wrapped


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run: its figures, its file operations and the
    folder before each of them (`snapshots/<n>` before the n-th, 1-based,
    and `snapshots/<count + 1>` at the end)."""
    root = tmp_path_factory.mktemp("reference")
    out, snapshots = root / "run", root / "snapshots"
    with pytest.MonkeyPatch.context() as monkeypatch:
        operations = _FileOperations(monkeypatch, out, snapshots)
        result = _invoke(*_args(data_dir, out))
    assert result.exit_code == 0, result.output
    shutil.copytree(out, snapshots / str(len(operations.names) + 1))
    return _figures(out), operations.names, snapshots


def test_an_uninterrupted_run_renames_every_file_into_place(reference):
    _, names, _ = reference
    for name in ("gloro_run.json", "history.csv", f"backup/epoch_{EPOCHS}.weights.h5", "model.keras",
                 "saved_model", "results.json"):
        assert f"replace {runs.partial_path(Path(name))}" in names, (name, names)
    # Marked finished before its backups go.
    finished = max(i for i, name in enumerate(names) if name == "replace gloro_run.partial.json")
    assert sorted(names[finished + 1:]) == [
        "rmdir backup", f"unlink backup/epoch_{EPOCHS - 1}.weights.h5", f"unlink backup/epoch_{EPOCHS}.weights.h5"
    ]


def _kind(folder):
    """What a rerun does with a killed run's folder: (state, newest backup)."""
    if not (folder / runs.MARKER).exists():
        # Killed before the marker was in place: only its partial is there.
        assert runs.RunFolder.check(folder, {}) is None
        return "new", None
    settings = json.loads((folder / runs.MARKER).read_text())["settings"]
    try:
        run = runs.RunFolder.open(folder, settings)
    except runs.RunFolderError as err:
        assert "holds a finished run" in str(err)
        return "finished", None
    assert not [p for p in folder.rglob("*") if ".partial" in p.name]
    return run.state, run.backup_epoch()


@pytest.mark.slow
def test_a_kill_at_any_file_operation_leaves_a_folder_the_command_resumes(reference, data_dir, tmp_path):
    figures, names, snapshots = reference
    kinds = {}
    for n in range(1, len(names) + 2):
        where = f"killed before {names[n - 1]!r}" if n <= len(names) else "killed after the last operation"
        probe = tmp_path / "probe"
        shutil.copytree(snapshots / str(n), probe)
        kinds.setdefault(_kind(probe), []).append((n, where))
        shutil.rmtree(probe)
    # A kill can land before the first backup, after each, and after the
    # run is marked finished.
    assert set(kinds) == {("new", None), ("training", 0), ("training", 1), ("training", 2), ("finished", None)}, kinds
    for kind, cases in kinds.items():
        n, where = cases[-1]
        out = tmp_path / f"rerun_{n}"
        shutil.copytree(snapshots / str(n), out)
        rerun = _invoke(*_args(data_dir, out))
        if kind == ("finished", None):
            assert rerun.exit_code == 2 and "holds a finished run" in rerun.output, (where, rerun.output)
        else:
            assert rerun.exit_code == 0, (where, rerun.output)
            assert not (out / "backup").exists(), where
        assert json.loads((out / runs.MARKER).read_text())["state"] == "finished", where
        np.testing.assert_allclose(_figures(out), figures, rtol=1e-5, err_msg=where)
        history = (out / "history.csv").read_text().splitlines()
        assert [row.split(",")[0] for row in history[1:]] == [str(e) for e in range(EPOCHS)], where
