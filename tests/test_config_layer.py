"""The config layer: one pipeline config parsed once per command, ids declared once, overrides that reach every
stage, commands that run from any folder (and from the Model Zoo's layout), outputs unchanged by the redesign."""

from __future__ import annotations

import csv
import re
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from golden_outputs import GOLDEN, fingerprints
from scripts.benchmarks.startup import LAUNCH, launch_report
from scripts.workflows.pipeline_config import PIPELINE_CONFIG, pipeline_parser

STAGES = ["prepare", "pretrain", "extract", "cluster", "inference", "evaluate", "deploy"]


def test_every_stage_config_is_the_pipeline_config():
    for stage in STAGES:
        path = ROOT / "configs" / f"{stage}.yaml"
        assert path.is_symlink() and path.resolve() == PIPELINE_CONFIG.resolve(), stage
    raw = yaml.safe_load(PIPELINE_CONFIG.read_text())
    for run_id in ["prepare", "pretrain", "extract", "cluster", "training", "inference", "evaluate", "export", "run"]:
        assert run_id in raw, run_id


def test_no_macros_no_nested_parsers():
    text = PIPELINE_CONFIG.read_text()
    assert '"%' not in text and "run_stage" not in text and "stage_overrides" not in text
    for overlay in ["cohort", "multi_gpu_extract", "multi_gpu_pretrain", "multi_gpu_train"]:
        assert '"%' not in (ROOT / "configs" / f"{overlay}.yaml").read_text()


def test_each_tunable_is_declared_once_at_top_level():
    """Flat ids are top-level keys once (YAML refuses duplicates); no tunable is re-declared inside a section."""
    raw = yaml.safe_load(PIPELINE_CONFIG.read_text())
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
    settings = p.get_parsed_content("deploy_settings")
    assert settings["patch_size"] == 128 and settings["tiling"]["patch_size"] == 128 and settings["cluster_scale_index"] == 1
    assert p.get_parsed_content("eval_train_ids")["scales_mpp"] == [0.5, 2.0]


def test_evaluation_runs_inherit_the_commands_training_ids():
    p = pipeline_parser({"max_epochs": 3, "learning_rate": 0.01, "bag_per_cluster": 4})
    ids = p.get_parsed_content("eval_train_ids")
    assert ids["max_epochs"] == 3 and ids["learning_rate"] == 0.01 and ids["bag_per_cluster"] == 4
    raw = yaml.safe_load(PIPELINE_CONFIG.read_text())
    assert set(ids) <= set(raw)  # every inherited id is a declared tunable


def test_eval_seed_repeats_the_protocol_on_the_same_features():
    """`--eval_seed` reaches the protocol (splits, bootstrap) and every run's training seed; the cohort, the
    encoders and the features keep `seed` (so repeating the protocol re-uses the feature cache)."""
    raw = yaml.safe_load(PIPELINE_CONFIG.read_text())
    assert raw["evaluate"]["seed"] == "@eval_seed" and raw["eval_train_ids"]["seed"] == "@eval_seed"
    assert pipeline_parser().get_parsed_content("eval_train_ids")["seed"] == 0  # follows seed by default
    p = pipeline_parser({"eval_seed": 3})
    assert p.get_parsed_content("eval_train_ids")["seed"] == 3
    assert p.get_parsed_content("seed") == 0 and p.get_parsed_content("demo_params").seed == 0
    assert "seed=@seed" in raw["encoders"]
    from scripts.config_checks import validate
    from scripts.errors import BundleInputError

    with pytest.raises(BundleInputError, match="--eval_seed: -1 is not allowed"):
        validate({"eval_seed": -1})


@pytest.mark.slow
def test_demo_features_and_model_unchanged(trained):
    """The tiny demo's features and trained model are bit-identical to those of the config layer before 0.12.0."""
    golden = json.loads(GOLDEN.read_text())
    now = fingerprints(trained)
    assert now["features"] == golden["features"], "features changed: regenerate tests/data only if intended (tests/golden_outputs.py)"
    assert now["model"] == golden["model"], "model.pt changed: regenerate tests/data only if intended (tests/golden_outputs.py)"


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
def test_model_zoo_checks_in_the_zoo_layout(trained, tmp_path, meta_schema):
    """The Model Zoo's ci/verify_bundle.py (full mode) steps, run from the zoo root on models/csmil_bundle."""
    zoo = tmp_path / "zoo"
    bundle = zoo / "models" / "csmil_bundle"
    top = {".git", "outputs", "data", "models", "tests", ".pytest_cache"}
    shutil.copytree(ROOT, bundle, symlinks=True,
                    ignore=lambda d, names: [n for n in names if (Path(d) == ROOT and n in top) or n == "__pycache__"])
    (bundle / "models").mkdir()
    shutil.copy(trained / "models" / "model.pt", bundle / "models" / "model.pt")
    (bundle / "eval").mkdir()
    shutil.copy(meta_schema, bundle / "eval" / "schema.json")
    rel = "models/csmil_bundle"
    checks = (
        "import sys\n"
        f"sys.path.insert(0, {rel!r})\n"
        "from monai.bundle import ckpt_export, create_workflow, verify_metadata, verify_net_in_out\n"
        f"b = {rel!r}\n"
        "verify_metadata(meta_file=b + '/configs/metadata.json', filepath=b + '/eval/schema.json')\n"
        "verify_net_in_out(net_id='network_def', meta_file=b + '/configs/metadata.json', config_file=b + '/configs/inference.yaml', bundle_root=b)\n"
        "ckpt_export(net_id='network_def', filepath=b + '/models/verify_model.ts', ckpt_file=b + '/models/model.pt',\n"
        "            meta_file=b + '/configs/metadata.json', config_file=b + '/configs/inference.yaml', bundle_root=b)\n"
        "w = create_workflow(workflow_type='inference', bundle_root=b, config_file=b + '/configs/inference.yaml',\n"
        "                    logging_file=b + '/configs/logging.conf', meta_file=b + '/configs/metadata.json')\n"
        "assert not w.check_properties(), w.check_properties()\n"
        "print('ZOO CHECKS PASSED')\n"
    )
    r = subprocess.run([sys.executable, "-c", checks], cwd=zoo, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0 and "ZOO CHECKS PASSED" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert (bundle / "models" / "verify_model.ts").is_file()


def test_preprocessing_signature_is_derived_from_the_transforms():
    from scripts.features.extraction import transform_signature

    base = transform_signature(pipeline_parser().get_parsed_content("preprocessing"))
    assert base == transform_signature(pipeline_parser().get_parsed_content("preprocessing"))  # deterministic
    types = [t["type"].rsplit(".", 1)[1] for t in base["transforms"]]
    assert types == ["LoadMultiScaleRegiond", "Resized", "ScaleIntensityRanged", "NormalizeIntensityd", "EnsureTyped"]
    for override in [{"normalize_mean": [0.5, 0.5, 0.5]}, {"patch_size": 224}]:
        assert transform_signature(pipeline_parser(override).get_parsed_content("preprocessing")) != base, override
    p = pipeline_parser()
    p["preprocessing"]["transforms"][3]["divisor"] = [1.0, 1.0, 1.0]  # an edit of the chain itself
    assert transform_signature(p.get_parsed_content("preprocessing")) != base
    assert pipeline_parser().get_parsed_content("deploy_settings")["preprocessing_signature"] == base


def test_every_tunable_has_a_rule_and_is_checked():
    from scripts.config_checks import RULES, rules_table

    raw = yaml.safe_load(PIPELINE_CONFIG.read_text())
    assert set(raw["checked_ids"]) == set(RULES)
    assert all(v == f"@{k}" for k, v in raw["checked_ids"].items())
    tunables = {k for k, v in raw.items() if (isinstance(v, (int, float, str, type(None))) or
                                             (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)))
                and not str(v).startswith(("$", "@", "%"))
                and k not in ("bundle_root", "input", "label_map", "imports", "eval_models", "ablation_models", "ablation_values",
                              "ablation_id", "eval_test_manifest", "mil_model", "encoder_arch", "encoder_weights_prefix",
                              "normalize_mean", "normalize_std", "demo_options", "train_overrides", "encoder_weights", "training",
                              "pretrain_init_weights", "pretrain_init_prefix")}
    assert tunables <= set(RULES), sorted(tunables - set(RULES))
    docs = (ROOT / "docs" / "configuration.md").read_text()
    assert rules_table() in docs  # the documented table is the code's


def test_validation_accepts_the_defaults_and_refuses_bad_values(tmp_path):
    from scripts.config_checks import validate
    from scripts.errors import BundleInputError

    p = pipeline_parser({"output_dir": str(tmp_path / "out")})
    assert p.get_parsed_content("validated") is True
    assert (tmp_path / "out").is_dir() and not [f for f in (tmp_path / "out").rglob("*") if f.is_file()]  # created, probes removed
    for bad, words in [({"patch_size": 8}, "[32, 4096]"), ({"val_fraction": 0.0}, "(0, 1]"), ({"num_workers": -1}, ">= 0"),
                       ({"learning_rate": 0}, "> 0"), ({"max_epochs": 2.5}, "integer"), ({"min_tissue": 2}, "[0, 1]"),
                       ({"on_error": "ignore"}, "raise"), ({"device": "tpu"}, "cpu, cuda"), ({"scales_mpp": []}, "non-empty"),
                       ({"scales_mpp": [0.5, 1.0], "pretrain_scales_mpp": [2.0]}, "subset"), ({"mpp": True}, "number")]:
        with pytest.raises(BundleInputError, match=re.escape(words)):
            validate(bad)


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
    literal; `False` arrives as a bool): validated, and every consumer reads the boolean."""
    p = pipeline_parser({"output_dir": str(tmp_path / "out"), **{k: given for k in SWITCHES}})
    assert p.get_parsed_content("validated") is True
    assert p.get_parsed_content("flags") == {k: expected for k in SWITCHES}
    assert p.get_parsed_content("eval_train_ids")["bag_replacement"] is expected  # what each protocol run inherits
    assert p.get_parsed_content("deploy_settings")["bag_replacement"] is expected  # what the Deploy app reads
    assert (p.get_parsed_content("demo") is None) is (not expected)


def test_a_value_that_is_not_yes_or_no_stops_naming_the_id(tmp_path):
    from scripts.errors import BundleInputError, find_input_error

    for key in SWITCHES:
        p = pipeline_parser({"output_dir": str(tmp_path / "out"), key: "maybe"})
        for target in ("validated", f"flags#{key}"):
            with pytest.raises(Exception) as err:
                p.get_parsed_content(target)
            found = find_input_error(err.value)
            assert isinstance(found, BundleInputError) and found.path == f"--{key}" and "'maybe'" in str(found), (target, err.value)


@pytest.mark.slow
@pytest.mark.parametrize("stage,args", [("prepare", ["--patch_size", "0"]), ("inference", ["--num_bags", "0"]),
                                        ("training", ["--scales_mpp", "[0.5]"]), ("export", ["--device", "cuda:7"])])
def test_each_stage_checks_settings_first(stage, args, tmp_path):
    config = {"export": "deploy", "training": "train"}.get(stage, stage)
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", stage, "--config_file", f"configs/{config}.yaml",
                        "--dataset_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if not x.lstrip().startswith(("warnings.warn", "/")) and "Warning" not in x]
    assert lines[-1].startswith("error: --") and "Fix:" in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "nowhere").exists()  # nothing was generated before the check


def test_checkpoint_contract_round_trip_and_old_checkpoints(tmp_path, caplog):
    import torch

    from scripts.inference.predict import load_network
    from scripts.mil import contract
    from scripts.mil.baselines import build_model

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
    r = _run_from(elsewhere, "run", "prepare", "--config_file", str(ROOT / "configs" / "prepare.yaml"), "--bundle_root", str(ROOT),
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
    from scripts.mil import contract
    from scripts.mil.baselines import build_model

    trained = build_scale_encoders("tiny", 3, seed=0)
    net = contract.attach(build_model("dsmil", in_features=128), {"encoders": [encoder_signature(e, "tiny") for e in trained]})
    assert contract.check_encoders(net, build_scale_encoders("tiny", 3, seed=0), "tiny", tmp_path / "model.pt") is net
    with pytest.raises(BundleInputError, match="trained on features of encoders"):
        contract.check_encoders(net, build_scale_encoders("tiny", 3, seed=5), "tiny", tmp_path / "model.pt")
    raw = yaml.safe_load(PIPELINE_CONFIG.read_text())
    assert "check_encoders" in raw["infer_network"] and "@entries" not in raw["infer_network"]  # checked before extraction


def test_trained_settings_are_taken_before_any_is_read(tmp_path):
    from scripts.mil.contract import TrainedSettings

    s = TrainedSettings()
    assert s.take(tmp_path / "missing.pt") and s.values == {} and s.get("num_clusters", 8) == 8  # nothing to take
    with pytest.raises(RuntimeError, match="before the checkpoint"):
        s.take(tmp_path / "missing.pt")  # a setting was read already: the config's order is wrong
    raw = yaml.safe_load(PIPELINE_CONFIG.read_text())
    for run_id in ("inference", "export"):
        assert raw[run_id][0] == "$@trained_settings.take(@ckpt_path)", run_id  # first item: before every check
    from scripts.mil.contract import SETTINGS, TAKEN

    for key in [k for k in SETTINGS + TAKEN if k != "in_features"]:
        assert raw[key].startswith(f"$@trained_settings.get('{key}', "), key
        assert raw["model_contract"][key] == f"@{key}", key  # recorded by training


@pytest.mark.slow
def test_inference_and_export_take_the_checkpoints_settings_and_old_checkpoints_upgrade(trained, tmp_path):
    """A model trained with other settings than the defaults: inference and export need no override, a
    conflicting one stops with one line; a weights-only copy (0.11 style) is upgraded to the same contract."""
    import torch

    from scripts.deploy.runtime import DeployModels
    from scripts.mil.contract import read_file

    shutil.copytree(trained / "out" / "cache", tmp_path / "cache")  # tiles and features; clusters are made again (k = 4)
    common = ["--dataset_dir", str(trained / "demo"), "--cache_dir", str(tmp_path / "cache"), "--ckpt_dir", str(tmp_path / "models"),
              "--progress", "False"]
    settings = ["--num_clusters", "4", "--mil_model", "csmil", "--seed", "3", "--bag_per_cluster", "4"]

    def bundle(*args):
        return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args, *common], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)

    r = bundle("training", "--config_file", "configs/train.yaml", "--output_dir", str(tmp_path / "train"), "--max_epochs", "1",
               "--val_fraction", "0.5", *settings)
    assert r.returncode == 0, r.stderr[-3000:]
    trained_with = read_file(tmp_path / "models" / "model.pt")
    assert (trained_with["num_clusters"], trained_with["mil_model"], trained_with["seed"], trained_with["bag_per_cluster"]) == (4, "csmil", 3, 4)
    r = bundle("inference", "--config_file", "configs/inference.yaml", "--output_dir", str(tmp_path / "pred"), "--num_bags", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "settings from the checkpoint" in r.stdout + r.stderr and "num_clusters=4" in r.stdout + r.stderr
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert len(rows) == 4 and all(0 <= float(x["probability"]) <= 1 for x in rows)
    r = bundle("inference", "--config_file", "configs/inference.yaml", "--output_dir", str(tmp_path / "pred2"), "--num_clusters", "8")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "num_clusters = 4 but this run has num_clusters = 8" in r.stderr
    r = bundle("export", "--config_file", "configs/deploy.yaml", "--output_dir", str(tmp_path / "exp"), "--deploy_dir", str(tmp_path / "deploy"))
    assert r.returncode == 0, r.stderr[-3000:]
    exported = DeployModels(tmp_path / "deploy").settings
    assert exported["num_clusters"] == 4 and exported["contract"]["mil_model"] == "csmil"
    # a 0.11-style checkpoint (weights only) gets the same contract from the training command's overrides
    old = tmp_path / "old" / "model.pt"
    old.parent.mkdir()
    torch.save(dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True)), old)
    assert read_file(old) is None
    up = subprocess.run([sys.executable, "-m", "scripts.mil.upgrade_checkpoint", str(old), "--output_dir", str(tmp_path / "train"), *settings],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr[-3000:]
    upgraded = read_file(old)
    assert upgraded.pop("upgraded_from") == "model.pt" and upgraded == trained_with
    assert (old.parent / "model.pt.orig").is_file()
    again = subprocess.run([sys.executable, "-m", "scripts.mil.upgrade_checkpoint", str(old)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and again.stderr.strip().splitlines()[-1].startswith("error: ") and "already carries" in again.stderr
