"""JSON schemas of real-world shapes for constrained decoding tests: nested objects, arrays of objects,
$ref/$defs, anyOf, enums, const, nullable fields, string formats and patterns, number bounds.

Strings and arrays are bounded (maxLength / maxItems) so that a small model finishes within the tests'
max_tokens whatever it writes."""
from __future__ import annotations

S = {"type": "string", "maxLength": 12}  # a short string
NAME = {"type": "string", "minLength": 1, "maxLength": 16}


def obj(props: dict, required=None, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required, **kw}


SCHEMAS: list[dict] = [
    # flat records
    obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}}),
    obj({"city": NAME, "country": NAME, "population": {"type": "integer", "minimum": 0, "maximum": 99999999}}),
    obj({"title": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2030}, "rating": {
        "type": "number", "minimum": 0, "maximum": 10}}),
    obj({"ok": {"type": "boolean"}}),
    obj({"answer": {"type": "string", "enum": ["yes", "no", "unknown"]}}),
    obj({"sentiment": {"enum": ["positive", "negative", "neutral"]}, "confidence": {
        "type": "number", "minimum": 0, "maximum": 1}}),
    obj({"temperature_c": {"type": "number", "minimum": -90, "maximum": 60}, "unit": {"const": "celsius"}}),
    obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {
        "type": "integer", "minimum": 1, "maximum": 99}}),
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "state": {"type": "string", "pattern": "^[A-Z]{2}$"}}),
    obj({"email": {"type": "string", "format": "email"}}),
    obj({"id": {"type": "string", "format": "uuid"}}),
    obj({"date": {"type": "string", "format": "date"}, "event": NAME}),
    obj({"created_at": {"type": "string", "format": "date-time"}}),
    obj({"ip": {"type": "string", "format": "ipv4"}}),
    obj({"start": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"}, "room": {"type": "integer", "minimum": 1, "maximum": 500}}),
    obj({"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}, "currency": {
        "enum": ["USD", "EUR", "GBP"]}}),
    obj({"percent": {"type": "integer", "minimum": 0, "maximum": 100}}),
    obj({"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180,
                                                                           "maximum": 180}}),
    obj({"name": NAME, "nickname": {"type": ["string", "null"], "maxLength": 10}}),
    obj({"name": NAME, "middle": S}, required=["name"]),
    obj({"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "integer", "minimum": 0, "maximum": 9},
         "sum": {"type": "integer", "minimum": 0, "maximum": 18}}),
    obj({"version": {"type": "string", "pattern": "^[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,3}$"}}),
    obj({"color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}}),
    obj({"status": {"const": "ok"}, "code": {"type": "integer", "enum": [200, 201, 204]}}),
    obj({"value": {"type": ["integer", "null"], "minimum": 0, "maximum": 1000}}),
    # arrays
    obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    obj({"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 4}}),
    obj({"primes": {"type": "array", "items": {"type": "integer", "minimum": 2, "maximum": 50}, "minItems": 2,
                    "maxItems": 4}}),
    {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 3},
    obj({"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}),
    obj({"point": {"type": "array", "prefixItems": [{"type": "number", "minimum": -10, "maximum": 10},
                                                    {"type": "number", "minimum": -10, "maximum": 10}],
                   "items": False, "minItems": 2}}),
    obj({"people": {"type": "array", "maxItems": 2, "items": obj({"name": NAME, "age": {
        "type": "integer", "minimum": 0, "maximum": 120}})}}),
    obj({"steps": {"type": "array", "minItems": 1, "maxItems": 3, "items": obj({"n": {
        "type": "integer", "minimum": 1, "maximum": 9}, "do": S})}}),
    # nested objects
    obj({"user": obj({"name": NAME, "email": {"type": "string", "format": "email"}})}),
    obj({"order": obj({"id": {"type": "integer", "minimum": 1, "maximum": 99999}, "total": {
        "type": "number", "minimum": 0, "maximum": 9999}}), "paid": {"type": "boolean"}}),
    obj({"address": obj({"street": NAME, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})}),
    obj({"a": obj({"b": obj({"c": obj({"d": {"type": "integer", "minimum": 0, "maximum": 9}})})})}),
    obj({"meta": obj({"page": {"type": "integer", "minimum": 1, "maximum": 99}, "per_page": {
        "enum": [10, 25, 50]}}), "items": {"type": "array", "maxItems": 2, "items": S}}),
    obj({"config": obj({"debug": {"type": "boolean"}, "level": {"enum": ["info", "warn", "error"]}},
                       additionalProperties=False)}),
    # $ref / $defs
    {"$defs": {"person": obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})},
     **obj({"author": {"$ref": "#/$defs/person"}, "editor": {"$ref": "#/$defs/person"}})},
    {"$defs": {"money": obj({"amount": {"type": "number", "minimum": 0, "maximum": 1e6},
                             "currency": {"enum": ["USD", "EUR"]}})},
     **obj({"price": {"$ref": "#/$defs/money"}, "tax": {"$ref": "#/$defs/money"}})},
    {"$defs": {"tag": {"type": "string", "enum": ["bug", "feature", "docs"]}},
     **obj({"labels": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 3}})},
    {"definitions": {"pt": obj({"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                "y": {"type": "integer", "minimum": 0, "maximum": 99}})},
     **obj({"from": {"$ref": "#/definitions/pt"}, "to": {"$ref": "#/definitions/pt"}})},
    # anyOf / unions
    obj({"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999}, {"type": "string",
                                                                               "pattern": "^[a-z]{4}$"}]}}),
    obj({"result": {"anyOf": [obj({"value": {"type": "number", "minimum": 0, "maximum": 100}}),
                              obj({"error": NAME})]}}),
    obj({"shape": {"anyOf": [obj({"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0, "maximum": 9}}),
                             obj({"kind": {"const": "square"}, "side": {"type": "number", "minimum": 0,
                                                                        "maximum": 9}})]}}),
    obj({"contact": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]}}),
    obj({"when": {"anyOf": [{"type": "string", "format": "date"}, {"type": "integer", "minimum": 1900,
                                                                   "maximum": 2100}]}}),
    # real-world API shapes
    obj({"function": {"enum": ["get_weather", "get_time"]}, "arguments": obj({"city": NAME})}),
    obj({"role": {"enum": ["user", "assistant"]}, "content": {"type": "string", "maxLength": 30}}),
    obj({"name": NAME, "description": {"type": "string", "maxLength": 30}, "price": {"type": "number", "minimum": 0,
                                                                                     "maximum": 500},
         "in_stock": {"type": "boolean"}}),
    obj({"question": {"type": "string", "maxLength": 30}, "options": {"type": "array", "items": S, "minItems": 2,
                                                                      "maxItems": 3},
         "answer_index": {"type": "integer", "minimum": 0, "maximum": 2}}),
    obj({"entities": {"type": "array", "maxItems": 2, "items": obj({"text": S, "type": {
        "enum": ["PERSON", "ORG", "LOC"]}})}}),
    obj({"translation": {"type": "string", "maxLength": 30}, "lang": {"type": "string", "pattern": "^[a-z]{2}$"}}),
    obj({"summary": {"type": "string", "maxLength": 40}, "keywords": {"type": "array", "items": S, "maxItems": 3}}),
    obj({"is_spam": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 25}}),
    obj({"hour": {"type": "integer", "minimum": 0, "maximum": 23}, "minute": {
        "type": "integer", "minimum": 0, "maximum": 59}}),
    obj({"http": obj({"method": {"enum": ["GET", "POST"]}, "path": {"type": "string", "pattern": "^/[a-z]{1,8}$"},
                      "status": {"type": "integer", "minimum": 100, "maximum": 599}})}),
    obj({"name": NAME, "scores": obj({"math": {"type": "integer", "minimum": 0, "maximum": 100},
                                      "art": {"type": "integer", "minimum": 0, "maximum": 100}})}),
]
