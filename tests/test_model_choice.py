"""The declared rule for the default model (scripts/evaluation/model_choice.py, the model card): it picks the
leader unless a simpler model is tied with it within the seed noise, and the recorded protocol results make it pick
configs/train.yaml's mil_model."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ROOT
from scripts.evaluation.model_choice import choose_default, markdown, model_parameters

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


def test_the_default_model_follows_the_rule_on_the_recorded_results():
    data = json.loads((ROOT / "docs" / "data" / "colocation_protocol.json").read_text())
    chosen, rows = choose_default(data["auc"], data["grid"], model_parameters(list(data["auc"])))
    default = yaml.safe_load((ROOT / "configs" / "train.yaml").read_text())["mil_model"]
    assert chosen == default, markdown(rows)
    assert "**yes**" in markdown(rows).splitlines()[2 + [r["model"] for r in rows].index(default)]
