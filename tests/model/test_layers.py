"""Layer-level checks: rotary inverse frequencies vs transformers for each rope type, fused residual RMSNorm."""
from __future__ import annotations

import pytest
import torch

from tokenmill.model.layers.norm import RMSNorm
from tokenmill.model.layers.rotary import RotaryEmbedding, compute_inv_freq

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
}


def _config(scaling):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072,
                       rope_theta=500000.0, rope_scaling=scaling)


@pytest.mark.parametrize("rope", list(ROPES))
def test_rotary_matches_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = _config(ROPES[rope])
    inv_freq, scaling = compute_inv_freq(config, 128)
    if rope == "default":
        hf_inv = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
        hf_scaling = 1.0
    else:
        hf_inv, hf_scaling = ROPE_INIT_FUNCTIONS[rope](config, "cpu")
    assert torch.equal(inv_freq, hf_inv.float())
    assert scaling == pytest.approx(hf_scaling, rel=0, abs=0)
    # cos/sin and the rotation itself, at scattered positions
    ours = RotaryEmbedding(config, 128)
    hf = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 7, 300, 9000, 120000])
    x = torch.randn(1, len(positions), 128)
    cos_hf, sin_hf = hf(x, positions[None])
    cos, sin = ours.cos_sin(positions)
    assert torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])


def test_rotary_type_changes_frequencies():
    base = compute_inv_freq(_config(None), 128)[0]
    for rope in ("linear", "llama3", "yarn"):
        assert not torch.equal(compute_inv_freq(_config(ROPES[rope]), 128)[0], base)


def test_rmsnorm_fused_residual():
    norm = RMSNorm(32, eps=1e-6)
    norm.weight.data = torch.rand(32) + 0.5
    x, r = torch.randn(5, 32), torch.randn(5, 32)
    out, res = norm(x, r)
    want = (x + r) / torch.sqrt(((x + r) ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.equal(res, x + r)
    out2, res2 = norm(x)
    assert torch.equal(res2, x) and out2.shape == x.shape
