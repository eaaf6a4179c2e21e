"""Training recipes (configs/train.yaml ``train_recipe``): the shared recipe builds the optimiser the bundle always built;
``published`` gives each head from the field its authors' optimiser, parameter groups and schedule."""

from __future__ import annotations

import math

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from conftest import ROOT, TINY_DEMO
from scripts.mil.registry import FIELD_HEADS, MODELS, build_model
from scripts.workflows.optim import Lookahead, build_optimizer, build_schedule, recipe_for


def _groups(opt):
    return [(g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shared_recipe_is_adam_over_every_parameter_for_every_model(name):
    net = build_model(name, 16)
    for mode in ("shared", "published") if net.published_recipe() is None else ("shared",):
        opt = build_optimizer(net, recipe_for(net, mode, 5e-4, 1e-4))
        assert type(opt) is torch.optim.Adam and len(opt.param_groups) == 1
        assert opt.param_groups[0]["params"] == list(net.parameters())
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (5e-4, 1e-4)
        assert build_schedule(opt, recipe_for(net, mode, 5e-4, 1e-4), 40) is None


def test_only_the_heads_from_the_field_publish_a_recipe():
    published = {n for n in MODELS if build_model(n, 16).published_recipe() is not None}
    assert published == set(FIELD_HEADS)


def test_monai_transformer_heads_train_their_transformer_group_slower_with_cosine():
    for name, group in (("monai_att_trans_20x", "transformer"), ("monai_att_trans_pyramid", "levels")):
        net = build_model(name, 16)
        recipe = recipe_for(net, "published", 5e-4, 1e-4)
        opt = build_optimizer(net, recipe)
        assert type(opt) is torch.optim.AdamW
        inner = {id(p) for p in getattr(net, group).parameters()}
        main, trans = opt.param_groups
        assert (main["lr"], main["weight_decay"], trans["lr"], trans["weight_decay"]) == (3e-5, 0.0, 6e-6, 0.1)
        assert {id(p) for p in trans["params"]} == inner and not inner & {id(p) for p in main["params"]}
        assert len(main["params"]) + len(trans["params"]) == len(list(net.parameters()))
        sched = build_schedule(opt, recipe, 4)
        lrs = []
        for _ in range(4):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[1]["lr"])
        assert lrs == pytest.approx([6e-6 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(1, 5)], abs=1e-12)
    att = build_optimizer(build_model("monai_att_20x", 16), recipe_for(build_model("monai_att_20x", 16), "published", 5e-4, 1e-4))
    assert _groups(att) == [(3e-5, 0.0, len(list(build_model("monai_att_20x", 16).parameters())))]  # no transformer


def test_transmil_published_recipe_is_lookahead_radam_without_decay_on_biases():
    net = build_model("transmil_20x", 16)
    opt = build_optimizer(net, recipe_for(net, "published", 5e-4, 1e-4))
    assert isinstance(opt, Lookahead) and type(opt.optimizer) is torch.optim.RAdam and (opt.k, opt.alpha) == (6, 0.5)
    assert opt.optimizer.defaults["decoupled_weight_decay"] is True
    flat, rest = opt.param_groups
    assert (flat["weight_decay"], rest["weight_decay"], flat["lr"], rest["lr"]) == (0.0, 1e-5, 2e-4, 2e-4)
    names = {id(p): n for n, p in net.named_parameters()}
    assert all(p.dim() <= 1 or names[id(p)].endswith(".bias") for p in flat["params"])
    assert all(p.dim() > 1 for p in rest["params"]) and names[id(net.cls_token)] == "cls_token" and any(p is net.cls_token for p in rest["params"])
    clam = build_model("clam_sb_20x", 16)
    assert _groups(build_optimizer(clam, recipe_for(clam, "published", 5e-4, 1e-4))) == [(2e-4, 1e-5, len(list(clam.parameters())))]


def test_lookahead_pulls_the_fast_weights_back_every_k_steps_and_resumes():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = Lookahead(torch.optim.SGD([w], lr=1.0), k=3, alpha=0.5)
    for step in range(1, 7):
        opt.zero_grad()
        (-w.sum()).backward()  # gradient -1: each SGD step adds 1
        opt.step()
        if step == 2:
            assert torch.equal(w.detach(), torch.full((3,), 2.0))  # fast weights between synchronisations
        if step == 3:  # slow 0 -> 0 + 0.5 * (3 - 0)
            assert torch.equal(w.detach(), torch.full((3,), 1.5))
    assert torch.equal(w.detach(), torch.full((3,), 3.0))  # slow 1.5 -> 1.5 + 0.5 * (4.5 - 1.5)
    state = opt.state_dict()
    w2 = torch.nn.Parameter(torch.zeros(3))
    again = Lookahead(torch.optim.SGD([w2], lr=1.0), k=3, alpha=0.5)
    again.load_state_dict(state)
    assert again.steps == 6 and torch.equal(again.slow[0], torch.full((3,), 3.0))
    with pytest.raises(ValueError, match="k >= 1"):
        Lookahead(torch.optim.SGD([w], lr=1.0), k=0)


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="train_recipe must be one of shared, published"):
        recipe_for(build_model("dsmil", 16), "paper", 5e-4, 1e-4)


def _parser(**over) -> ConfigParser:
    p = ConfigParser()
    p.read_config(str(ROOT / "configs" / "train.yaml"))
    p.update(over)
    return p


def test_train_yaml_default_is_the_shared_recipe_and_the_recipe_changes_the_fingerprint():
    p = _parser()
    assert p["train_recipe"] == "shared"
    assert "@train_recipe" in p["resume_fingerprint"]
    assert "([@train#schedule] if @lr_schedule is not None else [])" in p["train#every_rank"]
    assert p["train#resume#objects"]["schedule"] == "@lr_schedule"


def test_published_recipe_trains_with_its_schedule_in_the_bundle(trained, tmp_path):
    """``run training --train_recipe published``: MONAI's att head trains with AdamW and cosine annealing (the learning
    rate reaches 0 at the last epoch) and its schedule is part of the resume state."""
    w = ConfigWorkflow(config_file=str(ROOT / "configs" / "train.yaml"), run_id="training", meta_file=str(ROOT / "configs" / "metadata.json"),
                       logging_file=False, bundle_root=str(ROOT), progress=False, dataset_dir=str(trained / "demo"),
                       output_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "models"), demo_num_patients=TINY_DEMO.num_patients,
                       demo_slide_size=TINY_DEMO.size, max_epochs=2, val_fraction=0.5, mil_model="monai_att_20x", train_recipe="published")
    w.initialize()
    w.run()
    opt = w.parser.get_parsed_content("optimizer")
    sched = w.parser.get_parsed_content("lr_schedule")
    resume = w.parser.get_parsed_content("train#resume")
    guard = w.parser.get_parsed_content("train#loss_guard")
    w.finalize()
    assert type(opt) is torch.optim.AdamW and isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    assert resume.objects["schedule"] is sched
    assert guard.recipe.optimizer == "AdamW" and "published recipe" in guard._fix()  # a divergence names the recipe's rate
    assert (tmp_path / "models" / "model.pt").is_file()
