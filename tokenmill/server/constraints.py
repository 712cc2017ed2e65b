"""Request fields that constrain the output, mapped to one `StructuredOutputsParams`.

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema"}), vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and the newer `structured_outputs` object. At most one
constraint per request; every mistake is an InvalidRequestError naming the request field it came from.
"""
from __future__ import annotations

from typing import Any, Optional

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_SO_KEYS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")


def constraint_from_fields(fields: dict[str, Any]) -> tuple[Optional[StructuredOutputsParams], Optional[str]]:
    """(params, the request field they came from) from a request's fields, or (None, None)."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf = fields.get("response_format")
    if rf is not None:
        spec = _from_response_format(rf)
        if spec is not None:
            found.append(("response_format", spec))
    for name, kind in _GUIDED.items():
        if fields.get(name) is not None:
            found.append((name, {kind: fields[name]}))
    so = fields.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidRequestError("structured_outputs must be an object", param="structured_outputs")
        unknown = sorted(set(so) - set(_SO_KEYS))
        if unknown:
            raise InvalidRequestError(f"structured_outputs: unknown field(s) {', '.join(unknown)} (use one of "
                                      f"{', '.join(_SO_KEYS)})", param=f"structured_outputs.{unknown[0]}")
        found.append(("structured_outputs", dict(so)))
    if not found:
        return None, None
    if len(found) > 1:
        names = [n for n, _ in found]
        raise InvalidRequestError(f"only one output constraint per request; got {' and '.join(names)}",
                                  param=names[1])
    source, spec = found[0]
    try:
        return StructuredOutputsParams(**spec), source
    except InvalidRequestError as e:
        raise remap(e, source) from None


def _from_response_format(rf: Any) -> Optional[dict[str, Any]]:
    if not isinstance(rf, dict):
        raise InvalidRequestError("response_format must be an object", param="response_format")
    kind = rf.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise InvalidRequestError("response_format.json_schema must be an object with a `schema`",
                                      param="response_format.json_schema")
        schema = js.get("schema")
        if schema is None:
            # OpenAI requires a schema; an empty one means "any JSON object"
            raise InvalidRequestError("response_format.json_schema.schema is required",
                                      param="response_format.json_schema.schema")
        if not isinstance(schema, (dict, str)):
            raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object",
                                      param="response_format.json_schema.schema")
        return {"json": schema}
    raise InvalidRequestError(f"response_format.type {kind!r} is not supported (use text, json_object or "
                              "json_schema)", param="response_format.type")


_SOURCE_PARAM = {"response_format": {"json": "response_format.json_schema.schema", "": "response_format"},
                 "guided_json": {"": "guided_json"}, "guided_regex": {"": "guided_regex"},
                 "guided_choice": {"": "guided_choice"}, "guided_grammar": {"": "guided_grammar"}}


def remap(e: InvalidRequestError, source: Optional[str]) -> InvalidRequestError:
    """An error about `structured_outputs.<kind>` renamed after the request field the constraint came from."""
    param = e.param or ""
    if source is None or source == "structured_outputs" or not param.startswith("structured_outputs"):
        return e
    kind = param.partition(".")[2]
    table = _SOURCE_PARAM.get(source, {"": source})
    new = table.get(kind, table[""])
    msg = e.message.replace("structured_outputs", new)
    return InvalidRequestError(msg, param=new, code=e.code)


def check_grammar(so: StructuredOutputsParams, source: Optional[str]) -> None:
    """Parse the constraint now (a worker thread), so a schema, regex or grammar that does not compile is a
    400 before any response byte."""
    from tokenmill.structured.grammar import build_grammar

    try:
        build_grammar(so)
    except InvalidRequestError as e:
        raise remap(e, source) from None
