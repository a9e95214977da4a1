"""Serving metrics with the definitions and field names of ``vllm bench serve``.

All latencies count from the request's *scheduled* arrival, so time spent queued behind other
requests counts for every system alike.

- TTFT: first token - arrival. E2EL: last token (finish) - arrival.
- TPOT: (E2EL - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: every gap between consecutive tokens, pooled over all requests.
- Throughputs divide by ``duration``: the measured run's start to the last request's end.
- Goodput: requests per second that met every SLO given (``ttft_ms``, ``tpot_ms``, ``e2el_ms``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from splitwiser.errors import ConfigError
from splitwiser.outputs import RequestMetrics

PERCENTILES = (50, 90, 99)  # reported as median_, p90_, p99_ (plus mean_ and std_)
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


@dataclass
class RequestRecord:
    """One request as one system served it. Times are seconds after the measured run started."""

    system: str
    request_id: int
    arrival_s: float  # scheduled arrival
    prompt_len: int
    output_len: int  # the forced output length asked for
    submit_s: float | None = None  # when the system was handed the request
    token_times_s: list[float] = field(default_factory=list)
    finish_s: float | None = None
    token_ids: list[int] = field(default_factory=list)
    handoff_s: float | None = None  # Splitwiser only: prompt worker publish -> token worker
    kv_bytes_copied: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None and bool(self.token_times_s)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def timing(self) -> RequestMetrics:
        """TTFT, TPOT, ITL and E2E as the runtime defines them, from the scheduled arrival."""
        return RequestMetrics(self.arrival_s, self.token_times_s, self.finish_s)

    @property
    def ttft_s(self) -> float | None:
        return self.timing.ttft_s

    @property
    def e2el_s(self) -> float | None:
        return self.timing.e2e_s

    @property
    def tpot_s(self) -> float | None:
        return self.timing.tpot_s

    @property
    def itl_s(self) -> list[float]:
        return self.timing.itl_s


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft_ms=500,tpot_ms=50"`` -> ``{"ttft_ms": 500.0, "tpot_ms": 50.0}``."""
    if not text:
        return {}
    slo = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in SLO_KEYS:
            raise ConfigError(
                f"bad --slo entry {part!r}; use KEY=MILLISECONDS with KEY in {', '.join(SLO_KEYS)}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ConfigError(f"bad --slo value {value!r} for {key}; give milliseconds") from None
        if not ms > 0:
            raise ConfigError(f"--slo {key} must be positive, got {value}")
        slo[key] = ms
    return slo


def distribution(name: str, values_ms: list[float]) -> dict[str, float | None]:
    """``mean_``, ``std_``, ``median_``, ``p90_``, ``p99_`` of ``values_ms`` (None when empty)."""
    if not values_ms:
        stats = dict.fromkeys(("mean", "std", "median", "p90", "p99"))
    else:
        arr = np.asarray(values_ms, dtype=np.float64)
        pct = np.percentile(arr, PERCENTILES)  # linear interpolation, as numpy's default
        stats = {"mean": arr.mean(), "std": arr.std(), "median": pct[0], "p90": pct[1]}
        stats["p99"] = pct[2]
    return {f"{k}_{name}": None if v is None else float(v) for k, v in stats.items()}


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    values = {"ttft_ms": record.ttft_s, "tpot_ms": record.tpot_s or 0.0, "e2el_ms": record.e2el_s}
    return all(values[k] is not None and values[k] * 1e3 <= limit for k, limit in slo.items())


def compute_metrics(
    records: list[RequestRecord], duration_s: float, slo: dict[str, float] | None = None
) -> dict:
    """The metrics of one system over one run (``duration_s`` > 0)."""
    done = [r for r in records if r.ok]
    total_input = sum(r.prompt_len for r in done)
    total_output = sum(r.num_output_tokens for r in done)
    metrics: dict = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration": duration_s,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration_s,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    if slo:
        metrics["request_goodput"] = sum(meets_slo(r, slo) for r in done) / duration_s
    metrics |= distribution("ttft_ms", [r.ttft_s * 1e3 for r in done])
    metrics |= distribution("tpot_ms", [r.tpot_s * 1e3 for r in done if r.tpot_s is not None])
    metrics |= distribution("itl_ms", [gap * 1e3 for r in done for gap in r.itl_s])
    metrics |= distribution("e2el_ms", [r.e2el_s * 1e3 for r in done])
    handoff = [r.handoff_s * 1e3 for r in done if r.handoff_s is not None]
    if handoff:
        pct = np.percentile(handoff, (50, 99))
        metrics["median_handoff_ms"], metrics["p99_handoff_ms"] = float(pct[0]), float(pct[1])
        metrics["kv_bytes_copied"] = sum(r.kv_bytes_copied for r in done)
    return metrics


def phase_summary(counters: dict) -> dict:
    """Per-phase rates from the counters of ``stats()["phases"]`` (or a difference of two)."""
    c = counters
    return {
        **c,
        "prefill_tokens_per_s": c["prefill_tokens"] / c["prefill_s"] if c["prefill_s"] else None,
        "mean_prefill_batch_tokens": c["prefill_tokens"] / c["prefill_batches"]
        if c["prefill_batches"] else None,
        "mean_decode_step_ms": 1e3 * c["decode_s"] / c["decode_steps"]
        if c["decode_steps"] else None,
        "mean_decode_batch": c["decode_tokens"] / c["decode_steps"] if c["decode_steps"] else None,
    }  # fmt: skip


# the figures the comparison table shows, and whether higher is better
HEADLINE = (
    ("output_throughput", "output tok/s", True),
    ("request_throughput", "requests/s", True),
    ("total_token_throughput", "total tok/s", True),
    ("median_ttft_ms", "median TTFT ms", False),
    ("p99_ttft_ms", "p99 TTFT ms", False),
    ("median_tpot_ms", "median TPOT ms", False),
    ("median_itl_ms", "median ITL ms", False),
    ("median_e2el_ms", "median E2E ms", False),
    ("request_goodput", "goodput req/s", True),
    ("joules_per_output_token", "joules/output token", False),  # GPU runs (NVML)
)


def token_agreement(records: list[RequestRecord], reference: list[RequestRecord]) -> float | None:
    """Fraction of requests whose tokens equal the reference's (both completed)."""
    ref = {r.request_id: r.token_ids for r in reference if r.ok}
    pairs = [(r.token_ids, ref[r.request_id]) for r in records if r.ok and r.request_id in ref]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def ratios(systems: dict[str, dict], subject: str = "splitwiser") -> dict[str, dict]:
    """``subject``'s value divided by each baseline's, for every headline metric both have."""
    out = {}
    mine = systems[subject]
    for name, theirs in systems.items():
        if name == subject:
            continue
        out[name] = {
            key: mine[key] / theirs[key]
            for key, _, _ in HEADLINE
            if mine.get(key) is not None and theirs.get(key)
        }
    return out


def kv_cache_summary(before: dict, after: dict) -> dict:
    """The KV cache over a measured run from two snapshots of a system's cumulative counters
    (``prefix_cache_queries``, ``prefix_cache_hits``: prompt tokens looked up in the prefix
    cache and found; ``num_preemptions``): their differences, and the hit rate (hits / queries,
    tokens). A counter the system does not report is None."""

    def diff(key: str) -> float | None:
        a, b = before.get(key), after.get(key)
        return None if a is None or b is None else b - a

    queries, hits = diff("prefix_cache_queries"), diff("prefix_cache_hits")
    return {
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": hits / queries if queries and hits is not None else None,
        "num_preemptions": diff("num_preemptions"),
    }
