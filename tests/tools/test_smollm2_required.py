"""End to end on the bundled SmolLM2-135M (its template has no tool support): the generic tool prompt,
greedy decoding under the `required` / named-function grammar, and the generic parser give a valid call
whose arguments match the schema. (Seen: `get_weather` {"city": "Paris", "unit": "celsius"} for "What's
the weather like in Paris right now?", and `get_time` when that function is named.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from tokenmill.tools import (build_tool_constraint, detect_parser, generic_messages, get_tool_parser,  # noqa: E402
                             validate_tools)
from tests.conftest import hf_smollm2_oracle  # noqa: E402

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a time zone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}}, "required": ["tz"]}}}


@pytest.fixture(scope="module")
def hf_model():
    return hf_smollm2_oracle()


@torch.no_grad()
def _greedy(model, tok, prompt_ids, constraint, max_new=60):
    """Greedy decoding under the grammar. A token the grammar forces is taken without a forward pass and
    fed to the model with the next one that needs logits."""
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size,
                                              stop_token_ids=[tok.eos_token_id])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(constraint.grammar()))
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    pending, out, cache = list(prompt_ids), [], None
    for _ in range(max_new):
        matcher.fill_next_token_bitmask(bitmask)
        allowed = np.flatnonzero(np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little"))
        if len(allowed) == 1:
            nxt = int(allowed[0])
        else:
            res = model(input_ids=torch.tensor([pending]), cache=cache, use_cache=True)
            cache, logits, pending = res.past_key_values, res.logits[:, -1, :].float(), []
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            nxt = int(logits.argmax(-1))
        assert matcher.accept_token(nxt)
        if nxt == tok.eos_token_id:
            return tok.decode(out)
        out.append(nxt)
        pending.append(nxt)
    raise AssertionError(f"no end after {max_new} tokens: {tok.decode(out)!r}")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tiny_model_emits_a_valid_required_call(hf_model, smollm2_tokenizer, smollm2_template, tool_choice):
    tok = smollm2_tokenizer
    parser_name = detect_parser(smollm2_template, "llama")
    assert parser_name == "generic"
    req = validate_tools([WEATHER, TIME], tool_choice, False)
    msgs = generic_messages([{"role": "user", "content": "What's the weather like in Paris right now?"}],
                            req.openai_tools(), tool_choice, req.parallel, parser_name)
    prompt = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    text = _greedy(hf_model, tok, prompt, build_tool_constraint(req, parser_name))
    content, calls = get_tool_parser(parser_name, tool_names=req.names).parse(text)
    assert content is None and len(calls) == 1, text
    schema = {t.name: t.parameters for t in req.tools}[calls[0].name]
    jsonschema.validate(json.loads(calls[0].arguments), schema)
    if isinstance(tool_choice, dict):
        assert calls[0].name == "get_time"
