from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The bundled default model's tokenizer (its chat_template is the GGUF's tokenizer.chat_template)."""
    from tests.conftest import smollm2_gguf_path
    from tokenmill.engine.tokenizer import load_tokenizer

    path = smollm2_gguf_path()
    return load_tokenizer(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def smollm2_template(smollm2_tokenizer) -> str:
    return smollm2_tokenizer.chat_template
