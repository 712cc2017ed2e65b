"""Engines for the tests that compare tokens or logits with an exact oracle (transformers in float32, or another
float32 run such as dequantized GGUF weights) at tight tolerances: float32 K/V, whatever the CPU.

`kv_cache_dtype="auto"` (the default) stores a float32 model's K/V as bfloat16 on CPUs whose attention kernel
reads it in place (AVX-512): its rounding (2^-9 relative) flips near-tied argmaxes of the deliberately sharp
tiny random-weight models and moves logprobs past 1e-3. The default itself is tested against these float32 runs
(tests/engine/test_kv_bf16_default.py, tests/engine/test_kv_quant_engine.py).
"""
from __future__ import annotations

from typing import Any

EXACT_KV = {"kv_cache_dtype": "float32"}


def exact_llm(*args: Any, **kwargs: Any):
    """tokenmill.LLM with float32 K/V (kv_cache_dtype in kwargs wins)."""
    from tokenmill import LLM

    return LLM(*args, **{**EXACT_KV, **kwargs})
