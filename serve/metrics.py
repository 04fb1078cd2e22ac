"""Prometheus metrics of the engine, read at scrape time (prometheus_client text format)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine):
        self.engine = engine
        self.requests = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self._rate: deque = deque(maxlen=64)  # (time, generation tokens) at scrapes
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self):
        e = self.engine
        load, stats = e.load(), dict(e.stats)
        while e.ttft:  # drain what the engine measured since the last scrape
            t = e.ttft.popleft()
            self.ttft_sum += t
            self.ttft_counts[next((i for i, b in enumerate(TTFT_BUCKETS) if t <= b), len(TTFT_BUCKETS))] += 1
        now = time.monotonic()
        self._rate.append((now, stats["generation_tokens"]))
        old = next(((t, n) for t, n in self._rate if now - t <= 10.0), self._rate[0])
        rate = (stats["generation_tokens"] - old[1]) / (now - old[0]) if now > old[0] else 0.0

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            return c

        yield gauge("llmzip_queue_depth", "Requests waiting for a slot", load["waiting"])
        yield gauge("llmzip_running_seqs", "Sequences in the running batch", load["running"])
        yield gauge("llmzip_kv_pages_used", "KV pool pages held by running sequences", load["kv_pages_used"])
        yield gauge("llmzip_kv_pages_total", "KV pool pages", load["kv_pages_total"])
        yield gauge("llmzip_kv_cache_bytes_per_token", "KV pool bytes per token (all layers, K and V)",
                    e.pool.bytes_per_token())
        yield gauge("llmzip_generation_tokens_per_second", "Generated tokens per second since the scrape ~10 s ago",
                    rate)
        yield counter("llmzip_requests", "Sequences submitted", self.requests)
        yield counter("llmzip_prompt_tokens", "Prompt tokens prefilled", stats["prompt_tokens"])
        yield counter("llmzip_generation_tokens", "Tokens generated", stats["generation_tokens"])
        yield counter("llmzip_finished_seqs", "Sequences finished (stop or length)", stats["finished"])
        yield counter("llmzip_aborted_seqs", "Sequences cancelled (client gone or timed out)", stats["aborted"])
        yield counter("llmzip_failed_seqs", "Sequences failed by an engine error", stats["failed"])
        yield counter("llmzip_engine_steps", "Engine steps that ran the model", stats["steps"])
        yield counter("llmzip_engine_step_seconds", "Seconds spent in those steps", stats["step_seconds"])
        h = HistogramMetricFamily("llmzip_time_to_first_token_seconds", "Arrival to first generated token")
        cum, buckets = 0, []
        for b, c in zip([*map(str, TTFT_BUCKETS), "+Inf"], self.ttft_counts):
            cum += c
            buckets.append((b, cum))
        h.add_metric([], buckets, self.ttft_sum)
        yield h

    def render(self) -> str:
        return generate_latest(self.registry).decode()
