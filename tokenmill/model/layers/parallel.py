"""Tensor-parallel layers (Megatron style). Each rank holds a slice; the weight loaders cut that slice out of
the checkpoint tensor, which may be a lazy safetensors slice (`get_slice`), so a rank reads only its part.

  ColumnParallelLinear   output rows split (packed q|k|v or gate|up: each packed part split on its own);
                         no communication, the output stays split
  RowParallelLinear      input columns split; one all-reduce of the output, then the bias (added once)
  VocabParallelEmbedding vocabulary rows split (padded to a multiple of the ranks); ids outside a rank's
                         rows give zeros there; one all-reduce
  ParallelLMHead         vocabulary rows split; logits all-gathered and trimmed to the vocabulary

With one rank every layer equals its plain counterpart (tokenmill/model/layers/linear.py, embedding.py).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.group import TPGroup
from tokenmill.model.layers.linear import ShardId

Tensor = torch.Tensor


def take(loaded: Any, dim: int, start: int, size: int) -> Tensor:
    """rows (dim 0) or columns (dim 1) [start, start + size) of a tensor or of a lazy safetensors slice."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    return loaded[start:start + size] if dim == 0 else loaded[:, start:start + size]


def whole(loaded: Any) -> Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _shape(loaded: Any) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)
    p.weight_loader = loader
    p.accepts_slices = True  # load_weights hands it lazy safetensors slices
    return p


class ColumnParallelLinear(nn.Module):
    """Packed parts stacked along the output dim; part i is full_sizes[i] rows in the checkpoint, of which this
    rank holds rows [starts[i], starts[i] + sizes[i])."""

    def __init__(self, in_features: int, full_sizes: list[int], starts: list[int], sizes: list[int],
                 shard_names: list[ShardId], bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features, self.out_features = in_features, sum(sizes)
        self.full_sizes, self.starts, self.sizes = list(full_sizes), list(starts), list(sizes)
        self.shard_names = list(shard_names)
        self.weight = _param((self.out_features, in_features), dtype, device, self.weight_loader)
        self.bias = _param((self.out_features,), dtype, device, self.weight_loader) if bias else None
        for p in (self.weight, self.bias):
            if p is not None and self.shard_names != [None]:
                p.shard_ids = list(self.shard_names)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: ShardId = None) -> None:
        if shard_id not in self.shard_names:
            raise ValueError(f"unknown shard {shard_id!r} (expected one of {self.shard_names})")
        i = self.shard_names.index(shard_id)
        if _shape(loaded)[0] != self.full_sizes[i] or _shape(loaded)[1:] != tuple(param.shape[1:]):
            raise ValueError(f"shape mismatch for shard {shard_id!r}: expected {self.full_sizes[i]} rows of "
                             f"{tuple(param.shape[1:])}, checkpoint {_shape(loaded)}")
        offset = sum(self.sizes[:i])
        param.data.narrow(0, offset, self.sizes[i]).copy_(take(loaded, 0, self.starts[i], self.sizes[i]))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)  # [T, in] -> [T, out / tp]


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b: this rank holds input columns [rank * n, (rank + 1) * n). With
    reduce=False the output stays this rank's partial sum, for a caller that reduces it together with others
    (a MoE block's shared expert); no bias then, since it would be summed N times."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device, reduce: bool = True):
        super().__init__()
        from tokenmill.distributed.group import shard_range

        if bias and not reduce:
            raise ValueError("an unreduced row-parallel linear cannot hold a bias")
        self.tp, self.reduce = tp, reduce
        self.in_start, self.in_local = shard_range(in_features, tp.rank, tp.world_size, "a row-parallel input")
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, self.in_local), dtype, device, self.weight_loader)
        self.bias = _param((out_features,), dtype, device, self._bias_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: ShardId = None) -> None:
        if shard_id is not None or _shape(loaded) != (self.out_features, self.in_features):
            raise ValueError(f"shape mismatch: expected {(self.out_features, self.in_features)}, "
                             f"checkpoint {_shape(loaded)}")
        param.data.copy_(take(loaded, 1, self.in_start, self.in_local))

    def _bias_loader(self, param: nn.Parameter, loaded: Any, shard_id: ShardId = None) -> None:
        if shard_id is not None or _shape(loaded) != (self.out_features,):
            raise ValueError(f"shape mismatch: expected {(self.out_features,)}, checkpoint {_shape(loaded)}")
        param.data.copy_(whole(loaded))

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)  # [T, in / tp] -> [T, out], this rank's partial sum
        if self.reduce:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.tp = tp
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.rows = -(-num_embeddings // tp.world_size)  # per rank, the last rank padded
        self.start = tp.rank * self.rows
        self.num_real = max(0, min(num_embeddings, self.start + self.rows) - self.start)
        self.weight = _param((self.rows, embedding_dim), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: ShardId = None) -> None:
        if shard_id is not None or _shape(loaded) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"shape mismatch: expected {(self.num_embeddings, self.embedding_dim)}, "
                             f"checkpoint {_shape(loaded)}")
        param.data[self.num_real:].zero_()
        if self.num_real:
            param.data[:self.num_real].copy_(take(loaded, 0, self.start, self.num_real))

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)  # [T] -> [T, D]
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows)
        h = F.embedding(local.clamp(0, self.rows - 1), self.weight)  # [T, D], rows of other ranks wrong ...
        h.masked_fill_(outside.unsqueeze(-1), 0.0)  # ... and zeroed
        return self.tp.all_reduce(h)  # [T, D]


class ParallelLMHead(nn.Module):
    """hidden [N, D] -> logits [N, V]: each rank computes its vocabulary rows, then one all-gather."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                 tie_to: Optional[VocabParallelEmbedding] = None):
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        if tie_to is not None:
            self.weight = tie_to.weight
        else:
            self._emb = VocabParallelEmbedding(vocab_size, hidden_size, tp, dtype, device)
            self.weight = self._emb.weight
            del self._emb

    def forward(self, hidden: Tensor) -> Tensor:
        logits = F.linear(hidden, self.weight)  # [N, D] -> [N, V / tp (padded)]
        return self.tp.all_gather_last(logits)[:, :self.vocab_size]  # [N, V]


class ParallelRMSNorm(nn.Module):
    """RMSNorm over a whole projection split across ranks (OLMoE's q / k norm): this rank holds features
    [start, start + size) of `full_size` and its weight slice; the mean of squares is all-reduced. Features held
    by several ranks (a replicated KV head) are counted once: the sum over ranks is divided by how many copies
    of the projection the ranks hold together (world_size * size / full_size)."""

    def __init__(self, full_size: int, start: int, size: int, eps: float, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.full_size, self.start, self.size, self.eps, self.tp = full_size, start, size, eps, tp
        self.weight = _param((size,), dtype, device, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: ShardId = None) -> None:
        if shard_id is not None or _shape(loaded) != (self.full_size,):
            raise ValueError(f"shape mismatch: expected {(self.full_size,)}, checkpoint {_shape(loaded)}")
        param.data.copy_(whole(loaded)[self.start:self.start + self.size])

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        if residual is not None:
            x = x + residual
        xf = x.float()
        sum_sq = self.tp.all_reduce(xf.pow(2).sum(-1, keepdim=True))  # [T, 1]
        mean_sq = sum_sq / (self.tp.world_size * self.size)  # every copy of the projection counted once
        return self.weight * (xf * torch.rsqrt(mean_sq + self.eps)).to(x.dtype), x
