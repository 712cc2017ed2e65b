"""RMSNorm with an optional fused residual add."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from tokenmill.ops.cpu.rmsnorm import add_rmsnorm


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in float32 like transformers."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); without residual: (norm(x), x)."""
        if x.dtype == torch.float32 and x.dim() == 2 and not x.is_cuda:  # batch-1 decode: one fused C call
            fused = add_rmsnorm(x, residual, self.weight, self.eps)
            if fused is not None:
                return fused
        if residual is not None:
            x = x + residual
        return self._norm(x), x
