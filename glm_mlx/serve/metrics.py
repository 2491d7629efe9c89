"""`/metrics` in Prometheus' text format (prometheus_client), on a registry of the server's own.

Counted at the end of each request (front_door.py); the batch size, queue length and prefix-cache
counters are read when scraped, from plain numbers the worker thread publishes (nothing MLX).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _PrefixCollector:
    def __init__(self, worker):
        self.worker = worker

    def collect(self):
        prefix = getattr(self.worker, "prefix", None)
        st = prefix.stats() if prefix is not None else {}  # plain numbers, under the cache's own lock
        hits = CounterMetricFamily("glm_mlx_prefix_cache_hit_blocks", "Prefix-cache blocks read for a hit, by tier",
                                   labels=["tier"])
        hits.add_metric(["ram"], st.get("ram_blocks_read", 0))
        hits.add_metric(["disk"], st.get("disk_blocks_read", 0))
        yield hits
        yield CounterMetricFamily("glm_mlx_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                  value=st.get("hit_tokens", 0))
        events = CounterMetricFamily("glm_mlx_prefix_cache_blocks", "Prefix-cache block events", labels=["event"])
        for name in ("blocks_saved", "blocks_written", "blocks_spilled", "ram_dropped", "disk_evicted", "write_errors"):
            events.add_metric([name], st.get(name, 0))
        yield events
        size = GaugeMetricFamily("glm_mlx_prefix_cache_bytes", "Bytes held by the prefix cache, by tier",
                                 labels=["tier"])
        size.add_metric(["ram"], st.get("ram_bytes", 0))
        size.add_metric(["disk"], st.get("disk_bytes", 0))
        yield size


class Metrics:
    def __init__(self, worker):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("glm_mlx_requests", "Requests by API and HTTP status", ["api", "status"], registry=r)
        self.tokens = Counter("glm_mlx_tokens", "Tokens by kind (prompt, cached, completion)", ["kind"], registry=r)
        self.ttft = Histogram("glm_mlx_time_to_first_token_seconds", "From submission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("glm_mlx_time_per_output_token_seconds", "Mean time between a request's tokens",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.failed = Counter("glm_mlx_failed_generations", "Generations that ended in an error", registry=r)
        batch = Gauge("glm_mlx_batch_size", "Sequences running in the batch", registry=r)
        batch.set_function(lambda: len(getattr(worker, "running", {}) or {}))
        waiting = Gauge("glm_mlx_queue_length", "Requests waiting for the worker", registry=r)
        waiting.set_function(lambda: worker.waiting)
        r.register(_PrefixCollector(worker))

    def request(self, api: str, status: int, end, seen: dict):
        self.requests.labels(api, str(status)).inc()
        if hasattr(end, "prompt_tokens"):
            self.tokens.labels("prompt").inc(end.prompt_tokens)
            self.tokens.labels("cached").inc(end.cached_tokens)
            self.tokens.labels("completion").inc(end.completion_tokens)
            if end.completion_tokens:
                self.ttft.observe(end.ttft)
            if end.generation_tps > 0:
                self.per_token.observe(1.0 / end.generation_tps)
        elif end is not None:
            self.failed.inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
