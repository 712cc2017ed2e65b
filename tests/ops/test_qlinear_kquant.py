"""Q5_0 / Q5_1 and the k-quants Q4_K / Q5_K / Q6_K kept packed: the torch reference dequantizer vs gguf-py's on
random blocks (every bit pattern) and odd shapes; the C kernel (register path for 1-3 rows, buffered path, AMX)
vs dequantize-then-matmul; the AVX2 and scalar builds of the same sources on this CPU; a merged linear whose shards
have different types; a tiny k-quant GGUF loaded packed vs dequantized."""
from __future__ import annotations

import ctypes
import shutil

import numpy as np
import pytest
import torch

from tests.ops.kquant_blocks import quantize as kquantize
from tests.ops.kquant_blocks import random_blocks, requantize_gguf
from tokenmill.ops.cpu import qlinear as QL
from tokenmill.ops.cpu.build import build_error
from tokenmill.ops.moe.reference import round_int8_per_32

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as G  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

KTYPES = ["q4_k", "q5_k", "q6_k"]
TYPES = ["q5_0", "q5_1", *KTYPES]
needs_kernel = pytest.mark.skipif(not QL.available(), reason=f"qlinear kernel not built: {build_error('qlinear')}")


def _packed(qtype: str, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, row_bytes], gguf's own float32 dequantization [n, k]): random bits for the k-quants,
    gguf-quantized random weights for Q5_0 / Q5_1."""
    rng = np.random.default_rng(seed)
    if qtype in KTYPES:
        q = random_blocks(qtype, n, k, rng)
    else:
        w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
        q = gguf_quantize(w, getattr(G, qtype.upper()))
    ref = gguf_dequantize(q, getattr(G, qtype.upper())).reshape(n, k)
    return torch.from_numpy(np.ascontiguousarray(q)).reshape(n, -1), torch.from_numpy(ref.copy())


def _k(qtype: str, blocks: int) -> int:
    return blocks * QL.block_size(qtype)


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("n,blocks", [(1, 1), (7, 3), (13, 5)])
def test_reference_dequantize_equals_gguf(qtype, n, blocks):
    k = _k(qtype, blocks)
    packed, ref = _packed(qtype, n, k, seed=n)
    assert packed.shape == (n, QL.row_bytes(qtype, k))
    assert torch.equal(QL.dequantize(packed, qtype, k), ref)


def test_numpy_kquantizer_round_trips():
    """The test quantizer (tests/ops/kquant_blocks.py) writes valid blocks: gguf's dequantization is close."""
    w = (np.random.default_rng(0).standard_normal((6, 512)) * 0.1).astype(np.float32)
    for qtype, tol in (("q4_k", 0.12), ("q5_k", 0.06), ("q6_k", 0.03)):
        back = gguf_dequantize(kquantize(w, qtype), getattr(G, qtype.upper())).reshape(w.shape)
        assert np.abs(back - w).mean() / np.abs(w).mean() < tol, qtype


def test_block_size_and_row_bytes():
    assert QL.row_bytes("q4_k", 768) == 3 * 144 and QL.row_bytes("q6_k", 256) == 210
    assert QL.row_bytes("q5_0", 64) == 44 and QL.row_bytes("q5_1", 32) == 24
    with pytest.raises(ValueError, match="multiple of the block size 256"):
        QL.row_bytes("q5_k", 576)  # SmolLM2's hidden size: llama.cpp stores such rows as Q5_0 / Q8_0 instead
    with pytest.raises(ValueError, match="unsupported"):
        QL.row_bytes("q3_k", 256)


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b, tol: float = 1e-5, bf16: bool = False) -> None:
    xr, wr = (x.bfloat16(), w.bfloat16()) if bf16 else (x, w)
    ref = (xr.double() @ wr.double().T + (b.double() if b is not None else 0)).float()
    assert got.shape == ref.shape and got.dtype == torch.float32
    scale = (x.abs().double() @ w.abs().double().T).max().item()  # error bound relative to the sum of |terms|
    assert (got - ref).abs().max().item() <= tol * scale


@needs_kernel
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 64, 67])  # register path (1-3 rows, and 5 = 3 + 2), buffered (tails)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_dequantized_matmul(qtype, m, bias):
    n, k = 45, _k(qtype, 3 if qtype in KTYPES else 5)  # n: not a multiple of the 4-column tile; odd block counts
    packed, w = _packed(qtype, n, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    _check(QL.qlinear(x, packed, qtype, b), x, w, b)


@pytest.mark.skipif(not QL.amx_available(), reason="no AMX (bf16 tiles) on this CPU, or a kernel built without it")
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("m", [4, 33, 530])  # one partial token tile; 2 x 2 tiles with tails; past a 512-row pass
def test_amx_path_matches_bf16_rounded_matmul(qtype, m):
    n, k = 45, _k(qtype, 3 if qtype in KTYPES else 5)
    packed, w = _packed(qtype, n, k, seed=m)
    g = torch.Generator().manual_seed(m)
    x, b = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    got = QL.qlinear(x, packed, qtype, b, amx_min_rows=4)
    _check(got, x, w, b, bf16=True)
    assert not torch.equal(got, QL.qlinear(x, packed, qtype, b))  # really the bf16 path
    _, st = QL.amx_pack(packed, qtype, k)  # the tiles made once: the same numbers
    assert torch.equal(QL.qlinear(x, packed, qtype, b, amx_min_rows=4, qpanels=st), got)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_rows(qtype):
    k = _k(qtype, 2)
    packed, w = _packed(qtype, 20, k)
    ids = torch.tensor([[3, 0], [19, 3]])
    torch.testing.assert_close(QL.dequantize_rows(packed, qtype, k, ids), w[ids], rtol=1e-6, atol=1e-7)


@needs_kernel
def test_bad_arguments():
    packed, _ = _packed("q4_k", 4, 256)
    with pytest.raises(ValueError, match="bytes per row"):
        QL.qlinear(torch.randn(1, 512), packed, "q4_k")
    with pytest.raises(ValueError, match="bytes per row"):
        QL.qlinear(torch.randn(1, 32 * 9), packed[:, :QL.row_bytes("q5_0", 32 * 9) - 3], "q5_0")
    with pytest.raises(IndexError):
        QL.dequantize_rows(packed, "q4_k", 256, torch.tensor([4]))


def _build_variant(tmp_path, march: str) -> ctypes.CDLL:
    """The qlinear library's units built for an older CPU (-march), runnable on this one."""
    from tokenmill.ops.cpu import build

    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("no gcc")
    flags = [f if not f.startswith("-march=") else f"-march={march}" for f in build.FLAGS]
    out = tmp_path / f"qlinear-{march}.so"
    err = build._compile(cc, flags, [build.CSRC / f"{u}.c" for u in build.library_units("qlinear")], out)
    if err:
        pytest.skip(f"-march={march} build failed: {err}")
    import torch  # noqa: F401  (torch's libgomp first, as build.load_library does)

    lib = ctypes.CDLL(str(out))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qlinear_f32.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ptr, i64, i64]
    lib.qdequant_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
    return lib


@pytest.mark.parametrize("march", ["haswell", "x86-64"])  # the AVX2 path and the scalar one
def test_avx2_and_scalar_builds(tmp_path, march):
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 builds")
    lib = _build_variant(tmp_path, march)
    for qtype in TYPES:
        kind = QL.QTYPES[qtype][0]
        n, k = 13, _k(qtype, 3)
        packed, w = _packed(qtype, n, k, seed=3)
        for m in (1, 3, 5, 9):  # direct path (1, 3 rows; 5 = 3 + 2), buffered path (9 rows > direct_max 3)
            x, b = torch.randn(m, k), torch.randn(n)
            y = torch.empty(m, n)
            rc = lib.qlinear_f32(kind, x.data_ptr(), m, k, packed.data_ptr(), n, b.data_ptr(), y.data_ptr(), 3, 0)
            assert rc == 0
            _check(y, x, w, b)
        ids = torch.tensor([5, 0, 12])
        rows = torch.empty(3, k)
        assert lib.qdequant_rows(kind, packed.data_ptr(), n, k, ids.data_ptr(), 3, rows.data_ptr()) == 0
        torch.testing.assert_close(rows, w[ids], rtol=1e-6, atol=1e-7)


def test_mixed_quantized_linear():
    """q|k|v with Q4_K q and k, a Q6_K v (how llama.cpp's Q4_K_M stores some layers), and a Q8_0 fourth shard."""
    from tokenmill.model.layers.quantized import MixedQuantizedLinear, QuantizedLinear, finalize_quantized

    k = 256
    parts = {"q": _packed("q4_k", 8, k, 1), "k": _packed("q4_k", 4, k, 2), "v": _packed("q6_k", 4, k, 3)}
    w8 = (np.random.default_rng(4).standard_normal((5, k)) * 0.1).astype(np.float32)
    q8 = gguf_quantize(w8, G.Q8_0)
    parts["x"] = (torch.from_numpy(q8.copy()), torch.from_numpy(gguf_dequantize(q8, G.Q8_0).reshape(5, k).copy()))
    lin = MixedQuantizedLinear(k, [8, 4, 4, 5], ["q4_k", "q4_k", "q6_k", "q8_0"], bias=True,
                               shard_names=["q", "k", "v", "x"])
    assert isinstance(lin, QuantizedLinear)
    assert lin.weight.numel() == 12 * QL.row_bytes("q4_k", k) + 4 * QL.row_bytes("q6_k", k) + 5 * 272
    for name in ["v", "q", "x", "k"]:
        lin.weight_loader(lin.weight, parts[name][0], name)
        lin.weight_loader(lin.bias, torch.full((parts[name][0].shape[0],), 0.5), name)
    w = torch.cat([parts[s][1] for s in "qkvx"])
    x = torch.randn(5, k)
    _check(lin(x), x, w, torch.full((21,), 0.5))
    torch.testing.assert_close(lin.dequantized(), w)
    with pytest.raises(ValueError, match="shape"):
        lin.weight_loader(lin.weight, parts["q"][0], "v")
    with pytest.raises(ValueError, match="uint8"):
        lin.weight_loader(lin.weight, parts["v"][1], "v")
    with pytest.raises(ValueError, match="shard"):
        lin.weight_loader(lin.weight, parts["v"][0], "z")
    with pytest.raises(ValueError, match="one block type per shard"):
        MixedQuantizedLinear(k, [8, 4], ["q4_k"], shard_names=["q", "k"])
    lin.dense_min_rows = 2  # a float32 dense copy for >= 2 rows, the kernels below
    finalize_quantized(lin, dense_dtype=torch.float32)
    assert lin.weight_dense is not None
    _check(lin(x), x, w, torch.full((21,), 0.5))
    _check(lin(x[:1]), x[:1], w, torch.full((21,), 0.5))


@needs_kernel
@pytest.mark.parametrize("m", [1, 5, 70])  # register path, buffered path (column slices of a wider output)
def test_qlinear_parts_writes_each_group_into_its_columns(m):
    k = 512
    parts = [("q6_k", *_packed("q6_k", 7, k, 1)), ("q4_k", *_packed("q4_k", 9, k, 2)),
             ("q5_k", *_packed("q5_k", 3, k, 3))]
    groups = [(qt, p) for qt, p, _ in parts]
    w = torch.cat([ref for *_, ref in parts])
    x, b = torch.randn(m, k), torch.randn(19)
    _check(QL.qlinear_parts(x, groups, bias=b), x, w, b)
    if QL.amx_available():
        _check(QL.qlinear_parts(x, groups, bias=b, amx_min_rows=1), x, w, b, bf16=True)
    with pytest.raises(ValueError, match="row groups"):
        QL.make_qparts(groups * 2)
    with pytest.raises(ValueError, match="bytes per row"):
        QL.qlinear_parts(torch.randn(1, 256), groups)


def _tiny_kquant_model():
    """A llama with rows of 256 / 512 weights (k-quant super-blocks), untied head."""
    import transformers

    from tests.model.tiny_models import VOCAB

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model


# a Q4_K_M-like mix: Q4_K q/k/gate/up/o, Q6_K v and down (layer 0) or Q5_K (layer 1), Q8_0 embedding, Q6_K head
_KQ_TYPES = {
    "token_embd.weight": G.Q8_0, "output.weight": G.Q6_K,
    **{f"blk.{i}.{t}.weight": G.Q4_K
       for i in range(2) for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")},
    "blk.0.attn_v.weight": G.Q6_K, "blk.0.ffn_down.weight": G.Q6_K,
    "blk.1.attn_v.weight": G.Q4_K, "blk.1.ffn_down.weight": G.Q5_K,
}


def test_tiny_kquant_gguf_auto_equals_none(tmp_path):
    from tests.model.tiny_models import save_tiny_gguf
    from tokenmill.model.layers.quantized import MixedQuantizedLinear, QuantizedLinear, QuantizedLMHead
    from tokenmill.model.loader import load_hf_config, load_model, resolve_model_source

    f32 = save_tiny_gguf(_tiny_kquant_model(), str(tmp_path / "f32.gguf"))
    path = requantize_gguf(f32, str(tmp_path / "kq.gguf"), _KQ_TYPES)
    src = resolve_model_source(path)
    cfg = load_hf_config(src)
    none = load_model(src, cfg, torch.float32, "cpu", quantization="none")
    auto = load_model(src, cfg, torch.float32, "cpu", quantization="auto", gemm_dtype="float32")  # exact kernels
    if QL.available():
        l0, l1 = auto.model.layers
        assert type(l0.self_attn.qkv_proj) is MixedQuantizedLinear  # Q4_K q, k + Q6_K v
        assert l0.self_attn.qkv_proj.qtypes == ["q4_k", "q4_k", "q6_k"]
        assert type(l1.self_attn.qkv_proj) is QuantizedLinear and l1.self_attn.qkv_proj.qtype == "q4_k"
        assert l0.mlp.down_proj.qtype == "q6_k" and l1.mlp.down_proj.qtype == "q5_k"
        assert l0.mlp.gate_up_proj.qtype == "q4_k"
        assert isinstance(auto.lm_head, QuantizedLMHead) and auto.lm_head.qtype == "q6_k"
        packed = sum(p.numel() for p in auto.parameters() if p.dtype == torch.uint8)
        floats = sum(p.numel() * 4 for p in auto.parameters() if p.dtype == torch.float32)
        import os

        assert packed + floats <= os.path.getsize(path)  # every matrix packed: the weights are the file's bytes
    ids = torch.tensor([1, 17, 300, 5, 42, 9, 400, 3])
    outs: list[list[torch.Tensor]] = []
    for model in (none, auto):
        out = outs.append([]) or outs[-1]
        for rows in (ids[:1], ids[:3], ids):  # register path (1, 3 rows) and the buffered one
            with torch.no_grad():
                h = model.model.embed_tokens(rows)
                for layer in model.model.layers:  # attention-free check of every projection
                    qkv = layer.self_attn.qkv_proj(h)
                    h = h + layer.self_attn.o_proj(qkv[:, : layer.self_attn.q_size])
                    h = h + layer.mlp(h)
                    out.append(qkv)
                out.append(model.compute_logits(h))
    for got, ref in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_tiny_kquant_gguf_engine_fused_equals_dequantized(tmp_path, gguf_tokenizer_path):
    """Through the engine: every layer fused in C (layer 0's q|k|v as row groups of two types), greedy tokens equal
    the file dequantized at load."""
    from tests.exact import exact_llm
    from tests.model.tiny_models import save_tiny_gguf
    from tokenmill import SamplingParams
    from tokenmill.ops.cpu.layer import FusedCpuLayer, _lib

    if _lib() is None:
        pytest.skip(f"layer kernel not built: {build_error('layer')}")
    f32 = save_tiny_gguf(_tiny_kquant_model(), str(tmp_path / "f32.gguf"))
    path = requantize_gguf(f32, str(tmp_path / "kq.gguf"), _KQ_TYPES)
    prompts = [[1, 17, 300, 5, 42], [9, 400, 3], [7, 8, 9, 10, 11, 12, 13]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = {}
    for quant in ("auto", "none"):
        llm = exact_llm(path, tokenizer=gguf_tokenizer_path, dtype="float32", quantization=quant,
                        gemm_dtype="float32", enable_prefix_caching=False, skip_tokenizer_init=True)  # float32 K/V
        layers = llm.engine.core.runner.model.model.layers
        assert all(isinstance(layer.fast_path, FusedCpuLayer) for layer in layers) == (quant == "auto")
        out[quant] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        one = llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0].token_ids  # batch of 1: 1-row steps
        assert one == out[quant][0]
    assert out["auto"] == out["none"]


@needs_kernel
@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("m", [1, 2, 3])
def test_int8_direct_path_is_dequantized_weights_times_rounded_x(qtype, m):
    """gemm auto (amx_min_rows > 0) on an AVX512-VNNI build: 1-3 rows of x take int8 activations (llama.cpp's decode
    arithmetic): exactly the dequantized weights times x rounded per 32 values, whose error against the float32 path
    is that rounding's (< 1% of the output range here); float32 GEMMs (amx_min_rows 0) stay exact. Odd sizes, a
    zero sub-block, a bias."""
    k, n = 768, 37
    packed, _ = _packed(qtype, n, k, 11)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    x[0, 32:64] = 0.0  # a sub-block of zeros (scale 0)
    bias = torch.randn(n, generator=g)
    w = QL.dequantize(packed, qtype, k).double()
    exact = x.double() @ w.T + bias.double()
    got = QL.qlinear(x, packed, qtype, bias, amx_min_rows=4).double()
    scale = exact.abs().max().item()
    if QL.i8_direct_available():
        want = round_int8_per_32(x).double() @ w.T + bias.double()
        assert (got - want).abs().max().item() < 1e-5 * scale
        assert 0 < (got - exact).abs().max().item() < 0.01 * scale
    else:
        assert (got - exact).abs().max().item() < 1e-5 * scale
    assert (QL.qlinear(x, packed, qtype, bias).double() - exact).abs().max().item() < 1e-5 * scale
