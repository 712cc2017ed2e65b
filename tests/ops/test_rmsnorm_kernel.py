"""Fused residual add + RMSNorm C kernel vs the PyTorch formula (the RMSNorm layer uses it for float32 CPU rows)."""
from __future__ import annotations

import pytest
import torch

from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.cpu.rmsnorm import _lib, add_rmsnorm

pytestmark = pytest.mark.skipif(_lib() is None, reason=f"rmsnorm kernel not built: {build_error('rmsnorm')}")


@pytest.mark.parametrize("m", [1, 3, 200])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm_matches_torch(m, with_residual):
    g = torch.Generator().manual_seed(m)
    x, r, w = torch.randn(m, 96, generator=g) * 4, torch.randn(m, 96, generator=g), torch.randn(96, generator=g)
    out, s = add_rmsnorm(x, r if with_residual else None, w, 1e-5)
    ref_s = x + r if with_residual else x
    ref = w * (ref_s * torch.rsqrt(ref_s.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(s, ref_s)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_inputs_fall_back():
    w = torch.ones(8)
    assert add_rmsnorm(torch.randn(2, 8, dtype=torch.float64), None, w, 1e-6) is None
    assert add_rmsnorm(torch.randn(8, 2).T, None, w, 1e-6) is None  # not contiguous
    assert add_rmsnorm(torch.randn(2, 8), torch.randn(2, 8).half(), w, 1e-6) is None


def test_a_weight_of_the_wrong_width_is_an_error_not_a_silent_read():
    """The C kernel reads d weights; a weight of another width (a tensor-parallel slice norm wired wrong) must
    fail like PyTorch's broadcast does, never read past or short of the weight."""
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm(x, None, torch.ones(16), 1e-6)
