"""Memory planner on simulated devices (CPU), plus the real measurement on CUDA (skipped without)."""
from __future__ import annotations

import pytest

from tokenmill.errors import ConfigError
from tokenmill.worker.memory_planner import (
    GiB,
    DeviceMemory,
    dtype_bytes,
    kv_bytes_per_token,
    measure_device_memory,
    plan_kv_cache,
)

LLAMA3_8B_KV = kv_bytes_per_token(32, 8, 128, dtype_bytes("bfloat16"))  # 128 KiB per token
H100 = dict(total_bytes=80 * 10**9, name="simulated H100")


def test_bytes_per_token():
    assert LLAMA3_8B_KV == 131072
    assert kv_bytes_per_token(30, 3, 64, dtype_bytes("float32")) == 30 * 2 * 3 * 64 * 4  # SmolLM2-135M
    assert dtype_bytes("torch.float16") == 2 and dtype_bytes("fp8") == 1
    with pytest.raises(ConfigError):
        dtype_bytes("float12")


def test_llama3_8b_on_h100():
    dev = DeviceMemory(weights_bytes=16_060_000_000, peak_activation_bytes=2 * 10**9, other_bytes=500_000_000, **H100)
    plan = plan_kv_cache(dev, 0.9, LLAMA3_8B_KV, block_size=16, max_model_len=8192, cuda_graph_bytes=300_000_000)
    room = 72 * 10**9 - 16_060_000_000 - 2 * 10**9 - 500_000_000 - 300_000_000
    assert plan.num_blocks == room // (16 * 131072) == 25_339
    assert plan.kv_cache_bytes == plan.num_blocks * 16 * 131072
    assert plan.max_concurrent_tokens == 405_424
    assert plan.max_concurrent_requests == 49  # 25_339 // 512 blocks per 8192-token request
    table = plan.table()
    assert "simulated H100" in table and "25,339 blocks" in table and "max requests @ 8192" in table
    assert len(table.splitlines()) == 8


def test_user_block_override_is_checked():
    dev = DeviceMemory(weights_bytes=16 * 10**9, peak_activation_bytes=10**9, **H100)
    assert plan_kv_cache(dev, 0.9, LLAMA3_8B_KV, 16, 8192, num_kv_blocks=1000).num_blocks == 1000
    with pytest.raises(ConfigError, match="num_kv_blocks") as e:
        plan_kv_cache(dev, 0.9, LLAMA3_8B_KV, 16, 8192, num_kv_blocks=10**6)
    assert e.value.param == "num_kv_blocks"
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        plan_kv_cache(dev, 0.9, LLAMA3_8B_KV, 16, 8192, num_kv_blocks=100)  # < 512 blocks of one request


@pytest.mark.parametrize("weights,act,util,max_len,param", [
    (60 * 10**9, 10**9, 0.7, 8192, "gpu_memory_utilization"),  # weights fit the device, not the budget
    (90 * 10**9, 10**9, 0.9, 8192, "dtype"),  # weights larger than the device
    (16 * 10**9, 60 * 10**9, 0.9, 32768, "max_num_batched_tokens"),  # activations eat the KV room
    (16 * 10**9, 10**9, 0.9, 10**6, "max_model_len"),  # one sequence does not fit
])
def test_configs_that_cannot_fit_name_the_setting(weights, act, util, max_len, param):
    dev = DeviceMemory(weights_bytes=weights, peak_activation_bytes=act, **H100)
    with pytest.raises(ConfigError) as e:
        plan_kv_cache(dev, util, LLAMA3_8B_KV, 16, max_len)
    assert e.value.param == param
    assert param in str(e.value) and "\n" not in str(e.value)


def test_suggestions_are_actionable():
    dev = DeviceMemory(weights_bytes=60 * 10**9, peak_activation_bytes=10**9, **H100)
    with pytest.raises(ConfigError) as e:
        plan_kv_cache(dev, 0.7, LLAMA3_8B_KV, 16, 8192)
    util = float(str(e.value).rsplit(" ", 1)[-1])
    plan = plan_kv_cache(dev, util, LLAMA3_8B_KV, 16, 8192)  # the suggested value works
    assert plan.max_concurrent_requests >= 1
    dev = DeviceMemory(weights_bytes=16 * 10**9, peak_activation_bytes=10**9, **H100)
    with pytest.raises(ConfigError) as e:
        plan_kv_cache(dev, 0.9, LLAMA3_8B_KV, 16, 10**6)
    fit = int(str(e.value).split("at most ")[1].split(" ")[0])
    assert plan_kv_cache(dev, 0.9, LLAMA3_8B_KV, 16, fit).max_concurrent_requests == 1
    with pytest.raises(ConfigError):
        plan_kv_cache(dev, 0.9, LLAMA3_8B_KV, 16, fit + 1)


def test_invalid_utilization():
    dev = DeviceMemory(weights_bytes=1, peak_activation_bytes=1, **H100)
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        plan_kv_cache(dev, 1.5, LLAMA3_8B_KV, 16, 8192)


@pytest.mark.gpu
def test_measure_device_memory_on_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    weights = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    act = 512 << 20

    def profile():
        tmp = torch.ones(act, dtype=torch.uint8, device="cuda")
        return int(tmp[0])

    dev = measure_device_memory("cuda", profile)
    assert dev.weights_bytes >= weights.numel()
    assert act <= dev.peak_activation_bytes < act + (64 << 20)
    assert dev.total_bytes > 8 * GiB and dev.other_bytes > 0  # the CUDA context lives outside torch
    plan = plan_kv_cache(dev, 0.9, LLAMA3_8B_KV, 16, 8192)
    assert plan.num_blocks > 0
    del weights
