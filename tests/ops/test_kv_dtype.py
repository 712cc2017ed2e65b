"""kv_cache_dtype resolution (kv_quant.resolve_kv_cache_dtype): auto = bfloat16 on the CPU for a float32 model
when the attention kernel reads bf16 K/V in place, else the model dtype (always on CUDA); explicit settings mean
themselves; bad settings are ConfigErrors. And the kernel probe it is fed with (reads_kv_in_place)."""
from __future__ import annotations

import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.errors import ConfigError
from tokenmill.ops.attention.kv_quant import (KV_CACHE_DTYPES, PLAIN_KV_DTYPES, plain_kv_dtype,
                                             resolve_kv_cache_dtype)
from tokenmill.ops.cpu.attention import cpu_attention_available, reads_kv_in_place

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def test_auto_is_bfloat16_on_a_cpu_whose_kernel_reads_it_in_place():
    assert resolve_kv_cache_dtype("auto", F32, "cpu", True) == "bfloat16"


def test_auto_keeps_float32_without_the_kernel_or_in_place_bf16():
    assert resolve_kv_cache_dtype("auto", F32, "cpu", False) == "float32"


def test_auto_on_cuda_is_the_model_dtype():
    assert resolve_kv_cache_dtype("auto", BF16, "cuda", False) == "bfloat16"
    assert resolve_kv_cache_dtype("auto", F32, "cuda", True) == "float32"  # the CPU kernel does not matter there
    assert resolve_kv_cache_dtype("auto", F16, "cuda", False) == "float16"


def test_auto_keeps_a_half_precision_cpu_model_dtype():
    assert resolve_kv_cache_dtype("auto", BF16, "cpu", True) == "bfloat16"
    assert resolve_kv_cache_dtype("auto", F16, "cpu", True) == "float16"  # not rounded again to bf16
    assert resolve_kv_cache_dtype("auto", F16, "cpu", False) == "float16"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("model_dtype", [F32, BF16, F16])
@pytest.mark.parametrize("in_place", [True, False])
def test_explicit_settings_mean_themselves(device, model_dtype, in_place):
    for kind in ("float32", "bfloat16", "int8", "fp8"):
        assert resolve_kv_cache_dtype(kind, model_dtype, device, in_place) == kind


def test_bad_settings_are_config_errors():
    for bad in ("float16", "fp16", "bf16", "", "AUTO"):
        with pytest.raises(ConfigError, match="kv_cache_dtype"):
            resolve_kv_cache_dtype(bad, F32, "cpu", True)
        with pytest.raises(ConfigError, match="kv_cache_dtype"):
            EngineConfig.from_kwargs(kv_cache_dtype=bad)
    with pytest.raises(ConfigError):
        plain_kv_dtype("int8")
    with pytest.raises(ConfigError):
        plain_kv_dtype("auto")


def test_settings_agree_with_the_config_choices():
    from dataclasses import fields

    from tokenmill.config import CacheConfig

    choices = next(f for f in fields(CacheConfig) if f.name == "kv_cache_dtype").metadata["choices"]
    assert tuple(choices) == KV_CACHE_DTYPES
    for kind in KV_CACHE_DTYPES:
        EngineConfig.from_kwargs(kv_cache_dtype=kind)
    assert {plain_kv_dtype(n) for n in PLAIN_KV_DTYPES} == {F32, BF16, F16}


def test_kernel_probe():
    if not cpu_attention_available():
        assert not reads_kv_in_place(F32, 64) and not reads_kv_in_place(BF16, 64)
        return
    assert reads_kv_in_place(F32, 64) and reads_kv_in_place(F32, 24)  # float32 is always read in place
    # int8 / fp8 (QuantizedKVCache data) in place where bfloat16 is: dequantized in registers
    assert reads_kv_in_place(torch.int8, 64) == reads_kv_in_place(torch.float8_e4m3fn, 64) == _cpu_has_avx512bw()
    assert not reads_kv_in_place(torch.int8, 24)
    assert not reads_kv_in_place(F16, 64)  # converted into scratch, when readable at all
    # bfloat16 in place: the AVX-512 kernels, head_dim % 16 == 0
    assert not reads_kv_in_place(BF16, 24)
    assert reads_kv_in_place(BF16, 64) == reads_kv_in_place(BF16, 16) == _cpu_has_avx512bw()


def _cpu_has_avx512bw() -> bool:
    """What -march=native gives the kernel its AVX-512 path with (Linux x86; False elsewhere)."""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512f" in flags and "avx512bw" in flags
