"""DeepSeek-V2 / V3 (MLA with a compressed latent KV cache, DeepSeek MoE routing) vs transformers on tiny random
models: logits through the paged cache (prefill, chunked prefill mixed with decodes, batched decode), greedy tokens
through the engine (batching, chunked prefill, preemption by recompute or swap, prefix caching, n-gram
speculation), int8 / fp8 latent caches, the cache's bytes per token, the paths that must leave MLA alone, and the
settings that cannot apply (clear errors)."""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from tests.model.paged_logits import (BLOCK_SIZE, DECODE_STEPS, PROMPT_LENS, block_tables as _tables,
                                      chunked_prefill_mixed_with_decode, new_cache as _cache,
                                      prefill_then_batched_decode, run as _run)
from tests.model.tiny_models import DEEPSEEK_ARCHS, VOCAB, build_tiny_model, tiny_config
from tokenmill import LLM, SamplingParams
from tokenmill.errors import ConfigError, InvalidRequestError, ModelLoadError
from tokenmill.model.layers.mla import MLAttention
from tokenmill.model.layers.moe import GroupedTopkMoEBlock, moe_blocks
from tokenmill.model.loader import load_hf_config, load_model, resolve_model_source
from tokenmill.ops.moe.cpu import fused_moe_cpu

NEW_TOKENS = 10


def _latent_size(cfg) -> int:
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim


@pytest.fixture(scope="module", params=DEEPSEEK_ARCHS)
def models(request, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dirs[request.param]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    source = resolve_model_source(path)
    ours = load_model(source, load_hf_config(source), torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, VOCAB, (n + DECODE_STEPS,), generator=g).tolist() for n in PROMPT_LENS]
    with torch.no_grad():
        ref = [hf(torch.tensor([s])).logits[0] for s in seqs]  # [L, V] per sequence
    return ours, seqs, ref


def test_prefill_then_batched_decode(models):
    prefill_then_batched_decode(*models)


def test_chunked_prefill_mixed_with_decode(models):
    """Chunks of 3 prompt tokens per step; requests past their prompt decode in the same batch."""
    chunked_prefill_mixed_with_decode(*models)


def test_cache_holds_only_the_latent(models):
    """One 'KV head' of (kv_lora_rank + rope) / 2 values per plane: a token's row is its latent and roped k_pe."""
    model, seqs, _ = models
    cfg = model.config
    assert model.num_kv_heads == 1 and 2 * model.head_dim == _latent_size(cfg)
    assert model.latent_kv_cache and model.attention_layers() == []
    kv, tables = _cache(model), _tables(seqs)
    _run(model, kv, tables[:1], [seqs[0][:6]], [0])
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, MLAttention)
    slot = tables[0][1] * BLOCK_SIZE + 1  # position 5
    row = torch.cat((kv[0][0].reshape(-1, model.head_dim)[slot], kv[0][1].reshape(-1, model.head_dim)[slot]))
    h = model.model.embed_tokens(torch.tensor([seqs[0][5]]))
    h, _ = model.model.layers[0].input_layernorm(h)
    c_kv, _ = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(h)[:, :cfg.kv_lora_rank].contiguous())
    torch.testing.assert_close(row[:cfg.kv_lora_rank], c_kv[0])


def test_dense_and_moe_layers(models):
    model, _, _ = models
    cfg = model.config
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    first = cfg.first_k_dense_replace
    assert kinds == ["GatedMLP"] * first + ["GroupedTopkMoEBlock"] * (cfg.num_hidden_layers - first)
    block = moe_blocks(model)[0][1]
    assert block.shared_expert is not None and block.shared_expert_gate is None
    assert (block.gate.e_score_correction_bias is not None) == (cfg.model_type == "deepseek_v3")


@pytest.fixture(scope="module")
def hf_models():
    return {name: build_tiny_model(name) for name in DEEPSEEK_ARCHS}


_greedy_cache: dict = {}


@torch.no_grad()
def _hf_greedy(hf, arch: str, prompt: list[int]) -> list[int]:
    key = (arch, tuple(prompt))
    if key not in _greedy_cache:
        ids = list(prompt)
        for _ in range(NEW_TOKENS):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        _greedy_cache[key] = ids[len(prompt):]
    return _greedy_cache[key]


def _prompts(seed: int = 0) -> list[list[int]]:
    """Random prompts, and one that repeats itself (n-gram speculation proposes drafts from it)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 17, 9, 26)] + [
        [rng.randrange(3, VOCAB) for _ in range(6)] * 3]


SCENARIOS = {
    "batched": {},
    "chunked_prefill": {"max_num_batched_tokens": 8, "block_size": 4},
    "preemption": {"num_kv_blocks": 14, "block_size": 4},
    "swap_preemption": {"num_kv_blocks": 14, "block_size": 4, "cpu_offload_gb": 0.001},  # latent rows to the host
    "ngram_spec": {"speculative_method": "ngram", "num_speculative_tokens": 3},  # multi-token verify queries
}
PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.mark.parametrize("arch", DEEPSEEK_ARCHS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_engine_greedy_matches_transformers(tiny_model_dirs, hf_models, gguf_tokenizer_path, arch, scenario):
    llm = LLM(tiny_model_dirs[arch], tokenizer=gguf_tokenizer_path, dtype="float32", **SCENARIOS[scenario])
    runner = llm.engine.core.runner
    model = runner.model
    assert all(block.op is fused_moe_cpu for _, block in moe_blocks(model))
    assert all(layer.fast_path is None for layer in model.model.layers)  # fuse_cpu_layers left MLA alone
    cfg = model.config
    assert runner.kv_cache_dtype == "float32"  # auto: MLA attends in PyTorch, no C kernel reading bf16 in place
    assert runner.kv_bytes_per_block() == cfg.num_hidden_layers * runner.block_size * _latent_size(cfg) * 4
    assert tuple(runner.kv_caches[0].shape[2:]) == (runner.block_size, 1, _latent_size(cfg) // 2)
    sched = llm.engine.core.scheduler
    drafts = []
    schedule = sched.schedule

    def counting_schedule(*args, **kwargs):  # how many draft tokens were verified
        out = schedule(*args, **kwargs)
        drafts.extend(len(v) for v in out.scheduled_spec_decode_tokens.values())
        return out

    sched.schedule = counting_schedule
    prompts = _prompts()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == _hf_greedy(hf_models[arch], arch, prompt), f"{arch}/{scenario}"
    assert sched.kv.num_used_blocks == 0
    if scenario.endswith("preemption"):
        assert sched.num_preemptions > 0, "the scenario did not preempt"
    if scenario == "swap_preemption":
        off = sched.kv.offload
        assert off.num_swap_preemptions == sched.num_preemptions and off.num_swapped_in_blocks > 0
    if scenario == "ngram_spec":
        assert sum(drafts) > 0, "no draft was verified"


@pytest.mark.parametrize("arch", DEEPSEEK_ARCHS)
def test_engine_prefix_cache_hits_give_same_tokens(tiny_model_dirs, hf_models, gguf_tokenizer_path, arch):
    rng = random.Random(7)
    shared = [rng.randrange(3, VOCAB) for _ in range(21)]
    prompts = [shared + [rng.randrange(3, VOCAB) for _ in range(k)] for k in (1, 5, 9)]
    llm = LLM(tiny_model_dirs[arch], tokenizer=gguf_tokenizer_path, dtype="float32", block_size=4)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts[:1]], PARAMS, use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], PARAMS, use_tqdm=False)
    kv = llm.engine.core.scheduler.kv
    assert kv.prefix_hits >= 2 * 20, "the second wave did not hit the prefix cache"
    for prompt, out in zip(prompts, first + rest):
        assert out.outputs[0].token_ids == _hf_greedy(hf_models[arch], arch, prompt)
    assert kv.num_used_blocks == 0


@pytest.mark.parametrize("dtype,kv_dtype", [("float32", "bfloat16"), ("bfloat16", "auto")])
def test_dummy_weights_and_bfloat16(tiny_model_dirs, gguf_tokenizer_path, dtype, kv_dtype):
    """--load-format dummy builds and runs; a bfloat16 cache holds the same latent in half the bytes; a bfloat16
    model runs (its router stays float32)."""
    path = tiny_model_dirs["deepseek_v3"]
    llm = LLM(path, tokenizer=gguf_tokenizer_path, dtype=dtype, load_format="dummy", kv_cache_dtype=kv_dtype,
              max_num_batched_tokens=8, block_size=4)
    runner = llm.engine.core.runner
    assert runner.kv_caches[0].dtype == torch.bfloat16
    assert moe_blocks(runner.model)[0][1].gate.weight.dtype == torch.float32
    assert runner.kv_bytes_per_block() == 2 * runner.block_size * _latent_size(runner.model.config) * 2
    assert runner.model_info().supports_kv_streaming is False
    with pytest.raises(InvalidRequestError, match="MLA"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}],
                     SamplingParams(max_tokens=4, kv_eviction="streaming"), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], PARAMS, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == NEW_TOKENS


# |logprob(quantized cache) - logprob(float cache)| of the prompt tokens: test_kv_quant_engine.py's bounds, but
# fp8's max 0.4 (not 0.3): one latent serves as every head's K and V, so e4m3's 3 mantissa bits weigh more
# (measured: 0.18 on the tiny V2, 0.35 on the tiny V3; means 0.022 / 0.032)
MAX_LP_ERR = {"int8": 0.05, "fp8": 0.4}
MEAN_LP_ERR = {"int8": 0.01, "fp8": 0.06}


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_quantized_latent_cache_close_to_float(tiny_model_dirs, gguf_tokenizer_path, arch):
    """int8 / fp8 caches hold the latent halves quantized like a K and a V head: prompt logprobs within bounds,
    int8 greedy continuations mostly equal (fp8 flips near-tied argmaxes of these sharp random models, as for the
    other families), chunked prefill, no leaked blocks, one byte a latent value (+ two float32 scales a token
    for int8)."""
    from tokenmill.ops.attention.kv_quant import QuantizedKVCache

    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (40, 7, 52)]
    kw = dict(tokenizer=gguf_tokenizer_path, dtype="float32", block_size=8, max_num_batched_tokens=32)
    lp_params = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(llm):
        lps = [[lp.logprob for lp in o.prompt_logprobs[1:]] for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], lp_params, use_tqdm=False)]
        toks = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)]
        assert llm.engine.core.scheduler.kv.num_used_blocks == 0, "KV blocks leaked"
        return lps, toks

    base = LLM(tiny_model_dirs[arch], **kw)
    base_lps, base_toks = run(base)
    float_bytes = base.engine.core.runner.kv_bytes_per_block()
    for kind in ("int8", "fp8"):
        llm = LLM(tiny_model_dirs[arch], kv_cache_dtype=kind, **kw)
        runner = llm.engine.core.runner
        assert all(isinstance(c, QuantizedKVCache) for c in runner.kv_caches)
        latent = _latent_size(runner.model.config)
        per_token = latent + (8 if kind == "int8" else 0)  # one byte a value (+ a float32 scale a half)
        assert runner.kv_bytes_per_block() == float_bytes // (4 * latent) * per_token
        lps, toks = run(llm)
        errs = [abs(a - b) for la, lb in zip(lps, base_lps) for a, b in zip(la, lb)]
        assert 0 < max(errs) < MAX_LP_ERR[kind], (kind, max(errs))
        assert sum(errs) / len(errs) < MEAN_LP_ERR[kind], (kind, sum(errs) / len(errs))
        if kind == "int8":
            assert all(t[0] == b[0] for t, b in zip(toks, base_toks))
            same_prefix = sum(next((i for i, (x, y) in enumerate(zip(t, b)) if x != y), len(t))
                              for t, b in zip(toks, base_toks))
            assert same_prefix >= 0.75 * sum(len(t) for t in toks), (toks, base_toks)


def test_tensor_parallel_is_a_clear_error(tiny_model_dirs):
    """Refused by the runner before any weight is read, and by shard_model itself."""
    from tokenmill.config import EngineConfig
    from tokenmill.distributed.tensor_parallel import shard_model
    from tokenmill.worker.model_runner import ModelRunner

    config = EngineConfig.from_kwargs(model=tiny_model_dirs["deepseek_v2_lite"], tensor_parallel_size=2)
    runner = ModelRunner(config, tp=SimpleNamespace(world_size=2, rank=0, local_device=0))
    with pytest.raises(ConfigError, match="tensor parallelism does not support MLA"):
        runner.load()
    source = resolve_model_source(tiny_model_dirs["deepseek_v2_lite"])
    model = load_model(source, load_hf_config(source), torch.float32, "cpu", load_format="dummy")
    with pytest.raises(ConfigError, match="MLAttention"):
        shard_model(model, SimpleNamespace(world_size=2, rank=0), torch.device("cpu"))


def test_bad_configs_are_clear_errors():
    from tokenmill.model.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    odd = tiny_config("deepseek_v2_lite")
    odd.kv_lora_rank = 25  # 25 + 8 values a token do not split over two planes
    with pytest.raises(ModelLoadError, match="even"):
        DeepseekV2ForCausalLM(odd)
    method = tiny_config("deepseek_v2_lite")
    method.topk_method = "noaux_tc"
    with pytest.raises(ModelLoadError, match="topk_method"):
        DeepseekV2ForCausalLM(method)
    groups = tiny_config("deepseek_v3")
    groups.n_group = 3  # 8 experts in 3 groups
    with pytest.raises(ModelLoadError, match="groups"):
        DeepseekV3ForCausalLM(groups)


def test_mtp_layers_and_fused_cpu_layers_are_skipped(tiny_model_dirs):
    from tokenmill.ops.cpu.layer import fuse_cpu_layers

    source = resolve_model_source(tiny_model_dirs["deepseek_v3"])
    model = load_model(source, load_hf_config(source), torch.float32, "cpu")
    n = model.config.num_hidden_layers
    assert model.map_weight_name(f"model.layers.{n}.self_attn.kv_b_proj.weight") is None  # V3's MTP layer
    assert model.map_weight_name("model.layers.1.mlp.shared_experts.up_proj.weight") == (
        "model.layers.1.mlp.shared_expert.gate_up_proj.weight", 1)
    assert fuse_cpu_layers(model) == 0
    assert isinstance(moe_blocks(model)[0][1], GroupedTopkMoEBlock)


def test_deepseek_v2_lite_shape_builds_and_caches_576_values(tmp_path):
    """bench/configs/deepseek-v2-lite.json (the published config) builds (on the meta device: no memory); its
    cache row is 512 + 64 values a layer, 8.9x fewer than the expanded K/V of its 16 heads."""
    import os
    import shutil

    from tokenmill.model.registry import get_model_class
    from tokenmill.ops.attention.kv_quant import kv_bytes_per_token_per_layer

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shutil.copy(os.path.join(root, "bench", "configs", "deepseek-v2-lite.json"), tmp_path / "config.json")
    cfg = load_hf_config(resolve_model_source(str(tmp_path)))
    with torch.device("meta"):
        model = get_model_class(cfg)(cfg, dtype=torch.bfloat16)
    assert (model.num_kv_heads, model.head_dim) == (1, 288)
    assert kv_bytes_per_token_per_layer("bfloat16", model.num_kv_heads, model.head_dim) == 576 * 2
    expanded = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    assert expanded / 576 > 8.8
    attn = model.model.layers[0].self_attn
    assert attn.scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)  # YaRN mscale^2
    assert type(model.model.layers[0].mlp).__name__ == "GatedMLP" and moe_blocks(model)[0][0] == 1
