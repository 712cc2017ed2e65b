"""Host memory of the CPU offload tier, and the copies the scheduler asks for (SchedulerOutput.kv_swap_out /
kv_swap_in). The bookkeeping lives in tokenmill/core/offload.py; this only moves bytes.

Layout: one uint8 row per host block, holding that block of every layer back to back (per layer: K+V data,
then the per-token scales of an int8 cache; fp8's static per-layer scales stay on the device). Rows are
contiguous, so a run of consecutive host blocks is one copy. The device caches are read and written
through uint8 views `[2, num_blocks, bytes]`, which makes every KV dtype (fp8 included, which has no CPU
index_copy kernel) the same byte copy.

On CUDA the host tensor is pinned and the copies are non_blocking on the current stream, so they are
ordered with the forward that follows: swap-outs (device gather, then D2H per host run), then swap-ins
(H2D per host run, then a device scatter), then the forward.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from tokenmill.errors import ConfigError
from tokenmill.ops.attention.kv_quant import QuantizedKVCache

logger = logging.getLogger(__name__)


def _byte_views(kv_caches: list) -> list[torch.Tensor]:
    """Per layer, the per-block parts of its cache as uint8 [2, num_blocks, bytes_per_half_block]."""
    parts = []
    for c in kv_caches:
        tensors = [c]
        if isinstance(c, QuantizedKVCache):
            tensors = [c.data, c.scale] if c.per_token_scales else [c.data]
        for t in tensors:
            if not t.is_contiguous():
                raise ConfigError("cpu_offload_gb needs a contiguous KV cache")
            parts.append(t.view(t.shape[0], t.shape[1], -1).view(torch.uint8))
    return parts


def _host_runs(host_ids: list[int]) -> list[tuple[int, int, int]]:
    """(first host id, row offset in the batch, length) of each run of consecutive ids (ids sorted)."""
    runs: list[tuple[int, int, int]] = []
    for i, h in enumerate(host_ids):
        if runs and runs[-1][0] + runs[-1][2] == h:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((h, i, 1))
    return runs


class HostKVTier:
    """`num_host_blocks` rows of `bytes_per_block` bytes in host memory, pinned on CUDA."""

    def __init__(self, kv_caches: list, num_host_blocks: int, device: torch.device):
        self.device = device
        self.parts = _byte_views(kv_caches)
        self.row_bytes = sum(2 * p.shape[2] for p in self.parts)
        self.num_host_blocks = num_host_blocks
        self.host = torch.empty((num_host_blocks, self.row_bytes), dtype=torch.uint8,
                                pin_memory=device.type == "cuda")
        self._async = device.type == "cuda"

    @classmethod
    def create(cls, gib: float, kv_caches: list, bytes_per_block: int, device: torch.device) -> Optional["HostKVTier"]:
        """The tier for `gib` GiB (None for 0): floor(GiB / bytes per block over all layers) host blocks."""
        if gib <= 0:
            return None
        n = int(gib * (1 << 30)) // bytes_per_block
        if n < 1:
            raise ConfigError(f"cpu_offload_gb {gib} holds no KV block of {bytes_per_block} bytes; raise it or use 0")
        if device.type == "cpu":
            logger.warning("cpu_offload_gb on a CPU device: the KV cache already lives in host memory, so the "
                           "offload tier only adds copies (useful for testing)")
        tier = cls(kv_caches, n, device)
        if tier.row_bytes != bytes_per_block:
            raise ConfigError(f"KV offload row of {tier.row_bytes} bytes != {bytes_per_block} bytes per block")
        logger.info("CPU offload tier: %d host blocks (%.2f GiB)", n, n * bytes_per_block / (1 << 30))
        return tier

    def apply(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """All swap-outs (device block -> host block), then all swap-ins (host -> device)."""
        if swap_out:
            self.swap_out(swap_out)
        if swap_in:
            self.swap_in(swap_in)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        pairs = sorted(pairs, key=lambda p: p[1])
        dev = torch.tensor([d for d, _ in pairs], dtype=torch.long, device=self.device)
        n = len(pairs)
        # [n, row_bytes]: per layer part, [2, n, b] -> [n, 2 * b]
        rows = torch.cat([p.index_select(1, dev).transpose(0, 1).reshape(n, -1) for p in self.parts], dim=1)
        host_ids = [h for _, h in pairs]
        if not self._async:
            self.host.index_copy_(0, torch.tensor(host_ids, dtype=torch.long), rows)
            return
        for h0, i0, ln in _host_runs(host_ids):
            self.host[h0:h0 + ln].copy_(rows[i0:i0 + ln], non_blocking=True)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        pairs = sorted(pairs, key=lambda p: p[0])
        host_ids = [h for h, _ in pairs]
        n = len(pairs)
        if self._async:
            rows = torch.cat([self.host[h0:h0 + ln].to(self.device, non_blocking=True)
                              for h0, _, ln in _host_runs(host_ids)])
        else:
            rows = self.host.index_select(0, torch.tensor(host_ids, dtype=torch.long))
        dev = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        off = 0
        for p in self.parts:
            b = p.shape[2]
            p.index_copy_(1, dev, rows[:, off:off + 2 * b].reshape(n, 2, b).transpose(0, 1))
            off += 2 * b
