"""The router's view of a prompt: the token ids of a /v1/chat/completions or /v1/completions body, as the
backend would build them (the model's tokenizer and chat template, tokenmill's Processor), and their
chained block hashes for the prefix policy. A body the router cannot read gets no hashes; the backend
then answers it (with its own 400 where it is bad)."""
from __future__ import annotations

from typing import Any, Optional

from tokenmill.router.policy import prompt_block_hashes

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


class PromptHasher:
    def __init__(self, processor: Any, block_size: int, max_blocks: int):
        self.processor, self.block_size, self.max_blocks = processor, block_size, max_blocks

    @classmethod
    def for_model(cls, model: Optional[str], tokenizer: Optional[str], block_size: int,
                  max_blocks: int) -> "PromptHasher":
        """Load the tokenizer the backends use: `tokenizer` if given, else the model's (tokenmill's loaders)."""
        from tokenmill.engine.processor import Processor
        from tokenmill.engine.tokenizer import load_tokenizer
        from tokenmill.model.loader import resolve_model_source

        if tokenizer:
            tok = load_tokenizer(tokenizer)
        else:
            src = resolve_model_source(model)
            tok = load_tokenizer(src.path, src.gguf_file)
        return cls(Processor(tok, max_model_len=1 << 30, vocab_size=1 << 30), block_size, max_blocks)

    def token_ids(self, path: str, body: Any) -> Optional[list[int]]:
        if not isinstance(body, dict):
            return None
        if path == CHAT:
            msgs = body.get("messages")
            if not isinstance(msgs, list):
                return None
            kw = body.get("chat_template_kwargs") if isinstance(body.get("chat_template_kwargs"), dict) else {}
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tools=body.get("tools"),
                                                      **kw)
        if path == COMPLETIONS:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                prompt = prompt[0]  # a batch of prompts: route by the first
            if isinstance(prompt, str) or (isinstance(prompt, list) and prompt):
                return self.processor.tokenize(prompt)
        return None

    def hashes(self, path: str, body: Any) -> list[int]:
        try:
            ids = self.token_ids(path, body)
        except Exception:  # noqa: BLE001 - a bad body is the backend's to reject
            return []
        if not ids:
            return []
        salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None
        # the engine never takes a prompt's last token from the cache: hash only blocks it could hit
        return prompt_block_hashes(ids[:-1], self.block_size, salt, self.max_blocks)
