"""StructuredOutputManager: one xgrammar GrammarMatcher per constrained request, on the engine side.

The engine (tokenmill/engine/engine_core.py) drives it around each step:
  add_request -> (compiling off the step loop; the scheduler skips the request until `is_ready`)
  fill_bitmask for the scheduled rows (one row per sampled position, every draft position included)
  -> the runner masks the logits -> accept_tokens with what was kept -> is_terminated / jump_forward.

Jump-forward modes ("tokens" and "draft" are exact, "string" is not in general):
  tokens  where the grammar allows exactly one token (one bit set in the mask), that token is appended
          without sampling: every sampler would have picked it, so the output is distributed exactly as
          with token-by-token constrained decoding.
  draft   "tokens", then the tokenization of the string the grammar forces next (xgrammar's
          find_jump_forward_tokens: the longest vocabulary tokens covering keys and punctuation of a fixed
          schema) is proposed as draft tokens, which the next step verifies like speculative drafts
          (rejection sampling on the masked logits): exact, and one step covers a whole forced span where
          the model agrees with that tokenization.
  string  "tokens" after appending that forced-string tokenization unverified. Fewest steps, but the model
          might have tokenized the forced text differently, so the text after it can differ from
          token-by-token decoding.
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.structured.grammar import GrammarCache, compile_error

JUMP_FORWARD_MODES = ("off", "tokens", "draft", "string")


def bitmask_words(vocab_size: int) -> int:
    """int32 words per bitmask row: bit t % 32 of word t // 32 is token t."""
    return (vocab_size + 31) // 32


def single_allowed_token(row: np.ndarray) -> Optional[int]:
    """The token id when a bitmask row allows exactly one token, else None."""
    nz = np.flatnonzero(row)
    if len(nz) != 1:
        return None
    w = int(row[nz[0]]) & 0xFFFFFFFF
    if w & (w - 1):
        return None
    return int(nz[0]) * 32 + w.bit_length() - 1


@dataclass
class _Entry:
    future: Future
    matcher: Any = None  # xgrammar.GrammarMatcher once compiled
    row: Optional[np.ndarray] = None  # the bitmask row of the matcher's current state, when computed


class StructuredOutputManager:
    """Grammar state of every constrained request, keyed by request id. Not thread-safe: the engine's step
    thread calls it (compilation runs on GrammarCache's threads)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int],
                 jump_forward: str = "draft", cache_size: int = 256, num_threads: int = 1):
        if jump_forward not in JUMP_FORWARD_MODES:
            raise ValueError(f"jump_forward must be one of {JUMP_FORWARD_MODES}, got {jump_forward!r}")
        self.cache = GrammarCache(tokenizer, vocab_size, stop_token_ids, cache_size, num_threads)
        self.vocab_size = int(vocab_size)
        self.words = bitmask_words(self.vocab_size)
        self.stop_token_ids = frozenset(stop_token_ids)
        self.jump_forward_mode = jump_forward
        self._reqs: dict[str, _Entry] = {}
        self.num_forced_tokens = 0  # tokens appended by jump-forward, all requests
        self.num_filled_rows = 0  # bitmask rows filled for the runner, and the seconds it took
        self.fill_seconds = 0.0

    # ---- requests ------------------------------------------------------------------------------
    def validate(self, so: StructuredOutputsParams) -> None:
        """Parse the constraint (InvalidRequestError naming the field) and start compiling it."""
        self.cache.get(so)

    def add_request(self, req_id: str, so: StructuredOutputsParams) -> None:
        self._reqs[req_id] = _Entry(self.cache.get(so))

    def remove(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self._reqs.pop(rid, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._reqs

    def __len__(self) -> int:
        return len(self._reqs)

    def is_ready(self, req_id: str) -> bool:
        """False while the request's grammar compiles (or when compiling failed: see take_errors)."""
        e = self._reqs.get(req_id)
        if e is None or e.matcher is not None:
            return True
        if not e.future.done() or e.future.exception() is not None:
            return False
        import xgrammar as xgr

        e.matcher = xgr.GrammarMatcher(e.future.result())
        return True

    def take_errors(self) -> list[tuple[str, str]]:
        """(request id, message) of requests whose grammar failed to compile; they are dropped here."""
        out = []
        for rid, e in list(self._reqs.items()):
            if e.matcher is None and e.future.done():
                msg = compile_error(e.future)
                if msg is not None:
                    out.append((rid, msg))
                    del self._reqs[rid]
        return out

    def wait_for_compile(self, timeout: float) -> None:
        """Block until some pending compilation finishes (or `timeout` s): for a step with nothing else to run."""
        pending = [e.future for e in self._reqs.values() if e.matcher is None and not e.future.done()]
        if pending:
            wait_futures(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    # ---- one step ------------------------------------------------------------------------------
    def fill_bitmask(self, rows: Sequence[tuple[str, Sequence[int]]]) -> tuple[np.ndarray, dict[str, int]]:
        """Bitmask [sum(1 + len(drafts)), words] int32 for (request id, draft tokens) pairs, and each request's
        first row. Row k of a request is the mask after its drafts[:k]; rows after a draft the grammar
        rejects stay all-ones (that draft is masked out at its own row, so verification stops there)."""
        t0 = time.perf_counter()
        n = sum(1 + len(d) for _, d in rows)
        bm = np.full((n, self.words), -1, dtype=np.int32)
        index: dict[str, int] = {}
        r = 0
        for rid, drafts in rows:
            e = self._reqs[rid]
            index[rid] = r
            if e.row is not None:
                bm[r] = e.row
            else:
                e.matcher.fill_next_token_bitmask(bm, r)
            accepted = 0
            for k, t in enumerate(drafts):
                if not e.matcher.accept_token(int(t)):
                    break
                accepted += 1
                if e.matcher.is_terminated():  # a stop-token draft: nothing after it is kept
                    break
                e.matcher.fill_next_token_bitmask(bm, r + k + 1)
            if accepted:
                e.matcher.rollback(accepted)
            r += 1 + len(drafts)
        self.num_filled_rows += n
        self.fill_seconds += time.perf_counter() - t0
        return bm, index

    def accept_tokens(self, req_id: str, tokens: Sequence[int]) -> bool:
        """Advance the request's matcher; False when the grammar rejects a token (the rest are not taken)."""
        e = self._reqs[req_id]
        e.row = None
        for t in tokens:
            if not e.matcher.accept_token(int(t)):
                return False
        return True

    def is_terminated(self, req_id: str) -> bool:
        """The grammar accepted its stop token: nothing more may follow."""
        return bool(self._reqs[req_id].matcher.is_terminated())

    def valid_draft_prefix(self, req_id: str, drafts: Sequence[int]) -> list[int]:
        """The longest prefix of `drafts` the grammar accepts from the current state (verifying the rest
        would be wasted work)."""
        m = self._reqs[req_id].matcher
        n = 0
        for t in drafts:
            if not m.accept_token(int(t)):
                break
            n += 1
        if n:
            m.rollback(n)
        return list(drafts[:n])

    def jump_forward(self, req_id: str, limit: int, exclude: Iterable[int] = ()) -> list[int]:
        """Tokens the grammar forces next (at most `limit`), accepted into the matcher; see the module
        docstring for the modes. Stop tokens and `exclude` are never forced (they end or alter the request,
        so they are sampled as usual)."""
        mode = self.jump_forward_mode
        if mode == "off" or limit <= 0:
            return []
        e = self._reqs[req_id]
        m = e.matcher
        stop = self.stop_token_ids.union(exclude)
        forced: list[int] = []
        if mode == "string" and not m.is_terminated():
            for t in m.find_jump_forward_tokens():
                if len(forced) >= limit or t in stop or not m.accept_token(int(t)):
                    break
                forced.append(int(t))
            if forced:
                e.row = None
        scratch = np.empty((1, self.words), dtype=np.int32)
        while len(forced) < limit and not m.is_terminated():
            if e.row is None:
                scratch.fill(-1)
                m.fill_next_token_bitmask(scratch, 0)
                e.row = scratch[0].copy()
            t = single_allowed_token(e.row)
            if t is None or t in stop or not m.accept_token(t):
                break
            e.row = None
            forced.append(t)
        self.num_forced_tokens += len(forced)
        return forced

    def forced_drafts(self, req_id: str, limit: int, exclude: Iterable[int] = ()) -> list[int]:
        """"draft" mode: the tokenization of the string the grammar forces next, as draft tokens (at most
        `limit`; the matcher is not advanced). [] in the other modes."""
        if self.jump_forward_mode != "draft" or limit <= 0:
            return []
        m = self._reqs[req_id].matcher
        if m.is_terminated():
            return []
        stop = self.stop_token_ids.union(exclude)
        out = []
        for t in m.find_jump_forward_tokens()[:limit]:
            if t in stop:
                break
            out.append(int(t))
        return out

    def shutdown(self) -> None:
        self.cache.shutdown()
