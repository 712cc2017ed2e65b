"""A Hugging Face folder of bf16 / f16 weights under dtype bfloat16 on an AMX (or AVX512-BF16) CPU: the linears and embeddings keep
their 2-byte weights packed for the CPU kernels (qtypes bf16 / f16: AMX tiles made once, the fused C layer) and the
model computes in float32 between them (tokenmill.model.loader.cpu_packs_16bit).

The packed kernels are exact on those weights (gemm float32: equal to the float32 model of the same weights); the
engine's path (gemm auto: inputs rounded to bf16 on the tile unit) stays close to transformers in float32 on the
same bf16 weights: prompt logprobs and greedy continuations of the real SmolLM2."""
from __future__ import annotations

import pytest
import torch

from tests.model.tiny_models import build_tiny_model
from tokenmill.model.loader import cpu_packs_16bit, load_hf_config, load_model, resolve_model_source
from tokenmill.ops.cpu import qlinear as QL

needs_kernel = pytest.mark.skipif(not QL.available(), reason="qlinear kernel not built")
needs_panels = pytest.mark.skipif(not QL.panels_available("bf16"),
                                  reason="neither AMX nor AVX512-BF16 (bf16 tiles) on this CPU")


def _save(name: str, path: str, dtype: torch.dtype) -> str:
    build_tiny_model(name).to(dtype).save_pretrained(path)
    return path


def _sublayers(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every projection and the logits, attention left out (as tests/ops/test_qlinear.py's GGUF check)."""
    out = []
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        for layer in model.model.layers:
            qkv = layer.self_attn.qkv_proj(h)
            h = h + layer.self_attn.o_proj(qkv[:, : layer.self_attn.q_size])
            h = h + layer.mlp(h)
            out.append(qkv)
        out.append(model.compute_logits(h))
    return out


@needs_kernel
@pytest.mark.parametrize("name,dtype,qtype", [("smollm", torch.bfloat16, "bf16"), ("llama", torch.float16, "f16"),
                                              ("qwen2", torch.bfloat16, "bf16"), ("qwen3", torch.bfloat16, "bf16")])
def test_packed_16bit_equals_the_float32_model(name, dtype, qtype, tmp_path):
    """tied (embedding = LM head) and untied heads, q/k/v biases (qwen2), q/k norms (qwen3); bf16 and f16
    weights, exact kernels."""
    from tokenmill.model.layers.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedLMHead

    src = resolve_model_source(_save(name, str(tmp_path), dtype))
    cfg = load_hf_config(src)
    ref = load_model(src, cfg, torch.float32, "cpu", quantization="none")  # the 16-bit weights upcast exactly
    packed = load_model(src, cfg, torch.float32, "cpu", gemm_dtype="float32", packed_16bit=True)
    linears = [m for m in packed.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 4 * cfg.num_hidden_layers and all(m.qtype == qtype for m in linears)
    assert all(m.weight.dtype == torch.uint8 and m.weight.shape[1] == 2 * m.in_features for m in linears)
    assert isinstance(packed.model.embed_tokens, QuantizedEmbedding) and isinstance(packed.lm_head, QuantizedLMHead)
    assert all(p.dtype == torch.float32 for n, p in packed.named_parameters() if "norm" in n)
    ids = torch.tensor([1, 17, 300, 5, 42, 9, 400, 3])
    for got, want in zip(_sublayers(packed, ids), _sublayers(ref, ids)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    one = _sublayers(packed, ids[:1])[-1]  # one row: the register path of the kernel
    torch.testing.assert_close(one, _sublayers(ref, ids[:1])[-1], rtol=1e-5, atol=1e-4)


def test_which_requests_pack_16bit_weights(tmp_path):
    bf16 = resolve_model_source(_save("smollm", str(tmp_path / "bf16"), torch.bfloat16))
    f32 = resolve_model_source(_save("smollm", str(tmp_path / "f32"), torch.float32))
    amx = QL.panels_available("bf16") and QL.available()  # AMX, or AVX512-BF16 (tests/ops/test_qlinear_bf16.py)
    assert cpu_packs_16bit(bf16, torch.bfloat16, "cpu", "auto", "auto") == amx
    assert cpu_packs_16bit(bf16, torch.bfloat16, "cpu", "auto", "bfloat16") == amx
    assert not cpu_packs_16bit(bf16, torch.bfloat16, "cpu", "none", "auto")  # the per-op bfloat16 model
    assert not cpu_packs_16bit(bf16, torch.bfloat16, "cpu", "auto", "float32")  # exact GEMMs asked for
    assert not cpu_packs_16bit(bf16, torch.float32, "cpu", "auto", "auto")  # float32: the weights upcast
    assert not cpu_packs_16bit(bf16, torch.bfloat16, "cpu", "auto", "auto", load_format="dummy")
    assert not cpu_packs_16bit(f32, torch.bfloat16, "cpu", "auto", "auto")  # float32 tensors: not 16-bit
    assert not cpu_packs_16bit(resolve_model_source(None), torch.bfloat16, "cpu", "auto", "auto")  # a GGUF


@pytest.fixture(scope="module")
def smollm2_bf16(tmp_path_factory):
    """The real SmolLM2-135M (transformers' conversion of the bundled GGUF) saved as a bf16 folder, and
    transformers' float32 model of those bf16 weights (the oracle)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import hf_smollm2_oracle

    path = str(tmp_path_factory.mktemp("smollm2-bf16"))
    hf_smollm2_oracle().to(torch.bfloat16).save_pretrained(path)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@needs_panels
def test_bf16_folder_runs_fused_and_stays_close_to_transformers(smollm2_bf16, gguf_tokenizer_path, monkeypatch):
    from tokenmill import LLM, SamplingParams
    from tokenmill.ops.attention import backend
    from tokenmill.ops.cpu.attention import prefill_kernel_supports
    from tokenmill.ops.cpu.layer import FusedCpuLayer

    prefill_calls = []  # the prefill chunks (96 + 64 tokens) attend through the prefill kernel where it runs
    kernel = backend.cpu_prefill_attention
    monkeypatch.setattr(backend, "cpu_prefill_attention", lambda *a, **k: prefill_calls.append(1) or kernel(*a, **k))

    path, hf = smollm2_bf16
    llm = LLM(path, tokenizer=gguf_tokenizer_path, dtype="bfloat16", max_model_len=512, enable_prefix_caching=False,
              max_num_batched_tokens=96)  # the long prompt is chunked; decodes ride along
    runner = llm.engine.core.runner
    assert runner.dtype == torch.float32 and runner.kv_cache_dtype == "bfloat16"
    layers = runner.model.model.layers
    assert all(isinstance(layer.fast_path, FusedCpuLayer) for layer in layers)
    assert all(layer.self_attn.qkv_proj.qtype == "bf16" and layer.self_attn.qkv_proj.qpanels is not None
               for layer in layers)
    tok = llm.get_tokenizer()
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog near the river." for i in range(12))
    ids = tok.encode(text)[:160]
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=5),
                       use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
    diffs = [abs(lp.logprob - ref[i, ids[i + 1]].item()) for i, lp in enumerate(out.prompt_logprobs[1:])]
    assert len(diffs) == len(ids) - 1
    assert max(diffs) < 0.5 and sum(diffs) / len(diffs) < 0.05, (max(diffs), sum(diffs) / len(diffs))
    agree = sum(lp.top[0][0] == int(ref[i].argmax()) for i, lp in enumerate(out.prompt_logprobs[1:])) / len(diffs)
    assert agree > 0.95, agree
    assert len(prefill_calls) == (2 * len(layers) if prefill_kernel_supports(torch.bfloat16, 64) else 0)
    prompts = [tok.encode(p) for p in ("The capital of France is", "Once upon a time, in a small village,",
                                        "def fibonacci(n):")]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0
    same = 0
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
        got = o.outputs[0].token_ids
        assert got[0] == want[0]
        same += next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(got))
    assert same >= 0.75 * 16 * len(prompts), same


@needs_kernel
def test_gguf_f16_and_bf16_tensors_stay_packed(tmp_path):
    """A GGUF's F16 / BF16 linears and embedding (llama.cpp's converter writes F16 by default) stay in their 2-byte
    form under quantization auto, as the block types do; the exact kernels equal the dequantized model."""
    import gguf

    from tests.model.tiny_models import save_tiny_gguf
    from tokenmill.model.layers.quantized import QuantizedEmbedding, QuantizedLinear

    G = gguf.GGMLQuantizationType
    qtypes = {"token_embd.weight": G.F16,
              **{f"blk.{i}.{t}.weight": G.F16 for i in range(2) for t in ("attn_q", "attn_k", "attn_v", "attn_output")},
              **{f"blk.{i}.{t}.weight": G.BF16 for i in range(2) for t in ("ffn_gate", "ffn_up", "ffn_down")}}
    src = resolve_model_source(save_tiny_gguf(build_tiny_model("smollm"), str(tmp_path / "h.gguf"), qtypes=qtypes))
    cfg = load_hf_config(src)
    none = load_model(src, cfg, torch.float32, "cpu", quantization="none")
    auto = load_model(src, cfg, torch.float32, "cpu", quantization="auto", gemm_dtype="float32")
    layer = auto.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear) and layer.self_attn.qkv_proj.qtype == "f16"
    assert isinstance(layer.mlp.gate_up_proj, QuantizedLinear) and layer.mlp.gate_up_proj.qtype == "bf16"
    assert isinstance(auto.model.embed_tokens, QuantizedEmbedding) and auto.model.embed_tokens.qtype == "f16"
    ids = torch.tensor([1, 17, 300, 5, 42, 9, 400, 3])
    for got, want in zip(_sublayers(auto, ids), _sublayers(none, ids)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
