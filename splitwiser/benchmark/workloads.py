"""Benchmark workloads: fixed lengths or the Azure 2023 traces, with all-at-once, Poisson or
trace-timed arrivals, and prompts of the exact token count built with the model's tokenizer.

The trace CSVs ship under ``bench/traces/`` (CC-BY 4.0, attribution in ``TRACE_ATTRIBUTION``).
"""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path

from splitwiser.errors import ConfigError

TRACE_FILES = {
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
}
WORKLOADS = ("fixed", *TRACE_FILES)
TRACE_ATTRIBUTION = (
    "Azure LLM inference traces 2023 (github.com/Azure/AzurePublicDataset), CC-BY 4.0: "
    "Patel, Choukse, Zhang, Shah, Goiri, Maleki, Bianchini. 'Splitwise: Efficient generative "
    "LLM inference using phase splitting', ISCA 2024."
)


@dataclass(frozen=True)
class BenchRequest:
    request_id: int
    arrival_s: float  # seconds after the measured run starts
    prompt_len: int  # tokens
    output_len: int  # tokens, forced with ignore_eos


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[BenchRequest, ...]
    arrival: str  # "all-at-once", "poisson" or "trace"
    info: dict = field(default_factory=dict)  # source, caps and scaling, for the results

    def describe(self) -> dict:
        prompt = sorted(r.prompt_len for r in self.requests)
        output = sorted(r.output_len for r in self.requests)
        return {
            "name": self.name,
            "num_requests": len(self.requests),
            "arrival": self.arrival,
            "span_s": max(r.arrival_s for r in self.requests),
            "prompt_len": {"min": prompt[0], "median": prompt[len(prompt) // 2], "max": prompt[-1]},
            "output_len": {"min": output[0], "median": output[len(output) // 2], "max": output[-1]},
            "total_prompt_tokens": sum(prompt),
            "total_output_tokens": sum(output),
            **self.info,
        }


@dataclass(frozen=True)
class TraceRow:
    time_s: float  # seconds after the trace's first request
    context_tokens: int
    generated_tokens: int


def trace_path(workload: str) -> Path:
    """A trace CSV: in ``$SPLITWISER_TRACE_DIR``, else in ``bench/traces`` of the source tree."""
    name = TRACE_FILES[workload]
    env = os.environ.get("SPLITWISER_TRACE_DIR")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "bench" / "traces"
    path = base / name
    if not path.is_file():
        raise ConfigError(
            f"trace file {name} not found in {base}; run from a source checkout "
            f"(bench/traces/) or set SPLITWISER_TRACE_DIR to the folder holding it"
        )
    return path


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    """The first ``limit`` rows of an Azure trace (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    rows: list[TraceRow] = []
    start = None
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"{path}: not an Azure LLM trace, missing columns {sorted(missing)}")
        for rec in reader:
            # NOTE: timestamps carry 7 fractional digits; before 3.11 fromisoformat takes 6 at most
            stamp = re.sub(r"(\.\d{6})\d+", r"\1", rec["TIMESTAMP"].strip())
            t = datetime.fromisoformat(stamp).timestamp()
            start = t if start is None else start
            rows.append(TraceRow(t - start, int(rec["ContextTokens"]), int(rec["GeneratedTokens"])))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def scale_lengths(
    context_tokens: int, generated_tokens: int, length_scale: float
) -> tuple[int, int]:
    """A trace request's (prompt, output) lengths multiplied by ``length_scale``, both >= 1."""
    return max(1, round(context_tokens * length_scale)), max(
        1, round(generated_tokens * length_scale)
    )


def cap_lengths(
    context_tokens: int, generated_tokens: int, max_context: int, length_scale: float = 1.0
) -> tuple[int, int]:
    """Scale a trace request's lengths, then fit prompt + output into ``max_context`` tokens.

    The output keeps at most half of the context; the prompt takes what is left. Both stay >= 1.
    """
    prompt, output = scale_lengths(context_tokens, generated_tokens, length_scale)
    output = min(output, max(1, max_context // 2))
    prompt = min(prompt, max_context - output)
    return prompt, output


def poisson_arrivals(num_requests: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process at ``rate`` requests per second, the first at 0."""
    times, t = [], 0.0
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def build_workload(
    name: str,
    *,
    num_requests: int,
    input_len: int,
    output_len: int,
    rate: float | None,
    trace_speedup: float | None,
    max_context: int,
    length_scale: float = 1.0,
    seed: int = 0,
) -> Workload:
    """The requests of a benchmark run; every system replays exactly these."""
    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}; choose one of: {', '.join(WORKLOADS)}")
    rng = random.Random(seed)
    info: dict = {}
    if name == "fixed":
        if trace_speedup is not None:
            raise ConfigError("--trace-speedup needs a trace workload (azure-code or azure-conv)")
        if input_len + output_len > max_context:
            raise ConfigError(
                f"input_len + output_len = {input_len + output_len} exceeds the context of "
                f"{max_context} tokens; shorten them or raise --max-context"
            )
        lengths = [(input_len, output_len)] * num_requests
        trace_times = None
    else:
        path = trace_path(name)
        rows = read_trace(path, limit=num_requests)
        lengths = [
            cap_lengths(r.context_tokens, r.generated_tokens, max_context, length_scale)
            for r in rows
        ]
        num_capped = sum(
            capped != scale_lengths(r.context_tokens, r.generated_tokens, length_scale)
            for r, capped in zip(rows, lengths)
        )
        trace_times = [r.time_s for r in rows]
        info = {
            "source": path.name,
            "attribution": TRACE_ATTRIBUTION,
            "rows": f"first {len(rows)} of the trace",
            "length_scale": length_scale,
            "max_context": max_context,
            "num_capped": num_capped,
        }
        if len(rows) < num_requests:
            info["note"] = f"the trace has only {len(rows)} rows"
    n = len(lengths)
    if rate is not None:
        arrival, times = "poisson", poisson_arrivals(n, rate, rng)
        info["rate"] = rate
    elif trace_speedup is not None:
        arrival, times = "trace", [t / trace_speedup for t in trace_times]
        info["trace_speedup"] = trace_speedup
    else:
        arrival, times = "all-at-once", [0.0] * n
    requests = tuple(BenchRequest(i, t, p, o) for i, (t, (p, o)) in enumerate(zip(times, lengths)))
    return Workload(name, requests, arrival, info)


def corpus_token_ids(tokenizer) -> list[int]:
    """The package's text corpus in the model's tokens, no special tokens."""
    text = resources.files("splitwiser.models").joinpath("corpus.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < 16:
        raise ConfigError("the tokenizer turned the prompt corpus into fewer than 16 tokens")
    return list(ids)


def build_prompts(workload: Workload, tokenizer, seed: int = 0) -> list[list[int]]:
    """One prompt per request of exactly ``prompt_len`` tokens: a window of real text in the
    model's own tokens, starting at a seeded random offset (wrapping around the corpus)."""
    corpus = corpus_token_ids(tokenizer)
    rng = random.Random(seed)
    prompts = []
    for req in workload.requests:
        start = rng.randrange(len(corpus))
        reps = (start + req.prompt_len) // len(corpus) + 1
        prompts.append((corpus * reps)[start : start + req.prompt_len])
    return prompts
