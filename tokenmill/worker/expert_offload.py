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


def moe_stats(model: Any) -> Optional[MoEStats]:
    """Cumulative routing counts per MoE layer (and the expert cache's counters); None for a dense model."""
    blocks = moe_blocks(model)
    if not blocks:
        return None
    counts = torch.stack([block.expert_counts for _, block in blocks]).tolist()  # one copy to the host
    offload = getattr(model, "expert_offload", None)
    cache = dataclasses.replace(offload.stats) if offload is not None else None
    return MoEStats({i: c for (i, _), c in zip(blocks, counts)}, cache)
