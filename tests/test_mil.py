"""CS-MIL network and cluster-balanced bags."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ROOT

from scripts.data.bags import gather_bag, sample_bag
from scripts.workflows.engine import BagEnsembleInferer
from scripts.mil.networks import CSMIL

GOLDEN_MODELS = ROOT / "tests" / "data" / "golden_mil_models.json"

B, S, K, M, D = 2, 3, 4, 5, 16


def _net(**kw) -> CSMIL:
    torch.manual_seed(0)
    return CSMIL(in_features=D, num_scales=S, num_clusters=K, hidden=8, attn_hidden=4, dropout=0.0, **kw).eval()


VARIANTS = [
    {},
    {"share_scale_kernel": False, "scale_activation": "tanh"},
    {"pooling": "flat", "scale_softmax": False},
    {"share_instance_encoder": False},
]


@pytest.mark.parametrize("kw", VARIANTS)
def test_output_shapes_and_attention_sums(kw):
    net = _net(**kw)
    x = torch.randn(B, S, K * M, D)
    mask = torch.ones(B, K * M, dtype=torch.bool)
    mask[0, M : 2 * M] = False  # cluster 1 empty in bag 0
    mask[1, -2:] = False  # short last cluster in bag 1
    logits, att = net.forward_attention(x, mask)
    assert logits.shape == (B, 2)
    assert att["scale"].shape == (B, K * M, S)
    assert att["instance"].shape == (B, K * M)
    assert att["cluster"].shape == (B, K)
    if kw.get("scale_softmax", True):
        torch.testing.assert_close(att["scale"].sum(-1), torch.ones(B, K * M))
    # masked instances get no attention; the patch attention over a bag sums to 1
    assert att["patch"][~mask].abs().max() == 0
    torch.testing.assert_close(att["patch"].sum(-1), torch.ones(B))
    if kw.get("pooling", "hierarchical") == "hierarchical":
        per_cluster = att["instance"].reshape(B, K, M).sum(-1)
        expected = torch.ones(B, K)
        expected[0, 1] = 0  # the empty cluster
        torch.testing.assert_close(per_cluster, expected)
        assert att["cluster"][0, 1] == 0
        torch.testing.assert_close(att["cluster"].sum(-1), torch.ones(B))


@pytest.mark.parametrize("kw", VARIANTS)
def test_masked_slots_do_not_change_the_output(kw):
    net = _net(**kw)
    x = torch.randn(1, S, K * M, D)
    mask = torch.ones(1, K * M, dtype=torch.bool)
    mask[0, 3] = mask[0, 7] = False
    y = x.clone()
    y[:, :, [3, 7]] = 100 * torch.randn(S, 2, D)
    torch.testing.assert_close(net(x, mask), net(y, mask))


def test_instance_permutation_within_clusters_is_invariant():
    net = _net()
    x = torch.randn(1, S, K * M, D)
    perm = torch.cat([torch.randperm(M) + k * M for k in range(K)])
    torch.testing.assert_close(net(x), net(x[:, :, perm]), rtol=1e-5, atol=1e-6)


def test_scale_attention_weights_scales():
    """With softmax the fused embedding is a convex combination: a scale with a huge score dominates."""
    net = _net()
    x = torch.randn(1, S, K * M, D)
    att = net.forward_attention(x)[1]["scale"]
    assert torch.all(att >= 0) and torch.all(att <= 1)


def test_wrong_input_shape_is_explained():
    with pytest.raises(ValueError, match=r"expected bags \[B, 3, N, 16\]"):
        _net()(torch.randn(1, 2, K * M, D))


def test_sample_bag_draws_evenly_and_masks_short_clusters():
    clusters = np.array([0] * 10 + [1] * 2 + [3] * 6)  # cluster 2 empty
    idx, mask = sample_bag(clusters, num_clusters=4, per_cluster=4, rng=np.random.default_rng(0))
    assert idx.shape == mask.shape == (16,)
    assert mask.tolist() == [True] * 4 + [True, True, False, False] + [False] * 4 + [True] * 4
    for k in range(4):
        chosen = idx[k * 4 : (k + 1) * 4][mask[k * 4 : (k + 1) * 4]]
        assert np.all(clusters[chosen] == k)
        assert len(set(chosen.tolist())) == len(chosen)  # without replacement
    idx_r, mask_r = sample_bag(clusters, 4, 4, np.random.default_rng(0), replacement=True)
    assert mask_r.sum() == 12  # every non-empty cluster filled


def test_gather_bag_layout():
    feats = np.arange(5 * 3 * 2, dtype=np.float16).reshape(5, 3, 2)
    idx = np.array([4, -1, 0])
    bag = gather_bag(feats, idx)
    assert bag.shape == (3, 3, 2)
    torch.testing.assert_close(bag[:, 0], torch.from_numpy(feats[4].astype(np.float32)))
    assert bag[:, 1].abs().sum() == 0


def test_bag_ensemble_inferer_averages_probabilities():
    net = _net()
    x = torch.randn(2, 3, S, K * M, D)  # 2 slides x 3 bags
    mask = torch.ones(2, 3, K * M, dtype=torch.bool)
    out = BagEnsembleInferer()(x, net, mask=mask)
    probs = torch.softmax(net(x.reshape(6, S, K * M, D)), -1).reshape(2, 3, 2).mean(1)
    torch.testing.assert_close(out.exp(), probs)


def test_one_bag_ensemble_for_validation_inference_and_evaluation(tmp_path):
    """Validation (SlideBagsDataset) and inference / evaluation / Deploy (bag_probability) see the same bags of a
    slide, whatever its position among the other slides."""
    from feature_cohort import cross_scale_cohort
    from scripts.inference.predict import bag_probability
    from scripts.data.bags import SlideBagsDataset, slide_bags
    from scripts.workflows.engine import BagEnsembleInferer

    entries = cross_scale_cohort(tmp_path / "store", num_patients=4)
    forward = SlideBagsDataset(entries, num_clusters=4, per_cluster=3, num_bags=5, seed=7)
    backward = SlideBagsDataset(entries[::-1], num_clusters=4, per_cluster=3, num_bags=5, seed=7)
    e = entries[0]
    a, b = forward[0], backward[len(entries) - 1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    idx, mask = slide_bags(e.clusters(), e.slide_id, 4, 3, 5, seed=7)
    assert torch.equal(a["mask"], torch.from_numpy(mask)) and idx.shape == (5, 12)
    assert not np.array_equal(idx, slide_bags(e.clusters(), e.slide_id, 4, 3, 5, seed=8)[0])
    torch.manual_seed(0)
    net = CSMIL(in_features=e.features().shape[-1], num_scales=e.features().shape[1], num_clusters=4).eval()
    with torch.no_grad():
        val = BagEnsembleInferer()(a["image"][None], net, mask=a["mask"][None]).exp()[0, 1].item()
    assert bag_probability(net, e, 4, 3, num_bags=5, seed=7, chunk=2) == pytest.approx(val, abs=1e-5)


@pytest.mark.parametrize("name", ["csmil", "deepattnmisl_20x", "gated_attention_multiscale", "csmil_flat", "ablation_attention_pooling"])
def test_attention_pool_is_the_pooling_of_every_attention_model(name):
    """Hierarchical pooling through attention_pool: weights sum to 1 in every non-empty cluster and over clusters."""
    from scripts.mil.registry import build_model
    from scripts.mil.pooling import attention_pool

    v, s = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3)
    m = torch.ones(2, 4, 3, dtype=torch.bool)
    m[0, 1] = False
    w, pooled = attention_pool(v, s, m)
    assert torch.allclose(w.sum(-1)[m.any(-1)], torch.ones(7)) and (w[0, 1] == 0).all()
    assert torch.allclose(pooled, (w.unsqueeze(-1) * v).sum(-2))
    net = build_model(name, in_features=8, num_scales=3, num_clusters=4).eval()
    x, mask = torch.randn(1, 3, 12, 8), torch.rand(1, 12) > 0.2
    assert torch.allclose(torch.jit.script(net)(x, mask), net(x, mask), atol=1e-6)


def test_every_registry_model_has_a_recorded_output():
    """A model added to the registry is recorded too (python tests/golden_models.py adds it), so its numbers are
    guarded from then on."""
    from scripts.mil.registry import MODELS

    assert set(MODELS) == set(json.loads(GOLDEN_MODELS.read_text()))


@pytest.mark.parametrize("name", sorted(json.loads(GOLDEN_MODELS.read_text())))
def test_every_model_keeps_its_recorded_outputs(name):
    """Refactoring scripts/mil keeps every model's state-dict keys (old checkpoints load) and outputs
    (tests/golden_models.py recorded them before the models shared one base)."""
    from golden_models import model_outputs

    want, got = json.loads(GOLDEN_MODELS.read_text())[name], model_outputs(name)
    assert got["keys"] == want["keys"]
    assert set(got) == set(want)  # forward_attention neither lost nor gained without a new record
    for key in ("logits", "logits_nomask"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=0, atol=1e-6)
    for k, v in want.get("attention", {}).items():
        torch.testing.assert_close(torch.tensor(got["attention"][k]), torch.tensor(v), rtol=0, atol=1e-6)
