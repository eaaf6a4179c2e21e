"""configs/multi_gpu_train.yaml under torchrun with 2 CPU processes (gloo backend)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import run_bundle, ROOT, TINY_DEMO, default_network

pytestmark = pytest.mark.slow



def test_ddp_training_with_two_cpu_processes(tmp_path):
    data, out, models = tmp_path / "demo", tmp_path / "out", tmp_path / "models"
    common = ["--dataset_dir", str(data), "--output_dir", str(out), "--demo_num_patients", str(TINY_DEMO.num_patients),
              "--demo_slide_size", str(TINY_DEMO.size), "--progress", "False"]
    # earlier stages once, in one process (ranks would otherwise race to build the same caches)
    run_bundle("train.yaml", "cluster", dataset_dir=str(data), output_dir=str(out), demo_num_patients=TINY_DEMO.num_patients,
               demo_slide_size=TINY_DEMO.size)
    # --standalone: torchrun binds its own free rendezvous port (no window between choosing a port and binding it, in
    # which a test on the other xdist worker could take it)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*torchrun, "-m", "monai.bundle", "run", "training", "--config_file",
                        "['configs/train.yaml','configs/multi_gpu_train.yaml']", *common, "--ckpt_dir", str(models),
                        "--max_epochs", "2", "--val_fraction", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert log.count("Validation AUC") == 1  # rank 0 alone reports
    assert json.loads((out / "training_summary.json").read_text())["epochs"] == 2
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped from DistributedDataParallel
    default_network().load_state_dict(state)
