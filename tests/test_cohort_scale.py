"""Sharded extraction under torchrun (2 CPU ranks, gloo) and concurrent independent extractions: features
identical to one process, every slide encoded once, a killed rank costs only its unfinished slides."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_bundle, ROOT, TINY_DEMO
from scripts.features.extraction import balanced_shard

ENCODED = re.compile(r"encoded (\S+) \(")



def _args(data: Path, cache: Path) -> list[str]:
    return ["--dataset_dir", str(data), "--cache_dir", str(cache), "--output_dir", str(cache.parent / "out"),
            "--demo_num_patients", "6", "--demo_slide_size", str(TINY_DEMO.size), "--progress", "False"]


def _extract_cmd(data: Path, cache: Path, torchrun: bool = False, log_dir: Path | None = None) -> list[str]:
    if not torchrun:
        return [sys.executable, "-m", "monai.bundle", "run", "extract", "--config_file", "configs/train.yaml", *_args(data, cache)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log_dir", str(log_dir), "--redirects", "3"]
    return [*launcher, "-m", "monai.bundle", "run", "extract", "--config_file",
            "['configs/train.yaml','configs/multi_gpu_extract.yaml']", *_args(data, cache)]


def _features(cache: Path) -> dict[str, np.ndarray]:
    out = {}
    for d in (cache / "features").iterdir():
        if (d / "meta.json").is_file():
            out[d.name] = np.load(d / "features.npy")
    return out


def _assert_same_features(cache: Path, ref: dict[str, np.ndarray]) -> None:
    got = _features(cache)
    assert got.keys() == ref.keys()
    for name, f in ref.items():
        np.testing.assert_array_equal(got[name], f)


def _rank_logs(log_dir: Path) -> list[str]:
    return [p.read_text() for p in sorted(log_dir.rglob("std*.log"))]


def _leftovers(cache: Path) -> list[str]:
    return [p.name for p in (cache / "features").iterdir() if p.name.startswith(".tmp-") or p.name.endswith(".lock")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 6-slide demo cohort extracted by one process."""
    root = tmp_path_factory.mktemp("scale")
    data, cache = root / "demo", root / "ref" / "cache"
    run_bundle("train.yaml", "extract", dataset_dir=str(data), cache_dir=str(cache), output_dir=str(cache.parent / "out"),
               demo_num_patients=6, demo_slide_size=TINY_DEMO.size)  # the same as _args, in this process
    feats = _features(cache)
    assert len(feats) == 6
    return data, feats


def test_balanced_shard_by_tissue_area():
    costs = [100, 10, 90, 20, 50, 50]
    shards = [balanced_shard(costs, 2, r) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(6))
    loads = [sum(costs[i] for i in s) for s in shards]
    assert abs(loads[0] - loads[1]) <= 10  # 160 each, not 3 slides each by count
    assert balanced_shard(costs, 1, 0) == list(range(6))


pytestmark = pytest.mark.slow


def test_torchrun_sharded_extraction_equals_one_process(reference, tmp_path):
    data, ref = reference
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    r = subprocess.run(_extract_cmd(data, cache, torchrun=True, log_dir=logs), cwd=ROOT, capture_output=True, text=True, timeout=900)
    rank_logs = _rank_logs(logs)
    assert r.returncode == 0, (r.stderr[-2000:], [t[-2000:] for t in rank_logs])
    per_rank = [ENCODED.findall(t) for t in rank_logs if ENCODED.search(t)]
    assert len(per_rank) == 2 and all(per_rank)  # both ranks worked
    encoded = [s for rank in per_rank for s in rank]
    assert sorted(encoded) == sorted(set(encoded)) and len(encoded) == 6  # each slide once
    _assert_same_features(cache, ref)  # same provenance hashes, same bits
    assert _leftovers(cache) == []


def test_killed_rank_then_rerun_finishes_only_the_remainder(reference, tmp_path):
    data, ref = reference
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    proc = subprocess.Popen(_extract_cmd(data, cache, torchrun=True, log_dir=logs), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not ((cache / "features").is_dir() and len(_features(cache)) >= 1):
        time.sleep(0.05)
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "no rank processes found"
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
    proc.wait(timeout=300)
    assert proc.returncode != 0
    before = set(_features(cache))
    assert 1 <= len(before) < 6
    for name in before:  # what was written is complete and correct
        np.testing.assert_array_equal(_features(cache)[name], ref[name])
    logs2 = tmp_path / "logs2"
    r = subprocess.run(_extract_cmd(data, cache, torchrun=True, log_dir=logs2), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, [t[-2000:] for t in _rank_logs(logs2)]
    encoded = [s for t in _rank_logs(logs2) for s in ENCODED.findall(t)]
    assert len(encoded) == 6 - len(before) and len(set(encoded)) == len(encoded)  # only the remainder
    _assert_same_features(cache, ref)
    assert _leftovers(cache) == []


def test_ctrl_c_during_extract_is_one_line_and_the_rerun_resumes(reference, tmp_path):
    """Ctrl-C (SIGINT) in `run extract`: exit 130, one line, no traceback, nothing torn; the same command then
    encodes only the remaining slides and the store equals one uninterrupted run's, bit for bit."""
    data, ref = reference
    cache = tmp_path / "cache"
    proc = subprocess.Popen(_extract_cmd(data, cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not ((cache / "features").is_dir() and _features(cache)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    said = [line for line in err.splitlines() if line.startswith(("error", "interrupted"))]
    assert said == ["interrupted (SIGINT): rerun the same command to resume"], err[-2000:]
    done = {p.name: p.stat().st_mtime_ns for p in (cache / "features").iterdir() if (p / "meta.json").is_file()}
    assert 1 <= len(done) < 6 and _leftovers(cache) == []
    run_bundle("train.yaml", "extract", dataset_dir=str(data), cache_dir=str(cache), output_dir=str(cache.parent / "out"),
               demo_num_patients=6, demo_slide_size=TINY_DEMO.size)
    assert {n: (cache / "features" / n).stat().st_mtime_ns for n in done} == done  # finished slides not redone
    _assert_same_features(cache, ref)
    assert _leftovers(cache) == []


def test_two_independent_processes_share_one_store(reference, tmp_path):
    data, ref = reference
    cache = tmp_path / "cache"
    # tiles first (cheap), so both extractions start at the same time
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "prepare", "--config_file", "configs/train.yaml", *_args(data, cache)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    procs = [subprocess.Popen(_extract_cmd(data, cache), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]
    encoded = [s for o in outs for s in ENCODED.findall(o)]
    assert sorted(encoded) == sorted(set(encoded)) and len(encoded) == 6, encoded  # each slide computed once
    _assert_same_features(cache, ref)
    assert _leftovers(cache) == []


def test_ddp_simsiam_pretraining_two_ranks(reference, tmp_path):
    data, _ = reference
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--log_dir", str(logs), "--redirects", "3"]
    cmd = [*launcher, "-m", "monai.bundle", "run", "pretrain", "--config_file", "['configs/train.yaml','configs/multi_gpu_pretrain.yaml']",
           *_args(data, cache), "--pretrain_epochs", "2", "--pretrain_scales_mpp", "[2.0]", "--pretrain_max_patches_per_slide", "8",
           "--pretrain_batch_size", "8"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    rank_logs = _rank_logs(logs)
    assert r.returncode == 0, (r.stderr[-2000:], [t[-2000:] for t in rank_logs])
    epoch_lines = [line for t in rank_logs for line in t.splitlines() if "pretrain 2mpp epoch" in line]
    assert len(epoch_lines) == 2  # rank 0 alone logs, once per epoch
    (enc,) = list((cache.parent / "out" / "pretrain").glob("2mpp-*/encoder.pt"))
    import json

    import torch

    from scripts.features.encoders import build_backbone

    history = json.loads((enc.parent / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    state = torch.load(enc, map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    build_backbone("tiny").load_state_dict(state)
    assert len(list((enc.parent / "logs").glob("events.out.tfevents.*"))) == 1  # one TensorBoard writer


def test_planner_counts_patches_and_storage(reference, tmp_path, capsys):
    data, ref = reference
    out_csv = tmp_path / "plan.csv"
    from scripts.plan import main

    assert main(["--manifest", str(data / "manifest.csv"), "--cache_dir", str(tmp_path / "c"), "--encoder_arch", "tiny", "--gpus", "2",
                 "--patches_per_s", "10", "--csv", str(out_csv)]) == 0
    import csv

    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 6
    counts = sorted(int(x["patches_per_scale"]) for x in rows)
    assert counts == sorted(f.shape[0] for f in ref.values())  # what extraction really encoded
    n = sum(counts)
    assert int(sum(int(x["store_bytes"]) for x in rows)) == n * 3 * 128 * 2 + n * 16 + 6 * 4096
    total = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{n} patches per scale x 3 scales" in total
    assert f"about {n / 20 / 3600:.2f} h on 2 GPU(s) at 10 patches/s each (given)" in total
    assert main(["--manifest", str(data / "manifest.csv"), "--cache_dir", str(tmp_path / "c"), "--encoder_arch", "tiny", "--gpus", "2",
                 "--patches_per_s", "10", "--stain_views", "3", "--csv", str(out_csv)]) == 0
    assert int(sum(int(x["store_bytes"]) for x in csv.DictReader(out_csv.open()))) == 4 * n * 3 * 128 * 2 + n * 16 + 6 * 4096
    assert f"about {4 * n / 20 / 3600:.2f} h on 2 GPU(s)" in capsys.readouterr().out.strip().splitlines()[-1]


def test_planner_names_a_missing_manifest(tmp_path):
    from scripts.errors import find_input_error
    from scripts.plan import main

    with pytest.raises(Exception) as err:  # printed as one line by scripts.excepthook
        main(["--manifest", str(tmp_path / "nope.csv")])
    assert "nope.csv" in str(find_input_error(err.value))


def test_extraction_killed_mid_run_resumes_to_identical_features(reference, tmp_path):
    data, ref = reference
    cache = tmp_path / "cache"
    proc = subprocess.Popen(_extract_cmd(data, cache), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        store = cache / "features"
        if store.is_dir():
            for d in store.iterdir():  # at any moment, a final-named entry is complete
                if d.is_dir() and not d.name.startswith(".tmp-"):
                    assert (d / "meta.json").is_file() and (d / "features.npy").is_file()
                    np.load(d / "features.npy")
            if len(_features(cache)) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    before = set(_features(cache))
    assert 2 <= len(before) < 6, "extraction ended before it could be killed"
    r = subprocess.run(_extract_cmd(data, cache), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(ENCODED.findall(r.stdout + r.stderr)) == 6 - len(before)  # only the unfinished slides
    _assert_same_features(cache, ref)
    assert _leftovers(cache) == []


def test_claims_of_dead_processes_are_cleared_even_for_finished_entries(tmp_path):
    """A process killed after renaming its entry into place but before releasing its claim left a lock that no
    later run took over (the entry is complete, nobody claims it again; the kill test caught it under load).
    The store's clean-up removes claims of dead processes of this host, keeps live and other hosts' claims."""
    import json
    import socket

    from scripts.cache import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        host = socket.gethostname()
        claims = {"done-slide": {"host": host, "pid": dead.pid}, "busy-slide": {"host": host, "pid": live.pid},
                  "remote-slide": {"host": host + "-other", "pid": dead.pid}, "mine": {"host": host, "pid": os.getpid()}}
        for name, holder in claims.items():
            (tmp_path / f"{name}.lock").write_text(json.dumps({**holder, "time": 0}))
        (tmp_path / "done-slide").mkdir()
        assert remove_stale_temporaries(tmp_path) == 1
        assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["busy-slide.lock", "mine.lock", "remote-slide.lock"]
    finally:
        live.kill()
        live.wait()
