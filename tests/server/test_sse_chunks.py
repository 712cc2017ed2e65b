"""The pre-serialized SSE chunk of a streamed token (TextChunk) is byte for byte the json.dumps one."""
from __future__ import annotations

import random

import pytest

from tokenmill.server.generation import TextChunk, sse

TEXTS = ["", " fox", "a\"b\\c/d", "line\nbreak\ttab\r\x00\x01\x1f\x7f", "\u2028\u2029", "héllo wörld", "你好",
         "😀👨‍👩‍👧", "\ufffd", "</script><!--", "{\"json\": [1, 2]}"]


def reference(head: dict, chat: bool, usage: bool, index: int, text: str) -> str:
    """The chunk as the stream handlers build it for the same choice (serving.py's chunk())."""
    choice = {"index": index, "delta": {"content": text}} if chat else {"index": index, "text": text}
    choice.update(logprobs=None, finish_reason=None)
    body = {**head, "choices": [choice]}
    if usage:
        body["usage"] = None
    return sse(body)


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_text_chunk_matches_json_dumps(chat, usage):
    rng = random.Random(0)
    heads = [{"id": "cmpl-0123abcd-0", "object": "text_completion", "created": 1765000000, "model": "SmolLM2"},
             {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0, "model": "lora \"ñ\" 😀"}]
    for head in heads:
        chunk = TextChunk(head, chat=chat, usage=usage)
        for text in TEXTS + ["".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(0, 12)))
                             for _ in range(200)]:
            for index in (0, 7, 123):
                assert chunk(index, text) == reference(head, chat, usage, index, text)
