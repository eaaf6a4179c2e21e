"""The declared rule for the default model (scripts/evaluation/model_choice.py, the model card): it picks the
leader unless a simpler model is tied with it within the seed noise, and the recorded protocol results make it pick
configs/train.yaml's mil_model."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT
from scripts.evaluation.model_choice import choose_default, markdown

GRID = ["a/0", "a/1", "b/0", "b/1"]


def test_a_clear_leader_is_chosen_even_when_larger():
    auc = {"big": {c: 0.9 + 0.01 * i for i, c in enumerate(GRID)}, "small": {c: 0.7 for c in GRID}}
    chosen, rows = choose_default(auc, GRID, {"big": 10, "small": 1})
    assert chosen == "big" and [r["model"] for r in rows] == ["big", "small"] and not rows[1]["tied_with_leader"]


def test_a_lead_within_the_noise_goes_to_the_simpler_model():
    auc = {"big": {"a/0": 0.95, "a/1": 0.80, "b/0": 0.90, "b/1": 0.85}, "small": {"a/0": 0.85, "a/1": 0.86, "b/0": 0.88, "b/1": 0.86}}
    chosen, rows = choose_default(auc, GRID, {"big": 10, "small": 1})
    assert chosen == "small" and rows[0]["model"] == "big" and rows[1]["tied_with_leader"]


def test_a_model_missing_a_cell_is_listed_but_not_a_candidate():
    auc = {"a": {c: 0.8 for c in GRID}, "b": {"a/0": 0.99}}
    chosen, rows = choose_default(auc, GRID, {"a": 10, "b": 1})
    assert chosen == "a" and rows[-1]["model"] == "b" and rows[-1]["cells"] == 1
    with pytest.raises(ValueError, match="no model has a result in every cell"):
        choose_default({"b": {"a/0": 0.99}}, GRID, {"b": 1})


def test_a_partial_row_is_bounded_and_says_whether_its_missing_cells_could_change_the_default():
    """Mean and paired lead on the cells it has; with AUC 1 in the missing cells a low partial model cannot lead,
    and with more parameters than the default a tie would not pick it either; fewer parameters, or a bound that
    reaches the leader, leave the default open."""
    auc = {"a": {c: 0.9 for c in GRID}, "low": {"a/0": 0.5, "a/1": 0.4, "b/0": 0.45}, "one": {"a/0": 0.5},
           "cheap": {"a/0": 0.5, "a/1": 0.5, "b/0": 0.5}}
    chosen, rows = choose_default(auc, GRID, {"a": 10, "low": 20, "one": 20, "cheap": 5})
    by = {r["model"]: r for r in rows}
    assert chosen == "a" and [r["model"] for r in rows] == ["a", "cheap", "low", "one"]
    low = by["low"]
    assert low["cells"] == 3 and low["mean_auc"] == pytest.approx(0.45) and low["diff_to_leader"] == pytest.approx(0.45)
    assert low["se"] == pytest.approx(0.05 / 3 ** 0.5) and low["best_possible"] == pytest.approx(2.35 / 4)
    assert low["can_change_default"] is False and not low["chosen"]
    assert by["one"]["best_possible"] == pytest.approx(3.5 / 4) and by["one"]["can_change_default"] is False
    assert by["cheap"]["best_possible"] < 0.9 and by["cheap"]["can_change_default"] is True  # fewer parameters than a
    assert choose_default(auc, GRID, {"a": 10, "low": 20, "one": 20, "cheap": 50})[1][1]["can_change_default"] is False
    close = {"a": {c: 0.9 for c in GRID}, "near": {"a/0": 0.96, "a/1": 0.96, "b/0": 0.7}}
    assert choose_default(close, GRID, {"a": 1, "near": 2})[1][1]["can_change_default"] is True  # 0.905 with a 1 in b/1
    table = markdown(rows)
    assert "| low | 3 | 0.450 (its cells; at most 0.587) | +0.450 ± 0.029 (its cells) | - | 20 | partial: cannot change it |" in table
    assert "| cheap | 3 |" in table and "partial: its missing cells could change it" in table


def test_the_default_model_follows_the_rule_on_the_recorded_results():
    """configs/train.yaml's mil_model is the rule's pick on docs/data/colocation_protocol.json, and the table in
    docs/evaluation.md is the command's, so the documented evidence is the recorded one."""
    from scripts.evaluation.model_choice import apply_rule

    chosen, rows = apply_rule(ROOT / "docs" / "data" / "colocation_protocol.json")
    default = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())["mil_model"]
    assert chosen == default, markdown(rows)
    assert "**yes**" in markdown(rows).splitlines()[2 + [r["model"] for r in rows].index(default)]
    assert markdown(rows) in (ROOT / "docs" / "evaluation.md").read_text(), "rerun python -m scripts.evaluation.model_choice " \
        "docs/data/colocation_protocol.json and paste its table into docs/evaluation.md"


def test_the_command_lists_every_registry_model_and_says_what_is_not_settled(tmp_path, capsys):
    """A registry model without a recorded cell is a row of 0 cells whose cells could change the default; the last
    line names the models that keep it open."""
    from scripts.evaluation.model_choice import main
    from scripts.mil.registry import MODELS

    cells = {c: 0.9 for c in GRID}
    path = tmp_path / "rule.json"
    path.write_text(json.dumps({"grid": GRID, "auc": {"dsmil": cells, "csmil": {c: 0.6 for c in GRID}}}))
    main([str(path)])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    assert len(lines) == len(MODELS) and lines[0].startswith("| dsmil | 4 | 0.900 |") and "**yes**" in lines[0]
    assert "| monai_att_trans_pyramid | 0 | - (no cells; at most 1.000) | - | - |" in out
    assert "default by the rule: dsmil (not settled: the missing cells of " in out and "monai_att_trans_pyramid" in out.splitlines()[-1]
