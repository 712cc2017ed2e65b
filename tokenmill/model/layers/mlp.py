"""The gated feed-forward block (SwiGLU): down(silu(gate(x)) * up(x)), gate|up packed in one linear."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.model.layers.activation import SiluAndMul
from tokenmill.model.layers.linear import Linear, MergedLinear


def check_activation(act: Optional[str]) -> None:
    if (act or "silu") != "silu":
        raise ModelLoadError(f"unsupported activation {act!r} (only silu)")


class GatedMLP(nn.Module):
    """x [T, H] -> [T, H] through gate_up_proj [2I, H] and down_proj [H, I]."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype, bias: bool = False,
                 hidden_act: Optional[str] = "silu"):
        super().__init__()
        check_activation(hidden_act)
        i = intermediate_size
        self.gate_up_proj = MergedLinear(hidden_size, [i, i], bias=bias, dtype=dtype)
        self.down_proj = Linear(i, hidden_size, bias=bias, dtype=dtype)
        self.act = SiluAndMul()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.gate_up_proj(h)  # [T, 2I]
        x = self.act(x)  # [T, I]
        return self.down_proj(x)  # [T, hidden]
