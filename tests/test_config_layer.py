"""The config layer: the Model Zoo layout (train.yaml trains, evaluate.yaml overlays it, inference.yaml and deploy.yaml
standalone and driven by the checkpoint), a datalist between stages, the command line checked, values validated from
one Python table, commands that run from any folder and from a packed bundle, outputs unchanged by the redesign."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser

from conftest import ROOT, run_bundle
from golden_outputs import GOLDEN, differences, fingerprints
from scripts.benchmarks.startup import LAUNCH, launch_report
from scripts.errors import BundleInputError, find_input_error
from scripts.workflows.pipeline_config import (CONFIGS, DEPLOY_CONFIG, EVALUATE_CONFIG, INFERENCE_CONFIG, PIPELINE_CONFIG,
                                               pipeline_parser)

RUN_IDS = {"train.yaml": ["prepare", "pretrain", "extract", "cluster", "training", "run"], "evaluate.yaml": ["evaluate", "run"],
           "inference.yaml": ["inference", "run"], "deploy.yaml": ["export", "run"]}


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _parser(files, overrides=None) -> ConfigParser:
    """A parser as ``python -m monai.bundle run`` builds it (no normalisation of the overrides)."""
    p = ConfigParser()
    p.read_config([str(f) for f in files])
    p["bundle_root"] = str(ROOT)
    for k, v in (overrides or {}).items():
        p[k] = v
    return p


def _initialize(p: ConfigParser):
    """Run the config's ``initialize`` items one by one, as MONAI's ConfigWorkflow does; the last result."""
    return [p.get_parsed_content(f"initialize#{i}") for i in range(len(p["initialize"]))][-1]


def test_zoo_layout_real_files_each_running_its_stage():
    assert not [f.name for f in CONFIGS.iterdir() if f.is_symlink()]
    assert {f.name for f in CONFIGS.glob("*.yaml")} == {"train.yaml", "evaluate.yaml", "inference.yaml", "deploy.yaml", "cohort.yaml",
                                                        "multi_gpu_train.yaml", "multi_gpu_extract.yaml", "multi_gpu_pretrain.yaml"}
    for name, run_ids in RUN_IDS.items():
        raw = _raw(CONFIGS / name)
        assert all(r in raw for r in run_ids), name
    assert _raw(PIPELINE_CONFIG)["run"] == "$@training"
    assert _raw(EVALUATE_CONFIG)["run"] == "$@evaluate" and _raw(INFERENCE_CONFIG)["run"] == "$@inference"
    assert _raw(DEPLOY_CONFIG)["run"] == "$@export"
    assert len(INFERENCE_CONFIG.read_text().splitlines()) <= 150
    # evaluate.yaml only adds to train.yaml (besides the keys every config has); the standalone ones repeat no training id
    train = _raw(PIPELINE_CONFIG)
    assert set(_raw(EVALUATE_CONFIG)) & set(train) == {"imports", "initialize", "run"}
    from scripts.workflows.command import trained_ids

    for cfg in (INFERENCE_CONFIG, DEPLOY_CONFIG):
        assert not set(trained_ids()) & set(_raw(cfg)), cfg.name  # they come from the checkpoint


def test_no_macros_and_no_plumbing_lists():
    """No ``%`` macros (they resolve against the working directory); no mapping whose entries only hand ids on under
    their own names (the old checked_ids / flags / eval_train_ids / deploy_settings lists); handlers by id."""
    for path in CONFIGS.glob("*.yaml"):
        text = path.read_text()
        assert '"%' not in text, path.name

        def walk(node, where):
            if isinstance(node, dict):
                same = [k for k, v in node.items() if v == f"@{k}"]
                assert "_target_" in node or len(same) <= 2, (path.name, where, same)
                for k, v in node.items():
                    walk(v, f"{where}#{k}")
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, f"{where}#{i}")

        walk(_raw(path), "")
        assert not re.search(r"@[\w#]*handlers#\d", text) and "handlers[" not in text, path.name


def test_each_tunable_is_declared_once_at_top_level():
    """Flat ids are top-level keys once (YAML refuses duplicates); no tunable is re-declared inside a section."""
    raw = _raw(PIPELINE_CONFIG)
    nested = set()

    def walk(node, top):
        if isinstance(node, dict):
            loader = str(node.get("_target_", "")).endswith("DataLoader")  # its batch_size / num_workers are its own
            for k, v in node.items():
                if not top and not loader and isinstance(v, (int, float, str)) and not str(v).startswith(("@", "$")) and k in raw and k != "_target_":
                    nested.add(k)
                walk(v, False)
        elif isinstance(node, list):
            for v in node:
                walk(v, False)

    walk(raw, True)
    assert not nested, f"tunables with a literal value again inside a section: {sorted(nested)}"


def test_a_flat_override_reaches_every_stage_that_uses_it():
    p = pipeline_parser({"patch_size": 128, "scales_mpp": [0.5, 2.0]})
    assert p.get_parsed_content("tiling").patch_size == 128
    resize = [t for t in p.get_parsed_content("preprocessing").transforms if type(t).__name__ == "Resized"][0]
    assert tuple(resize.resizer.spatial_size) == (128, 128)
    assert p.get_parsed_content("pretrain_transform")(2.0).transforms[0].patch_size == 128
    assert p.get_parsed_content("scale_keys") == ["scale_0", "scale_1"]
    contract = p.get_parsed_content("model_contract")  # what inference and the Deploy export will build from
    assert contract["patch_size"] == 128 and contract["scales_mpp"] == [0.5, 2.0] and contract["tiling"]["patch_size"] == 128


def test_values_that_live_in_two_files_do_not_drift():
    """Where MONAI has no include: the checkpoint-less defaults of inference/export (contract.DEFAULTS) are
    train.yaml's values, and the run-time ids shared by inference.yaml, deploy.yaml and train.yaml agree."""
    from scripts.checkpoint.contract import DEFAULTS

    p = pipeline_parser()
    assert {k: p.get_parsed_content(k) for k in DEFAULTS} == DEFAULTS
    inference, deploy, train = _raw(INFERENCE_CONFIG), _raw(DEPLOY_CONFIG), _raw(PIPELINE_CONFIG)
    shared = set(inference) & set(deploy) - {"imports", "initialize", "run", "trained"}
    assert {"num_bags", "threshold", "heatmap_mpp", "overlay_mpp", "lesion_mask_mpp", "wsi_backend", "feature_batch_size"} <= shared
    assert {k: inference[k] for k in shared} == {k: deploy[k] for k in shared}
    literal = [k for k in set(inference) & set(train) if not isinstance(train[k], (dict, list)) and not str(train[k]).startswith(("$", "@"))]
    assert {"wsi_backend", "feature_batch_size", "num_workers", "progress", "on_error", "mpp", "mpp_force"} <= set(literal)
    assert {k: inference[k] for k in literal} == {k: train[k] for k in literal}


def test_evaluation_runs_train_with_the_commands_own_config():
    """Each protocol run parses the command's config (every overlay and override included), not a file by path."""
    from scripts.evaluation.protocol import run_config_key

    p = pipeline_parser({"max_epochs": 3, "learning_rate": 0.01, "bag_per_cluster": 4, "eval_workers": 2},
                        [PIPELINE_CONFIG, EVALUATE_CONFIG])
    p["probe"] = "$scripts.workflows.command.current_config()"
    config = p.get_parsed_content("probe")
    assert (config["max_epochs"], config["learning_rate"], config["bag_per_cluster"]) == (3, 0.01, 4)
    assert "train#trainer" not in config and "trainer" in config["train"]
    key = run_config_key(config)
    assert "max_epochs" in key and not [k for k in key if k.startswith("eval_") or k in ("output_dir", "progress")]
    # the guard's and the error handlers' settings are not in the key (an edit of them reuses finished runs); what
    # trains is (the trainer, the logging handler list a user may extend), and the config itself is left whole
    assert "loss_guard" not in key["train"] and "errors" not in key["validate"] and "trainer" in key["train"]
    assert "handlers" in key["train"] and "loss_guard" in config["train"]
    from scripts.cache import stable_hash

    edited = {**config, "train": {**config["train"], "loss_guard": {**config["train"]["loss_guard"], "recipe": "other"}}}
    assert stable_hash(run_config_key(edited)) == stable_hash(key)
    longer = {**config, "train": {**config["train"], "trainer": {**config["train"]["trainer"], "max_epochs": 4}}}
    assert stable_hash(run_config_key(longer)) != stable_hash(key)
    raw = _raw(EVALUATE_CONFIG)
    assert raw["evaluate"]["seed"] == "@eval_seed" and raw["eval_seed"] == "@seed"
    assert "current_config()" in raw["evaluate"]["config"] and raw["evaluate"]["entries"] == "@datalist"
    assert "config_file" not in raw["evaluate"]  # no re-read of a file by path


@pytest.mark.slow
def test_demo_features_and_model_unchanged(trained):
    """The tiny demo's features and trained model equal the recorded ones (to float32 rounding across CPUs:
    tests/golden_outputs.py); regenerate tests/data only if a change of the numbers is intended."""
    assert differences(fingerprints(trained), json.loads(GOLDEN.read_text())) == []


def test_golden_fingerprints_tolerate_rounding_and_catch_a_change(trained):
    """The comparison passes rounding-sized noise on every tensor and fails a change of one weight by 1e-3 or one
    coordinate."""
    import copy

    import torch

    now = fingerprints(trained)
    noisy = copy.deepcopy(now)
    for t in noisy["model"].values():
        t["summary"] = [v * (1 + 1e-6) + 1e-7 for v in t["summary"]]
    assert differences(noisy, now) == []
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    name = "pool.bag_classifier.weight"
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3
    from golden_outputs import summary

    changed = copy.deepcopy(now)
    changed["model"][name]["summary"] = summary(state[name].double().numpy())
    assert [line.split(":")[0] for line in differences(changed, now)] == [f"model {name} summary"]
    slide = next(iter(now["features"]))
    changed = copy.deepcopy(now)
    changed["features"][slide]["coords"][0][0] += 1
    assert differences(changed, now) == [f"features {slide} coords: {str(changed['features'][slide]['coords'])[:120]} != "
                                         f"{str(now['features'][slide]['coords'])[:120]}"]

def _run_from(cwd: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", prelude + LAUNCH, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_inference_from_another_folder_reads_each_config_once(trained, cmu_svs, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "pred"
    r = _run_from(elsewhere, "run", "inference", "--config_file", str(ROOT / "configs" / "inference.yaml"), "--bundle_root", str(ROOT),
                  "--input", str(cmu_svs), "--output_dir", str(out), "--ckpt_dir", str(trained / "models"), "--num_bags", "5",
                  "--cache_dir", str(tmp_path / "cache"), "--progress", "False")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [row["slide_id"] for row in rows] == ["CMU-1-Small-Region"]
    reads, _ = launch_report(r.stderr)
    assert reads and max(reads.values()) == 1, reads
    assert sum(v for k, v in reads.items() if k.endswith(".yaml")) == 1, reads
    assert not (elsewhere / "outputs").exists() and not list(elsewhere.iterdir())  # nothing written into the CWD


@pytest.mark.slow
def test_a_runtime_install_never_imports_mlflow_or_the_deploy_sdk(trained, cmu_svs, tmp_path):
    """With mlflow and the Deploy SDK made unimportable (as in a runtime install), inference still runs."""
    block = "import sys\nfor m in ('mlflow', 'holoscan', 'monai.deploy'):\n    sys.modules[m] = None\n"
    r = _run_from(ROOT, "run", "inference", "--config_file", "configs/inference.yaml", "--input", str(cmu_svs),
                  "--output_dir", str(tmp_path / "pred"), "--ckpt_dir", str(trained / "models"), "--num_bags", "5",
                  "--cache_dir", str(tmp_path / "cache"), "--progress", "False", prelude=block)
    assert r.returncode == 0, r.stderr[-3000:]
    _, modules = launch_report(r.stderr)
    assert not [m for m in modules if m.startswith(("mlflow.", "holoscan.", "monai.deploy."))]


@pytest.mark.slow
def test_model_zoo_checks_on_the_bundle_packed_as_the_zoo_packs_it(trained, cmu_svs, tmp_path, meta_schema):
    """The bundle zipped as the Model Zoo packs it (the tracked files; no links to follow or lose), unpacked into a zoo
    tree: the Zoo's ci/verify_bundle.py (full mode) steps from the zoo root, then inference with --bundle_root from
    another folder."""
    import zipfile

    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    with zipfile.ZipFile(tmp_path / "csmil_bundle.zip", "w") as z:
        for f in filter(None, files):
            assert not (ROOT / f).is_symlink(), f
            z.write(ROOT / f, f"csmil_bundle/{f}")
    zoo = tmp_path / "zoo"
    with zipfile.ZipFile(tmp_path / "csmil_bundle.zip") as z:
        z.extractall(zoo / "models")
    bundle = zoo / "models" / "csmil_bundle"
    shutil.rmtree(bundle / "tests")  # the Zoo ships no tests
    (bundle / "models").mkdir(exist_ok=True)
    shutil.copy(trained / "models" / "model.pt", bundle / "models" / "model.pt")
    (bundle / "eval").mkdir()
    shutil.copy(meta_schema, bundle / "eval" / "schema.json")
    rel = "models/csmil_bundle"
    checks = (
        "import sys\n"
        f"sys.path.insert(0, {rel!r})\n"
        "from monai.bundle import ckpt_export, create_workflow, run, verify_metadata, verify_net_in_out\n"
        f"b = {rel!r}\n"
        "verify_metadata(meta_file=b + '/configs/metadata.json', filepath=b + '/eval/schema.json')\n"
        "verify_net_in_out(net_id='network_def', meta_file=b + '/configs/metadata.json', config_file=b + '/configs/inference.yaml', bundle_root=b)\n"
        "ckpt_export(net_id='network_def', filepath=b + '/models/verify_model.ts', ckpt_file=b + '/models/model.pt',\n"
        "            meta_file=b + '/configs/metadata.json', config_file=b + '/configs/inference.yaml', bundle_root=b)\n"
        "w = create_workflow(workflow_type='inference', bundle_root=b, config_file=b + '/configs/inference.yaml',\n"
        f"                    logging_file=b + '/configs/logging.conf', meta_file=b + '/configs/metadata.json', dataset_dir={str(trained / 'demo')!r},\n"
        f"                    cache_dir={str(tmp_path / 'cache')!r}, output_dir={str(tmp_path / 'zoo_pred')!r}, progress=False, num_bags=5)\n"
        "assert not w.check_properties(), w.check_properties()\n"
        "print('ZOO CHECKS PASSED')\n"
        "import os\n"
        f"os.chdir({str(tmp_path)!r})\n"
        f"run(config_file={str(bundle / 'configs' / 'inference.yaml')!r}, bundle_root={str(bundle)!r}, input={str(cmu_svs)!r},\n"
        f"    output_dir={str(tmp_path / 'pred')!r}, cache_dir={str(tmp_path / 'cache')!r}, num_bags=5, progress=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", checks], cwd=zoo, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0 and "ZOO CHECKS PASSED" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert (bundle / "models" / "verify_model.ts").is_file()
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert [row["slide_id"] for row in rows] == ["CMU-1-Small-Region"]
    assert not (tmp_path / "outputs").exists()  # nothing written into the working folder


def test_preprocessing_signature_is_derived_from_the_transforms():
    from scripts.features.extraction import transform_signature
    from scripts.checkpoint.trained import TrainedModel

    base = transform_signature(pipeline_parser().get_parsed_content("preprocessing"))
    assert base == transform_signature(pipeline_parser().get_parsed_content("preprocessing"))  # deterministic
    types = [t["type"].rsplit(".", 1)[1] for t in base["transforms"]]
    assert types == ["LoadMultiScaleRegiond", "Resized", "ScaleIntensityRanged", "NormalizeIntensityd", "EnsureTyped"]
    for override in [{"normalize_mean": [0.5, 0.5, 0.5]}, {"patch_size": 224}, {"read_cell_um": 512.0}]:
        assert transform_signature(pipeline_parser(override).get_parsed_content("preprocessing")) != base, override
    # inference and the Deploy export build the same chain from a checkpoint's settings (here: none, the defaults)
    assert transform_signature(TrainedModel(ROOT / "no-such-model.pt").preprocessing()) == base


def test_every_tunable_has_a_rule_and_is_checked():
    from scripts.config_checks import RULES, rules_table

    exempt = {"bundle_root", "input", "label_map", "imports", "eval_models", "ablation_models", "ablation_values", "ablation_id",
              "eval_test_manifest", "mil_model", "encoder_arch", "encoder_weights_prefix", "normalize_mean", "normalize_std",
              "demo_options", "train_overrides", "encoder_weights", "training", "pretrain_init_weights", "pretrain_init_prefix",
              "initialize", "scales_mpp", "eval_reference"}
    for cfg in (PIPELINE_CONFIG, EVALUATE_CONFIG, INFERENCE_CONFIG, DEPLOY_CONFIG):
        raw = _raw(cfg)
        tunables = {k for k, v in raw.items() if (isinstance(v, (int, float, str, type(None))) or
                                                 (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)))
                    and not str(v).startswith(("$", "@", "%")) and k not in exempt}
        assert tunables <= set(RULES), (cfg.name, sorted(tunables - set(RULES)))
        assert "checked_ids" not in raw and "flags" not in raw and "validated" not in raw
        assert "workflows.command.start(" in raw["initialize"][1], cfg.name  # checked before any work
    assert "scales_mpp" in RULES
    docs = (ROOT / "docs" / "configuration.md").read_text()
    assert rules_table() in docs  # the documented table is the code's


def test_flush_denormal_is_set_where_the_network_is_built():
    """flush_denormal (default true) switches torch's CPU denormal flushing when the network is built, so every
    protocol run and worker gets it; false keeps denormals; inference sets it before loading the model."""
    import torch

    small = torch.tensor([1e-30])  # normal; times 1e-10 it is a denormal (kept) or zero (flushed)
    try:
        for value, flushed in ((None, True), (False, False)):
            torch.set_flush_denormal(not flushed)
            pipeline_parser({} if value is None else {"flush_denormal": value}).get_parsed_content("network_def")
            assert ((small * 1e-10).item() == 0.0) == flushed
    finally:
        torch.set_flush_denormal(False)
    raw = _raw(INFERENCE_CONFIG)
    assert raw["flush_denormal"] is True and raw["initialize"][2] == "$torch.set_flush_denormal(@flush_denormal)"
    assert _raw(PIPELINE_CONFIG)["initialize"][2] == "@cpu_numerics"  # right after the checks, before torch's threads start


def test_flush_denormal_reaches_torch_s_threads_when_set_first():
    """Set before torch's thread pool starts (the commands' initialize, the protocol's workers), flushing holds in
    every thread: a parallel multiply of denormal inputs gives zeros everywhere (set late, only the calling thread's
    share would be zero). In a fresh interpreter with two threads."""
    code = ("import torch\n"
            "from scripts.evaluation.protocol import _worker_init\n"
            "_worker_init(2, True, True)\n"
            "x = torch.full((1 << 22,), 1, dtype=torch.int32).view(torch.float32)\n"  # the smallest denormal
            "print(int(torch.count_nonzero(x * 2.0)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0 and r.stdout.strip() == "0", r.stderr[-2000:]


def test_validation_accepts_the_defaults_and_refuses_bad_values(tmp_path):
    from scripts.config_checks import validate

    p = _parser([PIPELINE_CONFIG], {"output_dir": str(tmp_path / "out")})
    assert _initialize(p) is True
    assert (tmp_path / "out").is_dir() and not [f for f in (tmp_path / "out").rglob("*") if f.is_file()]  # created, probes removed
    for bad, words in [({"patch_size": 8}, "[32, 4096]"), ({"val_fraction": 0.0}, "(0, 1]"), ({"num_workers": -1}, ">= 0"),
                       ({"learning_rate": 0}, "> 0"), ({"max_epochs": 2.5}, "integer"), ({"min_tissue": 2}, "[0, 1]"),
                       ({"on_error": "ignore"}, "raise"), ({"device": "tpu"}, "cpu, cuda"), ({"scales_mpp": []}, "non-empty"),
                       ({"scales_mpp": [0.5, 1.0], "pretrain_scales_mpp": [2.0]}, "subset"), ({"mpp": True}, "number"),
                       ({"eval_seed": -1}, "--eval_seed: -1 is not allowed"), ({"mil_dropout": 1.0}, "[0, 1)")]:
        with pytest.raises(BundleInputError, match=re.escape(words)):
            validate(bad)
    p = _parser([PIPELINE_CONFIG, EVALUATE_CONFIG], {"output_dir": str(tmp_path / "out"), "eval_num_splits": 1})
    with pytest.raises(Exception) as err:  # initialize checks the overlay's ids too, before any work
        _initialize(p)
    assert find_input_error(err.value).path == "--eval_num_splits"


def test_what_needs_no_slide_reads_none_and_the_cohort_is_read_once(tmp_path):
    """The encoders (all `run export` needs; what inference checks the checkpoint against) resolve without reading,
    generating or tiling the cohort - MONAI resolves every reference of an expression first, so the cohort is held
    by a lazy object - and the first stage that needs the slides reads and tiles them once per parse."""
    cohort = tmp_path / "cohort"
    p = pipeline_parser({"dataset_dir": str(cohort), "cache_dir": str(tmp_path / "cache"), "output_dir": str(tmp_path / "out"),
                         "demo_num_patients": 2, "demo_slide_size": 1024})
    assert len(p.get_parsed_content("encoders")) == 3
    assert callable(p.get_parsed_content("pretrain_encoders"))
    assert not cohort.exists() and not (tmp_path / "cache" / "tiles").exists()  # (validation creates the cache folder)
    tiles = p.get_parsed_content("tiles")
    assert len(tiles["records"]) == len(tiles["tiles"]) == 2 and (cohort / "manifest.csv").is_file()
    assert p.get_parsed_content("cohort").tiles() is tiles

SWITCHES = ("progress", "mpp_force", "demo_if_missing", "bag_replacement", "eval_bootstrap_by_patient", "eval_verbose")


@pytest.mark.parametrize("given,expected", [("false", False), ("no", False), (0, False), (False, False),
                                            ("true", True), ("YES", True), (1, True), (True, True)])
def test_yes_no_ids_read_as_booleans_whatever_the_command_line_passes(given, expected, tmp_path):
    """`--progress false` reaches the config as the string 'false' (Python Fire keeps what it cannot read as a
    literal; `False` arrives as a bool): `initialize` validates it and every consumer then reads the boolean."""
    p = _parser([PIPELINE_CONFIG, EVALUATE_CONFIG], {"output_dir": str(tmp_path / "out"), **{k: given for k in SWITCHES}})
    assert _initialize(p) is True
    assert {k: p.get_parsed_content(k) for k in SWITCHES} == {k: expected for k in SWITCHES}
    assert p.get_parsed_content("train#dataset#replacement") is expected  # what training and each protocol run read
    assert (p.get_parsed_content("demo") is None) is (not expected)
    q = pipeline_parser({k: given for k in ("progress", "bag_replacement")})  # Python callers get the same
    assert q.get_parsed_content("progress") is expected and q.get_parsed_content("bag_replacement") is expected


def test_a_value_that_is_not_yes_or_no_stops_naming_the_id(tmp_path):
    for key in SWITCHES:
        p = _parser([PIPELINE_CONFIG, EVALUATE_CONFIG], {"output_dir": str(tmp_path / "out"), key: "maybe"})
        with pytest.raises(Exception) as err:
            _initialize(p)
        found = find_input_error(err.value)
        assert isinstance(found, BundleInputError) and found.path == f"--{key}" and "'maybe'" in str(found), err.value


def test_the_command_line_is_checked_ids_and_stages(tmp_path):
    """A misspelt id names the closest known one; an unknown stage lists the stages (or says which config has it);
    training settings on inference's command line are checked against the checkpoint, not refused as unknown."""
    from scripts.workflows.command import check_command_line, command_line, declared_ids

    main = str(Path(__import__("monai").__file__).parent / "bundle" / "__main__.py")
    cli = command_line([main, "run", "--config_file", "configs/train.yaml", "--patch_sizee", "128", "--train#trainer#max_epochs=3"])
    assert cli == {"run_id": "run", "config_files": ["configs/train.yaml"], "ids": ["patch_sizee", "train"]}
    assert command_line(["pytest", "run"]) is None  # not the bundle's command line: nothing to check
    two = command_line([main, "run", "evaluate", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']"])
    assert two["run_id"] == "evaluate" and two["config_files"] == ["configs/train.yaml", "configs/evaluate.yaml"]
    assert {"patch_size", "train", "max_epochs", "initialize"} <= declared_ids([PIPELINE_CONFIG])
    p = _parser([PIPELINE_CONFIG])
    cases = [([PIPELINE_CONFIG], "run", ["patch_sizee"], "--patch_sizee", "did you mean 'patch_size'"),
             ([PIPELINE_CONFIG], "run", ["max_epoch"], "--max_epoch", "did you mean 'max_epochs'"),
             ([PIPELINE_CONFIG], "trainning", [], "run trainning", "prepare, pretrain, extract, cluster, training, run: did you mean 'training'"),
             ([PIPELINE_CONFIG], "evaluate", [], "run evaluate", "configs/evaluate.yaml")]
    for files, run_id, ids, path, words in cases:
        with pytest.raises(BundleInputError, match=re.escape(words)) as err:
            check_command_line(p, {"run_id": run_id, "config_files": [str(f) for f in files], "ids": ids})
        assert err.value.path == path
    check_command_line(p, {"run_id": "training", "config_files": [str(PIPELINE_CONFIG)], "ids": ["patch_size", "train", "debug"]})
    from scripts.workflows.command import trained_ids

    inference = _parser([INFERENCE_CONFIG])
    check_command_line(inference, {"run_id": "inference", "config_files": [str(INFERENCE_CONFIG)], "ids": ["num_clusters"]},
                       trained_ids())  # compared with the checkpoint by TrainedModel
    with pytest.raises(BundleInputError, match="did you mean 'num_bags'"):
        check_command_line(inference, {"run_id": "run", "config_files": [str(INFERENCE_CONFIG)], "ids": ["num_bag"]}, trained_ids())


def test_the_trained_model_builds_everything_from_the_checkpoint(tmp_path, caplog):
    """inference.yaml / deploy.yaml read the checkpoint with one expression: settings, network, encoders, tiling and
    preprocessing from its contract; a conflicting setting stops naming both values; free ones replace the stored."""
    import torch

    from scripts.checkpoint import contract
    from scripts.mil.registry import build_model
    from scripts.checkpoint.trained import TrainedModel

    fresh = TrainedModel(tmp_path / "none.pt")  # a fresh clone: the training defaults (the Zoo's tools need network_def)
    assert fresh.settings == contract.DEFAULTS and fresh.in_features == 128
    assert type(fresh.network_def()).__name__ == type(build_model(contract.DEFAULTS["mil_model"], in_features=128)).__name__
    with pytest.raises(BundleInputError, match="model checkpoint not found"):
        fresh.network()
    p = pipeline_parser({"num_clusters": 4, "mil_model": "csmil", "patch_size": 128, "seed": 3, "max_patches": 7})
    recorded = p.get_parsed_content("model_contract")
    net = contract.attach(build_model("csmil", in_features=128, num_clusters=4), recorded)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    t = TrainedModel(tmp_path / "model.pt")
    assert (t.num_clusters, t.mil_model, t.patch_size, t.seed) == (4, "csmil", 128, 3)
    assert t.tiling("tifffile").max_patches == 7 and t.tiling("tifffile").backend == "tifffile" and t.tiling().patch_size == 128
    assert type(t.network()).__name__ == "CSMIL" and t.network().csmil_contract["num_clusters"] == 4
    assert len(t.encoders()) == 3 and t.encoders() is t.encoders()  # built once
    with pytest.raises(BundleInputError, match="num_clusters = 4 but this run has num_clusters = 8"):
        TrainedModel(tmp_path / "model.pt", {"num_clusters": 8})
    assert TrainedModel(tmp_path / "model.pt", {"seed": 5, "num_clusters": 4}).seed == 5  # free, and agreeing
    torch.save(dict(net.state_dict()), tmp_path / "old.pt")  # 0.11: weights only
    with caplog.at_level("WARNING"):
        old = TrainedModel(tmp_path / "old.pt", {"mil_model": "csmil", "num_clusters": 4})
    assert "no training contract" in caplog.text and old.mil_model == "csmil" and old.tiling().patch_size == 256


def test_the_trained_model_reads_its_checkpoint_once_and_a_replaced_one_again(tmp_path, monkeypatch):
    """The contract and the weights come from one read of model.pt; a file replaced after the settings were read
    (new weights) is read again, so the weights are never stale."""
    import torch

    from scripts.checkpoint import contract
    from scripts.checkpoint.trained import TrainedModel
    from scripts.mil.registry import build_model

    recorded = pipeline_parser({"num_clusters": 4, "mil_model": "dsmil", "patch_size": 128}).get_parsed_content("model_contract")
    nets = [contract.attach(build_model("dsmil", in_features=128, num_clusters=4), recorded) for _ in range(2)]
    with torch.no_grad():
        next(nets[1].parameters()).add_(1.0)  # other weights
    ckpt = tmp_path / "model.pt"
    torch.save(nets[0].state_dict(), ckpt)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(contract.torch, "load", lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    t = TrainedModel(ckpt)
    net = t.network()
    assert reads == [ckpt] and t.num_clusters == 4
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), nets[0].state_dict().values()))
    t = TrainedModel(ckpt)
    torch.save(nets[1].state_dict(), tmp_path / "new.pt")
    (tmp_path / "new.pt").replace(ckpt)  # another training wrote model.pt in between
    net = t.network()
    assert len(reads) == 3 and all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), nets[1].state_dict().values()))


@pytest.mark.slow
@pytest.mark.parametrize("stage,config,args,start", [
    ("inference", "inference", ["--num_bags", "0"], "error: --num_bags"),
    ("trainning", "train", ["--max_epoch", "3"], "error: run trainning: train.yaml has no stage 'trainning'"),
    ("prepare", "train", ["--max_epoch", "3"], "error: --max_epoch: is not an id of train.yaml")])
def test_each_stage_checks_the_command_line_and_settings_first(stage, config, args, start, tmp_path):
    """As a user types them: a bad value, a misspelt stage or id stops with one line before any work (every case at
    the parser: test_the_command_line_is_checked_ids_and_stages, test_validation_accepts_the_defaults...)."""
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", stage, "--config_file", f"configs/{config}.yaml",
                        "--dataset_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if not x.lstrip().startswith(("warnings.warn", "/")) and "Warning" not in x]
    assert lines[-1].startswith(start) and "Fix:" in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "nowhere").exists()  # nothing was generated before the check


def test_checkpoint_contract_round_trip_and_old_checkpoints(tmp_path, caplog):
    import torch

    from scripts.inference.predict import load_network
    from scripts.checkpoint import contract
    from scripts.mil.registry import build_model

    settings = dict(mil_model="dsmil", scales_mpp=[0.5, 1.0, 2.0], patch_size=256, num_clusters=8, cluster_scale_mpp=2.0,
                    encoder_arch="tiny", in_features=16, label_map={"0": 0, "1": 1})
    torch.manual_seed(0)
    net = contract.attach(build_model("dsmil", in_features=16), contract.make_contract(**settings))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert contract.read(state)["patch_size"] == 256 and contract.read(state)["bundle_version"]
    loaded = load_network(build_model("dsmil", in_features=16), tmp_path / "model.pt", contract=contract.make_contract(**settings))
    assert loaded.csmil_contract["scales_mpp"] == [0.5, 1.0, 2.0]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    torch.save(dict(net.state_dict()), tmp_path / "old.pt")  # a plain dict: no metadata, as before 0.12.0
    with caplog.at_level("WARNING"):
        old = load_network(build_model("dsmil", in_features=16), tmp_path / "old.pt", contract=contract.make_contract(**settings))
    assert old.csmil_contract is None and "no training contract" in caplog.text


@pytest.mark.slow
def test_prepare_from_another_folder_builds_the_demo_where_told(tmp_path):
    """The data stages run from any folder too: the demo cohort and the tiles go where the ids say."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _run_from(elsewhere, "run", "prepare", "--config_file", str(ROOT / "configs" / "train.yaml"), "--bundle_root", str(ROOT),
                  "--dataset_dir", str(tmp_path / "demo"), "--output_dir", str(tmp_path / "out"), "--demo_num_patients", "2",
                  "--demo_slide_size", "1024", "--progress", "False")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "demo" / "manifest.csv").is_file() and len(list((tmp_path / "out" / "cache" / "tiles").glob("*/meta.json"))) == 2
    assert not list(elsewhere.iterdir())
    reads, _ = launch_report(r.stderr)
    assert max(reads.values()) == 1, reads


def test_inference_refuses_other_encoders_before_encoding(tmp_path):
    from scripts.errors import BundleInputError
    from scripts.features.encoders import build_scale_encoders, encoder_signature
    from scripts.checkpoint import contract
    from scripts.mil.registry import build_model

    trained = build_scale_encoders("tiny", 3, seed=0)
    net = contract.attach(build_model("dsmil", in_features=128), {"encoders": [encoder_signature(e, "tiny") for e in trained]})
    assert contract.check_encoders(net, build_scale_encoders("tiny", 3, seed=0), "tiny", tmp_path / "model.pt") is net
    with pytest.raises(BundleInputError, match="trained on features of encoders"):
        contract.check_encoders(net, build_scale_encoders("tiny", 3, seed=5), "tiny", tmp_path / "model.pt")
    raw = _raw(INFERENCE_CONFIG)
    assert raw["network"] == "$@trained.checked_network(@device)"  # TrainedModel.checked_network: check_encoders
    assert raw["initialize"][3] == "$@network"  # checked in initialize: before any slide is tiled or encoded


def test_multi_gpu_training_wraps_the_single_process_network():
    """multi_gpu_train.yaml wraps train.yaml's own network (its contract, with a survival model's time-bin edges) in
    DistributedDataParallel instead of repeating the expression (a copy had lost the survival cuts)."""
    train, ddp = _raw(ROOT / "configs" / "train.yaml"), _raw(ROOT / "configs" / "multi_gpu_train.yaml")
    assert train["network"] == "@mil_network" and "survival_cuts" in train["mil_network"]
    assert ddp["network"].startswith("$torch.nn.parallel.DistributedDataParallel(@mil_network,") and "attach(" not in ddp["network"]


@pytest.mark.slow
def test_inference_and_export_take_the_checkpoints_settings_and_old_checkpoints_upgrade(trained, tmp_path, caplog):
    """A model trained with other settings than the defaults: inference and export need no override, a
    conflicting one stops with one line; a weights-only copy (0.11 style) is upgraded to the same contract."""
    import torch

    from scripts.deploy.runtime import DeployModels
    from scripts.checkpoint.contract import read_file

    shutil.copytree(trained / "out" / "cache", tmp_path / "cache")  # tiles and features; clusters are made again (k = 4)
    data = dict(dataset_dir=str(trained / "demo"), cache_dir=str(tmp_path / "cache"), ckpt_dir=str(tmp_path / "models"))
    settings = dict(num_clusters=4, mil_model="csmil", seed=3, bag_per_cluster=4)
    run_bundle("train.yaml", output_dir=str(tmp_path / "train"), max_epochs=1, val_fraction=0.5, **settings, **data)
    trained_with = read_file(tmp_path / "models" / "model.pt")
    assert (trained_with["num_clusters"], trained_with["mil_model"], trained_with["seed"], trained_with["bag_per_cluster"]) == (4, "csmil", 3, 4)
    with caplog.at_level("INFO", logger="scripts.checkpoint.trained"):
        run_bundle("inference.yaml", output_dir=str(tmp_path / "pred"), num_bags=5, **data)  # no training setting given
    assert "settings from the checkpoint" in caplog.text and "num_clusters=4" in caplog.text
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert len(rows) == 4 and all(0 <= float(x["probability"]) <= 1 for x in rows)
    from scripts.checkpoint.trained import TrainedModel  # a contradicting override: one line (as a command: test_bad_inputs' table)

    with pytest.raises(BundleInputError, match="num_clusters = 4 but this run has num_clusters = 8"):
        TrainedModel(tmp_path / "models" / "model.pt", {"num_clusters": 8})
    run_bundle("deploy.yaml", deploy_dir=str(tmp_path / "deploy"), ckpt_dir=str(tmp_path / "models"))  # the export reads no slide
    exported = DeployModels(tmp_path / "deploy").settings
    assert exported["num_clusters"] == 4 and exported["contract"]["mil_model"] == "csmil"
    # a 0.11-style checkpoint (weights only) gets the same contract from the training command's overrides
    old = tmp_path / "old" / "model.pt"
    old.parent.mkdir()
    torch.save(dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True)), old)
    assert read_file(old) is None
    from scripts.checkpoint.upgrade import main as upgrade_main

    assert upgrade_main([str(old), "--output_dir", str(tmp_path / "train"), *[x for k, v in settings.items() for x in (f"--{k}", str(v))]]) == 0
    upgraded = read_file(old)
    assert upgraded.pop("upgraded_from") == "model.pt" and upgraded == trained_with
    assert (old.parent / "model.pt.orig").is_file()
    from scripts.checkpoint.upgrade import upgrade

    with pytest.raises(BundleInputError, match="already carries"):  # a second upgrade is refused
        upgrade(old)



@pytest.mark.slow
def test_a_relabelled_manifest_changes_trainings_labels_without_new_extraction(trained, tmp_path):
    """Labels, patients and splits come from the manifest of the command (the datalist), never from the feature
    cache: relabelling every slide changes what training sees, and nothing is tiled or encoded again."""
    rows = list(csv.DictReader(open(trained / "demo" / "manifest.csv")))
    cache = trained / "out" / "cache"
    stamps = {f: f.stat().st_mtime_ns for f in cache.rglob("*.npy")}

    def relabelled(name, label_of):
        d = tmp_path / name
        d.mkdir()
        with open(d / "manifest.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slide_id", "patient_id", "path", "label"])
            for r in rows:
                w.writerow([r["slide_id"], r["patient_id"], str(trained / "demo" / r["path"]), label_of(r)])
        return pipeline_parser({"dataset_dir": str(d), "cache_dir": str(cache), "output_dir": str(tmp_path / name / "out"),
                                "demo_if_missing": False, "progress": False, "val_fraction": 0.5})

    p = relabelled("flipped", lambda r: 1 - int(r["label"]))
    datalist = p.get_parsed_content("datalist")
    flipped = {r["slide_id"]: 1 - int(r["label"]) for r in rows}
    assert {e.slide_id: e.label for e in datalist} == flipped
    assert {e.path.parent for e in datalist} == {cache / "features"}  # the cached entries, found by the slide's identity
    written = json.loads((tmp_path / "flipped" / "out" / "datalist.json").read_text())["slides"]
    assert {i["slide_id"]: i["label"] for i in written} == flipped
    train = p.get_parsed_content("train#dataset")
    assert train.cache.labels == [flipped[e.slide_id] for e in train.cache.entries]  # what the bags are labelled with
    assert {f: f.stat().st_mtime_ns for f in cache.rglob("*.npy")} == stamps  # no tiling, extraction or clustering again
    one_class = relabelled("all_positive", lambda r: 1)
    with pytest.raises(Exception) as err:  # was silently trained on the cached labels before 0.15
        one_class.get_parsed_content("split")
    assert "at least two classes" in str(find_input_error(err.value))


def test_a_nested_override_of_the_preprocessing_reaches_inference_and_the_export(tmp_path):
    """The checkpoint records the preprocessing's own arguments, so `--preprocessing#read_cell_um 512` given to
    training is what inference and the Deploy export build (0.14 re-read the raw YAML and missed it)."""
    import torch

    from scripts.features.extraction import transform_signature
    from scripts.checkpoint import contract
    from scripts.mil.registry import build_model
    from scripts.checkpoint.trained import TrainedModel

    p = pipeline_parser({"preprocessing#read_cell_um": 512.0, "preprocessing#mean": [0.5, 0.5, 0.5]})
    trained_chain = transform_signature(p.get_parsed_content("preprocessing"))
    assert trained_chain != transform_signature(pipeline_parser().get_parsed_content("preprocessing"))
    torch.save(contract.attach(build_model("dsmil", in_features=128), p.get_parsed_content("model_contract")).state_dict(),
               tmp_path / "model.pt")
    t = TrainedModel(tmp_path / "model.pt")
    assert transform_signature(t.preprocessing()) == trained_chain
    assert t.deploy_settings()["preprocessing"]["read_cell_um"] == 512.0 and t.deploy_settings()["preprocessing_signature"] == trained_chain


def test_model_names_are_checked_and_a_bare_name_is_a_list(tmp_path):
    """`--mil_model csmill` stops with one line naming the closest model; `--eval_models csmil` (no brackets) is the
    one-element list ['csmil'], not the letters ['c', 's', 'm', 'i', 'l']."""
    p = _parser([PIPELINE_CONFIG, EVALUATE_CONFIG], {"output_dir": str(tmp_path / "out"), "eval_models": "csmil", "ablation_models": "dsmil"})
    assert _initialize(p) is True
    assert p.get_parsed_content("eval_models") == ["csmil"] and p.get_parsed_content("ablation_models") == ["dsmil"]
    for key, value in (("mil_model", "csmill"), ("eval_models", ["dsmil", "nosuchmodel"])):
        p = _parser([PIPELINE_CONFIG, EVALUATE_CONFIG], {"output_dir": str(tmp_path / "out"), key: value})
        with pytest.raises(Exception) as err:
            _initialize(p)
        found = find_input_error(err.value)
        assert found.path == f"--{key}" and "is not a model of the bundle" in found.reason and "dsmil" in found.fix
