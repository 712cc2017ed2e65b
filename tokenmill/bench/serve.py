"""Open-loop serving benchmark against any OpenAI-compatible server, and the goodput search.

Arrivals are open-loop (Poisson, or gamma with a burstiness factor as in vLLM's benchmark): a request
is sent at its arrival time whatever the server is doing. Multi-turn conversations arrive open-loop,
and each later turn is sent when the previous one completes (closed loop inside a conversation).
"""
from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import aiohttp
from tqdm import tqdm

from tokenmill.bench.client import (ClientConfig, build_body, fetch_model, make_session, normalize_base_url,
                                    send_request)
from tokenmill.bench.metrics import GOODPUT_ATTAINMENT, apply_slo, summarize
from tokenmill.bench.types import BenchError, Conversation, RequestRecord
from tokenmill.bench.workloads import Workload, get_workload

ARRIVALS = ("poisson", "gamma")
DEFAULT_NUM_REQUESTS = 200


@dataclass
class RateResult:
    """The outcome of one request rate: its summary (see metrics.summarize) and every request's record."""

    rate: float
    summary: dict[str, Any]
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def slo_attainment(self) -> float:
        return float(self.summary["slo_attainment"])

    @property
    def goodput(self) -> float:
        return float(self.summary["goodput"])


@dataclass
class GoodputResult:
    """`rate`: the highest probed rate at which >= `target` of requests met both SLOs (0.0 if none)."""

    rate: float
    target: float
    probes: list[RateResult]

    @property
    def best(self) -> Optional[RateResult]:
        ok = [p for p in self.probes if p.rate == self.rate and p.slo_attainment >= self.target]
        return ok[-1] if ok else None


def parse_rates(text: str) -> list[float]:
    """'1,2.5,inf' -> [1.0, 2.5, inf]; BenchError on anything else."""
    rates = []
    for item in text.split(","):
        item = item.strip()
        try:
            r = float(item)
        except ValueError:
            raise BenchError(f"bad rate list {text!r}: {item!r} is not a number (use e.g. 1,2,4 or inf)") from None
        if math.isnan(r) or r <= 0:
            raise BenchError(f"bad rate list {text!r}: rates must be > 0 (requests per second)")
        rates.append(r)
    return rates


def _check_arrival(rate: float, arrival: str, burstiness: float) -> None:
    if arrival not in ARRIVALS:
        raise BenchError(f"unknown arrival process {arrival!r}; choose one of: {', '.join(ARRIVALS)}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise BenchError(f"burstiness must be a positive number, got {burstiness}")
    if math.isnan(rate) or rate <= 0:
        raise BenchError(f"request rate must be > 0, got {rate}")


def _interval(rng: random.Random, rate: float, arrival: str, burstiness: float) -> float:
    if math.isinf(rate):
        return 0.0
    if arrival == "poisson" or burstiness == 1.0:
        return rng.expovariate(rate)
    # Gamma with shape = burstiness and mean 1/rate: burstiness < 1 is burstier, > 1 more regular.
    return rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


def arrival_times(rate: float, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0,
                  num: Optional[int] = None, duration_s: Optional[float] = None) -> list[float]:
    """Arrival offsets in seconds: `num` of them, or as many as fall before `duration_s`. First one at 0."""
    _check_arrival(rate, arrival, burstiness)
    if num is None and (duration_s is None or math.isinf(rate)):
        raise BenchError("an infinite request rate needs a number of requests (--num-requests)")
    rng = random.Random(f"arrivals:{seed}")
    times: list[float] = []
    t = 0.0
    while True:
        if num is not None and len(times) >= num:
            break
        if duration_s is not None and t >= duration_s:
            break
        times.append(t)
        t += _interval(rng, rate, arrival, burstiness)
    return times


class _Runner:
    """Holds the session and settings of one benchmark; runs one rate at a time."""

    def __init__(self, cfg: ClientConfig, workload: Workload, session: aiohttp.ClientSession, *,
                 duration_s: Optional[float], num_requests: Optional[int], slo_ttft_ms: Optional[float],
                 slo_tpot_ms: Optional[float], arrival: str, burstiness: float,
                 max_concurrency: Optional[int], seed: int, progress: bool):
        self.cfg, self.workload, self.session = cfg, workload, session
        self.duration_s, self.num_requests = duration_s, num_requests
        self.slo_ttft_ms, self.slo_tpot_ms = slo_ttft_ms, slo_tpot_ms
        self.arrival, self.burstiness = arrival, burstiness
        self.max_concurrency, self.seed, self.progress = max_concurrency, seed, progress

    async def warmup(self) -> None:
        """Send one short request; a client error (bad model, bad route) stops the benchmark."""
        conv = self.workload.generate(1, self.seed)[0]
        req = conv.turns[0]
        body = build_body(self.cfg, req, max_tokens=min(req.max_tokens, 8))
        rec = RequestRecord(conv_id=-1, turn=0, prompt_len=req.prompt_len, max_tokens=body["max_tokens"])
        await send_request(self.session, self.cfg, body, rec, time.perf_counter())
        if not rec.success and rec.status != 429:
            raise BenchError(f"test request to {self.cfg.url} failed: {rec.error}")

    async def _conversation(self, conv: Conversation, scheduled: float, t0: float,
                            sem: Optional[asyncio.Semaphore], bar: tqdm) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        history: list[dict[str, Any]] = []
        history_len = 0
        multi = len(conv.turns) > 1
        for i, req in enumerate(conv.turns):
            rec = RequestRecord(conv_id=conv.conv_id, turn=i, prompt_len=history_len + req.prompt_len,
                                max_tokens=req.max_tokens, scheduled_s=scheduled,
                                slo_ttft_ms=req.ttft_ms, slo_tpot_ms=req.tpot_ms)
            records.append(rec)
            if records[0] is not rec and not records[-2].success:
                rec.error = "skipped: an earlier turn failed"
                bar.update(1)
                continue
            msgs = None
            if multi:
                msgs = history + [{"role": "user", "content": req.prompt or ""}]
            body = build_body(self.cfg, req, messages=msgs)
            if sem is not None:
                async with sem:
                    await send_request(self.session, self.cfg, body, rec, t0)
            else:
                await send_request(self.session, self.cfg, body, rec, t0)
            bar.update(1)
            if multi:
                history = msgs + [{"role": "assistant", "content": rec.text}]  # type: ignore[operator]
                history_len = rec.prompt_len + rec.output_tokens
            scheduled = rec.start_s + (rec.e2e_s or 0.0)
        return records

    async def run_rate(self, rate: float) -> RateResult:
        """Send the workload at `rate` arrivals/s and measure every request."""
        if self.duration_s is not None:
            times = arrival_times(rate, self.arrival, self.burstiness, self.seed, num=self.num_requests,
                                  duration_s=self.duration_s)
        else:
            n = self.num_requests or self.workload.natural_size or DEFAULT_NUM_REQUESTS
            times = arrival_times(rate, self.arrival, self.burstiness, self.seed, num=n)
        convs = self.workload.generate(len(times), self.seed)
        schedule = sorted(((c.delay_s if c.delay_s is not None else t), c.conv_id, c) for t, c in zip(times, convs))
        total = sum(len(c.turns) for c in convs)
        sem = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
        label = "inf" if math.isinf(rate) else f"{rate:g}"
        bar = tqdm(total=total, desc=f"rate {label} req/s", unit="req", disable=not self.progress, leave=False)
        tasks = []
        t0 = time.perf_counter()
        try:
            for at, _, conv in schedule:
                wait = t0 + at - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                tasks.append(asyncio.create_task(self._conversation(conv, at, t0, sem, bar)))
            results = await asyncio.gather(*tasks)
        finally:
            bar.close()
        duration = time.perf_counter() - t0
        records = [r for rs in results for r in rs]
        apply_slo(records, self.slo_ttft_ms, self.slo_tpot_ms)
        return RateResult(rate=rate, summary=summarize(records, duration), records=records)


def _validate(duration_s: Optional[float], num_requests: Optional[int], endpoint: str,
              max_concurrency: Optional[int], slo: tuple[Optional[float], Optional[float]]) -> None:
    if duration_s is not None and not (duration_s > 0 and math.isfinite(duration_s)):
        raise BenchError(f"duration must be a positive number of seconds, got {duration_s}")
    if num_requests is not None and num_requests <= 0:
        raise BenchError(f"number of requests must be positive, got {num_requests}")
    if endpoint not in ("chat", "completions"):
        raise BenchError(f"unknown endpoint {endpoint!r}; choose chat or completions")
    if max_concurrency is not None and max_concurrency <= 0:
        raise BenchError(f"max concurrency must be positive, got {max_concurrency}")
    for name, v in zip(("TTFT", "TPOT"), slo):
        if v is not None and not v > 0:
            raise BenchError(f"SLO {name} target must be > 0 ms, got {v}")


async def _open(base_url: str, workload: Union[str, Workload], tokenizer: Any, api_key: Optional[str],
                model: Optional[str], endpoint: str, max_concurrency: Optional[int], seed: int,
                warmup: bool, kw: dict[str, Any]) -> tuple[aiohttp.ClientSession, _Runner]:
    wl = get_workload(workload, tokenizer=tokenizer, seed=seed) if isinstance(workload, str) else workload
    base = normalize_base_url(base_url)
    session = make_session(max_concurrency)
    try:
        found = await fetch_model(session, base, api_key)
        name = model or found
        if name is None:
            raise BenchError(f"{base}/v1/models did not name a model; pass --model")
        cfg = ClientConfig(base_url=base, model=name, endpoint=endpoint, api_key=api_key)
        runner = _Runner(cfg, wl, session, max_concurrency=max_concurrency, seed=seed, **kw)
        if warmup:
            await runner.warmup()
    except BaseException:
        await session.close()
        raise
    return session, runner


async def async_run_serve_benchmark(base_url: str, workload: Union[str, Workload], rates: list[float], *,
                                    duration_s: Optional[float] = None, num_requests: Optional[int] = None,
                                    slo_ttft_ms: Optional[float] = None, slo_tpot_ms: Optional[float] = None,
                                    arrival: str = "poisson", burstiness: float = 1.0,
                                    api_key: Optional[str] = None, model: Optional[str] = None,
                                    endpoint: str = "chat", max_concurrency: Optional[int] = None,
                                    seed: int = 0, tokenizer: Any = None, progress: bool = True,
                                    warmup: bool = True) -> list[RateResult]:
    """Async form of run_serve_benchmark."""
    _validate(duration_s, num_requests, endpoint, max_concurrency, (slo_ttft_ms, slo_tpot_ms))
    if not rates:
        raise BenchError("give at least one request rate")
    for r in rates:
        _check_arrival(r, arrival, burstiness)
    kw = dict(duration_s=duration_s, num_requests=num_requests, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
              arrival=arrival, burstiness=burstiness, progress=progress)
    session, runner = await _open(base_url, workload, tokenizer, api_key, model, endpoint, max_concurrency, seed,
                                  warmup, kw)
    async with session:
        return [await runner.run_rate(r) for r in rates]


def run_serve_benchmark(base_url: str, workload: Union[str, Workload], rates: list[float], **kwargs: Any
                        ) -> list[RateResult]:
    """Benchmark a server at each rate in turn (same requests, same seed at every rate).

    Keyword arguments: duration_s | num_requests, slo_ttft_ms, slo_tpot_ms, arrival ("poisson" | "gamma"),
    burstiness, api_key, model (default: the first of /v1/models), endpoint ("chat" | "completions"),
    max_concurrency, seed, tokenizer (a transformers tokenizer for exact prompt lengths), progress, warmup.
    """
    return asyncio.run(async_run_serve_benchmark(base_url, workload, rates, **kwargs))


async def async_find_goodput(base_url: str, workload: Union[str, Workload], *, slo_ttft_ms: Optional[float],
                             slo_tpot_ms: Optional[float], start_rate: float = 1.0, max_rate: float = 1024.0,
                             min_rate: Optional[float] = None, target: float = GOODPUT_ATTAINMENT,
                             rel_tol: float = 0.1, max_probes: int = 12, duration_s: Optional[float] = None,
                             num_requests: Optional[int] = None, arrival: str = "poisson",
                             burstiness: float = 1.0, api_key: Optional[str] = None, model: Optional[str] = None,
                             endpoint: str = "chat", max_concurrency: Optional[int] = None, seed: int = 0,
                             tokenizer: Any = None, progress: bool = True, warmup: bool = True) -> GoodputResult:
    """Async form of find_goodput."""
    _validate(duration_s, num_requests, endpoint, max_concurrency, (slo_ttft_ms, slo_tpot_ms))
    _check_arrival(start_rate, arrival, burstiness)
    min_rate = start_rate / 16 if min_rate is None else min_rate
    if not (0 < min_rate <= start_rate <= max_rate) or math.isinf(max_rate):
        raise BenchError("goodput search needs 0 < min_rate <= start_rate <= max_rate < inf")
    if not 0 < target <= 1:
        raise BenchError(f"attainment target must be in (0, 1], got {target}")
    kw = dict(duration_s=duration_s, num_requests=num_requests, slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
              arrival=arrival, burstiness=burstiness, progress=progress)
    session, runner = await _open(base_url, workload, tokenizer, api_key, model, endpoint, max_concurrency, seed,
                                  warmup, kw)
    probes: list[RateResult] = []
    async with session:
        lo: Optional[float] = None  # highest passing rate
        hi: Optional[float] = None  # lowest failing rate
        rate = start_rate
        while len(probes) < max_probes:
            res = await runner.run_rate(rate)
            probes.append(res)
            if res.slo_attainment >= target:
                lo = rate if lo is None else max(lo, rate)
            else:
                hi = rate if hi is None else min(hi, rate)
            nxt = next_probe_rate(lo, hi, min_rate, max_rate, rel_tol)
            if nxt is None:
                break
            rate = nxt
    return GoodputResult(rate=lo or 0.0, target=target, probes=probes)


def next_probe_rate(lo: Optional[float], hi: Optional[float], min_rate: float, max_rate: float,
                    rel_tol: float) -> Optional[float]:
    """Exponential search then bisection: the next rate to try, or None when the search is done."""
    if hi is None:  # everything passed so far: double
        assert lo is not None
        return None if lo >= max_rate else min(lo * 2.0, max_rate)
    if lo is None:  # everything failed so far: halve
        return None if hi <= min_rate else max(hi / 2.0, min_rate)
    if hi <= lo * (1.0 + rel_tol):
        return None
    return (lo + hi) / 2.0


def find_goodput(base_url: str, workload: Union[str, Workload], **kwargs: Any) -> GoodputResult:
    """Search the highest rate at which >= 90% of requests meet both SLOs (DistServe goodput).

    Doubles the rate from `start_rate` while the target is met (halves while it is not, down to `min_rate`,
    default start_rate / 16), then bisects
    between the highest passing and lowest failing rates until they are within `rel_tol`.
    Keyword arguments as async_find_goodput.
    """
    return asyncio.run(async_find_goodput(base_url, workload, **kwargs))
