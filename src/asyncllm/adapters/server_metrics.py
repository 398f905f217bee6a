"""The serving metrics of one app: HTTP requests, tokens, latencies and the engine's live state."""

from __future__ import annotations

import time
from collections.abc import Callable

from asyncllm.adapters.metrics import MetricsRegistry
from asyncllm.engine import AsyncEngine
from asyncllm.outputs import StepOutput

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ServerMetrics:
    """Metrics of one app. One engine request (one choice) is tracked by one ``RequestTimer``."""

    def __init__(self, engine: AsyncEngine, sessions_open: Callable[[], int],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.registry = registry = MetricsRegistry()
        self.http_requests = registry.counter(
            "asyncllm_http_requests_total", "HTTP requests answered, by endpoint and status.",
            ("endpoint", "status"))
        self.requests_finished = registry.counter(
            "asyncllm_requests_finished_total",
            "Engine requests (one per choice) ended, by finish reason (stop, length, abort, error).",
            ("finish_reason",))
        self.prompt_tokens = registry.counter(
            "asyncllm_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.cached_tokens = registry.counter(
            "asyncllm_prompt_tokens_cached_total", "Prompt tokens that reused cached or session KV.")
        self.generation_tokens = registry.counter("asyncllm_generation_tokens_total", "Tokens generated.")
        self.ttft = registry.histogram(
            "asyncllm_time_to_first_token_seconds", "From HTTP request arrival to the first generated token.",
            TTFT_BUCKETS)
        self.tpot = registry.histogram(
            "asyncllm_time_per_output_token_seconds",
            "Mean time per generated token after the first, one observation per request.", TPOT_BUCKETS)
        self.e2e = registry.histogram(
            "asyncllm_e2e_request_latency_seconds", "From HTTP request arrival to the request's end.",
            E2E_BUCKETS)

        def stat(field: str) -> Callable[[], float]:
            return lambda: float(getattr(engine.stats(), field))

        registry.sampled("asyncllm_kv_blocks_used", "KV blocks referenced by requests or sessions.",
                         stat("kv_blocks_used"))
        registry.sampled("asyncllm_kv_blocks_cached", "Unreferenced KV blocks kept for prefix reuse.",
                         stat("kv_blocks_cached"))
        registry.sampled("asyncllm_kv_blocks_total", "KV blocks in the pool.", stat("kv_blocks_total"))
        registry.sampled("asyncllm_requests_running", "Requests being computed.", stat("running"))
        registry.sampled("asyncllm_requests_waiting", "Requests queued for admission.", stat("waiting"))
        registry.sampled("asyncllm_sessions_pinned", "Sessions whose KV is pinned.", stat("sessions_pinned"))
        registry.sampled("asyncllm_preemptions_total", "Requests preempted for lack of KV blocks.",
                         stat("num_preemptions"), kind="counter")
        registry.sampled("asyncllm_sessions_open", "Server-side chat sessions open.",
                         lambda: float(sessions_open()))
        registry.sampled("asyncllm_engine_up", "1 while the engine can serve, else 0.",
                         lambda: float(engine.failure is None and engine.is_running))

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self, arrival)

    def render(self) -> str:
        return self.registry.render()


class RequestTimer:
    """Latency and token accounting of one engine request; ``end`` records it exactly once."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._first: float | None = None
        self._tokens = 0
        self._ended = False

    def on_output(self, out: StepOutput) -> None:
        if self._ended:
            return
        if out.token_ids and self._first is None:
            self._first = self._metrics.clock()
            self._metrics.ttft.observe(self._first - self._arrival)
        self._tokens += len(out.token_ids)
        if out.finish_reason is not None and out.usage is not None:
            self._metrics.prompt_tokens.inc(out.usage.prompt_tokens)
            self._metrics.cached_tokens.inc(out.usage.cached_tokens)

    def end(self, finish_reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        now = self._metrics.clock()
        metrics = self._metrics
        metrics.requests_finished.inc(labels=(finish_reason,))
        metrics.generation_tokens.inc(self._tokens)
        metrics.e2e.observe(now - self._arrival)
        if self._first is not None and self._tokens > 1:
            metrics.tpot.observe((now - self._first) / (self._tokens - 1))
