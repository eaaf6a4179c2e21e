"""The heads from the field (issue 30): MONAI's MILModel modules as MONAI runs them, CLAM-SB's clustering loss,
TransMIL's Nyström attention, and the protocol training, scoring, mapping and exporting each of them."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import MILModel
from torch import nn

from scripts.mil.losses import MILLoss
from scripts.mil.registry import build_model

D, S, K = 16, 3, 4

#: one model per new code path through training (CLAM's instance loss, TransMIL's layers, MONAI's transformers)
NEW_HEADS = ("abmil_concat", "clam_sb_concat", "transmil_20x", "monai_att_trans_pyramid")


@pytest.mark.parametrize("name", ["monai_att_20x", "monai_att_trans_20x", "monai_att_trans_concat"])
def test_monai_heads_equal_milmodel_forward_on_full_bags(name):
    """With every slot real, the masked forward equals MONAI's own ``MILModel.forward`` with the same modules (the
    features fed to it as 1x1 'images' through a flattening backbone)."""
    torch.manual_seed(0)
    net = build_model(name, in_features=D, num_scales=S, num_clusters=K).eval()
    concat = name.endswith("concat")
    mode = "att_trans" if "trans" in name else "att"
    width = net.myfc.in_features
    backbone = nn.Sequential(nn.Flatten(1), net.net)
    ref = MILModel(2, mil_mode=mode, pretrained=False, backbone=backbone, backbone_num_features=width).eval()
    ref.attention.load_state_dict(net.attention.state_dict())
    ref.myfc.load_state_dict(net.myfc.state_dict())
    if mode == "att_trans":
        ref.transformer.load_state_dict(net.transformer[0].state_dict())
    assert net.attention[0].out_features == 2048  # MONAI's attention: Linear(nfc, 2048) - Tanh - Linear(2048, 1)
    x = torch.randn(2, S, 8, D)
    inst = x.permute(0, 2, 1, 3).reshape(2, 8, S * D) if concat else x[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(inst[..., None, None]), rtol=1e-5, atol=1e-5)


def test_pyramid_levels_are_the_scales_finest_first():
    """monai_att_trans_pyramid: one transformer stage per scale; the first sees 20x alone, each later one the running
    tokens and its own scale; changing the 5x features changes the output (every scale enters)."""
    torch.manual_seed(0)
    net = build_model("monai_att_trans_pyramid", in_features=D, num_scales=S, num_clusters=K).eval()
    assert len(net.levels) == S and net.levels[0].proj.in_features == D and net.levels[1].proj.in_features == 256 + D
    x = torch.randn(1, S, 8, D)
    y = x.clone()
    y[:, 2] += 1.0
    assert not torch.allclose(net(x), net(y))


def test_clam_instance_loss_learns_the_bag_class_on_its_most_and_least_attended_instances():
    """CLAM-SB in training: MILLoss = 0.7 x bag CE + 0.3 x the instance loss of the bag's class classifier (top-k
    positive, bottom-k negative, masked slots never counted); in evaluation MILLoss is the plain CE."""
    torch.manual_seed(0)
    net = build_model("clam_sb_concat", in_features=D, num_scales=S, num_clusters=K, dropout=0.0, k_sample=2)
    loss = MILLoss(net)
    x, y = torch.randn(2, S, 8, D), torch.tensor([1, 0])
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 4:] = False
    net.train()
    logits = net(x, mask)
    h, w, m = net._last
    bag = nn.functional.cross_entropy(logits, y)
    # by hand: bag 0 (class 1) and bag 1 (class 0), 2 top and 2 bottom real instances each
    want = []
    for b in range(2):
        real = torch.nonzero(m[b]).squeeze(1)
        order = real[torch.argsort(w[b, real], descending=True)]
        ids = torch.cat([order[:2], order.flip(0)[:2]])
        out = net.instance_classifiers[int(y[b])](h[b, ids])
        want.append(nn.functional.cross_entropy(out, torch.tensor([1, 1, 0, 0])))
    total = loss(logits, y)
    torch.testing.assert_close(total, 0.7 * bag + 0.3 * torch.stack(want).mean())
    total.backward()
    assert net.instance_classifiers[0].weight.grad.abs().sum() > 0 and net.instance_classifiers[1].weight.grad.abs().sum() > 0
    assert net._last == []  # consumed: a stale cache never reaches the next step
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(loss(net(x, mask), y), nn.functional.cross_entropy(net(x, mask), y))


def test_other_models_train_on_plain_cross_entropy():
    torch.manual_seed(0)
    net = build_model("dsmil", in_features=D, num_scales=S, num_clusters=K).train()
    x, y = torch.randn(2, S, 8, D), torch.tensor([1, 0])
    out = net(x)
    torch.testing.assert_close(MILLoss(net)(out, y), nn.functional.cross_entropy(out, y))


def test_nystrom_attention_approximates_exact_attention_and_ignores_masked_tokens():
    """Bags longer than the landmarks use the Nyström approximation: close to exact softmax attention, and what a
    masked token holds never changes the real tokens' outputs."""
    from scripts.mil.transmil import NystromAttention

    torch.manual_seed(0)
    att = NystromAttention(32, heads=4, dim_head=8, num_landmarks=16, dropout=0.0).eval()
    x, m = torch.randn(2, 70, 32), torch.ones(2, 70, dtype=torch.bool)
    m[1, 50:] = False
    with torch.no_grad():
        approx, row = att(x, m)
        att.num_landmarks = 256
        exact, exact_row = att(x, m)
        att.num_landmarks = 16
        y = x.clone()
        y[1, 50:] = 9.0
        again, _ = att(y, m)
    assert (approx - exact).abs().mean() < 0.1 * exact.abs().mean()  # 16 landmarks for 70 random tokens: 7 % here
    torch.testing.assert_close(again[1, :50], approx[1, :50])
    torch.testing.assert_close(exact_row.sum(-1), torch.ones(2))
    assert exact_row[1, 50:].abs().max() == 0


def test_new_heads_train_score_map_and_export_in_the_protocol(tmp_path):
    """The protocol trains each new head with configs/train.yaml (CLAM with its instance loss), scores and maps the
    test slides (per-scale localisation present) and its checkpoint loads and exports to TorchScript with the same
    logits and maps."""
    from feature_cohort import cross_scale_cohort
    from scripts.deploy.export import _check_network
    from scripts.evaluation import workflow
    from scripts.checkpoint import contract
    from scripts.inference.predict import load_network
    from scripts.workflows.pipeline_config import training_config

    entries = cross_scale_cohort(tmp_path / "store", num_patients=16)
    out = tmp_path / "out"
    workflow.evaluate(training_config({"max_epochs": 1, "val_interval": 1}), entries, out, models=list(NEW_HEADS), reference="abmil_concat", num_splits=2,
                      seed=0, test_bags=2, bootstrap_resamples=50, progress=False)
    rep = json.loads((out / "report" / "report.json").read_text())
    assert set(rep["models"]) == set(NEW_HEADS)
    for name in NEW_HEADS:
        assert 0.0 <= rep["models"][name]["combined"]["auc"] <= 1.0
        ckpts = sorted(out.glob(f"**/runs/{name}/split_*/model.pt"))
        assert len(ckpts) == 2, ckpts
        c = contract.read(contract.read_checkpoint(ckpts[0]))
        assert c["mil_model"] == name
        net = load_network(build_model(name, c["in_features"], len(c["scales_mpp"]), c["num_clusters"]), ckpts[0]).eval()
        assert net.input_std.ne(1).any()  # the training statistics came with the weights
        ts_file = tmp_path / f"{name}.ts"
        torch.jit.save(torch.jit.script(net), str(ts_file))
        _check_network(net, ts_file, len(c["scales_mpp"]), c["num_clusters"])


def test_transformer_heads_join_the_protocol_on_request():
    """evaluate.yaml: eval_models holds every model but the ablations and the transformer heads;
    --eval_transformers true adds those (once, even when eval_models names one already)."""
    from monai.bundle import ConfigParser

    from conftest import ROOT
    from scripts.mil.registry import MODELS

    def models(**over):
        p = ConfigParser()
        p.read_config([str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "evaluate.yaml")])
        p.update(over)
        return p.get_parsed_content("evaluate#models")

    transformers = ["transmil_20x", "transmil_concat", "monai_att_trans_20x", "monai_att_trans_concat", "monai_att_trans_pyramid"]
    default = models()
    assert not set(transformers) & set(default) and {"abmil_20x", "clam_sb_concat", "monai_att_concat"} <= set(default)
    assert set(default) | set(transformers) == {m for m in MODELS if not m.startswith("ablation_")}
    assert models(eval_transformers=True) == default + transformers
    assert models(eval_transformers=True, eval_models=["dsmil", "transmil_20x"]) == ["dsmil", "transmil_20x", *transformers[1:]]
