"""The KV transfer interface of disaggregated prefill / decode (worker side; the scheduler's side is
tokenmill/core/kv_transfer.py).

A `KVConnector` takes one step's `KVTransferStep` (`start_step`): blocks to serve for a request id (producer,
`send_blocks`), blocks to fill for a request id (consumer, `recv_blocks`: the KV lands in blocks the
scheduler has already allocated), pulls to cancel. It works in the background, overlapped with the steps
that follow, and reports what it has finished (`get_finished`): requests whose blocks it no longer reads
(sent or timed out: the producer frees them) and pulls it no longer writes (True: KV in place; False: failed
or late, the consumer recomputes). Every block handed to it is reported exactly once.

Implementations: `TcpKVConnector` (tokenmill/worker/kv_tcp.py). A GPU transport (NCCL, CUDA IPC, NIXL) is
another subclass over the same calls.

`KVBlockIO` reads and writes whole blocks as byte rows: per layer the K and V of the block back to back (and
an int8 cache's per-token scales; fp8's per-layer scales are the checkpoint's, the same on both sides), the
layout of the CPU offload tier (tokenmill/worker/kv_offload.py), so every KV dtype is one byte copy.
"""
from __future__ import annotations

from typing import Optional

import torch

from tokenmill.config import EngineConfig
from tokenmill.core.kv_transfer import KVRecv, KVSend, KVTransferStep
from tokenmill.errors import ConfigError
from tokenmill.worker.kv_offload import _byte_views


class KVBlockIO:
    """Whole blocks of the KV cache as uint8 rows [n, row_bytes] on the host."""

    def __init__(self, kv_caches: list, block_size: int, kv_cache_dtype: str):
        """kv_cache_dtype: the resolved dtype (float32, bfloat16, float16, int8, fp8), not auto."""
        try:
            self.parts = _byte_views(kv_caches)
        except ConfigError:
            raise ConfigError("kv_role needs a contiguous KV cache") from None
        self.row_bytes = sum(2 * p.shape[2] for p in self.parts)
        self.device = self.parts[0].device
        # what both sides of a transfer must agree on
        self.layout = {"row_bytes": self.row_bytes, "block_size": block_size, "kv_cache_dtype": kv_cache_dtype,
                       "num_layers": len(kv_caches)}

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' bytes, [n, row_bytes] uint8 on the host (contiguous)."""
        n = len(block_ids)
        with torch.inference_mode():
            idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            rows = torch.cat([p.index_select(1, idx).transpose(0, 1).reshape(n, -1) for p in self.parts], dim=1)
            return rows.cpu().contiguous()

    def scatter(self, block_ids: list[int], rows: torch.Tensor) -> None:
        """Write rows [n, row_bytes] (uint8, host) into the blocks."""
        n = len(block_ids)
        with torch.inference_mode():
            idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
            rows = rows.to(self.device)
            off = 0
            for p in self.parts:
                b = p.shape[2]
                p.index_copy_(1, idx, rows[:, off:off + 2 * b].reshape(n, 2, b).transpose(0, 1))
                off += 2 * b
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the KV is in place before it is reported


class KVConnector:
    """Moves KV blocks between instances, in the background. Subclasses implement the four calls below."""

    def start_step(self, step: KVTransferStep) -> None:
        for req_id in step.cancel:
            self.cancel(req_id)
        for req_id, send in step.send.items():
            self.send_blocks(req_id, send)
        for req_id, recv in step.recv.items():
            self.recv_blocks(req_id, recv)

    def send_blocks(self, req_id: str, send: KVSend) -> None:
        """Serve these blocks to the consumer of send.transfer_id (until sent or timed out)."""
        raise NotImplementedError

    def recv_blocks(self, req_id: str, recv: KVRecv) -> None:
        """Fill these (allocated) blocks with the producer's."""
        raise NotImplementedError

    def cancel(self, req_id: str) -> None:
        """Stop the pull of req_id soon (it is still reported, as failed)."""
        raise NotImplementedError

    def get_finished(self, wait_s: float = 0.0) -> tuple[list[str], dict[str, bool]]:
        """(request ids whose blocks are released by the sender, {request id: pull succeeded}) since the last
        call; waits up to wait_s for something to finish when nothing has."""
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


def make_kv_connector(config: EngineConfig, kv_caches: list, block_size: int,
                      kv_cache_dtype: str) -> Optional[KVConnector]:
    """The connector KVTransferConfig asks for, or None (no kv_role). kv_cache_dtype: the resolved dtype
    (kv_quant.resolve_kv_cache_dtype), part of the layout both sides must agree on."""
    kt = config.kv_transfer
    if kt.kv_role is None:
        return None
    from tokenmill.worker.kv_tcp import TcpKVConnector

    return TcpKVConnector(kt, KVBlockIO(kv_caches, block_size, kv_cache_dtype))
