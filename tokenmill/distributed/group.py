"""TPGroup: one rank's view of its tensor-parallel group, passed explicitly (no module-global state).

torch.distributed with gloo on the CPU and NCCL on CUDA. `TPGroup.single()` is the one-rank group: its
collectives are no-ops, so parallel layers built for one rank equal the plain ones.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # the torch.distributed process group (None: the default group)
    local_device: int = 0  # this rank's CUDA device index in its process (Ray shows each actor one GPU: 0)

    @classmethod
    def single(cls) -> "TPGroup":
        return cls()

    @classmethod
    def init(cls, rank: int, world_size: int, init_method: str, device: torch.device,
             timeout_s: float = 600.0, local_device: int = 0) -> "TPGroup":
        """Join the group (every rank calls this): gloo on the CPU, NCCL on CUDA."""
        import torch.distributed as dist

        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world_size, None, local_device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks (in place when there is more than one rank)."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] per rank -> [..., world_size * n], rank order."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, x: int, device: torch.device) -> int:
        """The smallest of the ranks' x."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def destroy(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def split_size(total: int, world_size: int, what: str) -> int:
    if total % world_size:
        from tokenmill.errors import ConfigError

        raise ConfigError(f"{what} ({total}) is not divisible by tensor_parallel_size {world_size}")
    return total // world_size


def shard_range(total: int, rank: int, world_size: int, what: str) -> tuple[int, int]:
    """(start, size) of rank's equal slice of `total`."""
    n = split_size(total, world_size, what)
    return rank * n, n


def kv_head_range(num_kv_heads: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first KV head, count) a rank holds: an equal split, or one replicated head when there are fewer KV heads
    than ranks (ranks r*k .. r*k+k-1 share head r for k = world_size / num_kv_heads)."""
    if num_kv_heads >= world_size:
        return shard_range(num_kv_heads, rank, world_size, "num_key_value_heads")
    if world_size % num_kv_heads:
        from tokenmill.errors import ConfigError

        raise ConfigError(f"tensor_parallel_size {world_size} is not a multiple of num_key_value_heads "
                          f"{num_kv_heads}")
    return rank // (world_size // num_kv_heads), 1


