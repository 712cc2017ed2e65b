"""GGUF (llama.cpp) files: metadata -> transformers config, tensors -> dequantized checkpoint-named weights.

Uses the `gguf` package (GGUFReader + gguf.quants.dequantize). llama.cpp's converter permutes the rows of
attn_q / attn_k of llama-arch models (interleaved rotary pairs); we undo it so the weights match Hugging
Face's rotate-half layout.
"""
from __future__ import annotations

import logging
import re
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import numpy as np
import torch

from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# llama.cpp's older MoE layout (Mixtral GGUFs before the 3-D ffn_*_exps): one 2-D tensor per expert
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")
# tensors llama.cpp adds that have no Hugging Face counterpart
_SKIP = {"rope_freqs.weight"}


def open_gguf(path: str) -> Any:
    """A gguf.GGUFReader over the file; unreadable or corrupt files raise ModelLoadError."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on bad files
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        return default


def gguf_config(reader: Any, path: str) -> Any:
    """A transformers PretrainedConfig built from the file's metadata."""
    from transformers import AutoConfig

    arch, model_type, hf_arch, cls = _family(reader, path)

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    variant = cls.gguf_variant(meta)  # one GGUF arch, several transformers ones (deepseek2: V2 or V3)
    if variant is not None:
        from tokenmill.model.registry import get_model_class

        model_type, hf_arch = variant
        cls = get_model_class(SimpleNamespace(architectures=[hf_arch]))

    required = ["embedding_length", "block_count", "feed_forward_length", "attention.head_count"]
    missing = [k for k in required if meta(k) is None]
    if missing:
        raise ModelLoadError(f"GGUF file {path} lacks metadata {', '.join(f'{arch}.{k}' for k in missing)}")
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = meta("vocab_size") or (len(tokens.data) if tokens is not None else None)
    names = {t.name for t in reader.tensors}
    if vocab is None:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = int(emb.shape[-1]) if emb is not None else None
    if vocab is None:
        raise ModelLoadError(f"GGUF file {path} has no vocabulary size")
    kwargs: dict[str, Any] = dict(
        architectures=[hf_arch],
        hidden_size=hidden,
        num_hidden_layers=int(meta("block_count")),
        intermediate_size=int(meta("feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        max_position_embeddings=int(meta("context_length", 2048)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        vocab_size=int(vocab),
        tie_word_embeddings="output.weight" not in names,
        head_dim=int(meta("attention.key_length") or meta("rope.dimension_count") or hidden // heads),
    )
    for key, tok in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                     ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{tok}")
        if value is not None:
            kwargs[key] = int(value)
    scaling = meta("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope = {"rope_type": scaling, "factor": float(meta("rope.scaling.factor", 1.0))}
        orig = meta("rope.scaling.original_context_length")
        if orig is not None:
            rope["original_max_position_embeddings"] = int(orig)
        kwargs["rope_scaling"] = rope
    window = meta("attention.sliding_window")
    if window:
        kwargs["sliding_window"] = int(window)
    kwargs.update(cls.gguf_config_kwargs(meta))
    if "rope_freqs.weight" in names:
        logger.warning("GGUF file %s has rope_freqs (Llama 3.1 rope scaling); it is ignored, long contexts "
                       "may degrade", path)
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"cannot build a {model_type} config from GGUF file {path}: {e}") from None


def _family(reader: Any, path: str) -> tuple[str, str, str, Any]:
    """(GGUF arch, transformers model_type, HF architecture, our model class) of the file."""
    from tokenmill.model.registry import gguf_architecture

    arch = _field(reader, "general.architecture")
    has_experts = int(_field(reader, f"{arch}.expert_count", 0) or 0) > 0
    try:
        model_type, hf_arch, cls = gguf_architecture(arch, has_experts)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e} (in {path})") from None
    return arch, model_type, hf_arch, cls


def gguf_to_hf_name(name: str, block_names: Optional[dict[str, str]] = None) -> Optional[str]:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight by the family's block map (default: the
    dense one with q/k norms); None if unknown."""
    if block_names is None:
        from tokenmill.model.decoder import GGUF_DENSE_BLOCK, GGUF_QK_NORM

        block_names = {**GGUF_DENSE_BLOCK, **GGUF_QK_NORM}
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in block_names:
        return f"model.layers.{m.group(1)}.{block_names[m.group(2)]}.{m.group(3)}"
    m = _EXPERT_RE.match(name)
    if m and "ffn_gate_exps" in block_names:  # a MoE family
        return f"model.layers.{m.group(1)}.mlp.experts.{m.group(3)}.{m.group(2)}_proj.weight"
    return None


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: rows (head, pair, 2) -> (head, 2, pair)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_types(reader: Any) -> dict[str, str]:
    """Checkpoint name -> GGUF tensor type in lower case (q4_1, q8_0, q6_k, f32...) for every known tensor."""
    block_names = _family(reader, "GGUF file")[3].gguf_block_names
    out: dict[str, str] = {}
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name, block_names)
        if hf_name is not None:
            out[hf_name] = t.tensor_type.name.lower()
    return out


def iter_gguf_weights(reader: Any, config: Any, path: str,
                      raw: frozenset[str] | set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, float32 tensor) for each GGUF tensor, dequantized one at a time.

    Names in `raw` come as their packed GGUF blocks instead: uint8 [rows, bytes per row] (q/k rows unpermuted
    all the same: a row's blocks move together)."""
    from gguf.quants import dequantize

    cls = _family(reader, path)[3]
    permuted = cls.gguf_permuted_qk
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for t in reader.tensors:
        if t.name in _SKIP:
            continue
        hf_name = gguf_to_hf_name(t.name, cls.gguf_block_names)
        if hf_name is None:
            raise ModelLoadError(f"unexpected tensor {t.name} in GGUF file {path}")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        try:
            if hf_name in raw:
                arr = np.reshape(t.data.view(np.uint8), (int(np.prod(shape[:-1])), -1))
            else:
                arr = np.reshape(dequantize(t.data, t.tensor_type), shape)
        except Exception as e:
            raise ModelLoadError(f"cannot dequantize tensor {t.name} ({t.tensor_type.name}) in {path}: "
                                 f"{type(e).__name__}: {e}") from None
        if permuted and ".attn_q." in t.name:
            arr = _unpermute_rows(arr, heads)
        elif permuted and ".attn_k." in t.name:
            arr = _unpermute_rows(arr, kv_heads)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr)
        yield hf_name, torch.from_numpy(arr)
