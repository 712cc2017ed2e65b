"""The shared decoder skeleton every family builds on: pre-norm layers over a flat batch, the causal-LM wrapper,
and the weight loading that maps checkpoint names through the family's own tables.

A family file (llama.py, qwen2.py, mixtral.py, ...) subclasses `CausalLM` and sets:
  make_layer(config, idx, dtype)  its attention and MLP / MoE choices for layer idx
  checkpoint_rules                regex rules checkpoint name -> (our parameter name, shard) for names that differ
  packed_modules_mapping          checkpoint module -> (our packed module, shard) (q|k|v, gate|up)
  gguf_block_names                its blk.N.<name> -> checkpoint module map
Plain eager PyTorch over a flat batch: T = tokens of all requests packed together, no padding.
"""
from __future__ import annotations

import re
from typing import Any, Callable, ClassVar, Iterable, Optional

import torch
from torch import nn

from tokenmill.model.layers.attention import Attention, SelfAttention, head_dim_of
from tokenmill.model.layers.embedding import LMHead, VocabEmbedding
from tokenmill.model.layers.linear import ShardId
from tokenmill.model.layers.norm import RMSNorm
from tokenmill.model.layers.rotary import RotaryEmbedding
from tokenmill.ops.attention.backend import AttentionBackend
from tokenmill.worker.forward_batch import ForwardBatch

Tensor = torch.Tensor
# checkpoint tensors that are not parameters of ours
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# q|k|v and gate|up packing shared by every family
DENSE_PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# llama.cpp block tensor names shared by every family (blk.N.<key> -> model.layers.N.<value>)
GGUF_DENSE_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


class DecoderLayer(nn.Module):
    """Pre-norm block: h = attn(norm(x)) + x; h = mlp(norm(h)) + h (the residual add fused into the norms)."""

    def __init__(self, config: Any, self_attn: SelfAttention, mlp: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        # installed from outside (tokenmill/ops/cpu/layer.py: a dense layer in one C call for small CPU batches);
        # returns None for a step it cannot take, which then runs the per-op path below
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


class DecoderModel(nn.Module):
    def __init__(self, config: Any, dtype: torch.dtype, make_layer: Callable[[Any, int, torch.dtype], DecoderLayer]):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(make_layer(config, i, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))

    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor], batch: ForwardBatch) -> Tensor:
        h = self.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary_emb.cos_sin(positions)  # [T, D] each, shared by all layers
        residual: Optional[Tensor] = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, cos, sin, kv_cache, batch)
        h, _ = self.norm(h, residual)
        return h  # [T, hidden]


Rule = tuple[str, str, Optional[Callable[[re.Match], ShardId]]]


class CausalLM(nn.Module):
    """Constructed from a transformers config; parameters are uninitialized until the loader fills them."""

    packed_modules_mapping: ClassVar[dict[str, tuple[str, ShardId]]] = DENSE_PACKED
    # (regex on the checkpoint name, replacement, shard from the match or None), tried before the packed mapping
    checkpoint_rules: ClassVar[tuple[Rule, ...]] = ()
    gguf_block_names: ClassVar[dict[str, str]] = GGUF_DENSE_BLOCK
    gguf_permuted_qk: ClassVar[bool] = False  # llama.cpp permuted attn_q / attn_k rows (llama-arch converters)
    # True (MLA, deepseek.py): a token's cache row is one compressed latent split over the K and V planes of a
    # one-KV-head cache, not per-head K/V: no attention backend swap, no K-shift, no CUDA graphs
    latent_kv_cache: ClassVar[bool] = False

    def __init__(self, config: Any, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = DecoderModel(config, dtype, self.make_layer)
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
        self._compiled_rules = [(re.compile(p), r, s) for p, r, s in self.checkpoint_rules]

    def make_layer(self, config: Any, layer_idx: int, dtype: torch.dtype) -> DecoderLayer:
        raise NotImplementedError

    # ---- gguf ----------------------------------------------------------------------------------------
    @classmethod
    def gguf_config_kwargs(cls, meta: Callable[[str], Any]) -> dict[str, Any]:
        """Family-specific transformers config fields from the GGUF metadata (meta(key) reads `<arch>.<key>`)."""
        return {}

    @classmethod
    def gguf_variant(cls, meta: Callable[[str], Any]) -> Optional[tuple[str, str]]:
        """(transformers model_type, architectures entry) to build instead of the registry's, when one GGUF arch
        covers several (deepseek.py: deepseek2 files with sigmoid gating are DeepSeek-V3); None keeps it."""
        return None

    # ---- attention -----------------------------------------------------------------------------------
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Swap the attention implementation of every layer (e.g. a Triton backend on GPU)."""
        for attn in self.attention_layers():
            attn.backend = backend

    @property
    def sliding_windows(self) -> list[Optional[int]]:
        return [attn.sliding_window for attn in self.attention_layers()]

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, positions: Tensor, kv_caches: list[Tensor], batch: ForwardBatch) -> Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden] (K/V of these tokens written to kv_caches)."""
        return self.model(input_ids, positions, kv_caches, batch)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        return self.lm_head(hidden).float()

    # ---- mixture of experts ------------------------------------------------------------------------------
    def set_moe_op(self, op: Callable[..., Tensor]) -> None:
        """Swap the fused MoE op of every MoE layer (tokenmill.ops.moe.select_moe_op); no-op for dense models."""
        from tokenmill.model.layers.moe import moe_blocks

        for _, block in moe_blocks(self):
            block.op = op

    def expert_counts(self) -> dict[int, list[int]]:
        """Routing statistics: layer index -> tokens routed to each expert since the last reset (each token counts
        once per chosen expert; profiling and graph-capture forwards count too). Empty for dense models."""
        from tokenmill.model.layers.moe import moe_blocks

        return {i: block.expert_counts.tolist() for i, block in moe_blocks(self)}

    def reset_expert_counts(self) -> None:
        from tokenmill.model.layers.moe import moe_blocks

        for _, block in moe_blocks(self):
            block.expert_counts.zero_()

    # ---- weights -------------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> Optional[tuple[str, ShardId]]:
        """Checkpoint tensor name -> (our parameter name, shard id); None: the tensor is not ours to load."""
        if name.endswith(IGNORED_SUFFIXES) or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        for pattern, repl, shard in self._compiled_rules:
            m = pattern.fullmatch(name)
            if m is not None:
                return m.expand(repl), (shard(m) if shard is not None else None)
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in self.packed_modules_mapping:
            ours, shard_id = self.packed_modules_mapping[parts[-2]]
            return ".".join(parts[:-2] + [ours, parts[-1]]), shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy checkpoint tensors onto the parameters (each through its `weight_loader`); every parameter, every
        shard of a packed one, must be filled. A loader may return the shard ids it filled (a fused tensor
        covering several shards); otherwise it filled the shard it was given."""
        from tokenmill.errors import ModelLoadError

        params = dict(self.named_parameters())
        loaded: set[tuple[str, Any]] = set()
        unexpected: list[str] = []
        with torch.no_grad():
            for name, tensor in weights:
                mapped = self.map_weight_name(name)
                if mapped is None:
                    continue
                target, shard = mapped
                param = params.get(target)
                if param is None:
                    unexpected.append(name)
                    continue
                loader = getattr(param, "weight_loader", None)
                try:
                    if not isinstance(tensor, Tensor) and not getattr(param, "accepts_slices", False):
                        tensor = tensor[:]  # a lazy safetensors slice (tensor parallelism), read whole here
                    filled = _plain_copy(param, tensor, shard) if loader is None else loader(param, tensor, shard)
                except ValueError as e:
                    raise ModelLoadError(f"cannot load tensor {name}: {e}") from None
                loaded.update((target, s) for s in (filled if filled is not None else [shard]))
        if unexpected:
            raise ModelLoadError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {_few(unexpected)}")
        missing = [f"{n}" + (f"[{s}]" if s is not None else "")
                   for n, p in params.items() for s in getattr(p, "shard_ids", [None]) if (n, s) not in loaded]
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensor(s): {_few(missing)}")


def _plain_copy(param: nn.Parameter, tensor: Tensor, shard: ShardId) -> None:
    if shard is not None or tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(tensor.shape)}")
    param.data.copy_(tensor)


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
