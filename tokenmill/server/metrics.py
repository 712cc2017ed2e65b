"""Prometheus metrics of one server: its own CollectorRegistry (no module globals).

Engine-side numbers (queue sizes, KV blocks, prefix cache, preemptions, token counters) are read from
`EngineClient.get_stats()` at scrape time; latencies are measured per request in the handlers.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.engine.protocol import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineStatsCollector(Collector):
    """Turns an EngineStats snapshot into gauges and counters on every scrape."""

    def __init__(self, get_stats: Callable[[], EngineStats]):
        self._get_stats = get_stats

    def collect(self) -> Iterator[Metric]:
        s = self._get_stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"tokenmill:{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"tokenmill:{name}", doc, value=value)

        yield gauge("num_requests_running", "requests in the running batch", s.num_running)
        yield gauge("num_requests_waiting", "requests waiting to be scheduled", s.num_waiting)
        yield gauge("kv_cache_blocks_total", "KV-cache blocks in the pool", s.kv_blocks_total)
        yield gauge("kv_cache_blocks_used", "KV-cache blocks held by requests", s.kv_blocks_used)
        yield gauge("kv_cache_blocks_free", "KV-cache blocks not held by any request",
                    max(0, s.kv_blocks_total - s.kv_blocks_used))
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        yield gauge("kv_cache_usage_ratio", "fraction of KV-cache blocks in use", usage)
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield gauge("prefix_cache_hit_rate", "prefix-cache hit tokens / queried tokens (cumulative)", rate)
        yield counter("prefix_cache_queries", "prompt tokens looked up in the prefix cache", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "prompt tokens found in the prefix cache", s.prefix_cache_hits)
        yield counter("kv_offload_swapped_out_blocks", "KV blocks copied to the CPU offload tier",
                      s.kv_offload_swapped_out_blocks)
        yield counter("kv_offload_swapped_in_blocks", "KV blocks copied back from the CPU offload tier",
                      s.kv_offload_swapped_in_blocks)
        yield counter("kv_offload_prefix_hits", "prompt tokens found in the CPU offload tier's prefix index",
                      s.kv_offload_prefix_hits)
        yield counter("kv_transfer_sent", "disaggregation: prefilled requests whose KV blocks were served or expired",
                      s.kv_transfer_sent)
        yield counter("kv_transfer_recv_ok", "disaggregation: requests whose prompt KV arrived from the producer",
                      s.kv_transfer_recv_ok)
        yield counter("kv_transfer_recv_failed", "disaggregation: failed or late KV pulls (prompt recomputed)",
                      s.kv_transfer_recv_failed)
        yield counter("num_preemptions", "requests preempted to free KV blocks", s.num_preemptions)
        yield counter("prompt_tokens", "prompt tokens computed", s.prompt_tokens)
        yield counter("generation_tokens", "tokens generated", s.generation_tokens)
        yield counter("engine_steps", "engine steps completed", s.steps)
        yield gauge("engine_alive", "1 while the engine loop is alive", 1.0 if s.loop_alive else 0.0)
        if s.lora_requests:  # multi-LoRA: per adapter
            req = CounterMetricFamily("tokenmill:lora_requests", "requests per LoRA adapter", labels=["lora_name"])
            tok = CounterMetricFamily("tokenmill:lora_generation_tokens", "tokens generated per LoRA adapter",
                                      labels=["lora_name"])
            for name, n in s.lora_requests.items():
                req.add_metric([name], n)
                tok.add_metric([name], s.lora_generation_tokens.get(name, 0))
            yield req
            yield tok
            yield counter("lora_unfused_steps", "CPU steps with LoRA rows run on the per-op path, not the fused layer",
                          s.lora_unfused_steps)
            yield counter("lora_reloads", "LoRA adapters read again after an LRU drop", s.lora_reloads)
        if s.moe is not None:
            yield from _moe_metrics(s.moe)


def _moe_metrics(moe) -> Iterator[Metric]:
    """MoE routing (tokens per layer and expert) and, under expert offload, the expert cache's counters."""
    load = CounterMetricFamily("tokenmill:moe_expert_tokens", "tokens routed to each expert of each MoE layer "
                               "(a token counts once per chosen expert)", labels=["layer", "expert"])
    for layer, counts in sorted(moe.expert_counts.items()):
        for e, n in enumerate(counts):
            load.add_metric([str(layer), str(e)], n)
    yield load
    c = moe.cache
    if c is None:
        return
    yield GaugeMetricFamily("tokenmill:moe_expert_cache_hit_rate", "routed experts found in the device expert "
                            "cache / routed experts (cumulative)", value=c.hit_rate)
    yield GaugeMetricFamily("tokenmill:moe_expert_cache_capacity", "expert slots on the device", value=c.capacity)
    yield GaugeMetricFamily("tokenmill:moe_expert_cache_resident", "experts resident on the device",
                            value=c.resident)
    for name, doc in (("hits", "routed experts found in the device cache"),
                      ("misses", "routed experts not in the device cache"),
                      ("fetches", "experts copied to the device on demand"),
                      ("prefetches", "experts copied to the device ahead of their layer (next-gate prediction)"),
                      ("prefetch_hits", "prefetched experts their layer then used"),
                      ("admissions", "host-run experts copied to the device afterwards for their score"),
                      ("evictions", "experts evicted from the device cache"),
                      ("host_tokens", "token-expert pairs run on the host"),
                      ("device_tokens", "token-expert pairs run on the device")):
        yield CounterMetricFamily(f"tokenmill:moe_expert_cache_{name}", doc, value=getattr(c, name))


class ServerMetrics:
    """All metrics of one app, registered on the app's own registry."""

    def __init__(self, get_stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tokenmill:request_success", "finished requests by finish reason",
                                ["finish_reason"], registry=r)
        self.http_responses = Counter("tokenmill:http_responses", "HTTP responses by route and status",
                                      ["route", "status"], registry=r)
        self.ttft = Histogram("tokenmill:time_to_first_token_seconds", "time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tokenmill:time_per_output_token_seconds", "inter-token latency after the first",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("tokenmill:e2e_request_latency_seconds", "request latency, arrival to finish",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("tokenmill:request_queue_time_seconds", "time waiting before first scheduled",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tokenmill:request_prompt_tokens", "prompt tokens of served requests",
                                     registry=r)
        self.completion_tokens = Counter("tokenmill:request_generation_tokens",
                                         "completion tokens of served requests", registry=r)
        r.register(_EngineStatsCollector(get_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
