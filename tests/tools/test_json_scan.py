"""The character-at-a-time JSON scanner agrees with json.loads on what is valid, finds the end of a value
exactly, and compacts to the same text as json.dumps."""
from __future__ import annotations

import json
import random

import pytest

from tokenmill.tools.json_scan import ERR, NEED, JsonScanner, compact, members, scan_string


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] * 2 if depth < 3 else [])
    k = rng.choice(kinds)
    if k == "str":
        return "".join(rng.choice('ab"\\/\n\té東🌸 {}[],:') for _ in range(rng.randint(0, 6)))
    if k == "int":
        return rng.randint(-10 ** 6, 10 ** 6)
    if k == "float":
        return rng.choice([0.5, -1e-7, 3.25e21, 1.0, -0.0])
    if k == "bool":
        return rng.random() < 0.5
    if k == "null":
        return None
    if k == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f"k{i}{rng.choice(['', 'é', ' x'])}": _random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def _status(text: str):
    """("done", index after the value) / ("err", index of the bad char) / ("open", None)."""
    sc = JsonScanner()
    for i, c in enumerate(text):
        if sc.feed(c) == ERR:
            return "err", i
        if sc.done:
            return "done", i + 1
    return "open", None


@pytest.mark.parametrize("seed", range(40))
def test_random_documents_compact_like_json_dumps(seed):
    rng = random.Random(seed)
    value = {"root": _random_value(rng)} if seed % 2 else [_random_value(rng) for _ in range(3)]
    for ascii_ in (True, False):
        pretty = json.dumps(value, indent=rng.choice([None, 1, 2, 4]), ensure_ascii=ascii_)
        assert compact(pretty) == json.dumps(value, separators=(",", ":"), ensure_ascii=ascii_)
        assert _status(pretty) == ("done", len(pretty))
        for cut in range(len(pretty)):  # every proper prefix is still open (never wrongly "done")
            st = _status(pretty[:cut])
            assert st[0] == "open", (cut, pretty[:cut])
    assert [json.loads(v) for _, v in members(compact(json.dumps(value)))] == \
        (list(value.values()) if isinstance(value, dict) else value)


@pytest.mark.parametrize("text,bad_at", [
    ('{"a": 1,}', 8), ("{'a': 1}", 1), ('{"a": NaN}', 6), ('{"a": 01}', 7), ('{"a": 1.}', 8),
    ('{"a": tru}', 9), ('{"a" 1}', 5), ('{"a": [1 2]}', 9), ('{"a": "x\ny"}', 8), ('{"a": "\\q"}', 8),
    ('{"a": "\\u12g4"}', 11), ('{"a": 1]', 7), ("[1,]", 3), ('"top-level string"', 0), ("1", 0),
    ('{"a": -}', 7), ('{"a": 1e}', 8), ('{"a": .5}', 6),
])
def test_invalid_json_fails_at_the_first_bad_char(text, bad_at):
    assert _status(text) == ("err", bad_at)
    with pytest.raises(ValueError):
        compact(text)
    if text not in ('"top-level string"', "1"):  # (valid JSON, but never arguments)
        with pytest.raises(ValueError):
            json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_nothing_after_the_value():
    sc = JsonScanner()
    for c in "{}":
        sc.feed(c)
    assert sc.done and sc.feed(" ") == ERR and sc.feed("{") == ERR


def test_numbers_end_at_the_next_structural_char():
    for text in ('{"a": 0}', '{"a": -12.5e+3}', '{"a": [1, 2.0, -0, 3E-2]}', '{"a": 1 }'):
        assert _status(text) == ("done", len(text)), text
        json.loads(text)


def test_scan_string():
    assert scan_string('"ab"x', 0) == 4
    assert scan_string('"a\\"b"', 0) == 6
    assert scan_string('"ab', 0) == NEED
    assert scan_string('"a\\', 0) == NEED
    assert scan_string('"a\\u00', 0) == NEED
    assert scan_string('"a\\u00zz"', 0) is None
    assert scan_string('"a\\x"', 0) is None
    assert scan_string('"a\nb"', 0) is None
