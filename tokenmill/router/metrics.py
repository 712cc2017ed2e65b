"""/metrics of the router: per-backend state, load and counts, retries, and the routing hit rate, read from
the Router at scrape time (its own CollectorRegistry; no module globals)."""
from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _RouterCollector(Collector):
    def __init__(self, router: Any):
        self.router = router

    def collect(self) -> Iterator[Metric]:
        r = self.router
        per = {
            "backend_up": (GaugeMetricFamily, "1 while the backend passes its health checks", lambda b: float(b.healthy)),
            "backend_in_flight": (GaugeMetricFamily, "requests the router has open on the backend",
                                  lambda b: b.load.in_flight),
            "backend_running": (GaugeMetricFamily, "running requests the backend last reported",
                                lambda b: b.load.running),
            "backend_waiting": (GaugeMetricFamily, "waiting requests the backend last reported",
                                lambda b: b.load.waiting),
            "backend_kv_usage": (GaugeMetricFamily, "KV-cache usage the backend last reported",
                                 lambda b: b.load.kv_usage),
            "backend_requests": (CounterMetricFamily, "responses relayed from the backend", lambda b: b.requests),
            "backend_failures": (CounterMetricFamily, "requests that failed on the backend before their first "
                                                      "byte (then retried on another)", lambda b: b.failures),
        }
        for name, (cls, doc, get) in per.items():
            m = cls(f"tokenmill_router:{name}", doc, labels=["backend"])
            for bs in r.backend_sets():
                for b in bs.backends:
                    m.add_metric([b.url], get(b))
            yield m
        yield CounterMetricFamily("tokenmill_router:retries", "requests sent again to another backend", value=r.retries)
        yield CounterMetricFamily("tokenmill_router:unroutable", "requests answered 503: no backend up",
                                  value=r.unroutable)
        yield CounterMetricFamily("tokenmill_router:routed_requests", "completion requests routed",
                                  value=r.routed_requests)
        yield CounterMetricFamily("tokenmill_router:prefix_matched_requests",
                                  "completion requests sent to a backend that was sent a prefix of them",
                                  value=r.matched_requests)
        yield CounterMetricFamily("tokenmill_router:prefix_prompt_blocks", "hashed leading prompt blocks routed",
                                  value=r.prompt_blocks)
        yield CounterMetricFamily("tokenmill_router:prefix_matched_blocks",
                                  "of those, blocks the chosen backend was sent before", value=r.matched_blocks)
        yield CounterMetricFamily("tokenmill_router:prefix_overloaded_fallbacks",
                                  "requests whose best-matching backend was overloaded (least-load chose)",
                                  value=r.overloaded_fallbacks)
        rate = r.matched_blocks / r.prompt_blocks if r.prompt_blocks else 0.0
        yield GaugeMetricFamily("tokenmill_router:routing_hit_rate",
                                "matched blocks / hashed prompt blocks (cumulative; prefix policy)", value=rate)


class RouterMetrics:
    def __init__(self, router: Any):
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_RouterCollector(router))

    def render(self) -> bytes:
        return generate_latest(self.registry)
