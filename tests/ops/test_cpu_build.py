"""The C-kernel builder: loading a kernel library must not change the process's float behaviour."""
from __future__ import annotations

import subprocess
import sys


def test_loading_kernels_keeps_denormals():
    # gcc links crtfastmath.o (flush-to-zero + denormals-are-zero for the whole process) into a shared
    # object linked with -ffast-math; torch's float results would then change after the first kernel load
    code = (
        "import torch\n"
        "from tokenmill.ops.cpu.build import load_library\n"
        "lib = load_library('attention')\n"
        "assert lib is not None\n"
        "x = torch.tensor([1e-40], dtype=torch.float32)\n"
        "print(float(x * 1.0), float(torch.tensor(1e-39) / 10))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    a, b = map(float, out.stdout.split())
    assert a > 0 and b > 0, out.stdout
