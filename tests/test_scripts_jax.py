"""scripts/train.py and scripts/certify.py on JAX and torch, in those test
processes (their input pipeline is tf.data, so TensorFlow must be installed)."""

import json

import keras
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from test_scripts import CERTIFY, TRAIN, TRAIN_FLAGS, _test_metrics, data_dir, invoke  # noqa: E402, F401

pytestmark = pytest.mark.skipif(
    keras.backend.backend() == "tensorflow", reason="runs in the JAX and torch test processes"
)


def test_scripts_run_on_this_backend(data_dir, tmp_path):  # noqa: F811
    invoke(TRAIN, *TRAIN_FLAGS, "--epochs", 1, "--batch-size", 64, "--data-dir", data_dir, "--out", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["versions"]["keras_backend"] == keras.backend.backend()

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
