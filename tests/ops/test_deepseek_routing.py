"""select_experts_grouped (DeepSeek routing) against transformers' own router modules on random inputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.ops.moe import select_experts_grouped


def _pairs(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (id, weight) pairs sorted by id (transformers' topk is unsorted)."""
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


def _check(got, want) -> None:
    (gi, gw), (wi, ww) = _pairs(*got), _pairs(*want)
    assert torch.equal(gi, wi)
    torch.testing.assert_close(gw, ww, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method,groups,topk_groups,scale", [("greedy", None, None, 1.0),
                                                             ("group_limited_greedy", 4, 2, 16.0),
                                                             ("group_limited_greedy", 8, 3, 1.0)])
def test_v2_softmax_routing_matches_transformers(method, groups, topk_groups, scale):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = DeepseekV2Config(hidden_size=32, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=3,
                           topk_method=method, n_group=groups, topk_group=topk_groups,
                           routed_scaling_factor=scale)
    router = DeepseekV2TopkRouter(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=g))
        h = torch.randn(50, 32, generator=g)
        _, w, ids = router(h)
    got = select_experts_grouped(F.linear(h, router.weight), 3, scoring="softmax", num_groups=groups or 1,
                                 topk_groups=topk_groups or 1, group_score="max", scaling_factor=scale)
    _check(got, (w, ids))


@pytest.mark.parametrize("groups,topk_groups,norm,scale", [(4, 2, True, 2.5), (1, 1, False, 1.0), (8, 4, True, 1.0)])
def test_v3_sigmoid_bias_routing_matches_transformers(groups, topk_groups, norm, scale):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=32, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=4,
                           n_group=groups, topk_group=topk_groups, norm_topk_prob=norm, routed_scaling_factor=scale)
    router = DeepseekV3TopkRouter(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32, generator=g))
        router.e_score_correction_bias.copy_(0.5 * torch.randn(16, generator=g))  # large enough to change choices
        h = torch.randn(50, 32, generator=g)
        _, w, ids = router(h)
    logits = F.linear(h, router.weight)
    got = select_experts_grouped(logits, 4, scoring="sigmoid", bias=router.e_score_correction_bias,
                                 num_groups=groups, topk_groups=topk_groups, group_score="top2",
                                 renormalize=norm, scaling_factor=scale)
    _check(got, (w, ids))
    if groups > 1:  # the bias and the groups matter on these inputs: plain top-k of the scores differs
        plain = torch.topk(torch.sigmoid(logits), 4, dim=-1).indices
        assert not torch.equal(_pairs(got[0], got[1])[0], _pairs(torch.ones_like(plain, dtype=torch.float), plain)[0])


def test_grouped_routing_rejects_bad_shapes():
    logits = torch.randn(3, 12)
    with pytest.raises(ValueError, match="groups"):
        select_experts_grouped(logits, 2, num_groups=5, topk_groups=1)
    with pytest.raises(ValueError, match="top_k"):
        select_experts_grouped(logits, 7, num_groups=4, topk_groups=2)  # 2 groups of 3 hold 6 experts
    with pytest.raises(ValueError, match="scoring"):
        select_experts_grouped(logits, 2, scoring="relu")
