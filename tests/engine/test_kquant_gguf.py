"""SmolLM2 re-quantized to Q4_K_M by llama.cpp's `llama-quantize` (made here, never downloaded): loaded with every
matrix kept packed (its mix of Q4_K / Q6_K rows where rows are multiples of 256, llama.cpp's Q5_0 / Q8_0 fallbacks
for SmolLM2's 576-wide rows, merged q|k|v of mixed types), the weights' memory no more than the file's; greedy
tokens equal the same file dequantized to float32 at load (quantization none), one request and a batch.

Needs the `llama-quantize` binary: on PATH, or built by ../shared/bench/cpu_peers/setup.sh's cmake steps
(target llama-quantize) under $PEERS_DIR or /tmp/peers; skipped otherwise. The Q4_K_M file is cached in
~/.cache/tokenmill/test-models/."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import torch

from tests.conftest import smollm2_gguf_path
from tests.exact import exact_llm
from tokenmill import SamplingParams
from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.cpu.qlinear import available

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason=f"qlinear kernel not built: {build_error('qlinear')}")]

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
             "Explain photosynthesis in one sentence."]


def find_llama_quantize() -> Optional[str]:
    """The llama-quantize binary: PATH, then the CPU peer bench's llama.cpp build dirs."""
    found = shutil.which("llama-quantize")
    if found:
        return found
    for base in (os.environ.get("PEERS_DIR"), "/tmp/peers", "/work/llama.cpp-build"):
        if base:
            cand = Path(base) / "lcpp-build" / "bin" / "llama-quantize"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return None


def smollm2_q4_k_m() -> str:
    """SmolLM2-135M-Instruct re-quantized Q4_1 -> Q4_K_M (made once, cached)."""
    out = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenmill" / "test-models"
    path = out / "SmolLM2-135M-Instruct.Q4_K_M.gguf"
    if path.exists():
        return str(path)
    tool = find_llama_quantize()
    if tool is None:
        pytest.skip("llama-quantize not found (build llama.cpp's llama-quantize target, see the module docstring)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    res = subprocess.run([tool, "--allow-requantize", smollm2_gguf_path(), str(tmp), "Q4_K_M", "2"],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        pytest.fail(f"llama-quantize failed: {res.stderr[-2000:]}")
    os.replace(tmp, path)
    return str(path)


@pytest.fixture(scope="module")
def q4km() -> str:
    return smollm2_q4_k_m()


def _run(path: str, quantization: str):
    # float32 GEMMs and K/V (tests/exact.py): packed and dequantized weights then differ by summation order only
    llm = exact_llm(path, max_model_len=1024, quantization=quantization, enable_prefix_caching=False,
                    gemm_dtype="float32")
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    one = [llm.chat(m, params, use_tqdm=False)[0].outputs[0].token_ids for m in msgs[:2]]  # 1 row per step
    many = [o.outputs[0].token_ids for o in llm.chat(msgs, params, use_tqdm=False)]  # 4 rows per decode step
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0
    return llm, one, many


def test_file_has_k_quants(q4km):
    from gguf import GGUFReader

    kinds = {t.tensor_type.name for t in GGUFReader(q4km).tensors}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds  # ffn_down (1536-wide rows) in Q4_K / Q6_K


def test_q4_k_m_packed_equals_dequantized_greedy(q4km):
    from tokenmill.model.layers.linear import Linear
    from tokenmill.model.layers.quantized import MixedQuantizedLinear, QuantizedEmbedding, QuantizedLinear

    llm, one_q, many_q = _run(q4km, "auto")
    model = llm.engine.core.runner.model
    assert not [name for name, m in model.named_modules() if isinstance(m, Linear)]  # no float matrix left
    qtypes = {m.qtype for m in model.modules() if type(m) is QuantizedLinear}
    assert {"q4_k", "q6_k"} <= qtypes, qtypes
    assert any(type(m) is MixedQuantizedLinear for m in model.modules())  # Q5_0 q/k + Q8_0 v layers
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    from tokenmill.ops.cpu.layer import FusedCpuLayer, _lib

    if _lib() is not None:  # every layer runs in C, the mixed q|k|v ones included
        assert all(isinstance(layer.fast_path, FusedCpuLayer) for layer in model.model.layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights <= os.path.getsize(q4km)  # the parameters are the file's blocks (and its float32 norms)
    del llm
    _, one_f, many_f = _run(q4km, "none")
    assert one_q == one_f
    assert many_q == many_f
