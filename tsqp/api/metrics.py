"""The API's Prometheus metrics, named after vLLM's (`vllm:` becomes `tsqp:`), in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str):
        disable_created_metrics()  # no `_created` series: vLLM serves none either
        self.registry = r = CollectorRegistry()
        self.model = model
        labels = ["model_name"]
        self.running = Gauge("tsqp:num_requests_running", "Generations running on a slot", labels, registry=r)
        self.waiting = Gauge("tsqp:num_requests_waiting", "Generations waiting for a free slot", labels, registry=r)
        self.requests = Counter(
            "tsqp:http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.success = Counter(
            "tsqp:request_success", "Finished generations by finish reason", [*labels, "finished_reason"], registry=r
        )
        self.prompt_tokens = Counter("tsqp:prompt_tokens", "Prompt tokens prefilled", labels, registry=r)
        self.generation_tokens = Counter("tsqp:generation_tokens", "Tokens generated", labels, registry=r)
        self.ttft = Histogram(
            "tsqp:time_to_first_token_seconds",
            "Request arrival to first token",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "tsqp:time_per_output_token_seconds", "Time between tokens", labels, buckets=TOKEN_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "tsqp:e2e_request_latency_seconds", "Request arrival to last token", labels, buckets=E2E_BUCKETS, registry=r
        )

    def watch_batcher(self, batcher) -> None:
        """`--slots batched`: the batched steps run and the rows they held (prompt rows and decode steps)."""
        r = self.registry
        steps = Gauge("tsqp:batched_steps", "Forward passes run for all generations at once", registry=r)
        rows = Gauge("tsqp:batched_rows", "Rows those steps held: prompt tokens and decode steps", registry=r)
        steps.set_function(lambda: batcher.steps)
        rows.set_function(lambda: batcher.rows)

    def finished(self, reason: str, prompt_tokens: int, token_times: list[float], arrival: float) -> None:
        """One generation done: token_times are perf_counter stamps of each generated token."""
        m = self.model
        self.success.labels(m, reason).inc()
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(len(token_times))
        if token_times:
            self.ttft.labels(m).observe(token_times[0] - arrival)
            self.e2e.labels(m).observe(token_times[-1] - arrival)
        for before, after in zip(token_times, token_times[1:], strict=False):
            self.per_token.labels(m).observe(after - before)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
