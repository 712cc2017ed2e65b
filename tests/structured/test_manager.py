"""StructuredOutputManager and GrammarCache on the default model's tokenizer (no model weights)."""
from __future__ import annotations

import numpy as np
import pytest

from tokenmill.engine.tokenizer import load_tokenizer
from tokenmill.sampling_params import StructuredOutputsParams as SO
from tokenmill.structured.grammar import GrammarCache
from tokenmill.structured.manager import StructuredOutputManager, single_allowed_token

VOCAB = 49152 + 32  # wider than the tokenizer, as a model's padded embedding can be
EOS = 2
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


@pytest.fixture(scope="module")
def tok(gguf_path):
    return load_tokenizer(gguf_path)


def _allowed(bm: np.ndarray, row: int) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(bm[row:row + 1].view(np.uint8), bitorder="little")).tolist())


def _ready(m: StructuredOutputManager, rid: str) -> None:
    for _ in range(200):
        if m.is_ready(rid):
            return
        m.wait_for_compile(0.1)
    raise AssertionError("grammar did not compile")


def test_cache_hits_and_lru_bound(tok):
    c = GrammarCache(tok, VOCAB, [EOS], max_entries=2)
    a, b, d = SO(regex="a+"), SO(regex="b+"), SO(regex="d+")
    fa = c.get(a)
    assert c.get(SO(regex="a+")) is fa and c.num_hits == 1
    c.get(b)
    c.get(a)  # a is now the most recent
    c.get(d)  # evicts b
    assert len(c) == 2 and a in c and d in c and b not in c
    assert fa.result(timeout=30) is not None
    c.shutdown()


def test_bitmask_rows_follow_the_drafts(tok):
    m = StructuredOutputManager(tok, VOCAB, [EOS], jump_forward="off")
    m.add_request("r", SO(json=SCHEMA, disable_any_whitespace=True))
    _ready(m, "r")
    good = tok.encode('{"name', add_special_tokens=False)
    bm, rows = m.fill_bitmask([("r", good)])
    assert rows == {"r": 0} and bm.shape == (len(good) + 1, (VOCAB + 31) // 32)
    for k, t in enumerate(good):
        assert t in _allowed(bm, k)
    assert max(_allowed(bm, 0)) < 49152  # ids past the tokenizer are never allowed
    bad = [good[0], tok.encode("x", add_special_tokens=False)[0], good[1]]
    bm, _ = m.fill_bitmask([("r", bad)])
    assert bad[1] not in _allowed(bm, 1) and (bm[2] == -1).all()  # rows after a rejected draft: all ones
    assert m.valid_draft_prefix("r", bad) == bad[:1]
    assert m.valid_draft_prefix("r", good) == good
    assert not m.accept_tokens("r", bad[1:2])  # the matcher state is unchanged by the calls above
    assert m.accept_tokens("r", good)


def test_jump_forward_tokens_forces_only_single_allowed_tokens(tok):
    so = SO(json={"type": "object", "properties": {"status": {"enum": ["active_subscription"]}},
                  "required": ["status"]}, disable_any_whitespace=True)
    m = StructuredOutputManager(tok, VOCAB, [EOS], jump_forward="tokens")
    m.add_request("r", so)
    ref = StructuredOutputManager(tok, VOCAB, [EOS], jump_forward="off")
    ref.add_request("r", so)
    _ready(m, "r")
    _ready(ref, "r")
    first = tok.encode("{", add_special_tokens=False)
    assert m.accept_tokens("r", first) and ref.accept_tokens("r", first)
    forced = m.jump_forward("r", limit=100)
    for t in forced:  # each one was the only token the grammar allowed
        bm, _ = ref.fill_bitmask([("r", [])])
        assert single_allowed_token(bm[0]) == t and _allowed(bm, 0) == {t}
        assert ref.accept_tokens("r", [t])
    bm, _ = ref.fill_bitmask([("r", [])])
    assert single_allowed_token(bm[0]) is None or single_allowed_token(bm[0]) == EOS
    assert m.jump_forward("r", limit=0) == []


def test_jump_forward_string_covers_the_forced_text(tok):
    m = StructuredOutputManager(tok, VOCAB, [EOS], jump_forward="string")
    m.add_request("r", SO(json=SCHEMA, disable_any_whitespace=True))
    _ready(m, "r")
    forced = m.jump_forward("r", limit=100)
    assert tok.decode(forced) == '{"name":'
    assert m.num_forced_tokens == len(forced) and len(forced) < len('{"name":')
    # ' "' comes next, but it is the start of longer tokens (' ""', ...): left to the model
    assert m.jump_forward("r", limit=100) == []


def test_draft_mode_proposes_the_forced_string_without_advancing(tok):
    m = StructuredOutputManager(tok, VOCAB, [EOS], jump_forward="draft")
    m.add_request("r", SO(json=SCHEMA, disable_any_whitespace=True))
    _ready(m, "r")
    assert m.jump_forward("r", limit=100) == []  # '{' is not the only allowed token ('{"' is one too)
    drafts = m.forced_drafts("r", limit=100)
    assert tok.decode(drafts) == '{"name":'
    assert m.forced_drafts("r", limit=1) == drafts[:1]
    assert m.valid_draft_prefix("r", drafts) == drafts  # the matcher did not move
    m.jump_forward_mode = "tokens"
    assert m.forced_drafts("r", limit=100) == []


def test_termination_and_stop_tokens(tok):
    m = StructuredOutputManager(tok, VOCAB, [EOS], jump_forward="tokens")
    m.add_request("r", SO(choice=["yes", "no"]))
    _ready(m, "r")
    assert m.accept_tokens("r", tok.encode("yes", add_special_tokens=False))
    assert m.jump_forward("r", limit=10) == []  # only the stop token is left: it is sampled, never forced
    bm, _ = m.fill_bitmask([("r", [])])
    assert _allowed(bm, 0) == {EOS}
    assert not m.is_terminated("r")
    assert m.accept_tokens("r", [EOS]) and m.is_terminated("r")


def test_a_grammar_that_fails_to_compile_is_reported_not_hung():
    # a tokenizer xgrammar cannot read: compiling (on the worker thread) fails, the request is reported
    m = StructuredOutputManager(object(), VOCAB, [EOS])
    m.add_request("r", SO(regex="a+"))
    for _ in range(100):
        m.wait_for_compile(0.1)
        errors = m.take_errors()
        if errors:
            break
    assert [rid for rid, _ in errors] == ["r"] and errors[0][1].startswith("grammar compilation failed")
    assert "r" not in m and m.is_ready("r")  # dropped: nothing left to wait for
