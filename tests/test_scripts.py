"""End-to-end tests of scripts/train.py and scripts/certify.py on a small
synthetic dataset written as gzipped IDX files (the layout of Debian's
Fashion-MNIST package).

The scripts run in this process through their typer apps, and in
subprocesses where a test kills one. The module runs in the TensorFlow test
process only (the suite's time budget has no room for a second pass of these
end-to-end runs); `tests/test_scripts_jax.py` runs the scripts in the JAX
test process."""

import csv
import functools
import importlib.util
import inspect
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from idx_files import write_idx
from typer.testing import CliRunner

# The scripts read their data with tf.data on every backend.
tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.tensorflow

import gloro  # noqa: E402
from gloro import certificates, data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"
CERTIFY = ROOT / "scripts" / "certify.py"
EPSILON = 0.1
TRAIN_FLAGS = ["--dataset", "synthetic", "--epsilon", str(EPSILON), "--verbose", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """10 classes of 28x28 images: a fixed random prototype per class mixed
    with noise, so that after two epochs some test points are certified,
    some rejected and some misclassified."""
    rng = np.random.default_rng(0)
    prototypes = rng.random((10, 28, 28))
    folder = tmp_path_factory.mktemp("data") / "synthetic"
    folder.mkdir()
    for prefix, n in (("train", 512), ("t10k", 256)):
        labels = rng.integers(0, 10, n)
        images = 255 * (0.2 * prototypes[labels] + 0.8 * rng.random((n, 28, 28)))
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return folder.parent


def _command(script, *args):
    return [sys.executable, str(script), *map(str, args)]


def _env(**overrides):
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "GLORO_DATA_DIR": "", **overrides}


def _run(script, *args, env=None):
    result = subprocess.run(
        _command(script, *args), check=False, capture_output=True, text=True, env=env or _env(), timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _history(out):
    with open(out / "history.csv", newline="") as file:
        return list(csv.DictReader(file))


def _test_metrics(model_path, data_dir):
    """Test clean accuracy, VRA and rejection rate of a saved model,
    computed here from its predictions."""
    g = gloro.load_model(model_path)
    ds, _ = data.load("synthetic", "test", data_dir=data_dir)
    x, y = (np.stack(a) for a in zip(*ds.as_numpy_iterator()))
    outputs = g.predict(x, verbose=0)
    m = outputs.shape[1] - 1
    prediction = np.argmax(outputs, axis=1)
    return {
        "clean_acc": np.mean(np.argmax(outputs[:, :m], axis=1) == y),
        "vra": np.mean(prediction == y),
        "rejection_rate": np.mean(prediction == m),
    }


def invoke(script, *args):
    """Runs a script's typer app in this process; returns its output."""
    result = CliRunner().invoke(_load_module(script).app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    invoke(TRAIN, *TRAIN_FLAGS, "--epochs", 2, "--batch-size", 32, "--data-dir", data_dir, "--out", out)
    return out


def test_train_writes_its_outputs(trained, data_dir):
    for name in ("model.keras", "saved_model/saved_model.pb", "results.json", "history.csv"):
        assert (trained / name).exists(), name
    assert not (trained / "backup").exists()
    if importlib.util.find_spec("tensorboard"):
        (events,) = (trained / "logs" / "train").glob("events.out.tfevents.*")
        tags = {
            value.tag
            for event in tf.compat.v1.train.summary_iterator(str(events))
            for value in event.summary.value
        }
        assert {"epoch_lipschitz", "epoch_epsilon", "epoch_vra", "epoch_learning_rate"} <= tags

    results = json.loads((trained / "results.json").read_text())
    assert results["epsilon"] == EPSILON
    assert results["config"]["epochs"] == 2 and results["config"]["dataset"] == "synthetic"
    versions = results["versions"]
    assert versions["keras_backend"] == keras.backend.backend()
    assert {"gloro", "keras", keras.backend.backend(), "tensorflow", "numpy", "python"} <= set(versions)
    for split in ("train", "test"):
        assert 0 <= results[split]["vra"] <= results[split]["clean_acc"] <= 1
        assert results[split]["vra"] + results[split]["rejection_rate"] <= 1
    # The test data is hard enough that the numbers below test something.
    assert 0 < results["test"]["vra"] < results["test"]["clean_acc"] < 1
    assert results["lipschitz_constant"] > 0
    assert results["seconds_per_epoch"] > 0 and len(results["epoch_seconds"]) == 2
    assert results["peak_memory"]["host_rss_mb"] > 0

    history = _history(trained)
    assert [int(row["epoch"]) for row in history] == [0, 1]
    # Training ends at 1.1 epsilon (the default schedule); the model at epsilon.
    assert float(history[-1]["epsilon"]) == pytest.approx(1.1 * EPSILON, rel=1e-6)
    assert gloro.load_model(trained / "model.keras").epsilon == pytest.approx(EPSILON)
    np.testing.assert_allclose(
        list(_test_metrics(trained / "model.keras", data_dir).values()),
        [results["test"][k] for k in ("clean_acc", "vra", "rejection_rate")],
        atol=1e-6,
    )


@pytest.mark.slow
def test_train_builds_a_liresnet(data_dir, tmp_path):
    flags = ["--architecture", "liresnet", "--depth", 1, "--width", 4, "--epochs", 1, "--batch-size", 256]
    result = CliRunner().invoke(
        _load_module(TRAIN).app, [*map(str, TRAIN_FLAGS + flags), "--data-dir", str(data_dir), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["architecture"] == "liresnet"
    assert (results["config"]["depth"], results["config"]["width"]) == (1, 4)
    f = gloro.load_model(tmp_path / "model.keras").f
    (block,) = [layer for layer in f.layers if isinstance(layer, gloro.layers.LiResNetBlock)]
    assert block.filters == 4


def test_certify_measures_what_train_reported(trained, data_dir):
    out = trained / "certified"
    printed = invoke(
        CERTIFY,
        "--model",
        trained / "model.keras",
        "--dataset",
        "synthetic",
        "--data-dir",
        data_dir,
        "--out",
        out,
        "--audit",
        10,
        "--verbose",
        0,
    )
    results = json.loads((trained / "results.json").read_text())
    report = json.loads((out / "certify.json").read_text())
    for key in ("clean_acc", "vra", "rejection_rate"):
        assert report[key] == pytest.approx(results["test"][key], abs=1e-6), key
    assert report["epsilon"] == EPSILON
    assert report["num_examples"] == 256
    assert report["throughput_examples_per_second"] > 0
    assert report["lipschitz_constant"] == pytest.approx(results["lipschitz_constant"])
    assert 1 <= report["lipschitz_report"]["ratio"] < 1.01
    assert report["radius_vra_disagreements"] == 0
    assert report["audit"]["points"] == 10
    assert report["audit"]["broken"] == 0
    assert report["audit"]["max_relative_margin_reduction"] < 1
    # Figures are printed rounded, the audit's like the accuracies.
    assert re.search(
        r"^Audit: PGD broke 0 of 10 points certified as a single class; largest margin reduction 0\.\d{4} of the clean "
        r"margin\.$",
        printed,
        re.MULTILINE,
    ), printed
    assert not re.search(r"\d\.\d{7}", printed), printed

    with open(out / "examples.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["index"]) for r in rows] == list(range(256))
    label, clean, prediction = (
        np.array([int(r[k]) for r in rows]) for k in ("label", "clean_prediction", "prediction")
    )
    radius = np.array([float(r["radius"]) for r in rows])
    assert np.mean(prediction == label) == pytest.approx(report["vra"])
    assert np.mean(prediction == -1) == pytest.approx(report["rejection_rate"])
    assert np.all((prediction == -1) | (prediction == clean))
    np.testing.assert_array_equal(prediction >= 0, radius > EPSILON)

    curve = np.loadtxt(out / "radius_curve.csv", delimiter=",", skiprows=1)
    assert curve[0, 0] == 0 and curve[0, 1] == pytest.approx(report["clean_acc"])
    assert np.all(np.diff(curve[:, 1]) <= 0)
    expected = [np.mean((clean == label) & (radius >= r)) for r in curve[:, 0]]
    np.testing.assert_allclose(curve[:, 1], expected)
    assert (out / "radius_curve.png").stat().st_size > 0


def _backups(out):
    """The epochs backed up whole in `out` (not `epoch_<n>.partial.weights.h5`)."""
    names = (p.name for p in (out / "backup").glob("*"))
    return [int(m[1]) for m in map(re.compile(r"^epoch_(\d+)\.weights\.h5$").match, names) if m]


@pytest.mark.slow
def test_killed_training_resumes(data_dir, tmp_path):
    epochs, steps = 8, 32
    args = [
        *TRAIN_FLAGS,
        "--batch-size",
        512 // steps,
        "--epochs",
        epochs,
        "--data-dir",
        data_dir,
        "--out",
        tmp_path,
    ]
    process = subprocess.Popen(
        _command(TRAIN, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    try:
        deadline = time.monotonic() + 120
        # Backups appear whole (tests/test_runs.py kills at every file
        # operation); this kill lands mid-training, at a real instant.
        while not _backups(tmp_path):
            assert process.poll() is None and time.monotonic() < deadline, "no epoch was backed up"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "results.json").exists()
    backed_up = max(_backups(tmp_path))
    assert 1 <= backed_up < epochs, "training finished before it was killed"
    before = _history(tmp_path)
    # A kill can also land between logging an epoch and backing it up: fake
    # the row such a run leaves, which the resumed run must replace.
    if len(before) == backed_up:
        with open(tmp_path / "history.csv", "a") as file:
            file.write(",".join([str(backed_up)] + ["-1"] * (len(before[0]) - 1)) + "\n")

    resumed = _run(TRAIN, *args)
    assert "Resuming" in resumed.stdout
    assert re.findall(r"Epoch (\d+)/", resumed.stdout) == [str(e + 1) for e in range(backed_up, epochs)]
    assert not (tmp_path / "backup").exists()
    history = _history(tmp_path)
    assert [int(row["epoch"]) for row in history] == list(range(epochs))
    assert history[:backed_up] == before[:backed_up]
    assert all(value != "-1" for row in history for value in row.values())
    # The epsilon schedule went on where it was: its value at the last batch
    # of each epoch.
    schedule = gloro.schedules.parse("[0.01]-log-[50%:1.1]")
    expected = [EPSILON * schedule((e + (steps - 1) / steps) / epochs) for e in range(epochs)]
    np.testing.assert_allclose([float(row["epsilon"]) for row in history], expected, rtol=1e-5)
    # So did the learning rate, a function of the restored step counter: its
    # value at the end of each epoch.
    schedule = gloro.schedules.parse("[1.]-[50%:1.]-cos-[0.01]")
    expected = [1e-3 * schedule((e + 1) / epochs) for e in range(epochs)]
    np.testing.assert_allclose([float(row["learning_rate"]) for row in history], expected, rtol=1e-5)

    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["epoch_seconds"]) == epochs
    # The optimizer state went on too: its step counter (the first optimizer
    # variable in the .keras weights) counts every step of both runs.
    with zipfile.ZipFile(tmp_path / "model.keras") as archive:
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")))
        assert weights["optimizer/vars/0"][()] == epochs * steps
    np.testing.assert_allclose(
        list(_test_metrics(tmp_path / "model.keras", data_dir).values()),
        [results["test"][k] for k in ("clean_acc", "vra", "rejection_rate")],
        atol=1e-6,
    )


@pytest.mark.slow
def test_certify_reports_relaxed_sets(trained, data_dir, tmp_path):
    g = gloro.load_model(trained / "model.keras")
    relaxed = gloro.relaxations.RtkGloroNet(model=g.f, epsilon=EPSILON, k=2)
    relaxed.save(tmp_path / "rtk.keras")
    results = _load_module(CERTIFY).certify(
        model=str(tmp_path / "rtk.keras"), dataset="synthetic", data_dir=str(data_dir),
        out=str(tmp_path / "certified"), audit=10, verbose=0,
    )
    ds, _ = data.load("synthetic", "test", data_dir=data_dir)
    x, y = (np.stack(a) for a in zip(*ds.as_numpy_iterator()))
    outputs = relaxed.predict(x, verbose=0)
    in_set = outputs[np.arange(len(y)), y] > outputs[:, -1]
    assert results["rtk_vra"] == pytest.approx(np.mean(in_set))
    assert results["rtk_vra"] >= results["vra"]
    assert results["mean_certified_k"] == pytest.approx(np.mean(gloro.certificates.certified_top_k(outputs)))
    assert results["audit"]["broken"] == 0 and results["audit"]["points"] > 0


@functools.cache
# In the long tier: tests/test_holes.py certifies from float32 logits under
# both half-precision policies in the default tier; this is the script's flag.
@pytest.mark.slow
def test_train_in_mixed_bfloat16_certifies_from_float32_logits(data_dir, tmp_path):
    invoke(TRAIN, *TRAIN_FLAGS, "--epochs", 1, "--batch-size", 64, "--dtype-policy", "mixed_bfloat16",
           "--data-dir", data_dir, "--out", tmp_path)
    # The policy reached the layers, and stayed with them.
    assert keras.config.dtype_policy().name == "float32"
    assert json.loads((tmp_path / "results.json").read_text())["config"]["dtype_policy"] == "mixed_bfloat16"
    g = gloro.load_model(tmp_path / "model.keras")
    assert {layer.compute_dtype for layer in g.f.layers[1:]} == {"bfloat16"}
    ds, _ = data.load("synthetic", "test", data_dir=data_dir)
    x = np.stack([image for image, _ in ds.as_numpy_iterator()])
    m = g.num_classes
    out = g.predict(x, verbose=0)
    # The same weights in float32 layers: the certificate's logits are
    # theirs (bfloat16 logits differ by about 1e-2).
    float32_f = keras.models.clone_model(
        g.f, clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})
    )
    float32_f.set_weights(g.f.get_weights())
    np.testing.assert_allclose(out[:, :m], float32_f.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, :m], keras.ops.convert_to_numpy(g.f(x)), rtol=1e-4, atol=1e-4)
    radius = certificates.certified_radius(float32_f.predict(x, verbose=0), g.lipschitz_constant())
    certified = np.argmax(out, axis=1) < m
    assert certified.any() and np.all(radius[certified] > g.epsilon)


def _load_module(script):
    spec = importlib.util.spec_from_file_location(f"_script_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--dataset", "no_such_dataset"], "--dataset"),
        (["--architecture", "resnet"], "--architecture"),
        (["--activation", "tanh"], "--activation"),
        (["--epsilon", "-0.1"], "--epsilon"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--epsilon-schedule", "[0.01]-log-[50%:"], "--epsilon-schedule"),
        (["--lr-schedule", "[1]-exp-[0]"], "--lr-schedule"),
        (["--loss", "trades_kl.x"], "--loss"),
        (["--loss", "mse"], "--loss"),
        (["--trades-schedule", "linear"], "--trades-schedule"),
        (["--optimizer", "rmsprop"], "--optimizer"),
        (["--optimizer", "sgd.1.5"], "--optimizer"),
        (["--augmentation", "flip"], "--augmentation"),
        (["--lr", "0"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--depth", "2"], "--depth"),
        (["--architecture", "mlp", "--width", "8"], "--width"),
        (["--architecture", "liresnet", "--width", "5"], "--width"),
        (["--architecture", "liresnet", "--depth", "-1"], "--depth"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--batch-size", "99999999999999999999"], "--batch-size"),
        (["--epsilon", "1e39"], "--epsilon"),
        (["--lr", "1e39"], "--lr"),
        (["--dtype-policy", "mixed_float16"], "--dtype-policy"),
        (["--worker-timeout", "0"], "--worker-timeout"),
        (["--worker-timeout", "inf"], "--worker-timeout"),
        (["--out", "{tmp}/file"], "--out"),
        (["--out", "/proc/gloro"], "--out"),
        (["--out", "{tmp}/file/below"], "--out"),
    ],
)
def test_train_rejects_bad_flags(args, flag, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" in args:
        result = CliRunner().invoke(_load_module(TRAIN).app, [*args, "--data-dir", str(tmp_path)])
        _assert_one_line_error(result.exit_code, result.output, flag)
        assert (tmp_path / "file").read_text() == "a file, not a folder"
        return
    result = CliRunner().invoke(
        _load_module(TRAIN).app, [*args, "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    )
    _assert_one_line_error(result.exit_code, result.output, flag)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--model", "{run}/model.keras", "--epsilon", "-1"], "--epsilon"),
        (["--model", "{run}/model.keras", "--dataset", "no_such_dataset"], "--dataset"),
        (["--model", "{run}/model.keras", "--split", "validation"], "--split"),
        (["--model", "{run}/model.keras", "--audit", "-1"], "--audit"),
        (["--model", "{run}/model.keras", "--epsilon", "1e39"], "--epsilon"),
        (["--model", "{run}/model.keras", "--split", "test[:0]"], "--split"),
        (["--model", "{run}/model.keras", "--out", "{run}/results.json"], "--out"),
    ],
)
def test_certify_rejects_bad_flags(args, flag, trained, data_dir):
    args = [a.format(run=trained) for a in args] + ["--data-dir", str(data_dir)]
    if "--dataset" not in args:
        args += ["--dataset", "synthetic"]
    result = CliRunner().invoke(_load_module(CERTIFY).app, args)
    _assert_one_line_error(result.exit_code, result.output, flag)
    assert not list(trained.glob("certify_*"))


def _assert_one_line_error(exit_code, output, flag, reason=""):
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert exit_code == 2, output
    assert len(errors) == 1 and flag in errors[0] and reason in errors[0], output
    assert "Traceback" not in output


def _lower_stored_constants(weights_file, stored):
    """Halves the stored margin Lipschitz constants in a .keras weights file.

    Args:
        weights_file: the bytes of `model.weights.h5`.
        stored: the constants the model certifies with, to find them by value
            (the file names variables by position, not by meaning).

    Returns:
        the bytes of the edited file.
    """
    buffer = io.BytesIO(weights_file)
    with h5py.File(buffer, "r+") as weights:
        found = []
        weights.visititems(
            lambda name, item: found.append(item)
            if isinstance(item, h5py.Dataset) and np.array_equal(item[()], stored)
            else None
        )
        # The constants and the copy freezing keeps of them: a consistent
        # forgery.
        assert len(found) == 2
        for item in found:
            item[...] = stored / 2
    return buffer.getvalue()


@pytest.fixture(scope="module")
def refused(trained, tmp_path_factory):
    """Files that gloro.load_model refuses, by kind."""
    folder = tmp_path_factory.mktemp("refused")
    paths = {"missing": folder / "missing.keras", "saved_model": trained / "saved_model"}

    paths["corrupt"] = folder / "corrupt.keras"
    paths["corrupt"].write_bytes(b"not a zip archive")

    paths["plain"] = folder / "plain.keras"
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]).save(
        paths["plain"]
    )

    paths["lowered"] = folder / "lowered.keras"
    stored = gloro.load_model(trained / "model.keras").lipschitz_constant()
    with zipfile.ZipFile(trained / "model.keras") as source, zipfile.ZipFile(paths["lowered"], "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename == "model.weights.h5":
                content = _lower_stored_constants(content, stored)
            target.writestr(item, content)
    # The edit landed in the file.
    with zipfile.ZipFile(paths["lowered"]) as archive:
        found = []
        h5py.File(io.BytesIO(archive.read("model.weights.h5"))).visititems(
            lambda name, item: found.append(name)
            if isinstance(item, h5py.Dataset) and np.array_equal(item[()], stored / 2)
            else None
        )
        assert len(found) == 2
    return paths


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("missing", "No model file"),
        ("saved_model", "a SavedModel's constants cannot be checked"),
        ("corrupt", "not a readable .keras model file"),
        ("plain", "not a GloroNet"),
        ("lowered", "constants below what its weights prove"),
    ],
)
def test_certify_refuses_what_load_model_refuses(kind, reason, refused, data_dir):
    args = ["--model", str(refused[kind]), "--dataset", "synthetic", "--data-dir", str(data_dir)]
    result = CliRunner().invoke(_load_module(CERTIFY).app, args)
    _assert_one_line_error(result.exit_code, result.output, "--model", reason)


@pytest.mark.slow
def test_bad_flag_from_the_command_line():
    result = subprocess.run(
        _command(TRAIN, "--epsilon", "-1"), check=False, capture_output=True, text=True, env=_env()
    )
    _assert_one_line_error(result.returncode, result.stderr, "--epsilon")


@pytest.mark.parametrize("script", [TRAIN, CERTIFY], ids=["train", "certify"])
def test_help_lists_every_flag_with_its_default(script):
    help_text = invoke(script, "--help")
    entries = {}
    for entry in re.split(r"\n  (?=--)", help_text)[1:]:
        flag, text = entry.split(None, 1)
        entries[flag] = " ".join(text.split())
    function = getattr(_load_module(script), script.stem)
    for name, parameter in inspect.signature(function).parameters.items():
        text = entries[f"--{name.replace('_', '-')}"]
        if parameter.default is inspect.Parameter.empty:
            assert "[required]" in text, name
        elif parameter.default is None or isinstance(parameter.default, bool):
            # A flag without a value shows its default in parentheses, as
            # flags whose default is worked out do.
            assert "[default: (" in text, name
        else:
            assert f"default: {parameter.default}" in text, name


# ------------------------------------------------ the output folder and reruns


def test_train_refuses_a_folder_it_did_not_write(data_dir, tmp_path):
    for name in ("logs/notes.txt", "backup/thesis.tex"):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_text(name)
    for out in (tmp_path, tmp_path / "backup"):
        result = CliRunner().invoke(
            _load_module(TRAIN).app, [*TRAIN_FLAGS, "--data-dir", str(data_dir), "--out", str(out), "--restart"]
        )
        _assert_one_line_error(result.exit_code, result.output, "--out", "holds files that no gloro run wrote")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "backup", "backup/thesis.tex", "logs", "logs/notes.txt"
    ]


@pytest.mark.parametrize(
    "args, reason",
    [
        ([], "holds a finished run"),
        (["--epochs", "4"], "epochs is 4 but the run in"),
        (["--activation", "relu"], "activation is 'relu' but the run in"),
        (["--architecture", "liresnet", "--depth", "3"], "architecture is 'liresnet'"),
    ],
)
def test_a_rerun_of_a_finished_run_changes_nothing(args, reason, trained, data_dir):
    before = {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()}
    result = CliRunner().invoke(
        _load_module(TRAIN).app,
        [*TRAIN_FLAGS, "--epochs", "2", "--batch-size", "32", "--data-dir", str(data_dir), "--out", str(trained), *args],
    )
    _assert_one_line_error(result.exit_code, result.output, "--out", reason)
    assert "--restart" in result.output
    assert {p: p.stat().st_mtime_ns for p in trained.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_a_diverged_run_is_not_resumed_and_restart_keeps_other_files(data_dir, tmp_path):
    flags = [*TRAIN_FLAGS, "--architecture", "mlp", "--epochs", "1", "--batch-size", "256",
             "--data-dir", str(data_dir), "--out", str(tmp_path)]
    app = _load_module(TRAIN).app
    diverged = CliRunner().invoke(app, [*flags, "--optimizer", "sgd", "--lr", "1e30"])
    assert diverged.exit_code == 1, diverged.output
    assert "diverged in epoch 1" in diverged.output
    assert not list(tmp_path.glob("backup/*")) and not (tmp_path / "model.keras").exists()
    marker = json.loads((tmp_path / "gloro_run.json").read_text())
    assert marker["state"] == "diverged"
    (tmp_path / "notes.txt").write_text("mine")

    again = CliRunner().invoke(app, [*flags, "--optimizer", "sgd", "--lr", "1e30"])
    _assert_one_line_error(again.exit_code, again.output, "--out", "diverged")
    fixed = CliRunner().invoke(app, [*flags, "--restart"])
    assert fixed.exit_code == 0, fixed.output
    restarted = json.loads((tmp_path / "gloro_run.json").read_text())
    assert restarted["state"] == "finished" and restarted["run_id"] != marker["run_id"]
    assert restarted["settings"]["lr"] == 1e-3
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert np.isfinite(json.loads((tmp_path / "results.json").read_text())["test"]["loss"])


# ------------------------------------------------------------- data checks


def _idx_folder(folder, train, test):
    folder.mkdir(parents=True)
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))


def _split(n, size=28, classes=10):
    return np.zeros((n, size, size), np.uint8), np.arange(n) % classes


@pytest.mark.parametrize(
    "name, train, test, reason",
    [
        ("synthetic", _split(20), (_split(20)[0], np.r_[np.arange(19) % 10, 255]), "no split has label 10"),
        ("synthetic", _split(20), _split(20, size=14), "test images (14, 14, 1)"),
        ("synthetic", (np.zeros((0, 28, 28)), np.zeros(0)), _split(20, classes=3), "'train' split of synthetic has no"),
        ("cifar10", _split(20), _split(20), "another dataset"),
        ("mnist", _split(20), (_split(20)[0], np.r_[np.arange(19) % 10, 10]), "label 10, but 'mnist' has 10"),
    ],
    ids=["stray-label", "shapes", "empty-train", "wrong-name", "known-classes"],
)
def test_train_checks_the_data_before_training(name, train, test, reason, tmp_path):
    _idx_folder(tmp_path / "data", train, test)
    result = CliRunner().invoke(
        _load_module(TRAIN).app,
        ["--dataset", name, "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
    )
    _assert_one_line_error(result.exit_code, result.output, "--dataset", reason)
    assert not (tmp_path / "out").exists()


def test_certify_checks_the_classes_against_the_model(trained, tmp_path):
    _idx_folder(tmp_path / "synthetic", _split(22, classes=11), _split(22, classes=11))
    result = CliRunner().invoke(
        _load_module(CERTIFY).app,
        ["--model", str(trained / "model.keras"), "--dataset", "synthetic", "--data-dir", str(tmp_path),
         "--out", str(tmp_path / "out")],
    )
    _assert_one_line_error(result.exit_code, result.output, "--dataset", "has 11 classes, the model 10")
    assert not (tmp_path / "out").exists()


def test_certify_never_reads_a_label_as_bottom(trained, tmp_path, monkeypatch):
    # Metadata that undercounts the classes: label 10 would pick column 10, ⊥.
    def load(name, split, data_dir=None):
        ds = tf.data.Dataset.from_tensor_slices((np.zeros((2, 28, 28, 1), np.float32), np.array([3, 10])))
        return ds, data.DatasetInfo(name, split, 10, (28, 28, 1), 2)

    monkeypatch.setattr(data, "load", load)
    result = CliRunner().invoke(
        _load_module(CERTIFY).app,
        ["--model", str(trained / "model.keras"), "--out", str(tmp_path / "out"), "--verbose", "0"],
    )
    _assert_one_line_error(result.exit_code, result.output, "--dataset", "label 10, outside the model's classes 0 to 9")
    assert not (tmp_path / "out" / "certify.json").exists() and not (tmp_path / "out" / "examples.csv").exists()
