"""shard_model: tensor parallelism applied from outside a plain model, before its weights are loaded.

Every decoder layer's packed q|k|v and gate|up become ColumnParallelLinear, o_proj and down_proj
RowParallelLinear (one all-reduce each), the embedding and LM head vocabulary-parallel; the attention
modules are told their local head counts. Query heads are split evenly; KV heads too, or, with fewer KV heads
than ranks, each rank keeps the one KV head its query heads use (replicated over world_size / num_kv_heads
ranks). The model code stays as it is (tokenmill/model/llama.py); the weight loaders of the new layers cut
each rank's slice out of the checkpoint.
"""
from __future__ import annotations

from typing import Any

import torch

from tokenmill.distributed.group import TPGroup, kv_head_range, shard_range, split_size
from tokenmill.errors import ConfigError
from tokenmill.model.layers.linear import MergedLinear, QKVLinear
from tokenmill.model.layers.parallel import (ColumnParallelLinear, ParallelLMHead, ParallelRMSNorm,
                                             RowParallelLinear, VocabParallelEmbedding)


def shard_model(model: Any, tp: TPGroup, device: torch.device, expert_parallel: bool = False) -> Any:
    """Replace the layers of `model` (built, weights not loaded yet) by this rank's tensor-parallel slices.
    MoE layers: tokenmill/distributed/expert_parallel.py (experts split by intermediate rows, or whole experts
    per rank with `expert_parallel`)."""
    from tokenmill.distributed.expert_parallel import is_moe, shard_moe_block

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise ConfigError(f"tensor parallelism does not support {type(model).__name__}")
    dtype = model.lm_head.weight.dtype
    for layer in layers:
        _shard_attention(layer.self_attn, tp, dtype, device)
        if is_moe(layer.mlp):
            try:
                shard_moe_block(layer.mlp, tp, expert_parallel, dtype, device)
            except ValueError as e:
                raise ConfigError(f"tensor parallelism: {e}") from None
        else:
            _shard_mlp(layer.mlp, tp, dtype, device)
    inner = model.model
    emb = inner.embed_tokens
    inner.embed_tokens = VocabParallelEmbedding(emb.num_embeddings, emb.embedding_dim, tp, dtype, device)
    model.lm_head = ParallelLMHead(emb.num_embeddings, emb.embedding_dim, tp, dtype, device,
                                   tie_to=inner.embed_tokens if model.tie_word_embeddings else None)
    attn0 = layers[0].self_attn
    model.num_heads, model.num_kv_heads = attn0.num_heads, attn0.num_kv_heads  # sizes this rank's KV cache
    model.tp = tp
    return model


def _shard_attention(attn: Any, tp: TPGroup, dtype: torch.dtype, device: torch.device) -> None:
    qkv = getattr(attn, "qkv_proj", None)
    if qkv is None:
        raise ConfigError(f"tensor parallelism does not support {type(attn).__name__} layers (e.g. DeepSeek's MLA) "
                          "yet; use tensor_parallel_size 1", param="tensor_parallel_size")
    if not isinstance(qkv, QKVLinear):
        raise ConfigError(f"tensor parallelism needs a packed QKVLinear, got {type(qkv).__name__}")
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    hl = split_size(h, tp.world_size, "num_attention_heads")
    kv0, hkvl = kv_head_range(hkv, tp.rank, tp.world_size)
    attn.qkv_proj = ColumnParallelLinear(
        qkv.in_features, [h * d, hkv * d, hkv * d], [tp.rank * hl * d, kv0 * d, kv0 * d], [hl * d, hkvl * d, hkvl * d],
        ["q", "k", "v"], qkv.bias is not None, dtype, device)
    o = attn.o_proj
    attn.o_proj = RowParallelLinear(o.in_features, o.out_features, o.bias is not None, tp, dtype, device)
    if getattr(attn, "qk_norm", None) == "full":  # one norm over the whole q / k projection: reduce its sum
        for name, full, start, size in (("q_norm", h * d, tp.rank * hl * d, hl * d),
                                        ("k_norm", hkv * d, kv0 * d, hkvl * d)):
            eps = getattr(attn, name).eps
            setattr(attn, name, ParallelRMSNorm(full, start, size, eps, tp, dtype, device))
    attn.num_heads, attn.num_kv_heads = hl, hkvl
    attn.q_size, attn.kv_size = hl * d, hkvl * d
    attn.attn.num_heads, attn.attn.num_kv_heads = hl, hkvl


def _shard_mlp(mlp: Any, tp: TPGroup, dtype: torch.dtype, device: torch.device) -> None:
    gu = mlp.gate_up_proj
    if not isinstance(gu, MergedLinear):
        raise ConfigError(f"tensor parallelism needs a packed gate_up MergedLinear, got {type(gu).__name__}")
    ranges = [shard_range(n, tp.rank, tp.world_size, "intermediate_size") for n in gu.output_sizes]
    mlp.gate_up_proj = ColumnParallelLinear(gu.in_features, gu.output_sizes, [s for s, _ in ranges],
                                            [n for _, n in ranges], gu.shard_names, gu.bias is not None, dtype,
                                            device)
    down = mlp.down_proj
    mlp.down_proj = RowParallelLinear(down.in_features, down.out_features, down.bias is not None, tp, dtype, device)
