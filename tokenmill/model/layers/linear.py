"""Linear layers whose parameters carry a `weight_loader(param, tensor, shard_id)` used by the model loader.

MergedLinear packs several checkpoint matrices along the output dim (gate|up); QKVLinear packs q|k|v.
Parameters are created with torch.empty (no init cost), so building an 8B model on a device is instant.
"""
from __future__ import annotations

from typing import Callable, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

ShardId = Optional[Union[int, str]]


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
    """Copy a whole checkpoint tensor into param (casting dtype, moving device)."""
    if shard_id is not None:
        raise ValueError(f"parameter is not packed, got shard {shard_id!r}")
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T + b with W [out, in]."""

    # False: a module that reads `weight` itself (MLA's kv_b_proj, DeepSeek's float32 router) stays a dense float
    # Linear, its GGUF blocks dequantized at load (layers.quantized.quantize_modules never swaps it)
    packable: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        # installed from outside (tokenmill/ops/cpu/dense.py: oneDNN with a prepacked bf16 weight on the CPU)
        self.fast_path: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        default_weight_loader(param, loaded, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path is not None:
            return self.fast_path(x)
        return F.linear(x, self.weight, self.bias)  # [T, in] -> [T, out]


class MergedLinear(Linear):
    """Several linears of the same input stacked along the output dim; shard i fills rows of output_sizes[i]."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype = torch.float32, shard_names: Optional[list[ShardId]] = None):
        super().__init__(in_features, sum(output_sizes), bias=bias, dtype=dtype)
        self.output_sizes = list(output_sizes)
        self.shard_names: list[ShardId] = list(shard_names) if shard_names else list(range(len(output_sizes)))
        for p in (self.weight, self.bias):
            if p is not None:
                p.shard_ids = list(self.shard_names)  # the loader checks that every shard arrived

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if shard_id not in self.shard_names:
            raise ValueError(f"unknown shard {shard_id!r} (expected one of {self.shard_names})")
        i = self.shard_names.index(shard_id)
        offset, size = sum(self.output_sizes[:i]), self.output_sizes[i]
        target = param.data.narrow(0, offset, size)
        if tuple(target.shape) != tuple(loaded.shape):
            raise ValueError(f"shape mismatch for shard {shard_id!r}: expected {tuple(target.shape)}, "
                             f"checkpoint {tuple(loaded.shape)}")
        target.copy_(loaded)


class QKVLinear(MergedLinear):
    """q|k|v projections packed: out = (num_heads + 2 * num_kv_heads) * head_dim; shards 'q', 'k', 'v'."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], bias=bias, dtype=dtype, shard_names=["q", "k", "v"])
        self.q_size, self.kv_size = q_size, kv_size
