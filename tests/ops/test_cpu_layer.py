"""The fused CPU decoder layer (tokenmill/ops/cpu/layer.py, csrc/layer.c) against the per-op path it replaces,
on the bundled SmolLM2 Q4_1 GGUF: hidden states of mixed batches (decodes + a short prefill chunk) within
float tolerance, greedy tokens identical, every KV block back in the pool, and the per-op path taken for
steps the kernel does not take (too many tokens, a KV cache neither float32 nor bfloat16). A bfloat16 KV
cache (`kv_cache_dtype="bfloat16"`) gives the same tokens fused and per-op, and logprobs close to float32 KV."""
from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.cpu.layer import FusedCpuLayer, _lib, fuse_cpu_layers, unfuse_cpu_layers
from tokenmill.worker.forward_batch import build_forward_batch

pytestmark = pytest.mark.skipif(_lib() is None, reason=f"layer kernel not built: {build_error('layer')}")

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def llm() -> LLM:
    # float32 GEMMs: the fused and per-op paths then round nothing to bf16 and agree to float tolerance
    return LLM(max_model_len=512, enable_prefix_caching=False, num_kv_blocks=64, gemm_dtype="float32")


def _layers(llm: LLM):
    return llm.engine.core.runner.model.model.layers


def test_installed_on_every_layer(llm):
    assert all(isinstance(layer.fast_path, FusedCpuLayer) for layer in _layers(llm))


def _forward(llm: LLM, fused: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward of a mixed batch (two decodes over a cached context, one 5-token prefill chunk) on fresh
    caches filled with the same random context."""
    runner = llm.engine.core.runner
    model = runner.model
    if fused:
        fuse_cpu_layers(model)
    else:
        unfuse_cpu_layers(model)
    torch.manual_seed(0)
    cfg = model.config
    hkv, d, bs = model.num_kv_heads, model.head_dim, 16
    caches = [torch.randn(2, 8, bs, hkv, d) for _ in range(cfg.num_hidden_layers)]
    batch = build_forward_batch([[11], [12], [13, 14, 15, 16, 17]], [20, 33, 3],
                                [[0, 1], [2, 3, 4], [5]], bs)
    with torch.inference_mode():
        h = model(batch.input_ids, batch.positions, caches, batch)
    return h, caches


def test_fused_equals_per_op_forward(llm, monkeypatch):
    ref, ref_caches = _forward(llm, fused=False)
    taken = []
    real_call = FusedCpuLayer.__call__
    monkeypatch.setattr(FusedCpuLayer, "__call__", lambda self, *a: taken.append(real_call(self, *a)) or taken[-1])
    out, caches = _forward(llm, fused=True)
    assert len(taken) == len(_layers(llm)) and all(x is not None for x in taken)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(caches, ref_caches):  # K (rotated) and V written at the same slots
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
MSGS = [[{"role": "user", "content": q}] for q in QUESTIONS]


def _greedy_fused_and_per_op(llm: LLM) -> tuple[list, list]:
    model = llm.engine.core.runner.model
    fused = [o.outputs[0].token_ids for o in llm.chat(MSGS, GREEDY, use_tqdm=False)]
    unfuse_cpu_layers(model)
    try:
        ref = [o.outputs[0].token_ids for o in llm.chat(MSGS, GREEDY, use_tqdm=False)]
    finally:
        fuse_cpu_layers(model)
    return fused, ref


def test_greedy_tokens_fused_vs_per_op(llm):
    fused, ref = _greedy_fused_and_per_op(llm)
    assert fused == ref
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0


def test_declines_what_it_cannot_take(llm):
    layer = _layers(llm)[0]
    fp = layer.fast_path
    t = fp.max_tokens + 1
    h = torch.randn(t, fp.hidden)
    cos = torch.ones(t, fp.head_dim)
    batch = build_forward_batch([list(range(t))], [0], [[0] * ((t + 15) // 16)], 16)
    cache = torch.zeros(2, 8, 16, fp.num_kv_heads, fp.head_dim)
    assert fp(h, None, cos, cos, cache, batch) is None  # more tokens than one call takes (float32 GEMMs: no halves)
    h1 = torch.randn(1, fp.hidden)
    one = build_forward_batch([[1]], [0], [[0]], 16)
    assert fp(h1, None, cos[:1], cos[:1], cache.to(torch.float16), one) is None  # neither float32 nor bfloat16
    assert fp(h1, None, cos[:1], cos[:1], cache, one) is not None


def _set_amx_rows(model, rows: int) -> None:
    from tokenmill.model.layers.quantized import QuantizedLinear

    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.amx_min_rows = rows
    for layer in model.model.layers:
        if layer.fast_path is not None:
            layer.fast_path.amx_min_rows = rows


@pytest.mark.parametrize("extra", [8, 600])  # 600: the post-attention half runs two 512-row blocks
def test_long_step_halves_equal_per_op(llm, monkeypatch, extra):
    """Steps over the single-call cap run the two C halves around the backend's attention (the AMX mode). With
    the AMX threshold out of reach every linear stays float32, so the halves must match the per-op path."""
    model = llm.engine.core.runner.model
    backend = _layers(llm)[0].self_attn.attn.backend
    fp = _layers(llm)[0].fast_path
    n = fp.max_tokens + extra  # a prefill chunk past the single-call cap, beside two decodes
    old_dtype = backend.prefill_dtype
    backend.prefill_dtype = None  # float32 attention on both paths
    halves = []
    real_split = FusedCpuLayer._split
    monkeypatch.setattr(FusedCpuLayer, "_split", lambda self, *a: halves.append(1) or real_split(self, *a))
    try:
        def forward(fused: bool):
            (fuse_cpu_layers if fused else unfuse_cpu_layers)(model)
            _set_amx_rows(model, 1 << 30)
            torch.manual_seed(0)
            caches = [torch.randn(2, 64, 16, model.num_kv_heads, model.head_dim)
                      for _ in range(model.config.num_hidden_layers)]
            batch = build_forward_batch([[11], [12], list(range(100, 100 + n))], [20, 33, 5],
                                        [[0, 1], [2, 3, 4], list(range(5, 5 + (n + 5 + 15) // 16))], 16)
            with torch.inference_mode():
                return model(batch.input_ids, batch.positions, caches, batch), caches

        ref, ref_caches = forward(False)
        out, caches = forward(True)
        assert len(halves) == len(_layers(llm))  # every layer ran the halves
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # 30 layers of float32 summed in other orders
        for a, b in zip(caches, ref_caches):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    finally:
        backend.prefill_dtype = old_dtype
        fuse_cpu_layers(model)
        _set_amx_rows(model, 0)


def test_bf16_kv_cache_fused_vs_per_op_and_close_to_float32():
    """kv_cache_dtype="bfloat16": the C layer stores K/V rounded to bf16 (nearest even, as torch's .to does) and
    its attention reads them; the per-op path (torch write, same kernel read) gives the same greedy tokens, and
    the logprobs of the float32-cache run's tokens move by bf16 rounding only. Half the bytes: twice the blocks."""
    bf = LLM(max_model_len=512, enable_prefix_caching=False, gemm_dtype="float32", kv_cache_dtype="bfloat16",
             kv_cache_memory=0.05)
    f32 = LLM(max_model_len=512, enable_prefix_caching=False, gemm_dtype="float32", kv_cache_dtype="float32",
              kv_cache_memory=0.05)
    assert bf.engine.core.runner.kv_caches[0].dtype == torch.bfloat16
    assert f32.engine.core.runner.kv_caches[0].dtype == torch.float32
    assert abs(bf.engine.core.runner.num_blocks - 2 * f32.engine.core.runner.num_blocks) <= 1  # floor of the budget
    assert all(isinstance(layer.fast_path, FusedCpuLayer) for layer in _layers(bf))
    fused, ref = _greedy_fused_and_per_op(bf)
    assert fused == ref
    # the float32-cache run's greedy tokens, scored with the bf16 cache: same argmax-level quality
    tok = f32.get_tokenizer()
    want = [o.outputs[0].token_ids for o in f32.chat(MSGS, GREEDY, use_tqdm=False)]
    prompts = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                          add_special_tokens=False) for m in MSGS]
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    for p, w in zip(prompts, want):
        a = f32.generate([list(p) + w], score, use_tqdm=False)[0].prompt_logprobs[len(p):]
        b = bf.generate([list(p) + w], score, use_tqdm=False)[0].prompt_logprobs[len(p):]
        diffs = [abs(x.logprob - y.logprob) for x, y in zip(a, b)]
        assert max(diffs) < 0.15 and sum(diffs) / len(diffs) < 0.03, diffs
    assert bf.engine.core.scheduler.kv.num_used_blocks == 0


def test_glu_epilogue_equals_plain_panels():
    """gemm auto on an AMX CPU: the gate|up tiles pair each 16 gates with their ups and the fused layer writes
    silu(gate) * up from the accumulators (no g|u pass). Bit for bit what the plain tiles + silu pass give, for a
    one-call step (64 decodes) and a long step in halves (a 600-token chunk beside them)."""
    from tokenmill.ops.cpu.qlinear import amx_available

    if not amx_available():
        pytest.skip("no AMX (bf16 tiles) on this CPU")
    llm = LLM(max_model_len=1024, enable_prefix_caching=False, num_kv_blocks=160)
    model = llm.engine.core.runner.model
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(m.gate_up_proj.qpanels is not None and m.gate_up_proj.qpanels.glu == m.down_proj.in_features
               for m in mlps)

    def forward(n_prefill: int) -> torch.Tensor:
        torch.manual_seed(0)
        caches = [torch.randn(2, 320, 16, model.num_kv_heads, model.head_dim).bfloat16()
                  for _ in range(model.config.num_hidden_layers)]
        seqs = [[7 + i] for i in range(64)] + ([list(range(100, 100 + n_prefill))] if n_prefill else [])
        ctx = [20 + i // 2 for i in range(64)] + ([0] * bool(n_prefill))  # 21-52 tokens: 4 blocks each
        tables = [list(range(4 * i, 4 * i + 4)) for i in range(64)] + (
            [list(range(256, 256 + (n_prefill + 15) // 16))] if n_prefill else [])
        batch = build_forward_batch(seqs, ctx, tables, 16)
        with torch.inference_mode():
            return model(batch.input_ids, batch.positions, caches, batch)

    paired = [forward(0), forward(600)]
    for m in mlps:
        m.gate_up_proj.pack_amx()  # the plain tiles
    fuse_cpu_layers(model)
    assert all(m.gate_up_proj.qpanels.glu == 0 for m in mlps)
    plain = [forward(0), forward(600)]
    for a, b in zip(paired, plain):
        assert torch.equal(a, b)
