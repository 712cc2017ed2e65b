"""Seeded, local benchmark workloads (no downloads) and JSONL workload files.

A workload spec is one of
  chat | long-prefill | shared-prefix | multi-turn   optionally followed by `:key=value,key=value`
  fixed:IN:OUT                                      IN prompt tokens, OUT output tokens (ignore_eos on)
  PATH.jsonl  (or jsonl:PATH)                       one request per line
Prompt text is built from real prose (data/text.txt) so that token counts are controllable: about
0.75 words per token, or exact counts when a Hugging Face tokenizer object is given.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tokenmill.bench.types import BenchError, BenchRequest, Conversation

WORDS_PER_TOKEN = 0.75
_TEXT_PATH = Path(__file__).parent / "data" / "text.txt"
_JUMP_PROB = 0.08  # chance of jumping to a random place in the text after each word (keeps prompts distinct)
_RANDOM_HEAD_WORDS = 3


class TextSource:
    """Makes real-looking text of a requested token length from the built-in prose."""

    def __init__(self, tokenizer: Any = None, text: Optional[str] = None):
        self.words: list[str] = (text if text is not None else _TEXT_PATH.read_text()).split()
        self.tokenizer = tokenizer

    def _words(self, n_words: int, rng: random.Random) -> str:
        pos = rng.randrange(len(self.words))
        out = []
        for i in range(max(1, n_words)):
            out.append(self.words[pos])
            # The first words are drawn independently so that two prompts almost never share a prefix
            # (which a server's prefix cache would otherwise reuse); then the prose runs on with rare jumps.
            jump = i < _RANDOM_HEAD_WORDS or rng.random() < _JUMP_PROB
            pos = rng.randrange(len(self.words)) if jump else (pos + 1) % len(self.words)
        return " ".join(out)

    def count(self, text: str) -> int:
        """Token count of `text`: exact with a tokenizer, else words / 0.75."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return max(1, round(len(text.split()) / WORDS_PER_TOKEN))

    def make(self, n_tokens: int, rng: random.Random) -> tuple[str, int]:
        """Text of about `n_tokens` tokens (exactly, up to decode/encode round trips, with a tokenizer)."""
        n_tokens = max(1, int(n_tokens))
        if self.tokenizer is None:
            n_words = max(1, round(n_tokens * WORDS_PER_TOKEN))
            return self._words(n_words, rng), n_tokens
        text = self._words(int(n_tokens * WORDS_PER_TOKEN) + 8, rng)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        while len(ids) < n_tokens:
            text = text + " " + self._words(n_tokens - len(ids) + 8, rng)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        text = self.tokenizer.decode(ids[:n_tokens])
        return text, self.count(text)


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


@dataclass
class Workload:
    """A named request generator; `generate(num, seed)` returns `num` conversations (arrivals)."""

    name: str
    params: dict[str, Any]
    make_one: Callable[[random.Random, int], Conversation]
    fixed: Optional[list[Conversation]] = None  # file workloads: the file's requests, in order
    source: str = ""

    @property
    def natural_size(self) -> Optional[int]:
        """Number of arrivals in a file workload (None for generated ones)."""
        return len(self.fixed) if self.fixed is not None else None

    def generate(self, num: int, seed: int = 0) -> list[Conversation]:
        """`num` conversations; the same (num, seed) always gives the same requests. Files repeat cyclically."""
        if self.fixed is not None:
            return [Conversation(turns=list(self.fixed[i % len(self.fixed)].turns), conv_id=i) for i in range(num)]
        rng = random.Random(seed)
        return [self.make_one(rng, i) for i in range(num)]

    def describe(self) -> dict[str, Any]:
        """Name and parameters, for the results file."""
        return {"name": self.name, "params": dict(self.params), "source": self.source}


# ---------------------------------------------------------------- generated workloads

_DEFAULTS: dict[str, dict[str, Any]] = {
    # ShareGPT-like: lognormal prompt and output lengths, clipped.
    "chat": {"in_median": 160, "in_sigma": 1.0, "in_min": 4, "in_max": 2048,
             "out_median": 150, "out_sigma": 0.8, "out_min": 4, "out_max": 1024, "ignore_eos": 0},
    # A few long prompts among many short ones.
    "long-prefill": {"long_frac": 0.1, "long_min": 1000, "long_max": 2000, "short_min": 32, "short_max": 256,
                     "out_len": 64, "ignore_eos": 0},
    # Few long few-shot system prompts shared by many requests, each followed by a short question.
    "shared-prefix": {"num_prefixes": 4, "prefix_len": 2000, "question_len": 200, "out_len": 64, "ignore_eos": 0},
    # Conversations whose next turn resends the history.
    "multi-turn": {"min_turns": 2, "max_turns": 6, "turn_len": 100, "out_len": 100, "ignore_eos": 0},
}


def _chat(p: dict[str, Any], text: TextSource) -> Callable[[random.Random, int], Conversation]:
    def one(rng: random.Random, i: int) -> Conversation:
        n_in = _lognormal(rng, p["in_median"], p["in_sigma"], int(p["in_min"]), int(p["in_max"]))
        n_out = _lognormal(rng, p["out_median"], p["out_sigma"], int(p["out_min"]), int(p["out_max"]))
        prompt, n = text.make(n_in, rng)
        return Conversation([BenchRequest(prompt=prompt, prompt_len=n, max_tokens=n_out,
                                          ignore_eos=bool(p["ignore_eos"]))], conv_id=i)
    return one


def _long_prefill(p: dict[str, Any], text: TextSource) -> Callable[[random.Random, int], Conversation]:
    def one(rng: random.Random, i: int) -> Conversation:
        if rng.random() < float(p["long_frac"]):
            n_in = rng.randint(int(p["long_min"]), int(p["long_max"]))
        else:
            n_in = rng.randint(int(p["short_min"]), int(p["short_max"]))
        prompt, n = text.make(n_in, rng)
        return Conversation([BenchRequest(prompt=prompt, prompt_len=n, max_tokens=int(p["out_len"]),
                                          ignore_eos=bool(p["ignore_eos"]))], conv_id=i)
    return one


def _shared_prefix(p: dict[str, Any], text: TextSource, seed_rng: random.Random
                   ) -> Callable[[random.Random, int], Conversation]:
    prefixes = []
    for k in range(int(p["num_prefixes"])):
        # A few-shot system prompt: an instruction followed by worked examples (plain prose here).
        body, n = text.make(int(p["prefix_len"]), seed_rng)
        prefixes.append((f"You are assistant number {k}. Answer in the style of these examples. {body}", n + 12))

    def one(rng: random.Random, i: int) -> Conversation:
        system, n_sys = prefixes[rng.randrange(len(prefixes))]
        q_len = max(1, round(int(p["question_len"]) * rng.uniform(0.8, 1.2)))
        question, n_q = text.make(q_len, rng)
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return Conversation([BenchRequest(messages=msgs, prompt_len=n_sys + n_q, max_tokens=int(p["out_len"]),
                                          ignore_eos=bool(p["ignore_eos"]))], conv_id=i)
    return one


def _multi_turn(p: dict[str, Any], text: TextSource) -> Callable[[random.Random, int], Conversation]:
    def one(rng: random.Random, i: int) -> Conversation:
        turns = []
        for _ in range(rng.randint(int(p["min_turns"]), int(p["max_turns"]))):
            n_in = max(1, round(int(p["turn_len"]) * rng.uniform(0.5, 1.5)))
            n_out = max(1, round(int(p["out_len"]) * rng.uniform(0.5, 1.5)))
            prompt, n = text.make(n_in, rng)
            turns.append(BenchRequest(prompt=prompt, prompt_len=n, max_tokens=n_out,
                                      ignore_eos=bool(p["ignore_eos"])))
        return Conversation(turns, conv_id=i)
    return one


def _fixed(n_in: int, n_out: int, text: TextSource) -> Callable[[random.Random, int], Conversation]:
    def one(rng: random.Random, i: int) -> Conversation:
        prompt, n = text.make(n_in, rng)
        return Conversation([BenchRequest(prompt=prompt, prompt_len=n, max_tokens=n_out, ignore_eos=True)],
                            conv_id=i)
    return one


def _parse_params(name: str, rest: str) -> dict[str, Any]:
    params = dict(_DEFAULTS[name])
    if not rest:
        return params
    for item in rest.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in params:
            raise BenchError(f"workload {name!r}: bad parameter {item!r}; known: {', '.join(sorted(params))}")
        try:
            num = float(value)
        except ValueError:
            raise BenchError(f"workload {name!r}: parameter {key} must be a number, got {value!r}") from None
        if num < 0 or not math.isfinite(num):
            raise BenchError(f"workload {name!r}: parameter {key} must be a finite number >= 0, got {value!r}")
        params[key] = num if isinstance(_DEFAULTS[name][key], float) else int(num)
    return params


def _check_ranges(name: str, p: dict[str, Any]) -> None:
    for lo, hi in (("in_min", "in_max"), ("out_min", "out_max"), ("long_min", "long_max"),
                   ("short_min", "short_max"), ("min_turns", "max_turns")):
        if lo in p and p[lo] > p[hi]:
            raise BenchError(f"workload {name!r}: {lo} ({p[lo]}) is larger than {hi} ({p[hi]})")
    for key in ("in_median", "out_median", "num_prefixes", "prefix_len", "question_len", "out_len",
                "turn_len", "min_turns", "in_min", "out_min", "long_min", "short_min"):
        if key in p and p[key] <= 0:
            raise BenchError(f"workload {name!r}: {key} must be > 0")


WORKLOAD_NAMES = ("chat", "long-prefill", "shared-prefix", "multi-turn", "fixed:IN:OUT", "PATH.jsonl")


def get_workload(spec: str, tokenizer: Any = None, seed: int = 0) -> Workload:
    """Parse a workload spec (see the module doc); `tokenizer` gives exact token counts when given."""
    spec = spec.strip()
    text = TextSource(tokenizer)
    name, _, rest = spec.partition(":")
    if name == "jsonl" or spec.endswith(".jsonl"):
        return load_jsonl(rest if name == "jsonl" else spec, text)
    if name == "fixed":
        parts = rest.split(":")
        try:
            n_in, n_out = (int(x) for x in parts)
        except ValueError:
            raise BenchError(f"bad workload {spec!r}: expected fixed:IN:OUT with two positive integers") from None
        if n_in <= 0 or n_out <= 0:
            raise BenchError(f"bad workload {spec!r}: IN and OUT must be positive")
        return Workload("fixed", {"in": n_in, "out": n_out}, _fixed(n_in, n_out, text))
    if name not in _DEFAULTS:
        raise BenchError(f"unknown workload {spec!r}; choose one of: {', '.join(WORKLOAD_NAMES)}")
    p = _parse_params(name, rest)
    _check_ranges(name, p)
    if name == "chat":
        make = _chat(p, text)
    elif name == "long-prefill":
        make = _long_prefill(p, text)
    elif name == "shared-prefix":
        make = _shared_prefix(p, text, random.Random(f"prefix:{seed}"))
    else:
        make = _multi_turn(p, text)
    return Workload(name, p, make)


# ---------------------------------------------------------------- JSONL files

_JSONL_KEYS = {"prompt", "messages", "max_tokens", "ttft_ms", "tpot_ms", "priority", "user", "delay_s",
               "ignore_eos"}


def _opt_number(obj: dict[str, Any], key: str, where: str, integer: bool = False) -> Optional[float]:
    v = obj.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (not integer and (not math.isfinite(v) or v < 0)):
        kind = "an integer" if integer else "a number >= 0"
        raise BenchError(f"{where}: {key!r} must be {kind}, got {v!r}")
    return v


def parse_jsonl_line(line: str, where: str, text: TextSource) -> BenchRequest:
    """One JSONL line -> BenchRequest; errors name `where` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BenchError(f"{where}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise BenchError(f"{where}: each line must be a JSON object")
    unknown = set(obj) - _JSONL_KEYS
    if unknown:
        raise BenchError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_JSONL_KEYS))}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        raise BenchError(f"{where}: give exactly one of 'prompt' or 'messages'")
    if prompt is not None and not isinstance(prompt, str):
        raise BenchError(f"{where}: 'prompt' must be a string")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BenchError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    max_tokens = obj.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise BenchError(f"{where}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
    user = obj.get("user")
    if user is not None and not isinstance(user, str):
        raise BenchError(f"{where}: 'user' must be a string")
    ignore_eos = obj.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BenchError(f"{where}: 'ignore_eos' must be true or false")
    body = prompt if prompt is not None else "\n".join(m["content"] for m in messages)
    priority = _opt_number(obj, "priority", where, integer=True)
    return BenchRequest(prompt=prompt, messages=messages, max_tokens=max_tokens, prompt_len=text.count(body),
                        ttft_ms=_opt_number(obj, "ttft_ms", where), tpot_ms=_opt_number(obj, "tpot_ms", where),
                        priority=None if priority is None else int(priority), user=user,
                        ignore_eos=ignore_eos, delay_s=_opt_number(obj, "delay_s", where))


def load_jsonl(path: str, text: Optional[TextSource] = None) -> Workload:
    """Read a JSONL workload file; a bad line raises BenchError naming the file and line number."""
    text = text or TextSource()
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"workload file not found: {path}")
    convs: list[Conversation] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            req = parse_jsonl_line(line, f"{path}:{lineno}", text)
            convs.append(Conversation([req], conv_id=len(convs)))
    if not convs:
        raise BenchError(f"workload file {path} has no requests")
    return Workload("jsonl", {"requests": len(convs)}, make_one=_no_make, fixed=convs, source=str(p))


def _no_make(rng: random.Random, i: int) -> Conversation:
    raise AssertionError("file workloads do not generate")  # pragma: no cover
