"""Expert offload mechanism (tokenmill/model/layers/expert_offload.py) on the CPU with a simulated device pool:
both tiers are CPU tensors, the pool holds a few experts. Greedy tokens equal the model without offload and
the sampled tokens' logprobs stay close, for Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE, OLMoE and DeepSeek-V2 /
V3 (grouped routing, ungated shared experts, MLA), whether
the policy sends misses to the host, fetches them, or prefetches by the next layer's gate; the routing and
cache counters reach EngineStats and /metrics."""
from __future__ import annotations

import pickle
import random

import pytest
import torch

from tests.model.tiny_models import MOE_ARCHS, VOCAB, build_tiny_model, fake_quantize_, save_tiny_gguf, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.core.expert_cache import ExpertCostModel, MoEStats
from tokenmill.errors import ConfigError
from tokenmill.model.layers.expert_offload import ExpertOffload, OffloadedMoEOp
from tokenmill.model.layers.moe import PackedExperts, moe_blocks
from tokenmill.worker.expert_offload import install_expert_offload

NEW_TOKENS = 8
# cost models that force one side: misses run on the host / misses are fetched
HOST = ExpertCostModel(expert_bytes=1000, flops_per_token=1, link_bytes_per_s=1.0, host_bytes_per_s=1e12,
                       host_flops=1e12)
FETCH = ExpertCostModel(expert_bytes=1000, flops_per_token=1, link_bytes_per_s=1e12, host_bytes_per_s=1.0)
MODES = {"host": dict(cost=HOST), "fetch": dict(cost=FETCH), "fetch_prefetch": dict(cost=FETCH, prefetch=True),
         "host_prefetch": dict(cost=HOST, prefetch=True)}


class _Engines(dict):
    """arch -> (LLM, its greedy tokens and logprobs without offload), built on first use."""

    def __init__(self, tmp_path_factory, tokenizer: str):
        super().__init__()
        self.tmp, self.tokenizer = tmp_path_factory, tokenizer

    def __missing__(self, name: str):
        path = save_tiny_model(name, str(self.tmp.mktemp(name)))
        llm = LLM(path, tokenizer=self.tokenizer, dtype="float32", enable_prefix_caching=False, block_size=4,
                  max_num_batched_tokens=16)
        self[name] = (llm, _generate(llm))
        return self[name]


@pytest.fixture(scope="module")
def engines(tmp_path_factory, gguf_tokenizer_path):
    return _Engines(tmp_path_factory, gguf_tokenizer_path)


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 17, 9, 26)]


def _generate(llm: LLM):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]


def _restore(model, ops) -> None:
    for (_, block), op in zip(moe_blocks(model), ops):
        block.op = op
    del model.expert_offload


@pytest.mark.parametrize("arch", MOE_ARCHS + ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("mode", list(MODES))
def test_offload_matches_resident_experts(engines, arch, mode):
    llm, want = engines[arch]
    model = llm.engine.core.runner.model
    blocks = moe_blocks(model)
    ops = [block.op for _, block in blocks]
    num_experts = blocks[0][1].num_experts
    # prefetch needs slots the computing layer does not hold; the tiny Qwen2-MoE has one MoE layer of 4 experts
    cap = min(8 if mode.endswith("prefetch") else 3, len(blocks) * num_experts - 1)
    off = ExpertOffload.install(model, cap, torch.device("cpu"), **MODES[mode])
    try:
        assert all(isinstance(block.op, OffloadedMoEOp) for _, block in blocks)
        assert off.pool.gate_up_proj.shape[0] == cap and len(blocks) * num_experts > cap
        got = _generate(llm)
        for (tokens, lps), (want_tokens, want_lps) in zip(got, want):
            assert tokens == want_tokens, f"{arch}/{mode}"
            assert lps == pytest.approx(want_lps, abs=1e-4)
        s = off.stats
        assert s.hits + s.misses > 0 and s.resident <= cap
        if mode.startswith("host"):
            assert s.host_tokens > 0 and s.fetches == 0
        else:
            # a layer routing more experts than the pool holds runs the rest on the host
            assert s.fetches > 0 and s.evictions > 0
        if mode == "fetch_prefetch" and len(blocks) > 1:  # (under "host", admitted hot experts fill the pool)
            assert s.prefetches > 0
        stats = llm.engine.core.stats().moe  # what /metrics renders
        assert isinstance(stats, MoEStats) and stats.cache.hits == s.hits
        assert sorted(stats.expert_counts) == [i for i, _ in blocks]
    finally:
        _restore(model, ops)


def test_pool_slots_hold_the_host_experts(engines):
    llm, _ = engines["mixtral"]
    model = llm.engine.core.runner.model
    ops = [block.op for _, block in moe_blocks(model)]
    off = ExpertOffload.install(model, 4, torch.device("cpu"), cost=FETCH, prefetch=True)
    try:
        _generate(llm)
        for (pos, e), slot in off.policy.slot_of.items():
            host = off.blocks[pos].experts
            assert torch.equal(off.pool.gate_up_proj[slot], host.gate_up_proj[e])
            assert torch.equal(off.pool.down_proj[slot], host.down_proj[e])
    finally:
        _restore(model, ops)


def test_metrics_export_routing_and_cache(engines):
    from tokenmill.server.metrics import ServerMetrics

    llm, _ = engines["olmoe"]
    model = llm.engine.core.runner.model
    ops = [block.op for _, block in moe_blocks(model)]
    ExpertOffload.install(model, 3, torch.device("cpu"), cost=HOST)
    try:
        _generate(llm)
        text = ServerMetrics(llm.engine.core.stats).render().decode()
        stats = pickle.loads(pickle.dumps(llm.engine.core.stats()))  # how the engine process sends them
        assert stats.moe.cache.hits + stats.moe.cache.misses > 0 and stats.moe.expert_counts
    finally:
        _restore(model, ops)
    assert 'tokenmill:moe_expert_tokens_total{expert="0",layer="0"}' in text
    for name in ("hit_rate", "capacity", "hits_total", "fetches_total", "host_tokens_total", "prefetches_total"):
        assert f"tokenmill:moe_expert_cache_{name}" in text, name


def test_cache_gb_refused_on_cpu(engines):
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_kwargs(device="cpu", moe_expert_cache_gb=1.0)
    assert e.value.param == "moe_expert_cache_gb"
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_kwargs(moe_expert_prefetch=True)
    assert e.value.param == "moe_expert_prefetch"
    with pytest.raises(ConfigError) as e:
        EngineConfig.from_kwargs(device="cuda", moe_expert_cache_gb=0.0)
    assert e.value.param == "moe_expert_cache_gb"
    model = engines["mixtral"][0].engine.core.runner.model
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        install_expert_offload(model, 1.0, False, torch.device("cpu"))


def test_packed_gguf_experts_offloaded(tmp_path, gguf_tokenizer_path):
    """Q8_0 experts kept packed: the pool is packed too (uint8 slots run by the C kernel), tokens unchanged."""
    import gguf

    from tokenmill.ops.cpu.qlinear import available

    if not available():
        pytest.skip("the packed CPU kernels do not build here")
    hf = build_tiny_model("mixtral")
    fake_quantize_(hf, "mlp.experts.", gguf.GGMLQuantizationType.Q8_0)
    qtypes = {f"blk.{i}.ffn_{p}_exps.weight": gguf.GGMLQuantizationType.Q8_0
              for i in range(hf.config.num_hidden_layers) for p in ("gate", "up", "down")}
    path = save_tiny_gguf(hf, str(tmp_path / "mixtral.gguf"), qtypes=qtypes)
    llm = LLM(path, tokenizer=gguf_tokenizer_path, enable_prefix_caching=False, gemm_dtype="float32")
    model = llm.engine.core.runner.model
    want = _generate(llm)
    off = ExpertOffload.install(model, 5, torch.device("cpu"), cost=FETCH, prefetch=True)
    assert isinstance(off.pool, PackedExperts) and off.pool.gate_up_proj.dtype == torch.uint8
    got = _generate(llm)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert off.stats.fetches > 0


def test_recorded_trace_replays_to_the_same_decisions(engines):
    """The mechanism does exactly what the policy says: the routing counts and predictions it passed, recorded
    from a live run and replayed into a fresh torch-free policy, give the same plans and counters."""
    from tokenmill.core.expert_cache import ExpertCachePolicy

    llm, _ = engines["olmoe"]
    model = llm.engine.core.runner.model
    ops = [block.op for _, block in moe_blocks(model)]
    off = ExpertOffload.install(model, 6, torch.device("cpu"), cost=FETCH, prefetch=True)
    trace, plans = [], []
    plan_layer, plan_prefetch = off.policy.plan_layer, off.policy.plan_prefetch

    def rec_layer(layer, counts):
        trace.append(("layer", layer, list(counts)))
        plans.append(plan_layer(layer, counts))
        return plans[-1]

    def rec_prefetch(layer, predicted, protect_layer=None):
        trace.append(("prefetch", layer, list(predicted), protect_layer))
        plans.append(plan_prefetch(layer, predicted, protect_layer=protect_layer))
        return plans[-1]

    off.policy.plan_layer, off.policy.plan_prefetch = rec_layer, rec_prefetch
    try:
        _generate(llm)
    finally:
        _restore(model, ops)
    assert any(kind == "prefetch" for kind, *_ in trace)
    fresh = ExpertCachePolicy(len(off.blocks), off.num_experts, 6, FETCH)
    fresh.warm([(p, e) for p in range(len(off.blocks)) for e in range(off.num_experts)])
    for (kind, layer, *args), want in zip(trace, plans):
        got = fresh.plan_layer(layer, args[0]) if kind == "layer" else fresh.plan_prefetch(layer, args[0],
                                                                                          protect_layer=args[1])
        assert got == want
    assert fresh.stats == off.stats
