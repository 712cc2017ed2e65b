"""A tiny llama with SmolLM2's vocabulary (so the bundled GGUF tokenizer and its chat template apply) and a
small chat dataset with a fixed reply."""
from __future__ import annotations

import json

import pytest

from tests.model.tiny_models import build_tiny_model

QUESTION = "What is the secret word?"
REPLY = "The secret word is banana."


def fixed_reply_examples(n: int = 4) -> list[dict]:
    qs = [QUESTION, "Tell me the secret word.", "Secret word?", "Which word is secret?"]
    return [{"messages": [{"role": "user", "content": qs[i % len(qs)]}, {"role": "assistant", "content": REPLY}]}
            for i in range(n)]


def jsonl(examples: list[dict]) -> bytes:
    return ("\n".join(json.dumps(e) for e in examples) + "\n").encode()


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, gguf_path):
    """(folder, tokenizer source, transformers model) of a 2-layer llama with a 49152-token vocabulary."""
    path = str(tmp_path_factory.mktemp("tiny_chat"))
    hf = build_tiny_model("smollm", seed=3, vocab_size=49152)
    hf.save_pretrained(path)
    return path, gguf_path, hf
