"""scripts/train.py and scripts/certify.py on JAX and torch, in those test
processes (their input pipeline is tf.data, so TensorFlow must be installed)."""

import json

import keras
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from test_scripts import (  # noqa: E402, F401
    CERTIFY, TRAIN, TRAIN_FLAGS, _load_module, _test_metrics, data_dir, invoke,
)
from typer.testing import CliRunner  # noqa: E402

from gloro import runs  # noqa: E402

# In the long tier: on each backend a whole training and certification run
# (40 s on torch, minutes on JAX, here); tests/test_scripts.py runs the
# scripts on TensorFlow by default.
pytestmark = [
    pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="runs in the JAX and torch test processes"),
    pytest.mark.slow,
]


class _Killed(BaseException):
    """A kill: nothing in Keras catches it."""


def test_scripts_run_on_this_backend(data_dir, tmp_path, monkeypatch):  # noqa: F811
    flags = [*TRAIN_FLAGS, "--epochs", 2, "--batch-size", 64, "--data-dir", data_dir, "--out", tmp_path]
    # Killed right after the first epoch's backup is renamed into place.
    backed_up = runs.BackupAndResume.on_epoch_end

    def killed_after_backup(self, epoch, logs=None):
        backed_up(self, epoch, logs)
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(runs.BackupAndResume, "on_epoch_end", killed_after_backup)
        with pytest.raises(_Killed):
            CliRunner().invoke(_load_module(TRAIN).app, [str(a) for a in flags])
    assert [p.name for p in (tmp_path / "backup").iterdir()] == ["epoch_1.weights.h5"]

    assert "Resuming from epoch 1" in invoke(TRAIN, *flags)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["versions"]["keras_backend"] == keras.backend.backend()
    assert len(results["epoch_seconds"]) == 2 and not (tmp_path / "backup").exists()
    # A finished run is never restarted silently.
    rerun = CliRunner().invoke(_load_module(TRAIN).app, [str(a) for a in flags])
    assert rerun.exit_code == 2 and "holds a finished run" in rerun.output, rerun.output

    invoke(CERTIFY, "--model", tmp_path / "model.keras", "--dataset", "synthetic", "--data-dir", data_dir,
           "--audit", 5, "--verbose", 0)
    report = json.loads((tmp_path / "certify_test" / "certify.json").read_text())
    for key in ("clean_acc", "vra", "rejection_rate"):
        assert report[key] == pytest.approx(results["test"][key], abs=1e-6), key
    assert report["radius_vra_disagreements"] == 0
    assert report["audit"]["broken"] == 0
    np.testing.assert_allclose(
        list(_test_metrics(tmp_path / "model.keras", data_dir).values()),
        [results["test"][k] for k in ("clean_acc", "vra", "rejection_rate")],
        atol=1e-6,
    )
