"""Routing policies: which backend (replica) gets a request. Pure Python over ints; no torch, no I/O.

The router (tokenmill/router/app.py) and the data-parallel client (tokenmill/router/dp_client.py) both
call `choose()` with the indices of the healthy backends, each backend's load and, for `prefix`, the
chained block hashes of the request's prompt (`prompt_block_hashes`: the same keys the engine's prefix
cache uses, tokenmill/core/prefix_cache.py, so a hash here names exactly one cache block there).

    round-robin   backends in turn
    least-load    the backend with the lowest load (running + waiting + requests the router has sent
                  and not yet seen finish), KV usage breaking ties
    prefix        the backend that was sent the longest run of this prompt's leading block hashes
                  (remembered in a bounded LRU), unless it is overloaded; otherwise least-load
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

from tokenmill.core.prefix_cache import extend_block_keys
from tokenmill.errors import ConfigError

POLICIES = ("round-robin", "least-load", "prefix")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, extra: Hashable = None,
                        max_blocks: Optional[int] = None) -> list[int]:
    """hash() of the chained block keys of the prompt's full blocks, as the engine's prefix cache builds
    them (extra = the request's cache_salt). Ints only: tuples of ints hash the same in every process."""
    keys: list = []
    extend_block_keys(keys, list(token_ids), block_size, extra, max_blocks)
    return [hash(k) for k in keys]


@dataclass
class BackendLoad:
    """What a backend last reported (running, waiting, KV usage 0..1) and what the router has in flight."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    in_flight: int = 0

    @property
    def score(self) -> int:
        # the router's own in-flight count covers requests the backend has not reported yet
        return max(self.running + self.waiting, self.in_flight) + self.waiting


@dataclass(frozen=True)
class Decision:
    backend: int
    matched_blocks: int = 0  # leading prompt blocks the chosen backend was sent before (prefix policy)
    overloaded_fallback: bool = False  # prefix: the best match was overloaded and least-load chose


class RoutingPolicy:
    name = "base"

    def choose(self, candidates: Sequence[int], loads: Sequence[BackendLoad],
               block_hashes: Sequence[int] = ()) -> Decision:
        """Pick one of `candidates` (backend indices into `loads`); raises ValueError if there are none."""
        raise NotImplementedError

    def routed(self, backend: int, block_hashes: Sequence[int]) -> None:
        """The request went to `backend` (after retries): remember what it holds."""

    def forget_backend(self, backend: int) -> None:
        """The backend went down (its cache is gone when it comes back)."""

    @property
    def needs_hashes(self) -> bool:
        return False


def _least_loaded(candidates: Sequence[int], loads: Sequence[BackendLoad], turn: int = 0) -> int:
    """Lowest load, then lowest KV usage; ties go round the backends (starting after `turn`)."""
    n = len(loads) or 1
    return min(candidates, key=lambda i: (loads[i].score, loads[i].kv_usage, (i - turn) % n))


class RoundRobin(RoutingPolicy):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates, loads, block_hashes=()) -> Decision:
        if not candidates:
            raise ValueError("no backend to choose from")
        ordered = sorted(candidates)
        pick = next((i for i in ordered if i >= self._next), ordered[0])
        self._next = pick + 1
        return Decision(pick)


class LeastLoad(RoutingPolicy):
    name = "least-load"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates, loads, block_hashes=()) -> Decision:
        if not candidates:
            raise ValueError("no backend to choose from")
        self._turn += 1
        return Decision(_least_loaded(candidates, loads, self._turn))


class PrefixAware(RoutingPolicy):
    """Longest remembered prefix wins unless that backend is overloaded:
    its KV usage is at least `max_kv_usage`, or its load exceeds the least-loaded candidate's by more than
    `balance_abs` requests and by a factor of more than `balance_rel` (SGLang's cache-aware router idea)."""

    name = "prefix"

    def __init__(self, capacity: int = 1 << 18, balance_abs: int = 8, balance_rel: float = 1.5,
                 max_kv_usage: float = 0.95):
        if capacity < 1:
            raise ConfigError(f"prefix LRU capacity must be at least 1, got {capacity}")
        if balance_abs < 0 or balance_rel < 1.0:
            raise ConfigError(f"prefix balance thresholds: need balance_abs >= 0 and balance_rel >= 1, got "
                              f"{balance_abs} and {balance_rel}")
        if not 0.0 < max_kv_usage <= 1.0:
            raise ConfigError(f"max_kv_usage must be in (0, 1], got {max_kv_usage}")
        self.capacity, self.balance_abs, self.balance_rel, self.max_kv_usage = (capacity, balance_abs, balance_rel,
                                                                                max_kv_usage)
        self._lru: OrderedDict[int, set[int]] = OrderedDict()  # block hash -> backends sent it
        self._turn = 0

    @property
    def needs_hashes(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._lru)

    def longest_match(self, candidates: Sequence[int], block_hashes: Sequence[int]) -> tuple[list[int], int]:
        """(backends holding the longest run of leading hashes, its length in blocks)."""
        cur = set(candidates)
        n = 0
        for h in block_hashes:
            owners = self._lru.get(h)
            nxt = cur & owners if owners else set()
            if not nxt:
                break
            cur, n = nxt, n + 1
        return (sorted(cur), n) if n else ([], 0)

    def overloaded(self, i: int, candidates: Sequence[int], loads: Sequence[BackendLoad]) -> bool:
        if loads[i].kv_usage >= self.max_kv_usage:
            return True
        lo = min(loads[c].score for c in candidates)
        s = loads[i].score
        return s - lo > self.balance_abs and s > self.balance_rel * lo

    def choose(self, candidates, loads, block_hashes=()) -> Decision:
        if not candidates:
            raise ValueError("no backend to choose from")
        self._turn += 1
        best, n = self.longest_match(candidates, block_hashes)
        if n:
            pick = _least_loaded(best, loads, self._turn)
            if not self.overloaded(pick, candidates, loads):
                return Decision(pick, n)
            return Decision(_least_loaded(candidates, loads, self._turn), 0, overloaded_fallback=True)
        return Decision(_least_loaded(candidates, loads, self._turn))

    def routed(self, backend: int, block_hashes: Sequence[int]) -> None:
        lru = self._lru
        for h in block_hashes:
            owners = lru.get(h)
            if owners is None:
                lru[h] = {backend}
            else:
                owners.add(backend)
                lru.move_to_end(h)
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def forget_backend(self, backend: int) -> None:
        for h in [h for h, owners in self._lru.items() if backend in owners]:
            owners = self._lru[h]
            owners.discard(backend)
            if not owners:
                del self._lru[h]


def make_policy(name: str, **kw) -> RoutingPolicy:
    if name == "round-robin":
        return RoundRobin()
    if name == "least-load":
        return LeastLoad()
    if name == "prefix":
        return PrefixAware(**kw)
    raise ConfigError(f"unknown routing policy {name!r} (choose from {', '.join(POLICIES)})")
