"""Expert offload policy: which MoE experts stay in the device cache, which are fetched, which run on the host.

Pure Python over ints (no torch): the mechanism (tokenmill/model/layers/expert_offload.py) asks it once per
MoE layer and does what it says. The ideas, from the papers this project builds on:

- Hybrid execution (HybriMoE, MoE-Lens): a routed expert that is not resident either runs on the host, where
  its weights already are, or is copied to the device and runs there. `ExpertCostModel.prefer_host(n)`
  compares the two for n tokens: the host reads the expert from DRAM once and does n tokens of FLOPs at host
  speed; the fetch moves the expert over the link, then the device does the n tokens. Decode (n small) favours
  the host, prefill (n large) favours the fetch.
- Score-based caching (HybriMoE): each (layer, expert) has a score, the exponentially decayed count of tokens
  routed to it (score = decay * score + count, every time the layer runs). A fetched expert evicts the
  resident expert of lowest score (ties: least recently used) that the current layer does not use; an expert
  that ran on the host is admitted in the background when its score beats that victim's.
- Pre-gated prefetch (Pre-gated MoE, Fate): the next layer's gate applied to this layer's hidden state
  predicts the next layer's experts; `plan_prefetch` picks which of them to copy in while this layer computes.

Slots are global (every layer's experts have the same shape): `capacity` experts fit on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class ExpertCostModel:
    """Seconds for one expert's work on each side. expert_bytes: one expert's gate, up and down weights;
    flops_per_token: 2 * 3 * hidden * intermediate (three matmuls)."""

    expert_bytes: int
    flops_per_token: int
    link_bytes_per_s: float = 25e9  # host -> device copies (PCIe 4 x16 in practice)
    host_bytes_per_s: float = 60e9  # host DRAM bandwidth the expert kernel reaches
    host_flops: float = 1e12  # host matmul throughput
    device_bytes_per_s: float = 2e12  # device memory bandwidth
    device_flops: float = 300e12

    def fetch_s(self) -> float:
        return self.expert_bytes / self.link_bytes_per_s

    def host_s(self, n: int) -> float:
        """n tokens through the expert on the host: weights read once, or compute bound, whichever is slower."""
        return max(self.expert_bytes / self.host_bytes_per_s, n * self.flops_per_token / self.host_flops)

    def device_s(self, n: int) -> float:
        return max(self.expert_bytes / self.device_bytes_per_s, n * self.flops_per_token / self.device_flops)

    def prefer_host(self, n: int) -> bool:
        """Run n tokens on the host rather than fetch the expert and run them on the device."""
        return self.host_s(n) < self.fetch_s() + self.device_s(n)

    def host_break_even_tokens(self, limit: int = 1 << 20) -> int:
        """The fewest tokens for which fetching wins (limit when the host always wins below it)."""
        lo, hi = 1, limit
        if self.prefer_host(hi):
            return limit
        while lo < hi:
            mid = (lo + hi) // 2
            if self.prefer_host(mid):
                lo = mid + 1
            else:
                hi = mid
        return lo


@dataclass
class LayerPlan:
    """What the mechanism does for one layer. device: expert -> slot for every routed expert that runs on the
    device (resident ones and the ones fetched now); fetch: (expert, slot) copied in before the compute
    (blocking); host: experts whose tokens run on the host; admit: (expert, slot) copied in after the compute,
    overlapped with the next layers (host-run experts whose score earned a slot)."""

    device: dict[int, int] = field(default_factory=dict)
    fetch: list[tuple[int, int]] = field(default_factory=list)
    host: list[int] = field(default_factory=list)
    admit: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ExpertCacheStats:
    """Cumulative counters (one 'activation' = one routed expert of one layer in one forward)."""

    capacity: int = 0  # device slots
    resident: int = 0  # slots holding an expert now
    hits: int = 0  # activations whose expert was resident (prefetched ones included)
    misses: int = 0  # activations whose expert was not
    fetches: int = 0  # experts copied in on demand, before their layer ran
    prefetches: int = 0  # experts copied in ahead of their layer (predicted by the next gate)
    prefetch_hits: int = 0  # prefetched experts that their layer then used
    admissions: int = 0  # host-run experts copied in afterwards for their score
    evictions: int = 0
    host_tokens: int = 0  # token-expert pairs run on the host
    device_tokens: int = 0  # token-expert pairs run on the device

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0


class ExpertCachePolicy:
    """The device expert cache of one model: `capacity` slots over num_layers x num_experts experts."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int, cost: ExpertCostModel,
                 decay: float = 0.9, prefetch_limit: Optional[int] = None):
        if capacity < 0:
            raise ValueError(f"expert cache capacity must be >= 0, got {capacity}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"score decay must be in [0, 1), got {decay}")
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self.cost, self.decay = cost, decay
        self.prefetch_limit = prefetch_limit  # experts prefetched per layer at most (None: no limit)
        self.scores = [[0.0] * num_experts for _ in range(num_layers)]
        self.last_used = [[-1] * num_experts for _ in range(num_layers)]
        self.slot_of: dict[Key, int] = {}
        self.key_of: dict[int, Key] = {}
        self.free: list[int] = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first
        # per layer: its resident experts, and them sorted by (score, last use), rebuilt when None (after the
        # layer's scores change or its residents do); a victim is the best of each layer's first unprotected
        self._resident: list[set[int]] = [set() for _ in range(num_layers)]
        self._order: list[Optional[list[int]]] = [None] * num_layers
        self.prefetched: set[Key] = set()  # copied in ahead, not used yet
        self.clock = 0  # layer calls so far (the LRU tie-break)
        self.stats = ExpertCacheStats(capacity=capacity)

    # ---- placement ---------------------------------------------------------------------------------
    def warm(self, keys: list[Key]) -> list[tuple[Key, int]]:
        """Place experts before serving (no stats): the first `capacity` of `keys`. Returns (key, slot) to copy."""
        out = []
        for key in keys:
            if not self.free:
                break
            if key not in self.slot_of:
                out.append((key, self._place(key, self.free.pop())))
        return out

    def _place(self, key: Key, slot: int) -> int:
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self._resident[key[0]].add(key[1])
        self._order[key[0]] = None
        self.stats.resident = len(self.slot_of)
        return slot

    def _evict(self, key: Key) -> int:
        slot = self.slot_of.pop(key)
        del self.key_of[slot]
        self._resident[key[0]].discard(key[1])
        if self._order[key[0]] is not None:
            self._order[key[0]].remove(key[1])
        self.prefetched.discard(key)
        self.stats.evictions += 1
        self.stats.resident = len(self.slot_of)
        return slot

    def _victim(self, protect: set[Key], skip_layer: Optional[int] = None) -> Optional[Key]:
        """The resident expert of lowest (score, last use) not in `protect` nor of `skip_layer`."""
        best: Optional[Key] = None
        best_rank = None
        for layer, resident in enumerate(self._resident):
            if not resident or layer == skip_layer:
                continue
            scores, last = self.scores[layer], self.last_used[layer]
            order = self._order[layer]
            if order is None:
                order = self._order[layer] = sorted(resident, key=lambda e: (scores[e], last[e]))
            for e in order:
                if (layer, e) not in protect:
                    rank = (scores[e], last[e])
                    if best_rank is None or rank < best_rank:
                        best, best_rank = (layer, e), rank
                    break
        return best

    def _take_slot(self, key: Key, protect: set[Key], min_score: Optional[float] = None) -> Optional[int]:
        """A slot for `key`: a free one, else the victim's when its score is below min_score (None: any)."""
        if self.free:
            return self._place(key, self.free.pop())
        victim = self._victim(protect)
        if victim is None:
            return None
        if min_score is not None and self.scores[victim[0]][victim[1]] >= min_score:
            return None
        return self._place(key, self._evict(victim))

    def _admit(self, cands: list[tuple[Key, float]], protect: set[Key], skip_layer: Optional[int] = None,
               evict: bool = True, limit: Optional[int] = None) -> list[tuple[Key, int]]:
        """Slots for candidates (key, the score it needs to beat), in order: free slots first, then (evict) the
        victim's when its score is below the candidate's. The victim is searched again only after an eviction."""
        out: list[tuple[Key, int]] = []
        victim: Optional[Key] = None
        for key, min_score in cands:
            if limit is not None and len(out) >= limit:
                break
            if self.free:
                slot = self._place(key, self.free.pop())
            elif not evict:
                break
            else:
                if victim is None:
                    victim = self._victim(protect, skip_layer)
                    if victim is None:
                        break
                if self.scores[victim[0]][victim[1]] >= min_score:
                    continue
                slot = self._place(key, self._evict(victim))
                victim = None
            protect.add(key)
            out.append((key, slot))
        return out

    # ---- per layer ---------------------------------------------------------------------------------
    def plan_layer(self, layer: int, counts: list[int]) -> LayerPlan:
        """counts[e]: tokens routed to expert e in this forward of `layer`. Updates scores and the cache."""
        if len(counts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} expert counts, got {len(counts)}")
        self.clock += 1
        self._order[layer] = None  # its scores change
        scores, last = self.scores[layer], self.last_used[layer]
        for e, n in enumerate(counts):
            scores[e] = self.decay * scores[e] + n
            if n:
                last[e] = self.clock
        plan = LayerPlan()
        routed = [e for e, n in enumerate(counts) if n]
        protect = {(layer, e) for e in routed if (layer, e) in self.slot_of}
        st = self.stats
        misses = []
        for e in routed:
            key = (layer, e)
            slot = self.slot_of.get(key)
            if slot is None:
                misses.append(e)
                continue
            st.hits += 1
            if key in self.prefetched:
                self.prefetched.discard(key)
                st.prefetch_hits += 1
            plan.device[e] = slot
            st.device_tokens += counts[e]
        st.misses += len(misses)
        # the largest misses first: they gain most from a slot
        for e in sorted(misses, key=lambda e: -counts[e]):
            key, n = (layer, e), counts[e]
            slot = None if self.cost.prefer_host(n) else self._take_slot(key, protect)
            if slot is None:
                plan.host.append(e)
                st.host_tokens += n
                continue
            protect.add(key)
            plan.device[e] = slot
            plan.fetch.append((e, slot))
            st.fetches += 1
            st.device_tokens += n
        # admission in the background: only over a victim of lower score
        for key, slot in self._admit([((layer, e), scores[e]) for e in plan.host], protect):
            plan.admit.append((key[1], slot))
            st.admissions += 1
        return plan

    def plan_prefetch(self, layer: int, predicted: list[tuple[int, int]],
                      protect_layer: Optional[int] = None) -> list[tuple[int, int]]:
        """predicted: (expert, tokens) of `layer` the next gate expects, most likely first. Returns (expert, slot)
        to copy in now. A predicted expert takes a free slot, or evicts one whose score is below the score the
        prediction would give it (decayed score + predicted tokens); experts of `protect_layer` (the layer
        computing now) are never evicted (None: nothing resident is)."""
        protect = {(layer, e) for e, _ in predicted if (layer, e) in self.slot_of}
        scores = self.scores[layer]
        cands = [((layer, e), self.decay * scores[e] + n) for e, n in predicted if (layer, e) not in self.slot_of]
        out = []
        for key, slot in self._admit(cands, protect, skip_layer=protect_layer, evict=protect_layer is not None,
                                     limit=self.prefetch_limit):
            self.prefetched.add(key)
            out.append((key[1], slot))
            self.stats.prefetches += 1
        return out

    def resident(self, layer: int) -> dict[int, int]:
        """expert -> slot of the resident experts of `layer`."""
        return {k[1]: s for k, s in self.slot_of.items() if k[0] == layer}


@dataclass
class MoEStats:
    """A MoE model's routing statistics, cumulative since serving started (ModelRunnerOutput -> EngineStats ->
    /metrics): tokens routed to each expert per layer, and the expert cache's counters under offload."""

    expert_counts: dict[int, list[int]] = field(default_factory=dict)  # layer index -> tokens per expert
    cache: Optional[ExpertCacheStats] = None  # a copy; None without expert offload

    @staticmethod
    def merge(parts: list["MoEStats"]) -> "MoEStats":
        """Several engines' statistics (data-parallel replicas) as one: counts and counters summed."""
        out = MoEStats()
        for p in parts:
            for layer, counts in p.expert_counts.items():
                have = out.expert_counts.setdefault(layer, [0] * len(counts))
                out.expert_counts[layer] = [a + b for a, b in zip(have, counts)]
            if p.cache is not None:
                out.cache = out.cache or ExpertCacheStats()
                for f in fields(ExpertCacheStats):
                    setattr(out.cache, f.name, getattr(out.cache, f.name) + getattr(p.cache, f.name))
        return out
