"""Prometheus metrics with vLLM's names (prefix `sedac:`), fed from finished requests and engine stats."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PER_TOKEN = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.running = Gauge("sedac:num_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("sedac:num_requests_waiting", "Requests waiting to be scheduled", labels, registry=r)
        self.kv_usage = Gauge("sedac:kv_cache_usage_perc", "Fraction of KV cache blocks in use", labels, registry=r)
        self.prefix_queries = Counter("sedac:prefix_cache_queries", "Prefix cache lookups (blocks)", labels, registry=r)
        self.prefix_hits = Counter("sedac:prefix_cache_hits", "Prefix cache hits (blocks)", labels, registry=r)
        self.prefix_hit_rate = Gauge("sedac:prefix_cache_hit_rate", "Prefix cache hit rate", labels, registry=r)
        self.preemptions = Counter("sedac:num_preemptions", "Preemptions", labels, registry=r)
        self.ttft = Histogram("sedac:time_to_first_token_seconds", "TTFT", labels, buckets=_LATENCY, registry=r)
        self.tpot = Histogram("sedac:time_per_output_token_seconds", "TPOT", labels, buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("sedac:e2e_request_latency_seconds", "End-to-end latency", labels, buckets=_LATENCY,
                             registry=r)
        self.prompt_tokens = Counter("sedac:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("sedac:generation_tokens", "Tokens generated", labels, registry=r)
        self.requests = Counter("sedac:request_success", "Finished requests", labels + ["finished_reason"],
                                registry=r)
        self.skip_ratio = Gauge("sedac:sedac_skip_ratio", "SEDAC fraction of layers skipped", labels, registry=r)
        self.acceptance = Gauge("sedac:sedac_acceptance_rate", "SEDAC draft acceptance rate", labels, registry=r)
        self.exits = Counter("sedac:sedac_exit_tokens", "Lossy-mode tokens that exited at each layer",
                             labels + ["layer"], registry=r)
        self.structured = Counter("sedac:structured_output_requests", "Requests decoded under a grammar", labels,
                                  registry=r)
        self.budgets = Counter("sedac:thinking_budget_exhausted", "Reasoning blocks closed by a spent thinking budget",
                               labels, registry=r)
        self.o1 = {name: Counter(f"sedac:{name}", help_text, labels, registry=r) for name, help_text in (
            ("o1_requests", "Requests run with o1_mode adaptive"),
            ("o1_branches", "Branches forked at uncertain tokens by o1 adaptive requests"),
            ("o1_early_stops", "o1 adaptive requests whose vote ended before every branch finished"))}
        self.model = model_name
        self._totals: dict = {}      # the engine's running totals last seen, per counter and labels

    def observe_finished(self, out) -> None:
        m, label = out.metrics, self.model
        if m.ttft is not None:
            self.ttft.labels(label).observe(m.ttft)
        if m.tpot is not None:
            self.tpot.labels(label).observe(m.tpot)
        if m.e2e is not None:
            self.e2e.labels(label).observe(m.e2e)
        self.prompt_tokens.labels(label).inc(m.num_prompt_tokens)
        self.generation_tokens.labels(label).inc(m.num_generated_tokens)
        for c in out.outputs:
            self.requests.labels(label, c.finish_reason or "unknown").inc()

    def render(self, stats: dict) -> bytes:
        label = self.model
        self.running.labels(label).set(stats["num_requests_running"])
        self.waiting.labels(label).set(stats["num_requests_waiting"])
        self.kv_usage.labels(label).set(stats["kv_cache_usage"])
        self._count_to(self.prefix_queries, stats["prefix_cache_queries"], label)
        self._count_to(self.prefix_hits, stats["prefix_cache_hits"], label)
        self.prefix_hit_rate.labels(label).set(stats["prefix_cache_hits"] / max(1, stats["prefix_cache_queries"]))
        self._count_to(self.preemptions, stats["num_preemptions"], label)
        self.skip_ratio.labels(label).set(stats.get("sedac_skip_ratio", 0.0))
        self.acceptance.labels(label).set(stats.get("sedac_acceptance_rate", 0.0))
        self._count_to(self.structured, stats["structured_output_requests"], label)
        self._count_to(self.budgets, stats["thinking_budgets_exhausted"], label)
        for name, counter in self.o1.items():
            self._count_to(counter, stats[name], label)
        for layer, count in stats.get("sedac_exit_layer_tokens", {}).items():
            self._count_to(self.exits, count, label, str(layer))
        return generate_latest(self.registry)

    def _count_to(self, counter: Counter, total: int, *labels: str) -> None:
        """Counters for monotonic counts: advance by what the engine's running total grew since last seen."""
        key = (counter, labels)
        counter.labels(*labels).inc(max(0, total - self._totals.get(key, 0)))
        self._totals[key] = total
