"""DeepSeek-V2 / V2-Lite / V3 from llama.cpp "deepseek2" GGUF files (written in the converter's layout by
tests/model/deepseek_gguf.py) against transformers on the same tiny random weights: the config read from the
metadata, logits through the paged cache (prefill, batched decode, chunked prefill mixed with decodes), greedy
tokens through the engine (batching, chunked prefill), the older one-attn_kv_b layout, Q8_0 experts and linears
kept packed against the dequantized reference, and clear errors for what is not supported."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.exact import exact_llm
from tests.model.deepseek_gguf import save_deepseek2_gguf
from tests.model.paged_logits import (DECODE_STEPS, PROMPT_LENS, chunked_prefill_mixed_with_decode,
                                      prefill_then_batched_decode)
from tests.model.test_moe_loading import _logits
from tests.model.tiny_models import DEEPSEEK_ARCHS, VOCAB, build_tiny_model, fake_quantize_
from tokenmill import SamplingParams
from tokenmill.errors import ModelLoadError
from tokenmill.model.layers.mla import KVBProjection, MLAttention
from tokenmill.model.layers.moe import FusedExperts, GroupedTopkRouter, PackedExperts, moe_blocks
from tokenmill.model.loader import load_hf_config, load_model, resolve_model_source
from tokenmill.ops.moe.cpu import fused_moe_cpu, fused_moe_grouped

NEW_TOKENS = 8
# (tiny model, older layout with one attn_kv_b)
FILES = [(arch, False) for arch in DEEPSEEK_ARCHS] + [("deepseek_v2", True)]
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "q_lora_rank",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "head_dim",
                 "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
                 "first_k_dense_replace", "routed_scaling_factor", "vocab_size", "tie_word_embeddings",
                 "max_position_embeddings", "num_key_value_heads")


def _id(param) -> str:
    arch, legacy = param
    return arch + ("-kv_b" if legacy else "")


def _write(tmp_path_factory, arch: str, legacy: bool = False, **kwargs):
    hf = build_tiny_model(arch)
    path = str(tmp_path_factory.mktemp(_id((arch, legacy))) / "m.gguf")
    return hf, save_deepseek2_gguf(hf, path, legacy=legacy, **kwargs)


@pytest.fixture(scope="module", params=FILES, ids=_id)
def gguf_models(request, tmp_path_factory):
    arch, legacy = request.param
    hf, path = _write(tmp_path_factory, arch, legacy)
    src = resolve_model_source(path)
    ours = load_model(src, load_hf_config(src), torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, VOCAB, (n + DECODE_STEPS,), generator=g).tolist() for n in PROMPT_LENS]
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0] for s in seqs]
    return hf, path, ours, seqs, ref


def test_config_from_metadata(gguf_models):
    """The metadata gives the transformers config back: sizes, routing, interleaved rope, YaRN with mscale."""
    hf, path, ours, _, _ = gguf_models
    want, got = hf.config, ours.config
    assert got.model_type == want.model_type and got.architectures == want.architectures
    for field in CONFIG_FIELDS:
        assert getattr(got, field) == pytest.approx(getattr(want, field)), field
    if want.model_type == "deepseek_v2":
        assert got.topk_method == want.topk_method
        if want.topk_method == "group_limited_greedy":
            assert (got.n_group, got.topk_group) == (want.n_group, want.topk_group)
    else:
        assert (got.n_group, got.topk_group, got.norm_topk_prob) == (want.n_group, want.topk_group, True)
        assert got.rope_interleave
    rope_got, rope_want = got.rope_parameters, want.rope_parameters
    assert rope_got["rope_type"] == rope_want["rope_type"]
    for key in ("rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim"):
        if rope_want.get(key) is None:
            assert rope_got.get(key) is None, key
        else:
            assert rope_got.get(key) == pytest.approx(rope_want[key], rel=1e-6), key
    attn = ours.model.layers[0].self_attn
    assert isinstance(attn, MLAttention) and isinstance(attn.kv_b_proj, KVBProjection)
    assert ours.num_kv_heads == 1 and ours.latent_kv_cache


def test_prefill_then_batched_decode(gguf_models):
    prefill_then_batched_decode(*gguf_models[2:])


def test_chunked_prefill_mixed_with_decode(gguf_models):
    chunked_prefill_mixed_with_decode(*gguf_models[2:])


@torch.no_grad()
def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 17, 9, 26)]


PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("scenario", [{}, {"max_num_batched_tokens": 8, "block_size": 4}],
                         ids=["batched", "chunked_prefill"])
def test_engine_greedy_matches_transformers(gguf_models, gguf_tokenizer_path, scenario):
    hf, path, _, _, _ = gguf_models
    llm = exact_llm(path, tokenizer=gguf_tokenizer_path, dtype="float32", **scenario)
    assert all(block.op is fused_moe_cpu for _, block in moe_blocks(llm.engine.core.runner.model))
    prompts = _prompts()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt)
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0


def _q8_file(tmp_path_factory, arch: str, legacy: bool):
    """Q8_0 where the rows are whole blocks of 32 (as the converter's --outtype q8_0, which falls back to F16
    elsewhere): experts, shared experts, dense MLP, q_a / kv_a / o_proj (q_b too when q_lora_rank is 32), the router
    (llama.cpp keeps it F32; quantized here to test that it is dequantized), and the older layout's attn_kv_b.
    transformers gets the same values (fake_quantize_)."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    hf = build_tiny_model(arch)
    cfg = hf.config
    names = {"mlp.experts.": ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"],
             "mlp.shared_experts.": ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"],
             "mlp.gate.": ["ffn_gate_inp"], "mlp.gate_proj": ["ffn_gate"], "mlp.up_proj": ["ffn_up"],
             "mlp.down_proj": ["ffn_down"], "q_a_proj": ["attn_q_a"], "kv_a_proj_with_mqa": ["attn_kv_a_mqa"],
             "o_proj": ["attn_output"]}
    if cfg.q_lora_rank and cfg.q_lora_rank % 32 == 0:
        names["q_b_proj"] = ["attn_q_b"]
    if legacy:
        names["kv_b_proj"] = ["attn_kv_b"]
    for substring in names:
        fake_quantize_(hf, substring, q8)
    qtypes = {f"blk.{i}.{g}.weight": q8 for i in range(cfg.num_hidden_layers) for gs in names.values() for g in gs}
    path = str(tmp_path_factory.mktemp(f"{arch}-q8") / "m.gguf")
    return hf, save_deepseek2_gguf(hf, path, qtypes=qtypes, legacy=legacy)


@pytest.mark.parametrize("arch,legacy", [("deepseek_v3", False), ("deepseek_v2", True)], ids=["v3", "v2-kv_b"])
def test_q8_0_gguf_stays_packed(tmp_path_factory, gguf_tokenizer_path, arch, legacy):
    """Q8_0 experts load as PackedExperts and Q8_0 linears packed; kv_b_proj (read as a matrix by the absorbed
    attention) and the float32 router are dequantized; logits equal transformers holding the dequantized weights
    through the per-expert and one-call C MoE paths, greedy tokens too; quantization none gives the same."""
    from tokenmill.model.layers.quantized import QuantizedLinear
    from tokenmill.ops.cpu.qlinear import available

    hf, path = _q8_file(tmp_path_factory, arch, legacy)
    src = resolve_model_source(path)
    ids = [1, 17, 300, 42, 5, 99, 410, 7, 250, 8, 61, 3, 77, 128]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    packed = load_model(src, load_hf_config(src), torch.float32, "cpu", gemm_dtype="float32")
    blocks = moe_blocks(packed)
    for layer in packed.model.layers:
        kv_b = layer.self_attn.kv_b_proj
        assert type(kv_b) is KVBProjection and kv_b.weight.dtype == torch.float32
    assert all(type(b.gate) is GroupedTopkRouter for _, b in blocks)
    if available():
        assert all(isinstance(b.experts, PackedExperts) and b.experts.qtype == "q8_0" for _, b in blocks)
        assert all(isinstance(b.shared_expert.gate_up_proj, QuantizedLinear) for _, b in blocks)
        assert all(isinstance(layer.self_attn.o_proj, QuantizedLinear) for layer in packed.model.layers)
    for op in (None, fused_moe_grouped, fused_moe_cpu):
        if op is not None:
            packed.set_moe_op(op)
        assert (_logits(packed, ids) - ref).abs().max().item() < 1e-4
    dense = load_model(src, load_hf_config(src), torch.float32, "cpu", quantization="none")
    assert all(isinstance(b.experts, FusedExperts) for _, b in moe_blocks(dense))
    assert (_logits(dense, ids) - ref).abs().max().item() < 1e-4
    llm = exact_llm(path, tokenizer=gguf_tokenizer_path, max_num_batched_tokens=16, block_size=4,
                    gemm_dtype="float32")
    assert all(layer.fast_path is None for layer in llm.engine.core.runner.model.model.layers)  # no fused C layer
    prompts = _prompts(5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(hf, prompt)


def _edited_gguf(src_path: str, dst_path: str, drop_keys=(), set_keys=None, drop_tensors=()) -> str:
    """A copy of a GGUF file with metadata keys dropped or (re)set and tensors left out."""
    import gguf

    reader = gguf.GGUFReader(src_path)
    w = gguf.GGUFWriter(dst_path, "deepseek2")
    skip = {"general.architecture", *drop_keys, *(set_keys or {})}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        w.add_key_value(key, field.contents(), vtype)
    for key, (value, vtype) in (set_keys or {}).items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:  # F32 files only
        if t.name not in drop_tensors:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst_path


def test_unsupported_files_are_clear_errors(tmp_path):
    import gguf

    u32 = gguf.GGUFValueType.UINT32
    base = save_deepseek2_gguf(build_tiny_model("deepseek_v2_lite"), str(tmp_path / "base.gguf"))

    def config_error(name: str, match: str, **kw):
        src = resolve_model_source(_edited_gguf(base, str(tmp_path / name), **kw))
        with pytest.raises(ModelLoadError, match=match):
            load_model(src, load_hf_config(src), torch.float32, "cpu")

    config_error("gating.gguf", r"unsupported expert gating function 3 in a deepseek2 GGUF",
                 set_keys={"deepseek2.expert_gating_func": (3, u32)})
    config_error("norm.gguf", "softmax gating and expert_weights_norm is not supported",
                 set_keys={"deepseek2.expert_weights_norm": (True, gguf.GGUFValueType.BOOL)})
    config_error("rank.gguf", "lacks metadata deepseek2.attention.kv_lora_rank",
                 drop_keys={"deepseek2.attention.kv_lora_rank"})
    config_error("linear.gguf", "unsupported rope scaling 'linear'",
                 set_keys={"deepseek2.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
                           "deepseek2.rope.scaling.factor": (2.0, gguf.GGUFValueType.FLOAT32)})
    config_error("dense.gguf", "unsupported GGUF architecture 'deepseek2'",  # no experts (e.g. Youtu-LLM)
                 drop_keys={"deepseek2.expert_count"})
    config_error("half.gguf", r"lacks 1 tensor\(s\): model.layers.1.self_attn.kv_b_proj.weight\[v_b\]",
                 drop_tensors={"blk.1.attn_v_b.weight"})


def test_deepseek_v2_lite_metadata_builds_like_its_config(tmp_path):
    """The metadata the converter writes for the published V2-Lite config (bench/configs/deepseek-v2-lite.json: 27
    layers, 64 experts top-6, 2 shared, YaRN factor 40 with mscale 0.707) gives back the same model: built on the
    meta device from both, the same module tree, softmax scale and rotary frequencies, and a 576-value latent."""
    import os
    import shutil

    from tokenmill.model.registry import get_model_class

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copy(os.path.join(root, "bench", "configs", "deepseek-v2-lite.json"), tmp_path / "config.json")
    want = load_hf_config(resolve_model_source(str(tmp_path)))
    path = save_deepseek2_gguf(want, str(tmp_path / "v2-lite.gguf"), metadata_only=True)
    got = load_hf_config(resolve_model_source(path))
    got.tie_word_embeddings = False  # a file without tensors has no output.weight
    for field in CONFIG_FIELDS:
        assert getattr(got, field) == pytest.approx(getattr(want, field)), field
    with torch.device("meta"):
        a, b = get_model_class(want)(want, dtype=torch.bfloat16), get_model_class(got)(got, dtype=torch.bfloat16)
    assert type(a) is type(b) and str(a) == str(b)
    assert (b.num_kv_heads, 2 * b.head_dim) == (1, 576)
    assert b.model.layers[0].self_attn.scale == pytest.approx(a.model.layers[0].self_attn.scale, rel=1e-6)
    assert b.model.rotary_emb.attention_scaling == pytest.approx(a.model.rotary_emb.attention_scaling, rel=1e-6)
    torch.testing.assert_close(b.model.rotary_emb.inv_freq.to("cpu"), a.model.rotary_emb.inv_freq.to("cpu"))
