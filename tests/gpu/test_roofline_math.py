"""Roofline math of bench/gpu_roofline.py and the bench config shapes (CPU only)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bench" / "configs"


@pytest.fixture(scope="module")
def rl():
    spec = importlib.util.spec_from_file_location("gpu_roofline", ROOT / "bench" / "gpu_roofline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_roofline"] = mod
    spec.loader.exec_module(mod)
    return mod


def _shape(rl, name):
    return rl.ModelShape.from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


# published parameter counts of the real checkpoints
@pytest.mark.parametrize("name,params", [("llama-3-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400),
                                         ("qwen2.5-7b", 7_615_616_512)])
def test_param_counts_match_the_public_models(rl, name, params):
    assert _shape(rl, name).params() == params


def test_configs_load_in_transformers_with_the_same_count():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig.from_dict(json.loads((CONFIGS / "llama-3.2-1b.json").read_text()))
    assert cfg.tie_word_embeddings and cfg.head_dim == 64
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
    qwen = transformers.AutoConfig.for_model(**json.loads((CONFIGS / "qwen2.5-7b.json").read_text()))
    assert qwen.model_type == "qwen2" and qwen.num_key_value_heads == 4 and qwen.intermediate_size == 18944


def test_bytes(rl):
    s = _shape(rl, "llama-3-8b")
    assert s.kv_bytes_per_token() == 32 * 2 * 8 * 128 * 2 == 131072
    assert s.weight_bytes() == 2 * 8_030_261_248
    assert s.weight_bytes() - s.step_weight_bytes() == 2 * 128256 * 4096  # untied embedding: not read whole
    tied = _shape(rl, "llama-3.2-1b")
    assert tied.weight_bytes() == tied.step_weight_bytes()  # tied: the LM head reads the embedding
    assert _shape(rl, "qwen2.5-7b").qkv_bias and not s.qkv_bias


def test_batch1_decode_matches_the_anchor_numbers(rl):
    r = rl.batch1_decode_roofline(_shape(rl, "llama-3-8b"), bandwidth=3.0e12)
    assert r.ms_per_step == pytest.approx(5.35, abs=0.01)  # 16.06 GB / 3.0 TB/s
    assert r.tokens_per_s == pytest.approx(186.8, abs=0.5)
    one_b = rl.batch1_decode_roofline(_shape(rl, "llama-3.2-1b"), bandwidth=3.0e12)
    assert one_b.ms_per_step == pytest.approx(0.82, abs=0.01)  # "the roofline is 0.8 ms"


def test_offline_roofline_closed_form(rl):
    s = _shape(rl, "llama-3-8b")
    bw, mm = 3.0e12, 802e12
    r = rl.offline_roofline(s, bw, mm)
    n, p, o = 512, 512, 256
    layer = s.layers * s.layer_params()
    prefill = n * (2 * layer * p + 4 * 32 * 32 * 128 * p * (p + 1) // 2 + 2 * 128256 * 4096) / mm
    kv_tokens = n * sum(p + i for i in range(1, o))  # context summed over the 255 decode steps
    decode = ((o - 1) * s.weight_bytes() + kv_tokens * 131072) / bw
    assert r.seconds == pytest.approx(prefill + decode, rel=1e-12)
    assert r.output_tokens == n * o
    assert 12_000 < r.tokens_per_s < 14_500  # ANCHORS: "about 12.9k" (it charged 2 x params per prompt token)


def test_long_context_includes_kv_reads(rl):
    s = _shape(rl, "llama-3-8b")
    r = rl.long_context_roofline(s, bandwidth=3.0e12, context=32768)
    assert r.seconds == pytest.approx((s.weight_bytes() + 32768 * 131072) / 3.0e12)
    assert r.tokens_per_s < rl.batch1_decode_roofline(s, 3.0e12).tokens_per_s
    r8 = rl.long_context_roofline(s, bandwidth=3.0e12, context=32768, batch=8)
    assert r8.output_tokens == 8 and r8.seconds > r.seconds


def test_table_and_cli_without_gpu(rl, tmp_path, capsys):
    out = tmp_path / "r.json"
    res = rl.main(["--config", str(CONFIGS / "llama-3-8b.json"), "--out", str(out)])
    table = capsys.readouterr().out
    assert "| batch-1 decode @ ctx 0 | 187 |" in table
    saved = json.loads(out.read_text())
    assert saved["params"] == 8_030_261_248 == res["params"]
    assert [r["name"] for r in saved["rooflines"]][1] == "offline 512 x (512 in, 256 out)"
    rows = rl.rooflines(_shape(rl, "llama-3-8b"), 3.0e12, 802e12)
    assert "50%" in rl.format_table(rows, {rows[0].name: rows[0].tokens_per_s / 2})
