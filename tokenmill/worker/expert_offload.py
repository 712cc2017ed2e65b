"""The runner's side of MoE models: installing expert offload (--moe-expert-cache-gb) and the per-step routing
statistics (MoEStats) that travel in ModelRunnerOutput to /metrics."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from tokenmill.core.expert_cache import MoEStats
from tokenmill.errors import ConfigError
from tokenmill.model.layers.moe import moe_blocks


def install_expert_offload(model: Any, cache_gb: float, prefetch: bool, device: torch.device, tp: Any = None):
    """Keep `cache_gb` GiB of experts on the CUDA device, the rest on the host (tokenmill/model/layers/
    expert_offload.py). ConfigError (param moe_expert_cache_gb) where it cannot apply."""
    from tokenmill.model.layers.expert_offload import ExpertOffload, expert_nbytes

    param = "moe_expert_cache_gb"
    if device.type != "cuda":
        raise ConfigError(f"moe_expert_cache_gb needs a CUDA device (this engine runs on {device}): on the CPU "
                          "every expert already runs from host memory", param=param)
    if tp is not None and tp.world_size > 1:
        raise ConfigError("moe_expert_cache_gb is not supported with tensor parallelism", param=param)
    blocks = moe_blocks(model)
    if not blocks:
        raise ConfigError("moe_expert_cache_gb needs a mixture-of-experts model; this one is dense", param=param)
    one = expert_nbytes(blocks[0][1].experts)
    capacity = int(cache_gb * 2**30) // one
    if capacity < 1:
        raise ConfigError(f"moe_expert_cache_gb {cache_gb} holds no expert (one is {one / 2**20:.1f} MiB)",
                          param=param)
    return ExpertOffload.install(model, capacity, device, prefetch=prefetch)


class MoEStatsReader:
    """Reads a MoE model's cumulative routing counts per layer (and the expert cache's counters) every step:
    the counters' tensors are found once, so a read is one small copy to the host (~40 us for 16 x 64)."""

    def __init__(self, model: Any):
        self.model = model
        blocks = moe_blocks(model)
        self.layers = [i for i, _ in blocks]
        self.buffers = [block.expert_counts for _, block in blocks]
        self.sizes = [b.numel() for b in self.buffers]

    @classmethod
    def create(cls, model: Any) -> Optional["MoEStatsReader"]:
        """None for a dense model."""
        return cls(model) if moe_blocks(model) else None

    def read(self) -> MoEStats:
        flat = torch.cat(self.buffers).tolist()
        counts, start = {}, 0
        for layer, n in zip(self.layers, self.sizes):
            counts[layer] = flat[start:start + n]
            start += n
        offload = getattr(self.model, "expert_offload", None)
        return MoEStats(counts, dataclasses.replace(offload.stats) if offload is not None else None)
