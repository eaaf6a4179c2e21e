"""`--tracking mlflow`: parameters, metrics and artefacts in a local MLflow store (SQLite + artefact folder)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_DEMO

pytestmark = pytest.mark.slow


def _mlflow():
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("mlflow is not installed (pip install -r requirements-dev.txt)")
        pytest.skip("mlflow is not installed")
    from mlflow.tracking import MlflowClient

    return MlflowClient


def test_training_logs_params_metrics_and_artefacts_to_mlflow(tiny_demo, tmp_path):
    client_cls = _mlflow()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml",
           "--dataset_dir", str(tiny_demo.parent), "--output_dir", str(out), "--ckpt_dir", str(tmp_path / "models"),
           "--demo_num_patients", str(TINY_DEMO.num_patients), "--demo_slide_size", str(TINY_DEMO.size),
           "--val_fraction", "0.5", "--max_epochs", "2", "--progress", "False", "--tracking", "mlflow"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    client = client_cls(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "monai_experiment"]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert {"train_loss", "val_loss", "val_auc"} <= set(run.data.metrics)
    assert run.data.params["max_epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_summary.json", "model.pt", "logs"} <= names, names
    assert any(n.startswith("config_") and n.endswith(".json") for n in names), names
    local = client.download_artifacts(run.info.run_id, "training_summary.json", str(tmp_path / "dl"))
    assert (out / "training_summary.json").read_text() == open(local).read()
