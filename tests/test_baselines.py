"""Every Table-1 baseline and CS-MIL variant: shapes, masks, permutation invariance, TorchScript."""

from __future__ import annotations

import pytest
import torch

from scripts.mil.registry import MODELS, build_model

S, K, M, D = 3, 4, 3, 8


@pytest.fixture(params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return build_model(request.param, in_features=D, num_scales=S, num_clusters=K, dropout=0.0).eval()


def test_shapes_and_masked_slots(model):
    x = torch.randn(2, S, K * M, D)
    mask = torch.ones(2, K * M, dtype=torch.bool)
    mask[0, 2] = mask[1, M : 2 * M] = False  # a short cluster and an empty one
    out = model(x, mask)
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    y = x.clone()
    y[0, :, 2] = 50.0
    y[1, :, M : 2 * M] = -50.0
    torch.testing.assert_close(model(y, mask), out)  # masked slots do not matter


def test_permutation_invariant_within_clusters(model):
    """Every model but TransMIL, whose PPEG convolves neighbouring instances on a grid (order matters, as published:
    it says so with ``permutation_invariant = False``, and the test checks that it does)."""
    x = torch.randn(1, S, K * M, D)
    perm = torch.cat([torch.randperm(M) + k * M for k in range(K)])
    if not getattr(model, "permutation_invariant", True):
        assert not torch.allclose(model(x[:, :, perm]), model(x), rtol=1e-5, atol=1e-5)
        return
    torch.testing.assert_close(model(x[:, :, perm]), model(x), rtol=1e-5, atol=1e-5)


def test_single_scale_baselines_ignore_other_scales():
    net = build_model("deepattnmisl_5x", in_features=D, num_scales=S, num_clusters=K).eval()
    x = torch.randn(1, S, K * M, D)
    y = x.clone()
    y[:, :2] = torch.randn(1, 2, K * M, D)
    torch.testing.assert_close(net(x), net(y))


def test_unknown_model_is_explained():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope", in_features=D)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_gives_the_maps_weights(model):
    """Every model has forward_attention (inference and the Deploy export call it): logits equal forward's, patch
    weights sum to 1 over the real slots and are 0 on empty ones, scale weights sum to 1 per real location (the
    attention baselines: one-hot on the selected scale, uniform for sum, each scale instance's share for instances),
    and the TorchScript export gives the same weights."""
    torch.manual_seed(0)
    net = build_model(model, in_features=16, num_scales=3, num_clusters=4).eval()
    x, mask = torch.randn(2, 3, 8, 16), torch.ones(2, 8, dtype=torch.bool)
    mask[1, [2, 5]] = False
    logits, att = net.forward_attention(x, mask)
    torch.testing.assert_close(logits, net(x, mask))
    assert att["patch"].shape == (2, 8) and att["scale"].shape == (2, 8, 3) and att["cluster"].shape == (2, 4)
    torch.testing.assert_close(att["patch"].sum(-1), torch.ones(2))
    assert att["patch"][1, [2, 5]].abs().max() == 0
    if model != "csmil_reference":  # the reference code keeps raw scale scores (scale_softmax=False)
        torch.testing.assert_close(att["scale"][mask].sum(-1), torch.ones(int(mask.sum())))
    if model == "deepattnmisl_5x":
        assert torch.equal(att["scale"][0], torch.tensor([0.0, 0.0, 1.0]).expand(8, 3))
    ts = torch.jit.script(net)
    torch.testing.assert_close(ts.forward_attention(x, mask)[1]["patch"], att["patch"])
