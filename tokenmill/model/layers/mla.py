"""DeepSeek multi-head latent attention (MLA) with a compressed latent KV cache.

Projections as in the checkpoints: q_proj, or q_a_proj -> q_a_layernorm -> q_b_proj (q_lora_rank set), giving
per head qk_nope_head_dim + qk_rope_head_dim values; kv_a_proj_with_mqa gives the latent c_kv (kv_lora_rank,
then kv_a_layernorm) and one shared k_pe (qk_rope_head_dim); kv_b_proj [H * (nope + v), R] holds W_UK and
W_UV; o_proj. Only c_kv and the roped k_pe are cached (tokenmill/ops/attention/mla.py: the row split over the
K and V planes of a one-KV-head cache of head_dim (R + P) / 2), and attention runs in the absorbed form:
q_nope W_UK against c_kv, q_pe against k_pe, the weighted latent back through W_UV.

Rotary: DeepSeek lays the rope dims out in interleaved pairs (x0, x1), (x2, x3), ... (V2 always, V3 with
rope_interleave); they are de-interleaved into the "rotate half" layout first, the same permutation for q and k,
so scores are unchanged. The softmax scale is qk_head_dim ** -0.5, times YaRN's mscale(factor, mscale_all_dim)
squared when the rope scaling says so (transformers' yarn_apply_mscale).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.model.layers.linear import Linear, ShardId
from tokenmill.model.layers.norm import RMSNorm
from tokenmill.model.layers.rotary import RotaryEmbedding, rope_parameters
from tokenmill.ops.attention.mla import mla_attention
from tokenmill.worker.forward_batch import ForwardBatch

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: transformers builds them with the default eps


def mla_softmax_scale(config: Any, qk_head_dim: int) -> float:
    """qk_head_dim ** -0.5, times mscale ** 2 for scaled rope with mscale_all_dim (DeepSeek's YaRN)."""
    scale = qk_head_dim ** -0.5
    p = rope_parameters(config)
    if p["rope_type"] != "default" and p.get("mscale_all_dim"):
        factor = float(p["factor"])
        mscale = 1.0 if factor <= 1 else 0.1 * float(p["mscale_all_dim"]) * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


class KVBProjection(Linear):
    """kv_b_proj [H * (nope + v), R]: W_UK and W_UV of each head. Read as a matrix by the absorbed attention, so
    never swapped for a packed quantized linear. Loads whole (Hugging Face, llama.cpp's older attn_kv_b) or as
    llama.cpp's split halves: shard "k_b" [H, R, nope] (W_UK transposed, attn_k_b) and "v_b" [H, v, R]
    (attn_v_b)."""

    packable = False

    def __init__(self, kv_lora_rank: int, num_heads: int, nope: int, v_dim: int, dtype: torch.dtype):
        super().__init__(kv_lora_rank, num_heads * (nope + v_dim), dtype=dtype)
        self.num_heads, self.nope, self.v_dim = num_heads, nope, v_dim
        self.weight.shard_ids = ["k_b", "v_b"]  # the loader checks both halves arrived

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> list:
        if shard_id is None:
            super().weight_loader(param, loaded)
            return ["k_b", "v_b"]
        h, r, got = self.num_heads, self.in_features, tuple(loaded.shape)
        w = param.data.view(h, self.nope + self.v_dim, r)
        if shard_id == "k_b":
            target, loaded = w[:, :self.nope], loaded.transpose(1, 2) if loaded.dim() == 3 else loaded
        elif shard_id == "v_b":
            target = w[:, self.nope:]
        else:
            raise ValueError(f"unknown kv_b_proj shard {shard_id!r} (k_b, v_b)")
        if tuple(target.shape) != tuple(loaded.shape):
            want = (h, r, self.nope) if shard_id == "k_b" else (h, self.v_dim, r)
            raise ValueError(f"shape mismatch for {shard_id}: expected {want}, checkpoint {got}")
        target.copy_(loaded)
        return [shard_id]


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (x0, x1), (x2, x3), ...] -> [..., x0, x2, ..., x1, x3, ...]."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class MLAttention(nn.Module):
    """h [T, hidden] -> [T, hidden]; writes each token's latent row into `kv_cache` at its slot.

    To the engine it looks like one KV head of head_dim (kv_lora_rank + qk_rope_head_dim) / 2 (num_kv_heads,
    head_dim) and has no `attn` submodule: attention backends (kernels that assume per-head K/V) never take it.
    """

    def __init__(self, config: Any, dtype: torch.dtype, interleaved_rope: bool):
        super().__init__()
        self.num_heads = h = config.num_attention_heads
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        self.kv_lora_rank = r = config.kv_lora_rank
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        if (r + self.rope) % 2:
            raise ModelLoadError(f"MLA caches kv_lora_rank + qk_rope_head_dim = {r + self.rope} values a token, split "
                                 "over the K and V planes of the paged cache: it must be even")
        if self.rope % 2:
            raise ModelLoadError(f"qk_rope_head_dim {self.rope} must be even")
        self.num_kv_heads, self.head_dim, self.sliding_window = 1, (r + self.rope) // 2, None
        self.interleaved_rope = interleaved_rope
        qk = self.nope + self.rope
        bias = bool(getattr(config, "attention_bias", False))
        hidden = config.hidden_size
        if self.q_lora_rank:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, dtype=dtype)
            self.q_b_proj = Linear(self.q_lora_rank, h * qk, dtype=dtype)
        else:
            self.q_proj = Linear(hidden, h * qk, dtype=dtype)
        self.kv_a_proj_with_mqa = Linear(hidden, r + self.rope, bias=bias, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(r, LATENT_NORM_EPS, dtype=dtype)
        self.kv_b_proj = KVBProjection(r, h, self.nope, self.v_dim, dtype)
        self.o_proj = Linear(h * self.v_dim, hidden, bias=bias, dtype=dtype)
        self.scale = mla_softmax_scale(config, qk)

    def forward(self, hs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        t, h, r = hs.shape[0], self.num_heads, self.kv_lora_rank
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hs))[0])  # [T, H * (nope + rope)]
        else:
            q = self.q_proj(hs)
        q_nope, q_pe = q.view(t, h, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(hs).split([r, self.rope], dim=-1)  # [T, R], [T, P]
        c_kv, _ = self.kv_a_layernorm(c_kv.contiguous())
        k_pe = k_pe[:, None, :]  # [T, 1, P]
        if self.interleaved_rope:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        q_pe = RotaryEmbedding.apply(q_pe, cos, sin)  # [T, H, P]
        k_pe = RotaryEmbedding.apply(k_pe, cos, sin)  # [T, 1, P]
        rows = torch.cat((c_kv, k_pe[:, 0]), dim=-1)  # [T, R + P]: what the cache keeps of each token
        w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, r)  # [H, nope + v, R]
        q_lat = torch.einsum("thn,hnr->thr", q_nope, w[:, :self.nope])  # [T, H, R]: q_nope absorbed through W_UK
        o_lat = mla_attention(torch.cat((q_lat, q_pe), dim=-1), rows, kv_cache, batch, self.scale, r)  # [T, H, R]
        o = torch.einsum("thr,hvr->thv", o_lat, w[:, self.nope:])  # [T, H, v]: through W_UV
        return self.o_proj(o.reshape(t, h * self.v_dim))  # [T, hidden]
