"""Llama-family decoder: Llama 2/3/3.x, SmolLM, Mistral (sliding window), Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

Plain eager PyTorch over a flat batch: T = tokens of all requests packed together, no padding. Attention reads
and writes the paged KV cache through a pluggable backend (tokenmill/ops/attention/backend.py).
q/k/v are one packed `qkv_proj` and gate/up one `gate_up_proj`; the loader maps checkpoint names onto them
with `packed_modules_mapping`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.model.layers.activation import SiluAndMul
from tokenmill.model.layers.attention import Attention
from tokenmill.model.layers.embedding import LMHead, VocabEmbedding
from tokenmill.model.layers.linear import Linear, MergedLinear, QKVLinear
from tokenmill.model.layers.norm import RMSNorm
from tokenmill.model.layers.rotary import RotaryEmbedding
from tokenmill.ops.attention.backend import AttentionBackend
from tokenmill.worker.forward_batch import ForwardBatch

Tensor = torch.Tensor


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_sliding_window(config: Any, layer_idx: int) -> Optional[int]:
    """The window of one layer: per layer_types when the config has them (Qwen2), else config.sliding_window."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None:
        return None
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return window


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = _head_dim(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
                                  bias=bias, dtype=dtype)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=bool(getattr(config, "attention_bias", False))
                             and config.model_type != "qwen2", dtype=dtype)
        self.qk_norm = config.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5,
                              sliding_window=_layer_sliding_window(config, layer_idx))

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, kv_cache: Tensor, batch: ForwardBatch) -> Tensor:
        t = h.shape[0]
        qkv = self.qkv_proj(h)  # [T, (H + 2 Hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.qk_norm:
            q, _ = self.q_norm(q)
            k, _ = self.k_norm(k)
        q = RotaryEmbedding.apply(q, cos, sin)
        k = RotaryEmbedding.apply(k, cos, sin)
        o = self.attn(q, k, v, kv_cache, batch)  # [T, H * D]
        return self.o_proj(o)  # [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype):
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"unsupported activation {act!r} (only silu)")
        bias = bool(getattr(config, "mlp_bias", False))
        i = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [i, i], bias=bias, dtype=dtype)
        self.down_proj = Linear(i, config.hidden_size, bias=bias, dtype=dtype)
        self.act = SiluAndMul()

    def forward(self, h: Tensor) -> Tensor:
        x = self.gate_up_proj(h)  # [T, 2I]
        x = self.act(x)  # [T, I]
        return self.down_proj(x)  # [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, dtype)
        self.mlp = LlamaMLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        # installed from outside (tokenmill/ops/cpu/layer.py: the whole layer in one C call for small CPU
        # batches); returns None for a step it cannot take, which then runs the per-op path below
        self.fast_path: Optional[Callable[..., Optional[tuple[Tensor, Tensor]]]] = None

    def forward(self, h: Tensor, residual: Optional[Tensor], cos: Tensor, sin: Tensor, kv_cache: Tensor,
                batch: ForwardBatch) -> tuple[Tensor, Tensor]:
        if self.fast_path is not None:
            out = self.fast_path(h, residual, cos, sin, kv_cache, batch)
            if out is not None:
                return out
        h, residual = self.input_layernorm(h, residual)  # residual += h; h = norm(residual)
        h = self.self_attn(h, cos, sin, kv_cache, batch)
        h, residual = self.post_attention_layernorm(h, residual)
        h = self.mlp(h)
        return h, residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(config, _head_dim(config))

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor], batch: ForwardBatch) -> Tensor:
        h = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb.cos_sin(positions)  # [T, D] each, shared by all layers
        residual: Optional[Tensor] = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, cos, sin, kv_cache, batch)
        h, _ = self.norm(h, residual)
        return h  # [T, hidden]


class LlamaForCausalLM(nn.Module):
    """Constructed from a transformers config; parameters are uninitialized until the loader fills them."""

    # checkpoint module name -> (our packed module, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, dtype=dtype,
                              tie_to=self.model.embed_tokens if self.tie_word_embeddings else None)
        attn0 = self.model.layers[0].self_attn
        self.num_layers = config.num_hidden_layers
        self.num_heads = attn0.num_heads
        self.num_kv_heads = attn0.num_kv_heads
        self.head_dim = attn0.head_dim
        self.vocab_size = config.vocab_size
        self.hidden_size = config.hidden_size

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Swap the attention implementation of every layer (e.g. a Triton backend on GPU)."""
        for attn in self.attention_layers():
            attn.backend = backend

    @property
    def sliding_windows(self) -> list[Optional[int]]:
        return [attn.sliding_window for attn in self.attention_layers()]

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor], batch: ForwardBatch) -> Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden] (K/V of these tokens written to kv_caches)."""
        return self.model(input_ids, positions, kv_caches, batch)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        return self.lm_head(hidden).float()
