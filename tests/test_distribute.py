"""Training on several devices and machines gives what one device gives.

Devices are configured per process, so every distributed run happens in a
fresh interpreter, bounded in time: tests/replicas.py for two devices in one
process, scripts/train.py for two worker processes on 127.0.0.1.
"""

import csv
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from idx_files import write_idx

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
CERTIFY = ROOT / "scripts" / "certify.py"
EPOCHS = 4
EPSILON = 0.1


def _env(**overrides):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "GLORO_DATA_DIR": "", **overrides}


def _run_replicas(engine, **env):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "replicas.py"), engine],
        capture_output=True, text=True, env=_env(**env), timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.splitlines()[-1] == "OK"


@pytest.mark.slow
@pytest.mark.tensorflow
def test_mirrored_strategy_matches_one_device():
    _run_replicas("mirrored")


# In the JAX test process (the subprocess would pick JAX itself either way).
@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs in the JAX test process")
def test_jax_data_parallel_matches_one_device():
    _run_replicas("data_parallel", KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")


def test_train_refuses_a_strategy_it_cannot_run(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    from typer.testing import CliRunner

    spec = importlib.util.spec_from_file_location("_train_strategies", TRAIN)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if keras.backend.backend() == "tensorflow":
        cases = [("data_parallel", "needs the jax backend"), ("multiworker", "TF_CONFIG")]
    else:
        cases = [("mirrored", "needs the tensorflow backend")]
    for strategy, reason in cases:
        result = CliRunner().invoke(train.app, ["--strategy", strategy, "--out", str(tmp_path / "out")])
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 2, result.output
        assert len(errors) == 1 and "--strategy" in errors[0] and reason in errors[0], result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------ two workers on 127.0.0.1


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class _Job:
    """Both workers of one multi-worker training job."""

    def __init__(self, data_dir, out, logs, attempt):
        ports = _free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        self.logs = [logs / f"attempt{attempt}_worker{i}.log" for i in range(2)]
        self.processes = []
        for index, log in enumerate(self.logs):
            tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            command = [
                sys.executable, str(TRAIN), "--strategy", "multiworker", "--dataset", "synthetic",
                "--data-dir", str(data_dir), "--out", str(out), "--architecture", "cnn_2C2F",
                "--epsilon", str(EPSILON), "--epochs", str(EPOCHS), "--batch-size", "16", "--verbose", "2",
            ]
            with open(log, "w") as file:
                self.processes.append(subprocess.Popen(
                    command, stdout=file, stderr=subprocess.STDOUT, env=_env(TF_CONFIG=tf_config, KERAS_BACKEND="tensorflow")
                ))

    def output(self):
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)

    def kill(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()

    def wait(self, timeout):
        deadline = time.monotonic() + timeout
        try:
            for process in self.processes:
                process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the workers did not finish in {timeout} s\n{self.output()}")
        codes = [p.returncode for p in self.processes]
        assert codes == [0, 0], f"exit codes {codes}\n{self.output()}"


def _backed_up_epoch(backup):
    """The newest epoch backed up in `backup` (gloro.runs.BackupAndResume
    renames each whole file into place), 0 if none."""
    names = (p.name for p in backup.glob("*"))
    return max((int(m[1]) for m in map(re.compile(r"^epoch_(\d+)\.weights\.h5$").match, names) if m), default=0)


@pytest.fixture(scope="module")
def resumed_job(tmp_path_factory):
    """A two-worker run whose second worker is killed during the third epoch
    and which a scheduler then restarts (both workers).

    The second worker's backup is first set back by an epoch, as if it had
    died after the chief backed up the second epoch but before it did: the
    restarted workers must agree on the first epoch.

    Returns `(out, epoch the restarted chief resumed at, its log, every
    worker process started)`.
    """
    pytest.importorskip("tensorflow")
    root = tmp_path_factory.mktemp("multiworker")
    rng = np.random.default_rng(0)
    prototypes = rng.random((4, 8, 8))
    data_dir = root / "data"
    (data_dir / "synthetic").mkdir(parents=True)
    for prefix, n in (("train", 384), ("t10k", 128)):
        labels = rng.integers(0, 4, n)
        images = 255 * (0.4 * prototypes[labels] + 0.6 * rng.random((n, 8, 8)))
        write_idx(data_dir / "synthetic" / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(data_dir / "synthetic" / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    out = root / "run"
    backups = [out / "backup", Path(f"{out}.workertemp_worker_1") / "backup"]

    job = _Job(data_dir, out, root, attempt=0)
    try:
        deadline = time.monotonic() + 180
        while min(_backed_up_epoch(b) for b in backups) < 2:
            if any(p.poll() is not None for p in job.processes) or time.monotonic() > deadline:
                pytest.fail(f"no epoch backed up by both workers\n{job.output()}")
            time.sleep(0.05)
        assert all(p.poll() is None for p in job.processes), "trained to the end before the kill"
        job.processes[1].kill()
    finally:
        # The scheduler sees a failed task and tears the whole job down.
        job.kill()
    epochs = [_backed_up_epoch(b) for b in backups]
    assert epochs[0] == epochs[1] < EPOCHS, epochs
    (backups[1] / f"epoch_{epochs[1]}.weights.h5").unlink()
    assert _backed_up_epoch(backups[1]) == epochs[0] - 1

    restarted = _Job(data_dir, out, root, attempt=1)
    restarted.wait(timeout=240)
    return out, epochs[0] - 1, restarted.logs[0].read_text(), job.processes + restarted.processes


@pytest.mark.slow
@pytest.mark.tensorflow
def test_multiworker_resumes_after_a_worker_is_killed(resumed_job):
    out, resumed_at, chief_log, processes = resumed_job
    assert all(p.poll() is not None for p in processes)
    assert f"Resuming from epoch {resumed_at}, the last one every worker backed up" in chief_log
    first = re.search(r"^Epoch (\d+)/(\d+)$", chief_log, re.MULTILINE)
    assert first and (int(first[1]), int(first[2])) == (resumed_at + 1, EPOCHS), chief_log[-3000:]
    with open(out / "history.csv", newline="") as file:
        assert [int(row["epoch"]) for row in csv.DictReader(file)] == list(range(EPOCHS))
    # Only the chief wrote --out; the other worker removed its folder.
    assert not (out / "backup").exists()
    assert not list(out.parent.glob(f"{out.name}.workertemp_*"))
    assert (out / "model.keras").exists() and (out / "saved_model" / "saved_model.pb").exists()


@pytest.mark.slow
@pytest.mark.tensorflow
def test_multiworker_model_certifies_as_one_process_would(resumed_job):
    import gloro
    from gloro import architectures

    out = resumed_job[0]
    g = gloro.load_model(out / "model.keras")
    fresh = gloro.GloroNet(model=architectures.get("cnn_2C2F", (8, 8, 1), 4), epsilon=EPSILON)
    fresh.f.set_weights(g.f.get_weights())
    np.testing.assert_array_equal(g.lipschitz_constant(), fresh.lipschitz_constant())

    from typer.testing import CliRunner

    data_dir = out.parent / "data"
    spec = importlib.util.spec_from_file_location("_certify_multiworker", CERTIFY)
    certify = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(certify)
    result = CliRunner().invoke(certify.app, [
        "--model", str(out / "model.keras"), "--dataset", "synthetic", "--data-dir", str(data_dir),
        "--out", str(out / "certified"), "--verbose", "0",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "certified" / "certify.json").read_text())
    results = json.loads((out / "results.json").read_text())
    # The chief's evaluation, sharded over both workers, saw every test
    # example once.
    for key in ("clean_acc", "vra", "rejection_rate"):
        assert report[key] == pytest.approx(results["test"][key], abs=1e-6), key
    assert report["lipschitz_constant"] == pytest.approx(results["lipschitz_constant"])
    assert 0 < report["vra"] <= report["clean_acc"]


# ------------------------------------- malformed clusters, missing peers


def _train_app():
    pytest.importorskip("tensorflow")
    spec = importlib.util.spec_from_file_location("_train_clusters", TRAIN)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train.app


def _refused(app, strategy, out, reason):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["--strategy", strategy, "--out", str(out)])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and "--strategy" in errors[0] and reason in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.tensorflow
def test_a_malformed_tf_config_is_refused_in_one_line(tmp_path, monkeypatch):
    app = _train_app()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            ('{"cluster": ', "not valid JSON"),
            ('{"task": {"type": "worker", "index": 0}}', "TF_CONFIG must be"),
            ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}', "index 3 is out of range"),
            ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "chief", "index": 0}}', "'chief' is not in"),
            ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "not a host:port"),
            (json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}"]}, "task": {"type": "worker", "index": 0}}),
             f"port {port} of this worker's address in TF_CONFIG is in use"),
        ]
        for tf_config, reason in cases:
            monkeypatch.setenv("TF_CONFIG", tf_config)
            _refused(app, "multiworker", tmp_path / "out", reason)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="runs in the JAX test process")
def test_malformed_jax_process_variables_are_refused_in_one_line(tmp_path, monkeypatch):
    app = _train_app()
    cases = [
        ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "nonsense"}, "not a host:port"),
        ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1,127.0.0.1:2", "KERAS_DISTRIBUTION_NUM_PROCESSES": "3",
          "KERAS_DISTRIBUTION_PROCESS_ID": "0"}, "lists 2 address(es)"),
        ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"},
         "KERAS_DISTRIBUTION_PROCESS_ID must be a whole number"),
        ({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
          "KERAS_DISTRIBUTION_PROCESS_ID": "2"}, "not below the 2 processes"),
    ]
    for variables, reason in cases:
        for name in ("KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        _refused(app, "data_parallel", tmp_path / "out", reason)


@pytest.mark.slow
@pytest.mark.tensorflow
def test_a_missing_peer_times_out_and_sigterm_stops_a_waiting_worker(tmp_path):
    """Two lone workers of two-worker clusters whose peer never starts: one
    ends after --worker-timeout, the other is sent SIGTERM while it waits."""
    data_dir = tmp_path / "data"
    (data_dir / "synthetic").mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx(data_dir / "synthetic" / f"{prefix}-images-idx3-ubyte.gz", np.zeros((8, 8, 8), np.uint8))
        write_idx(data_dir / "synthetic" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(8, dtype=np.uint8) % 2)
    processes = []
    for name, timeout in (("timeout", "5"), ("sigterm", "600")):
        ports = _free_ports(2)
        tf_config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                "task": {"type": "worker", "index": 0}})
        command = [sys.executable, str(TRAIN), "--strategy", "multiworker", "--dataset", "synthetic",
                   "--data-dir", str(data_dir), "--out", str(tmp_path / name), "--architecture", "mlp",
                   "--epochs", "1", "--verbose", "0", "--worker-timeout", timeout]
        processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=_env(TF_CONFIG=tf_config, KERAS_BACKEND="tensorflow")))
    timed_out, terminated = processes
    try:
        # The supervised worker is started, imports TensorFlow and waits.
        deadline = time.monotonic() + 120
        children = Path(f"/proc/{terminated.pid}/task/{terminated.pid}/children")
        while not children.read_text().split():
            assert terminated.poll() is None and time.monotonic() < deadline, terminated.communicate()
            time.sleep(0.2)
        (worker,) = map(int, children.read_text().split())
        time.sleep(15)
        terminated.terminate()
        _, stderr = terminated.communicate(timeout=10)
        assert terminated.returncode == 128 + 15, stderr
        assert not Path(f"/proc/{worker}").exists() or "zombie" in Path(f"/proc/{worker}/status").read_text()

        _, stderr = timed_out.communicate(timeout=120)
        errors = [line for line in stderr.splitlines() if line.startswith("Error")]
        assert timed_out.returncode == 1, stderr[-3000:]
        assert errors == [line for line in errors if "did not all join within 5 s (--worker-timeout)" in line]
        assert len(errors) == 1, stderr[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
