"""StructuredOutputsParams validation, and xgrammar parse errors as InvalidRequestError naming the field."""
from __future__ import annotations

import pickle

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.structured.grammar import build_grammar


def _param_of(fn) -> str:
    with pytest.raises(InvalidRequestError) as e:
        fn()
    assert "\n" not in e.value.message and "/project/" not in e.value.message
    return e.value.param


def test_exactly_one_constraint():
    assert _param_of(lambda: StructuredOutputsParams()) == "structured_outputs"
    assert _param_of(lambda: StructuredOutputsParams(json={"type": "object"}, regex="a+")) == "structured_outputs"
    assert _param_of(lambda: StructuredOutputsParams(choice=["a"], json_object=True)) == "structured_outputs"
    assert _param_of(lambda: SamplingParams(structured_outputs={"regex": "a", "grammar": "root ::= \"a\""})) \
        == "structured_outputs"


def test_field_types():
    assert _param_of(lambda: StructuredOutputsParams(json="{not json")) == "structured_outputs.json"
    assert _param_of(lambda: StructuredOutputsParams(json="[1, 2]")) == "structured_outputs.json"
    assert _param_of(lambda: StructuredOutputsParams(regex="")) == "structured_outputs.regex"
    assert _param_of(lambda: StructuredOutputsParams(choice=[])) == "structured_outputs.choice"
    assert _param_of(lambda: StructuredOutputsParams(choice=["a", 3])) == "structured_outputs.choice"
    assert _param_of(lambda: SamplingParams(structured_outputs={"jsonn": {}})) == "structured_outputs"
    assert _param_of(lambda: SamplingParams(structured_outputs="json")) == "structured_outputs"


def test_invalid_specs_name_their_field():
    bad = [(StructuredOutputsParams(json={"type": "nosuchtype"}), "structured_outputs.json"),
           (StructuredOutputsParams(json={"properties": {"a": {"$ref": "#/$defs/missing"}}}),
            "structured_outputs.json"),
           (StructuredOutputsParams(regex="a(b"), "structured_outputs.regex"),
           (StructuredOutputsParams(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
           (StructuredOutputsParams(grammar="not a grammar at all"), "structured_outputs.grammar")]
    for so, param in bad:
        assert _param_of(lambda: build_grammar(so)) == param, so


def test_valid_specs_build():
    for so in [StructuredOutputsParams(json='{"type": "object", "properties": {"a": {"type": "integer"}}}'),
               StructuredOutputsParams(json_object=True), StructuredOutputsParams(regex=r"\d+"),
               StructuredOutputsParams(choice=['say "hi"', "b\\c"]),
               StructuredOutputsParams(grammar='root ::= "x" [0-9]*')]:
        build_grammar(so)


def test_key_keeps_property_order_and_ignores_formatting():
    a = StructuredOutputsParams(json={"properties": {"b": {}, "a": {}}})
    b = StructuredOutputsParams(json='{"properties": {"b": {},   "a": {}}}')
    c = StructuredOutputsParams(json={"properties": {"a": {}, "b": {}}})
    assert a.key == b.key != c.key
    assert a.key != StructuredOutputsParams(json=a.json, disable_any_whitespace=True).key


def test_sampling_params_with_structured_outputs_pickles():
    sp = SamplingParams(temperature=0, structured_outputs={"json": {"type": "object"}})
    assert isinstance(sp.structured_outputs, StructuredOutputsParams)
    sp2 = pickle.loads(pickle.dumps(sp))
    assert sp2.structured_outputs == sp.structured_outputs and sp2.structured_outputs.kind == "json"
