"""Compile the Triton attention kernels ahead of time for an H100 (sm_90) without a GPU.

Triton's wheel ships ptxas, so a CPU machine can prove the kernels lower to a cubin (dot shapes,
constexpr globals, dtypes) before a GPU session runs them. Runs in a subprocess so Triton's
interpreter switch (set by the CPU kernel tests) does not apply.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tokenmill.ops.attention import triton_kernels as K

    def build(fn, types, consts, **opts):
        names = fn.arg_names
        sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
        c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        assert len(c.asm["cubin"]) > 1000
        return c

    P = "*bf16"
    PLAIN = dict(KV_QUANT=0, ks_ptr=None, vs_ptr=None)  # unquantized KV: no scale tensors
    INT8 = dict(KV_QUANT=1)  # int8 KV with per-(token, head) fp32 scales
    Q8 = dict(kc_ptr="*i8", vc_ptr="*i8", ks_ptr="*fp32", vs_ptr="*fp32")
    for quant, ctypes in ((PLAIN, dict(kc_ptr=P, vc_ptr=P)), (INT8, Q8)):
        build(K._write_kv_kernel, dict(k_ptr=P, v_ptr=P, slot_ptr="*i64", **ctypes),
              dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_HKV=8, BLOCK_D=128, **quant))
        build(K._prefill_kernel, dict(q_ptr=P, o_ptr=P, bt_ptr="*i32", seq_lens_ptr="*i32",
                                      qsl_ptr="*i32", sm_scale_log2="fp32", **ctypes),
              dict(GROUP=4, HEAD_DIM=128, BLOCK_SIZE=16, USE_WINDOW=True, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128,
                   **quant))
        c = build(K._decode_kernel, dict(q_ptr=P, o_ptr=P, part_o_ptr="*fp32", part_ml_ptr="*fp32",
                                         bt_ptr="*i32", seq_lens_ptr="*i32", sm_scale_log2="fp32", **ctypes),
                  dict(NUM_HEADS=32, GROUP=4, HEAD_DIM=128, BLOCK_SIZE=16, USE_WINDOW=False, NUM_SPLITS=8,
                       BLOCK_H=16, BLOCK_N=64, BLOCK_D=128, **quant))
        assert c.asm["ttir"].count("tt.store") == 3  # partial out, max, sum
    build(K._decode_reduce_kernel, dict(part_o_ptr="*fp32", part_ml_ptr="*fp32", o_ptr=P),
          dict(NUM_HEADS=32, HEAD_DIM=128, NUM_SPLITS=8, BLOCK_S=8, BLOCK_D=128))
    print("compiled")
""")


@pytest.mark.kernel
@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence Triton 3.9's default-change warning
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "compiled" in res.stdout
