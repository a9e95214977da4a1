"""``GET /metrics``: vLLM's metric names, types and buckets (so existing dashboards work), with
the label ``model_name`` (and ``engine="0"``), plus Splitwiser's own (``splitwiser:*``).

Request histograms are observed when a request ends, from the runtime's own timestamps
(``RequestMetrics``); the pool and worker gauges, and the engine's cumulative counters (prefix
cache queries and hits in tokens, preemptions), are read from ``pipe.stats()`` at each scrape.
Waiting and running are counted here: a request waits until its first token, then runs (vLLM
counts a request in prefill as running).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from splitwiser.outputs import RequestOutput

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)
# prompt worker publish -> token worker admission: milliseconds on CPU, less on a GPU
HANDOFF_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def buckets_1_2_5(maximum: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``maximum`` (vLLM's token-count buckets)."""
    out, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > maximum:
                return out
            out.append(value)
        exponent += 1


class ServerMetrics:
    """Every series of one served model, in a registry of its own."""

    def __init__(self, model_name: str, max_model_len: int, stats):
        self.registry = CollectorRegistry()
        self.labels = {"model_name": model_name, "engine": "0"}
        self._stats = stats  # () -> pipe.stats() or None while starting
        names = list(self.labels)
        reg = self.registry

        def hist(name, doc, buckets, extra=()):
            return Histogram(name, doc, [*names, *extra], buckets=buckets, registry=reg)

        def counter(name, doc, extra=()):
            return Counter(name, doc, [*names, *extra], registry=reg)

        lengths = buckets_1_2_5(max_model_len)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for their first token.",
                             names, registry=reg).labels(**self.labels)  # fmt: skip
        self.running = Gauge("vllm:num_requests_running", "Requests generating.", names,
                             registry=reg).labels(**self.labels)  # fmt: skip
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens processed.")
        self.request_success = counter(
            "vllm:request_success", "Requests finished, by reason.", ("finished_reason",)
        )
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Inter-token latency.", ITL_BUCKETS)
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_time = hist(
            "vllm:request_queue_time_seconds", "Arrival to the first prefill batch.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.prefill_time = hist(
            "vllm:request_prefill_time_seconds", "First prefill batch to the first token.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.decode_time = hist(
            "vllm:request_decode_time_seconds", "First token to the last.",
            REQUEST_LATENCY_BUCKETS,
        )  # fmt: skip
        self.request_prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Prompt tokens per request.", lengths
        )
        self.request_generation_tokens = hist(
            "vllm:request_generation_tokens", "Generated tokens per request.", lengths
        )
        self.request_max_tokens = hist(
            "vllm:request_params_max_tokens", "max_tokens asked for.", lengths
        )
        self.request_n = hist("vllm:request_params_n", "n asked for.", N_BUCKETS)
        self.handoff = hist(
            "splitwiser:handoff_seconds",
            "Prompt worker publish to token worker admission, per request.",
            HANDOFF_BUCKETS,
        )
        reg.register(_PipelineCollector(self))

    def request_started(self, max_tokens: int, n: int) -> None:
        self.request_max_tokens.labels(**self.labels).observe(max_tokens)
        self.request_n.labels(**self.labels).observe(n)

    # ---- from the drain threads (Generation), one request each
    def request_waiting(self) -> None:
        self.waiting.inc()

    def request_running(self) -> None:
        self.waiting.dec()
        self.running.inc()

    def request_ended(self, was_running: bool, out: RequestOutput | None) -> None:
        """Observe one ended request (finished, stopped or aborted; ``None``: failed)."""
        (self.running if was_running else self.waiting).dec()
        if out is None:
            self.request_success.labels(**self.labels, finished_reason="error").inc()
            return
        labels, m = self.labels, out.metrics
        self.prompt_tokens.labels(**labels).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(**labels).inc(len(out.token_ids))
        self.request_success.labels(**labels, finished_reason=out.finish_reason).inc()
        self.request_prompt_tokens.labels(**labels).observe(len(out.prompt_token_ids))
        self.request_generation_tokens.labels(**labels).observe(len(out.token_ids))
        if m.ttft_s is not None:
            self.ttft.labels(**labels).observe(m.ttft_s)
        itl = self.itl.labels(**labels)
        for gap in m.itl_s:
            itl.observe(gap)
        if m.e2e_s is not None:
            self.e2e.labels(**labels).observe(m.e2e_s)
        if m.first_scheduled_time is not None:
            self.queue_time.labels(**labels).observe(m.first_scheduled_time - m.arrival_time)
            if m.token_times:
                prefill_s = m.token_times[0] - m.first_scheduled_time
                self.prefill_time.labels(**labels).observe(prefill_s)
        if m.token_times and m.finish_time is not None:
            self.decode_time.labels(**labels).observe(m.finish_time - m.token_times[0])
        if m.handoff_s is not None:
            self.handoff.labels(**labels).observe(m.handoff_s)


class _PipelineCollector:
    """The series read at scrape time from ``pipe.stats()``: KV usage, the prefix cache,
    preemptions, workers."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def describe(self):
        return []  # collected at scrape time only; no duplicate-name check needed

    def collect(self):
        m = self.metrics
        names, values = list(m.labels), list(m.labels.values())

        def gauge(name, doc, value, extra=None):
            family = GaugeMetricFamily(name, doc, labels=[*names, *(extra or {})])
            family.add_metric([*values, *(extra or {}).values()], value)
            return family

        stats = m._stats()
        if stats is None:
            return

        def counter(name, doc, value):
            family = CounterMetricFamily(name, doc, labels=names)  # exposed as <name>_total
            family.add_metric(values, value)
            return family

        # NOTE: a block that is free but still holds a cached prefix counts as free, as vLLM's
        # usage counts it: the next request that needs it evicts it
        used = stats["num_used_blocks"] / stats["num_kv_blocks"]
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", used)
        yield counter("vllm:prefix_cache_queries",
                      "Prefix cache queries, in terms of number of queried tokens.",
                      stats["prefix_cache_queries"])  # fmt: skip
        yield counter("vllm:prefix_cache_hits",
                      "Prefix cache hits, in terms of number of cached tokens.",
                      stats["prefix_cache_hits"])  # fmt: skip
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      stats["num_preemptions"])  # fmt: skip
        yield gauge("splitwiser:kv_blocks_free", "Free KV blocks of the pool (cached ones too).",
                    stats["num_free_blocks"])  # fmt: skip
        yield gauge("splitwiser:kv_blocks_cached",
                    "Free KV blocks still holding a cached prefix (evicted when needed).",
                    stats["num_cached_blocks"])  # fmt: skip
        ready = GaugeMetricFamily("splitwiser:workers_ready", "Workers ready, per role.",
                                  labels=[*names, "role"])  # fmt: skip
        configured = GaugeMetricFamily("splitwiser:workers_configured", "Workers per role.",
                                       labels=[*names, "role"])  # fmt: skip
        restarts = CounterMetricFamily("splitwiser:worker_restarts", "Worker restarts, per role.",
                                       labels=[*names, "role"])  # fmt: skip
        for role, w in stats["workers"].items():
            ready.add_metric([*values, role], w["ready"])
            configured.add_metric([*values, role], w["configured"])
            restarts.add_metric([*values, role], w["restarts"])
        yield ready
        yield configured
        yield restarts
