"""Profile-based KV-cache sizing: how many blocks fit after weights, activations and runtime overhead.

Pure-Python core: `plan_kv_cache(...)` takes numbers (a real or simulated device) and returns a
`MemoryPlan`, or raises `ConfigError` naming the setting to change. The thin torch part,
`measure_device_memory(device, profile_fn)`, measures a CUDA device after the weights are loaded:
weights = bytes allocated before profiling, activations = peak of a profiling forward at
max_num_batched_tokens minus the weights, other = memory in use that torch did not allocate
(CUDA context, cuBLAS workspaces).

    budget   = total * gpu_memory_utilization
    kv bytes = budget - weights - peak activations - other - cuda graphs
    blocks   = kv bytes // (block_size * per-token KV bytes)
    per-token KV bytes = layers * 2 (K and V) * kv_heads * head_dim * dtype bytes
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from tokenmill.errors import ConfigError

GiB = 1 << 30

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2,
                "fp8": 1, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name (float32, bfloat16, float16, fp8, int8, torch.bfloat16...)."""
    key = str(name).removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {name!r} for memory planning")
    return _DTYPE_BYTES[key]


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype_bytes: int) -> int:
    """K and V of one token across all layers."""
    return num_layers * 2 * num_kv_heads * head_dim * kv_dtype_bytes


@dataclass(frozen=True)
class DeviceMemory:
    """What the planner needs to know about a device (measured, or simulated in tests)."""

    total_bytes: int
    weights_bytes: int
    peak_activation_bytes: int
    other_bytes: int = 0  # not allocated by torch: CUDA context, library workspaces
    name: str = "device"


@dataclass(frozen=True)
class MemoryPlan:
    device: DeviceMemory
    gpu_memory_utilization: float
    cuda_graph_bytes: int
    kv_cache_bytes: int  # num_blocks * bytes_per_block (what gets allocated)
    num_blocks: int
    block_size: int
    bytes_per_token: int
    max_model_len: int

    @property
    def budget_bytes(self) -> int:
        return int(self.device.total_bytes * self.gpu_memory_utilization)

    @property
    def max_concurrent_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def blocks_per_full_request(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def max_concurrent_requests(self) -> int:
        """Requests of max_model_len tokens that fit at once."""
        return self.num_blocks // self.blocks_per_full_request

    def table(self) -> str:
        """A short human-readable table of the plan."""
        d = self.device
        rows = [
            f"memory plan for {d.name}: {d.total_bytes / GiB:.2f} GiB total x gpu_memory_utilization "
            f"{self.gpu_memory_utilization:.2f} = {self.budget_bytes / GiB:.2f} GiB",
            f"  {'weights':<24}{d.weights_bytes / GiB:>10.2f} GiB",
            f"  {'activations (peak)':<24}{d.peak_activation_bytes / GiB:>10.2f} GiB",
            f"  {'other (non-torch)':<24}{d.other_bytes / GiB:>10.2f} GiB",
            f"  {'cuda graphs':<24}{self.cuda_graph_bytes / GiB:>10.2f} GiB",
            f"  {'KV cache':<24}{self.kv_cache_bytes / GiB:>10.2f} GiB  = {self.num_blocks:,} blocks x "
            f"{self.block_size} tokens x {self.bytes_per_token / 1024:.1f} KiB/token",
            f"  {'max tokens in cache':<24}{self.max_concurrent_tokens:>10,}",
            f"  {f'max requests @ {self.max_model_len}':<24}{self.max_concurrent_requests:>10,}",
        ]
        return "\n".join(rows)


def plan_kv_cache(device: DeviceMemory, gpu_memory_utilization: float, bytes_per_token: int, block_size: int,
                  max_model_len: int, cuda_graph_bytes: int = 0,
                  num_kv_blocks: Optional[int] = None) -> MemoryPlan:
    """Size the KV cache; raise ConfigError (naming the setting to change) when the config cannot fit.

    num_kv_blocks: a user override; it is checked against the room left, not recomputed.
    """
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}",
                          param="gpu_memory_utilization")
    if bytes_per_token <= 0 or block_size <= 0 or max_model_len <= 0:
        raise ConfigError("bytes_per_token, block_size and max_model_len must be positive")
    total = device.total_bytes
    budget = int(total * gpu_memory_utilization)
    fixed = device.weights_bytes + device.other_bytes + cuda_graph_bytes
    g = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    bytes_per_block = bytes_per_token * block_size
    need_blocks = -(-max_model_len // block_size)
    room = budget - fixed - device.peak_activation_bytes
    if fixed >= budget:
        need = fixed + device.peak_activation_bytes + need_blocks * bytes_per_block
        if need <= total:
            raise ConfigError(
                f"the weights and runtime ({g(fixed)}) do not fit in gpu_memory_utilization "
                f"{gpu_memory_utilization:.2f} x {g(total)}: raise gpu_memory_utilization to at least "
                f"{min(1.0, -(-need * 100 // total) / 100):.2f}", param="gpu_memory_utilization")
        raise ConfigError(f"the weights and runtime ({g(fixed)}) leave no room on the device ({g(total)}): "
                          f"choose a smaller dtype (or a quantized model)", param="dtype")
    if room < need_blocks * bytes_per_block:
        fit_tokens = max(room, 0) // bytes_per_block * block_size
        if device.peak_activation_bytes > max(room, 0):
            raise ConfigError(
                f"peak activations ({g(device.peak_activation_bytes)}) leave {g(max(room, 0))} for the KV "
                f"cache, less than one max_model_len={max_model_len} sequence needs: lower "
                f"max_num_batched_tokens (or raise gpu_memory_utilization)", param="max_num_batched_tokens")
        raise ConfigError(
            f"the KV cache has room for {fit_tokens} tokens ({g(max(room, 0))}) but max_model_len is "
            f"{max_model_len}: lower max_model_len to at most {fit_tokens} (or raise gpu_memory_utilization, "
            f"or use kv_cache_dtype fp8)", param="max_model_len")
    if num_kv_blocks is not None:
        if num_kv_blocks * bytes_per_block > room:
            raise ConfigError(f"num_kv_blocks={num_kv_blocks} needs {g(num_kv_blocks * bytes_per_block)} but "
                              f"only {g(room)} is left: lower num_kv_blocks to at most {room // bytes_per_block}",
                              param="num_kv_blocks")
        if num_kv_blocks < need_blocks:
            raise ConfigError(f"num_kv_blocks={num_kv_blocks} cannot hold one max_model_len={max_model_len} "
                              f"sequence ({need_blocks} blocks): raise num_kv_blocks or lower max_model_len",
                              param="num_kv_blocks")
        num_blocks = num_kv_blocks
    else:
        num_blocks = room // bytes_per_block
    return MemoryPlan(device=device, gpu_memory_utilization=gpu_memory_utilization,
                      cuda_graph_bytes=cuda_graph_bytes, kv_cache_bytes=num_blocks * bytes_per_block,
                      num_blocks=num_blocks, block_size=block_size, bytes_per_token=bytes_per_token,
                      max_model_len=max_model_len)


def measure_device_memory(device, profile_fn: Callable[[], object]) -> DeviceMemory:
    """Measure a CUDA device whose model weights are loaded; profile_fn runs one forward at the step's
    largest token count (max_num_batched_tokens) without a KV cache of real size."""
    import torch

    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    profile_fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    free, total = torch.cuda.mem_get_info(dev)
    other = max(0, (total - free) - torch.cuda.memory_reserved(dev))
    torch.cuda.empty_cache()
    return DeviceMemory(total_bytes=total, weights_bytes=weights, peak_activation_bytes=max(0, peak - weights),
                        other_bytes=other, name=torch.cuda.get_device_name(dev))
