"""Grammars for constrained decoding: StructuredOutputsParams -> xgrammar Grammar -> CompiledGrammar.

`build_grammar` parses a constraint (fast: no tokenizer involved) and turns xgrammar's parse errors into an
InvalidRequestError naming the field. `GrammarCache` compiles grammars against the model's tokenizer on a
thread pool, off the engine's step loop, and keeps the compiled ones in a size-bounded LRU keyed by
`StructuredOutputsParams.key`, so a schema seen before costs nothing.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Sequence

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import StructuredOutputsParams

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " (and sometimes a failed check's text)
_CPP_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


def _clean(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _CPP_PREFIX.sub("", msg)


def build_grammar(so: StructuredOutputsParams):
    """The xgrammar Grammar of a constraint; InvalidRequestError (param `structured_outputs.<kind>`) when
    the schema, regex or grammar is invalid or uses something xgrammar does not support."""
    import xgrammar as xgr

    kind = so.kind
    any_ws = not so.disable_any_whitespace
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(so.spec, any_whitespace=any_ws)
        if kind == "json_object":  # any object, any keys (strict mode would forbid additional properties)
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=any_ws, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(so.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in so.choice))
        return xgr.Grammar.from_ebnf(so.grammar)
    except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own InvalidJSONError
        what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
                "choice": "choice list", "grammar": "EBNF grammar"}[kind]
        param = "structured_outputs" if kind == "json_object" else f"structured_outputs.{kind}"
        raise InvalidRequestError(f"invalid {what}: {_clean(e)}", param=param) from None


class GrammarCache:
    """Compiles grammars for one tokenizer on `num_threads` worker threads; an LRU of at most `max_entries`
    compiled grammars (futures), keyed by StructuredOutputsParams.key.

    The xgrammar tokenizer info (a pass over the vocabulary, ~0.1 s) is built by the first compile job, on
    the worker thread. `vocab_size` is the width of the model's logits, which may exceed the tokenizer's:
    ids past the tokenizer are never allowed."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int], max_entries: int = 256,
                 num_threads: int = 1):
        if max_entries < 1:
            raise ValueError(f"the grammar cache needs at least one entry, got {max_entries}")
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = list(stop_token_ids)
        self.max_entries = max_entries
        self._executor = ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix="tokenmill-grammar")
        self._entries: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self.num_compiled = 0  # grammars compiled (cache misses)
        self.num_hits = 0

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids or None)
                # our LRU is the cache: xgrammar's own would keep every grammar ever compiled
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def _compile(self, grammar):
        compiled = self._get_compiler().compile_grammar(grammar)
        self.num_compiled += 1
        return compiled

    def get(self, so: StructuredOutputsParams, grammar=None) -> Future:
        """A future of the CompiledGrammar for `so` (done at once for a cached one). Parses the constraint
        first when it is not cached (InvalidRequestError on bad input); `grammar` is an already-built one."""
        key = so.key
        with self._lock:
            fut = self._entries.get(key)
            if fut is not None:
                self._entries.move_to_end(key)
                self.num_hits += 1
                return fut
        if grammar is None:
            grammar = build_grammar(so)
        with self._lock:
            fut = self._entries.get(key)  # another thread may have added it meanwhile
            if fut is None:
                fut = self._executor.submit(self._compile, grammar)
                self._entries[key] = fut
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)  # the holders of an evicted future keep it
            return fut

    def __contains__(self, so: StructuredOutputsParams) -> bool:
        with self._lock:
            return so.key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def compile_error(fut: Future) -> Optional[str]:
    """The error message of a finished compile future, or None when it succeeded."""
    exc = fut.exception()
    return None if exc is None else f"grammar compilation failed: {_clean(exc)}"
