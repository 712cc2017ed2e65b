"""Tool-call parsers on recorded-style outputs: whole-text parse, and streaming at every split position,
char by char and in random chunks, adding up to exactly the whole-text parse."""
from __future__ import annotations

import json
import random
import re

import pytest

from tests.tools.samples import MALFORMED_ARGS, SAMPLES
from tokenmill.tools.parsers import TOOL_PARSER_NAMES, get_tool_parser
from tokenmill.tools.types import ContentDelta, ToolCallDelta, assemble

OPENAI_ID = re.compile(r"^call_[A-Za-z0-9]{24}$")
MISTRAL_ID = re.compile(r"^[A-Za-z0-9]{9}$")


def _shape(parsed):
    return parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


def _stream(parser, pieces):
    sp = parser.streaming()
    deltas = []
    for p in pieces:
        deltas += sp.feed(p)
    deltas += sp.finish()
    return deltas


def _ids(sample):
    return f"{sample[0]}:{sample[1][:40]!r}"


@pytest.mark.parametrize("sample", SAMPLES, ids=[_ids(s) for s in SAMPLES])
def test_whole_text_parse(sample):
    fmt, text, content, calls = sample
    parsed = get_tool_parser(fmt).parse(text)
    assert _shape(parsed) == (content, calls)
    for c in parsed.tool_calls:
        json.loads(c.arguments)
        assert (MISTRAL_ID if fmt == "mistral" else OPENAI_ID).match(c.id), c.id
    assert len({c.id for c in parsed.tool_calls}) == len(parsed.tool_calls)


@pytest.mark.parametrize("stream_arguments", [True, False])
@pytest.mark.parametrize("sample", SAMPLES, ids=[_ids(s) for s in SAMPLES])
def test_streaming_equals_whole_parse_at_every_split(sample, stream_arguments):
    fmt, text, content, calls = sample
    parser = get_tool_parser(fmt, stream_arguments=stream_arguments)
    expected = (content, calls)
    assert _shape(parser.parse(text)) == expected
    for cut in range(len(text) + 1):
        assert _shape(assemble(_stream(parser, [text[:cut], text[cut:]]))) == expected, cut
    for a in range(0, len(text) + 1, 7):  # two split points
        for b in range(a, len(text) + 1, 5):
            assert _shape(assemble(_stream(parser, [text[:a], text[a:b], text[b:]]))) == expected, (a, b)
    assert _shape(assemble(_stream(parser, list(text)))) == expected
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 12))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        assert _shape(assemble(_stream(parser, pieces))) == expected, cuts


@pytest.mark.parametrize("sample", SAMPLES, ids=[_ids(s) for s in SAMPLES])
def test_streamed_content_never_shows_a_partial_trigger(sample):
    """Char by char, the content sent so far is always a prefix of the final content: nothing that later
    turns out to be part of a call (a held-back `<tool_ca`) is ever sent as text."""
    fmt, text, content, _ = sample
    parser = get_tool_parser(fmt)
    sp = parser.streaming()
    sent = ""
    for ch in text:
        for d in sp.feed(ch):
            if isinstance(d, ContentDelta):
                sent += d.text
                assert (content or "").startswith(sent), (sent, content)


def test_call_deltas_name_first_then_argument_pieces():
    text = ('Hi.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
            '\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>')
    deltas = _stream(get_tool_parser("hermes"), [text[i:i + 4] for i in range(0, len(text), 4)])
    calls = [d for d in deltas if isinstance(d, ToolCallDelta)]
    first = [d for d in calls if d.index == 0]
    assert first[0].name == "get_weather" and OPENAI_ID.match(first[0].id) and first[0].arguments == ""
    assert all(d.id is None and d.name is None for d in first[1:])
    assert len(first) > 3  # arguments arrive in pieces, not at once
    assert "".join(d.arguments for d in first) == '{"city":"Paris","days":3}'
    # call 1 starts only after call 0 is complete, and the content came before both
    assert [d.index for d in calls] == sorted(d.index for d in calls)
    assert isinstance(deltas[0], ContentDelta) and deltas[0].text == "Hi."
    assert calls[0].to_openai() == {"index": 0, "id": calls[0].id, "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""}}
    assert calls[1].to_openai() == {"index": 0, "function": {"arguments": calls[1].arguments}}


def test_stream_arguments_false_sends_each_call_whole():
    text = '<tool_call>{"name": "f", "arguments": {"a": [1, 2, 3]}}</tool_call>'
    deltas = _stream(get_tool_parser("hermes", stream_arguments=False), list(text))
    assert [(d.name, d.arguments) for d in deltas] == [("f", ""), (None, '{"a":[1,2,3]}')]


@pytest.mark.parametrize("fmt,text,prefix", MALFORMED_ARGS)
def test_malformed_arguments(fmt, text, prefix):
    whole = get_tool_parser(fmt, stream_arguments=False)
    assert _shape(whole.parse(text)) == (text, [])  # the call is content
    streaming = get_tool_parser(fmt)
    content, calls = _shape(streaming.parse(text))
    assert calls[0][1] == prefix  # the call keeps what was already sent; the rest is content
    assert text.endswith(content or "")
    for parser in (whole, streaming):
        expected = _shape(parser.parse(text))
        for cut in range(len(text) + 1):
            assert _shape(assemble(_stream(parser, [text[:cut], text[cut:]]))) == expected, cut


def test_tool_names_filter_unknown_functions():
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call><tool_call>{"name": "ok", "arguments": {}}</tool_call>'
    content, calls = _shape(get_tool_parser("hermes", tool_names=["ok"]).parse(text))
    assert content == '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>' and calls == [("ok", "{}")]
    assert _shape(get_tool_parser("llama3_json", tool_names=["a"]).parse('{"name": "b", "parameters": {}}')) \
        == ('{"name": "b", "parameters": {}}', [])
    assert _shape(get_tool_parser("mistral", tool_names=["a"]).parse("[TOOL_CALLS]b[ARGS]{}")) \
        == ("[TOOL_CALLS]b[ARGS]{}", [])


def test_truncated_call_keeps_sent_arguments():
    # max_tokens stopped the output inside the arguments: the call was already sent
    text = '<tool_call>\n{"name": "write", "arguments": {"text": "Once upon a ti'
    content, calls = _shape(get_tool_parser("generic").parse(text))
    assert content is None and calls == [("write", '{"text":"Once upon a ti')]


def test_id_factory_and_unknown_parser():
    n = iter(range(100))
    parser = get_tool_parser("hermes", id_factory=lambda: f"call_{next(n)}")
    parsed = parser.parse('<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>'
                          '{"name": "b", "arguments": {}}</tool_call>')
    assert [c.id for c in parsed.tool_calls] == ["call_0", "call_1"]
    assert parsed.tool_calls[0].to_openai() == {"id": "call_0", "type": "function",
                                                "function": {"name": "a", "arguments": "{}"}}
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_tool_parser("nope")
    assert set(TOOL_PARSER_NAMES) == {"hermes", "generic", "llama3_json", "mistral"}


def test_streaming_misuse_is_an_error():
    sp = get_tool_parser("hermes").streaming()
    sp.finish()
    with pytest.raises(RuntimeError):
        sp.feed("x")
    with pytest.raises(RuntimeError):
        sp.finish()


def test_long_output_streams_in_linear_time_buffers():
    """A long plain answer is not buffered: each delta comes out as it is fed (held back: only a
    suffix that may start a trigger, and trailing whitespace)."""
    sp = get_tool_parser("hermes").streaming()
    out = []
    for i in range(2000):
        out += sp.feed(f"word{i} ")
        assert len(sp._buf) < 16
    out += sp.finish()
    assert "".join(d.text for d in out) == "".join(f"word{i} " for i in range(2000))


_PIECES = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "{", "}", "[", "]", '"',
           '"name"', '"arguments"', '"parameters"', ":", ",", ";", " ", "\n", "f", "1", "-", "e", ".", "true",
           "nul", "\\", "\\u00e9", "é", "x", '{"name": "f", "arguments": {', '{"name": "f", "parameters": {',
           "f[ARGS]{", '"a": [1, {"b": null}]', "}}", "<tool_", "[TOOL_"]


@pytest.mark.parametrize("fmt", TOOL_PARSER_NAMES)
@pytest.mark.parametrize("stream_arguments", [True, False])
def test_fuzz_never_crashes_and_is_chunking_independent(fmt, stream_arguments):
    rng = random.Random(f"{fmt}-{stream_arguments}")
    parser = get_tool_parser(fmt, stream_arguments=stream_arguments)
    for _ in range(150):
        text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 30)))
        expected = _shape(parser.parse(text))
        for c in get_tool_parser(fmt).parse(text).tool_calls:
            assert c.name and c.arguments.startswith("{")
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        assert _shape(assemble(_stream(parser, pieces))) == expected, (text, cuts)
        assert _shape(assemble(_stream(parser, list(text)))) == expected, text
        if not expected[1]:  # no call: the text comes back untouched
            assert expected[0] == (text or None), text


@pytest.mark.parametrize("stream_arguments", [True, False])
def test_fuzz_mutated_samples(stream_arguments):
    """Recorded outputs with a few random cuts, insertions and repeats: near-valid, mostly malformed."""
    rng = random.Random(stream_arguments)
    with_calls = 0
    for _ in range(400):
        fmt, text, _, _ = rng.choice(SAMPLES)
        for _ in range(rng.randint(1, 3)):
            i = rng.randint(0, len(text))
            j = min(len(text), i + rng.randint(0, 6))
            op = rng.random()
            text = (text[:i] + text[j:] if op < 0.4 else text[:i] + rng.choice(_PIECES) + text[i:] if op < 0.8
                    else text[:j] + text[i:])
        parser = get_tool_parser(fmt, stream_arguments=stream_arguments)
        expected = _shape(parser.parse(text))
        with_calls += bool(expected[1])
        if not stream_arguments:
            for _, args in expected[1]:
                json.loads(args)  # calls sent whole are always valid JSON
        cut = rng.randint(0, len(text))
        assert _shape(assemble(_stream(parser, [text[:cut], text[cut:]]))) == expected, (text, cut)
        assert _shape(assemble(_stream(parser, list(text)))) == expected, text
    assert with_calls > 60  # the mutations leave many calls intact
