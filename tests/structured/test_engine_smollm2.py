"""Constrained decoding end to end on the bundled SmolLM2 GGUF: every output parses and validates, the
unconstrained rows of a mixed batch are untouched, jump-forward keeps greedy output, speculation too."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.structured.schemas import SCHEMAS
from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import StructuredOutputsParams as SO

pytestmark = pytest.mark.slow

FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.fixture(scope="module")
def llm():
    # float32 GEMMs and K/V: greedy tokens do not depend on how many rows a step has (bf16 GEMMs kick in from a few
    # rows; a bf16 cache rounds a drafted token's K/V differently: on the Zen 4 box a near-tied digit in one of 30
    # jump-forward answers flipped with the default bf16 K/V)
    return LLM(max_model_len=1024, gemm_dtype="float32", max_num_seqs=64, kv_cache_dtype="float32")


def _prompt(llm, text: str) -> dict:
    return {"prompt_token_ids": llm.engine.processor.apply_chat_template([{"role": "user", "content": text}])}


def _schema_prompt(llm, schema: dict) -> dict:
    return _prompt(llm, f"Reply with a JSON value for this schema, with realistic values: {json.dumps(schema)}")


def _generate(llm, prompts, params) -> list:
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def _check_json(outs, schemas) -> None:
    for o, schema in zip(outs, schemas):
        assert o.finish_reason == "stop", (o.finish_reason, o.text, schema)
        jsonschema.validate(json.loads(o.text), schema, format_checker=FORMATS)


def _jf(llm, mode: str) -> None:
    llm.engine.core.structured.manager.jump_forward_mode = mode


def test_sixty_schemas_parse_and_validate(llm):
    assert len(SCHEMAS) >= 50
    params = [SamplingParams(temperature=0, max_tokens=160,
                             structured_outputs=SO(json=s, disable_any_whitespace=i % 2 == 1))
              for i, s in enumerate(SCHEMAS)]
    outs = _generate(llm, [_schema_prompt(llm, s) for s in SCHEMAS], params)
    _check_json(outs, SCHEMAS)
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0
    assert len(llm.engine.core.structured.manager) == 0  # every matcher was dropped


def test_sampled_outputs_validate_too(llm):
    # without string formats and floats, whose digits a sampled small model can continue past max_tokens
    schemas = [s for s in SCHEMAS if '"format"' not in json.dumps(s) and '"number"' not in json.dumps(s)][::4]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=160, n=2,
                             structured_outputs=SO(json=s, disable_any_whitespace=True))
              for i, s in enumerate(schemas)]
    res = llm.generate([_schema_prompt(llm, s) for s in schemas], params, use_tqdm=False)
    for r, s in zip(res, schemas):
        _check_json(r.outputs, [s] * len(r.outputs))


def test_regex_choice_and_grammar(llm):
    cases = [(SO(regex=r"[0-9]{3}-[0-9]{4}"), re.compile(r"[0-9]{3}-[0-9]{4}")),
             (SO(regex=r"(red|green|blue) (car|bike)"), re.compile(r"(red|green|blue) (car|bike)")),
             (SO(choice=["Paris", "London", "Berlin"]), re.compile(r"Paris|London|Berlin")),
             (SO(grammar='root ::= num " " op " " num\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-" | "*"'),
              re.compile(r"[1-9][0-9]? [-+*] [1-9][0-9]?")),
             (SO(json_object=True, disable_any_whitespace=True), None)]
    prompts = [_prompt(llm, q) for q in ["Give a phone number.", "Name a colored vehicle.",
                                         "What is the capital of France?", "Write an arithmetic expression.",
                                         'Return {"ok": true} as JSON.']]
    params = [SamplingParams(temperature=0, max_tokens=120, structured_outputs=so) for so, _ in cases]
    outs = _generate(llm, prompts, params)
    for (so, pattern), o in zip(cases, outs):
        assert o.finish_reason == "stop", (so, o.text)
        if pattern is None:
            assert json.loads(o.text) == {"ok": True}
        else:
            assert pattern.fullmatch(o.text), (so, o.text)


def test_chat_with_a_schema(llm):
    schema = SCHEMAS[0]
    out = llm.chat([{"role": "user", "content": "Describe Bob, 42 years old, as JSON."}],
                   SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=schema)),
                   use_tqdm=False)[0].outputs[0]
    _check_json([out], [schema])


def test_unsatisfiable_within_max_tokens_ends_with_length(llm):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 200}
    outs = _generate(llm, [_schema_prompt(llm, schema)],
                     SamplingParams(temperature=0, max_tokens=12, structured_outputs=SO(json=schema)))
    assert outs[0].finish_reason == "length" and len(outs[0].token_ids) == 12
    assert llm.engine.core.scheduler.kv.num_used_blocks == 0


def test_grammar_end_finishes_with_stop_even_with_ignore_eos(llm):
    out = _generate(llm, [_prompt(llm, "Is the sky blue?")],
                    SamplingParams(temperature=0, max_tokens=50, ignore_eos=True,
                                   structured_outputs=SO(choice=["yes", "no"])))[0]
    assert out.finish_reason == "stop" and out.text in ("yes", "no")


def test_bad_specs_are_request_errors_and_the_engine_keeps_serving(llm):
    bad = [({"json": {"type": "nosuchtype"}}, "structured_outputs.json"),
           ({"json": {"properties": {"a": {"$ref": "#/$defs/nope"}}}}, "structured_outputs.json"),
           ({"regex": "(unclosed"}, "structured_outputs.regex"),
           ({"grammar": "root ::= missing_rule"}, "structured_outputs.grammar"),
           ({"regex": "a", "choice": ["a"]}, "structured_outputs")]
    for spec, param in bad:
        with pytest.raises(InvalidRequestError) as e:
            llm.generate("hi", SamplingParams(max_tokens=4, structured_outputs=spec), use_tqdm=False)
        assert e.value.param == param, (spec, e.value.message)
    out = _generate(llm, ["Hello"], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.token_ids) == 4


def test_mixed_batch_leaves_unconstrained_rows_unchanged(llm):
    free = [_prompt(llm, q) for q in ["Write a haiku about rain.", "Name three primary colors.",
                                      "What is 2+2?"]]
    free_params = SamplingParams(temperature=0, max_tokens=24)
    alone = _generate(llm, free, free_params)
    constrained = [_schema_prompt(llm, s) for s in SCHEMAS[:6]]
    c_params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=s)) for s in SCHEMAS[:6]]
    mixed = _generate(llm, constrained[:3] + free + constrained[3:], c_params[:3] + [free_params] * 3 + c_params[3:])
    assert [o.token_ids for o in mixed[3:6]] == [o.token_ids for o in alone]
    _check_json(mixed[:3] + mixed[6:], SCHEMAS[:6])


def test_jump_forward_keeps_greedy_output_and_saves_steps(llm):
    schemas = SCHEMAS[:30]
    prompts = [_schema_prompt(llm, s) for s in schemas]
    results, steps = {}, {}
    for mode in ("off", "tokens", "draft", "string"):
        _jf(llm, mode)
        params = [SamplingParams(temperature=0, max_tokens=160, structured_outputs=SO(json=s, disable_any_whitespace=True))
                  for s in schemas]
        s0 = llm.engine.core.scheduler.num_steps
        results[mode] = _generate(llm, prompts, params)
        steps[mode] = llm.engine.core.scheduler.num_steps - s0
    _jf(llm, "draft")
    for mode in ("tokens", "draft"):  # the exact modes
        _check_json(results[mode], schemas)
        assert [o.token_ids for o in results[mode]] == [o.token_ids for o in results["off"]], mode
    assert steps["draft"] < steps["tokens"] < steps["off"]
    _check_json(results["string"], schemas)  # valid, but its text may differ (not asserted)


def test_jump_forward_one_request_fixed_keys(llm):
    schema = {"type": "object", "additionalProperties": False, "properties": {
        "customer_name": {"type": "string", "maxLength": 16}, "account_status": {"enum": ["active", "suspended"]},
        "is_verified": {"type": "boolean"}, "number_of_devices": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["customer_name", "account_status", "is_verified", "number_of_devices"]}
    prompt = _prompt(llm, "Create the account record of Alice as JSON.")
    steps, outs = {}, {}
    for mode in ("off", "draft"):
        _jf(llm, mode)
        s0 = llm.engine.core.scheduler.num_steps
        outs[mode] = _generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=120, structured_outputs=SO(
            json=schema, disable_any_whitespace=True)))[0]
        steps[mode] = llm.engine.core.scheduler.num_steps - s0
    _jf(llm, "draft")
    assert outs["draft"].token_ids == outs["off"].token_ids
    _check_json([outs["draft"]], [schema])
    assert steps["off"] >= 1.3 * steps["draft"], steps


def test_speculation_with_a_grammar_gives_the_same_greedy_text(llm):
    spec_llm = LLM(max_model_len=1024, gemm_dtype="float32", max_num_seqs=64, speculative_method="ngram",
                   num_speculative_tokens=4)
    schemas = SCHEMAS[:12] + SCHEMAS[30:34]
    prompts = [_schema_prompt(llm, s) for s in schemas]
    params = [SamplingParams(temperature=0, max_tokens=160, structured_outputs=SO(json=s)) for s in schemas]
    ref = _generate(llm, prompts, params)
    out = _generate(spec_llm, prompts, params)
    _check_json(out, schemas)
    assert [o.text for o in out] == [o.text for o in ref]
    sampled = _generate(spec_llm, prompts, [p.clone(temperature=0.7, seed=i) for i, p in enumerate(params)])
    _check_json(sampled, schemas)
