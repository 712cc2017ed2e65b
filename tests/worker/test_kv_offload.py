"""HostKVTier: swap-out then swap-in restores every layer's block bytes exactly (fp32, int8 + per-token
scales, fp8), outs run before ins in one step, and the host sizing."""
from __future__ import annotations

import pytest
import torch

from tokenmill.errors import ConfigError
from tokenmill.ops.attention.kv_quant import QuantizedKVCache, allocate_quantized_kv_cache
from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.worker.kv_offload import HostKVTier, _host_runs

L, NB, BS, H, D = 3, 9, 4, 2, 8


def _caches(kind: str) -> list:
    g = torch.Generator().manual_seed(0)
    if kind == "auto":
        caches = allocate_kv_cache(L, NB, BS, H, D, torch.float32, "cpu")
        for c in caches:
            c.copy_(torch.randn(c.shape, generator=g))
        return caches
    caches = allocate_quantized_kv_cache(L, NB, BS, H, D, kind, "cpu")
    for c in caches:
        c.data.view(torch.uint8).copy_(torch.randint(0, 120, c.data.shape, generator=g, dtype=torch.uint8))
        c.scale.copy_(torch.rand(c.scale.shape, generator=g) + 0.5)
    return caches


def _block(caches: list, b: int) -> list[torch.Tensor]:
    out = []
    for c in caches:
        if isinstance(c, QuantizedKVCache):
            out.append(c.data[:, b].view(torch.uint8).clone())
            if c.per_token_scales:
                out.append(c.scale[:, b].clone())
        else:
            out.append(c[:, b].clone())
    return out


def _bytes_per_block(kind: str) -> int:
    per_tok = {"auto": 2 * H * D * 4, "int8": 2 * H * (D + 4), "fp8": 2 * H * D}[kind]
    return L * BS * per_tok


@pytest.mark.parametrize("kind", ["auto", "int8", "fp8"])
def test_swap_round_trip_and_order(kind):
    caches = _caches(kind)
    tier = HostKVTier.create(4 * _bytes_per_block(kind) / (1 << 30), caches, _bytes_per_block(kind),
                             torch.device("cpu"))
    assert tier.num_host_blocks == 4 and tier.host.shape == (4, _bytes_per_block(kind))
    want = {b: _block(caches, b) for b in (1, 2, 3, 5)}
    tier.apply([(3, 2), (1, 0), (2, 3)], [])
    # one step: block 5 goes out to host 1 while blocks 3 and 1 come back into 5 and 6 (outs first)
    tier.apply([(5, 1)], [(2, 5), (0, 6)])
    for got, exp in zip(_block(caches, 5), want[3]):
        assert torch.equal(got, exp)
    for got, exp in zip(_block(caches, 6), want[1]):
        assert torch.equal(got, exp)
    tier.apply([], [(1, 7), (3, 8)])  # host 1 holds the old block 5
    for b, src in ((7, 5), (8, 2)):
        for got, exp in zip(_block(caches, b), want[src]):
            assert torch.equal(got, exp)
    # untouched blocks keep their content
    for got, exp in zip(_block(caches, 1), want[1]):
        assert torch.equal(got, exp)


def test_sizing_and_runs():
    caches = _caches("auto")
    assert HostKVTier.create(0, caches, _bytes_per_block("auto"), torch.device("cpu")) is None
    with pytest.raises(ConfigError):
        HostKVTier.create(1e-9, caches, _bytes_per_block("auto"), torch.device("cpu"))
    assert _host_runs([0, 1, 2, 5, 6, 9]) == [(0, 0, 3), (5, 3, 2), (9, 5, 1)]
