"""Tool validation (the 400s) and the xgrammar constraints: they compile, accept exactly the valid
calls, and what they accept parses back into those calls."""
from __future__ import annotations

import json

import pytest

xgr = pytest.importorskip("xgrammar")

from tokenmill.errors import InvalidRequestError  # noqa: E402
from tokenmill.tools.constraints import build_tool_constraint  # noqa: E402
from tokenmill.tools.parsers import get_tool_parser  # noqa: E402
from tokenmill.tools.validate import ToolValidationError, validate_tools  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"]}}}
PING = {"type": "function", "function": {"name": "ping"}}  # no parameters
TOOLS = [WEATHER, TIME, PING]
NAMED_TIME = {"type": "function", "function": {"name": "get_time"}}


# ---------------------------------------------------------------- validation
def _param(tools, choice=None, parallel=None):
    with pytest.raises(ToolValidationError) as e:
        validate_tools(tools, choice, parallel)
    assert isinstance(e.value, InvalidRequestError) and e.value.http_status == 400
    return e.value.param


def _fn(**fn):
    return {"type": "function", "function": fn}


def test_validation_errors_name_the_field():
    assert _param(TOOLS, {"type": "function", "function": {"name": "nope"}}) == "tool_choice"
    assert _param(TOOLS, "sometimes") == "tool_choice"
    assert _param(TOOLS, {"type": "function"}) == "tool_choice"
    assert _param(TOOLS, 3) == "tool_choice"
    assert _param(None, "required") == "tool_choice"
    assert _param([], NAMED_TIME) == "tool_choice"
    assert _param([WEATHER, WEATHER]) == "tools[1].function.name"
    assert _param([_fn(name="bad name")]) == "tools[0].function.name"
    assert _param([_fn(name="x" * 65)]) == "tools[0].function.name"
    assert _param([WEATHER, _fn(name="f", parameters={"type": "object", "properties": {"a": {"type": "strin"}}})]) \
        == "tools[1].function.parameters"
    assert _param([_fn(name="f", parameters={"type": "array"})]) == "tools[0].function.parameters"
    assert _param([_fn(name="f", parameters="{}")]) == "tools[0].function.parameters"
    assert _param([_fn(name="f", parameters={"type": "object", "properties": {"a": {"$ref": "#/nope"}}})]) \
        == "tools[0].function.parameters"  # valid JSON schema syntax, but nothing to enforce
    assert _param([{"type": "retrieval"}]) == "tools[0].type"
    assert _param([{"type": "function"}]) == "tools[0].function"
    assert _param([_fn(name="f", description=3)]) == "tools[0].function.description"
    assert _param({"name": "f"}) == "tools"
    assert _param(TOOLS, "auto", "yes") == "parallel_tool_calls"


def test_validation_accepts_and_normalizes():
    assert validate_tools(None) is None and validate_tools(None, "none") is None and validate_tools([], None) is None
    assert validate_tools([], "auto") is None
    req = validate_tools(TOOLS)
    assert req.choice == "auto" and req.parallel and req.names == ("get_weather", "get_time", "ping")
    assert req.tools[2].parameters == {"type": "object", "properties": {}}
    assert req.openai_tools()[1] == TIME
    req = validate_tools(TOOLS, NAMED_TIME, False)
    assert (req.choice, req.function, req.parallel) == ("function", "get_time", False)
    assert validate_tools(TOOLS, "none").choice == "none"
    assert build_tool_constraint(validate_tools(TOOLS, "none"), "hermes") is None
    assert build_tool_constraint(None, "hermes") is None


# ---------------------------------------------------------------- grammars
EOS = "<eos>"
VOCAB = [chr(i) for i in range(32, 127)] + ["\n", "é", EOS]


@pytest.fixture(scope="module")
def compiler():
    return xgr.GrammarCompiler(xgr.TokenizerInfo(VOCAB, stop_token_ids=[len(VOCAB) - 1]))


def _accepts(compiler, constraint, text):
    """Whether the constraint takes `text` then the end token; its EBNF form must agree."""
    results = []
    for grammar in (constraint.grammar(), xgr.Grammar.from_ebnf(constraint.ebnf())):
        m = xgr.GrammarMatcher(compiler.compile_grammar(grammar))
        results.append(m.accept_string(text) and m.accept_token(len(VOCAB) - 1) and m.is_terminated())
    assert results[0] == results[1], text
    return results[0]


def _call(fmt, name, args):
    a = json.dumps(args)
    if fmt in ("hermes", "generic"):
        return '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (name, a)
    if fmt == "llama3_json":
        return '{"name": "%s", "parameters": %s}' % (name, a)
    return "[TOOL_CALLS]%s[ARGS]%s" % (name, a)


def _join(fmt, calls):
    return {"hermes": "\n", "generic": "\n", "llama3_json": "; ", "mistral": ""}[fmt].join(calls)


GOOD = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"}), ("ping", {}),
        ("get_weather", {"city": "Zürich", "days": 3})]
BAD = [("get_weather", {"town": "Paris"}), ("get_weather", {"city": 3}), ("get_time", {"tz": "PST"}),
       ("get_weather", {"city": "P", "days": 0}), ("nope", {}), ("get_weather", {})]


@pytest.mark.parametrize("fmt", ["hermes", "generic", "llama3_json", "mistral"])
def test_required_accepts_valid_calls_only(compiler, fmt):
    one = build_tool_constraint(validate_tools(TOOLS, "required", False), fmt)
    many = build_tool_constraint(validate_tools(TOOLS, "required", True), fmt)
    parser = get_tool_parser(fmt, tool_names=[t["function"]["name"] for t in TOOLS])
    for name, args in GOOD:
        text = _call(fmt, name, args)
        assert _accepts(compiler, one, text) and _accepts(compiler, many, text), text
        content, calls = parser.parse(text)
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [(name, args)]
    for name, args in BAD:
        assert not _accepts(compiler, one, _call(fmt, name, args)), (name, args)
        assert not _accepts(compiler, many, _call(fmt, name, args)), (name, args)
    both = _join(fmt, [_call(fmt, *GOOD[0]), _call(fmt, *GOOD[1])])
    assert _accepts(compiler, many, both) and not _accepts(compiler, one, both)
    assert [c.name for c in parser.parse(both).tool_calls] == ["get_weather", "get_time"]
    assert not _accepts(compiler, one, "Sure, here you go.")  # text instead of a call
    assert not _accepts(compiler, one, "")


def test_mistral_required_also_takes_the_list_form(compiler):
    one = build_tool_constraint(validate_tools(TOOLS, "required", False), "mistral")
    many = build_tool_constraint(validate_tools(TOOLS, "required", True), "mistral")
    listed = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    two = '[TOOL_CALLS][{"name": "ping", "arguments": {}}, {"name": "get_time", "arguments": {"tz": "UTC"}}]'
    assert _accepts(compiler, one, listed) and _accepts(compiler, many, two) and not _accepts(compiler, one, two)
    assert [c.name for c in get_tool_parser("mistral").parse(two).tool_calls] == ["ping", "get_time"]


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_named_function_accepts_only_that_function(compiler, fmt):
    c = build_tool_constraint(validate_tools(TOOLS, NAMED_TIME), fmt)
    assert _accepts(compiler, c, _call(fmt, "get_time", {"tz": "UTC"}))
    assert not _accepts(compiler, c, _call(fmt, "get_weather", {"city": "Paris"}))
    assert not _accepts(compiler, c, _join(fmt, [_call(fmt, "get_time", {"tz": "UTC"})] * 2))


@pytest.mark.parametrize("fmt", ["hermes", "generic", "llama3_json", "mistral"])
def test_auto_leaves_text_free_and_constrains_triggered_calls(compiler, fmt):
    c = build_tool_constraint(validate_tools(TOOLS, "auto", True), fmt)
    single = build_tool_constraint(validate_tools(TOOLS, "auto", False), fmt)
    assert _accepts(compiler, c, "The weather is nice. No tool needed!")
    assert _accepts(compiler, c, "")
    call = _call(fmt, "get_weather", {"city": "Paris"})
    assert _accepts(compiler, c, "Let me check. " + call)
    assert _accepts(compiler, c, call + call)
    assert _accepts(compiler, single, "Let me check. " + call) and not _accepts(compiler, single, call + call)
    for name, args in BAD:
        assert not _accepts(compiler, c, "Let me check. " + _call(fmt, name, args)), (name, args)
    content, calls = get_tool_parser(fmt).parse("Let me check. " + call)
    assert content == "Let me check." and [x.name for x in calls] == ["get_weather"]


def test_token_level_with_the_smollm2_tokenizer(smollm2_tokenizer):
    """With the real tokenizer, `required` masks the end-of-sequence token until a call is complete,
    and the model's tokens of a valid call are accepted one by one."""
    tok = smollm2_tokenizer
    info = xgr.TokenizerInfo.from_huggingface(tok, stop_token_ids=[tok.eos_token_id])
    c = build_tool_constraint(validate_tools(TOOLS, "required", False), "generic")
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(c.grammar()))
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    def allowed(i):  # bit i of the mask is set when token i may come next
        return bool((int(bitmask[0, i // 32]) >> (i % 32)) & 1)

    assert not allowed(tok.eos_token_id)
    assert allowed(tok.encode("<", add_special_tokens=False)[0])
    ids = tok.encode(_call("generic", "get_weather", {"city": "Paris"}), add_special_tokens=False)
    for i in ids:
        assert matcher.accept_token(i), tok.decode([i])
    assert matcher.accept_token(tok.eos_token_id) and matcher.is_terminated()
    bad = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(c.grammar()))
    assert not all(bad.accept_token(i) for i in tok.encode("Hello!", add_special_tokens=False))
