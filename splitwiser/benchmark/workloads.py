"""Benchmark workloads: fixed lengths, the Azure 2023 traces, prompts sharing a few long
prefixes (``prefix_repetition``) and conversations (``multi_turn``), with all-at-once, Poisson
or trace-timed arrivals, and prompts of the exact token count built with the model's tokenizer.

The trace CSVs ship under ``bench/traces/`` (CC-BY 4.0, attribution in ``TRACE_ATTRIBUTION``).
"""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib import resources
from pathlib import Path

from splitwiser.benchmark import multi_turn, prefix_repetition
from splitwiser.benchmark.bench_request import BenchRequest, cap_lengths, scale_lengths, window
from splitwiser.errors import ConfigError

TRACE_FILES = {
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
}
PREFIX_REPETITION = "prefix-repetition"  # vllm bench serve --dataset-name prefix_repetition
MULTI_TURN = "multi-turn"  # conversations of the azure-conv trace, each turn the whole history
WORKLOADS = ("fixed", *TRACE_FILES, PREFIX_REPETITION, MULTI_TURN)
TRACE_WORKLOADS = (*TRACE_FILES, MULTI_TURN)  # arrivals may follow the trace's own times
TRACE_ATTRIBUTION = (
    "Azure LLM inference traces 2023 (github.com/Azure/AzurePublicDataset), CC-BY 4.0: "
    "Patel, Choukse, Zhang, Shah, Goiri, Maleki, Bianchini. 'Splitwise: Efficient generative "
    "LLM inference using phase splitting', ISCA 2024."
)


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
    max_tokens_factor: int = 1,
    prefix_len: int = 256,
    suffix_len: int = 256,
    num_prefixes: int = 10,
    think_time_s: float = 1.0,
) -> Workload:
    """The requests of a benchmark run; every system replays exactly these.

    ``max_tokens_factor``: every request asks for that many times its output length (capped
    to the context), as chat clients do; the client still takes only ``output_len`` tokens.
    ``prefix_len``, ``suffix_len``, ``num_prefixes``: the prefix-repetition workload's (vLLM's
    ``--prefix-repetition-*``); ``think_time_s``: multi-turn, between an answer and the next
    turn."""
    if name not in WORKLOADS:
        raise ConfigError(f"unknown workload {name!r}; choose one of: {', '.join(WORKLOADS)}")
    if trace_speedup is not None and name not in TRACE_WORKLOADS:
        raise ConfigError(f"--trace-speedup needs a trace workload ({', '.join(TRACE_WORKLOADS)})")
    rng = random.Random(seed)
    info: dict = {}
    trace_times = None
    if name == "fixed":
        if input_len + output_len > max_context:
            raise ConfigError(
                f"input_len + output_len = {input_len + output_len} exceeds the context of "
                f"{max_context} tokens; shorten them or raise --max-context"
            )
        requests = [BenchRequest(i, 0.0, input_len, output_len) for i in range(num_requests)]
    elif name == PREFIX_REPETITION:
        requests, info = prefix_repetition.build_requests(
            num_requests, prefix_len, suffix_len, num_prefixes, output_len, max_context, rng
        )
    elif name == MULTI_TURN:
        path = trace_path("azure-conv")
        rows = read_trace(path, limit=num_requests)
        requests, info = multi_turn.build_requests(rows, max_context, length_scale, think_time_s)
        trace_times = [r.arrival_s for r in requests]
        info = {"source": path.name, "attribution": TRACE_ATTRIBUTION, **info}
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
        requests = [BenchRequest(i, 0.0, p, o) for i, (p, o) in enumerate(lengths)]
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
    requests = _arrivals(requests, rate, trace_speedup, trace_times, rng, info)
    requests = ask_for_more(requests, max_tokens_factor, max_context)
    info["max_tokens_factor"] = max_tokens_factor
    return Workload(name, tuple(requests), _arrival_name(rate, trace_speedup), info)


def _arrival_name(rate: float | None, trace_speedup: float | None) -> str:
    if rate is not None:
        return "poisson"
    return "trace" if trace_speedup is not None else "all-at-once"


def _arrivals(requests, rate, trace_speedup, trace_times, rng, info) -> list[BenchRequest]:
    """Each request's arrival: Poisson at ``rate``, the trace's times divided by
    ``trace_speedup``, or all at once. A conversation's later turns are sent after the answer
    before them (their arrival is nominal); Poisson draws one arrival per conversation."""
    if rate is not None:
        info["rate"] = rate
        starts = [r for r in requests if not r.is_follow_up]
        times = dict(zip((r.request_id for r in starts),
                         poisson_arrivals(len(starts), rate, rng)))  # fmt: skip
        out, last = [], 0.0
        for r in requests:  # a later turn: nominally at its conversation's start
            last = times.get(r.request_id, last)
            out.append(replace(r, arrival_s=last))
        return out
    if trace_speedup is not None:
        info["trace_speedup"] = trace_speedup
        return [replace(r, arrival_s=t / trace_speedup) for r, t in zip(requests, trace_times)]
    return [replace(r, arrival_s=0.0) for r in requests]


def ask_for_more(requests: list[BenchRequest], factor: int, max_context: int) -> list[BenchRequest]:
    """Each request asking for ``factor`` times its output length, capped so prompt + max_tokens
    fit ``max_context`` (as a server requires), never below the output length."""
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ConfigError(f"--max-tokens-factor must be an integer >= 1, got {factor!r}")
    if factor == 1:
        return list(requests)
    return [
        replace(r, max_tokens=max(r.output_len, min(factor * r.output_len,
                                                    max_context - r.prompt_len)))
        for r in requests
    ]  # fmt: skip


def corpus_token_ids(tokenizer) -> list[int]:
    """The package's text corpus in the model's tokens, no special tokens."""
    text = resources.files("splitwiser.models").joinpath("corpus.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < 16:
        raise ConfigError("the tokenizer turned the prompt corpus into fewer than 16 tokens")
    return list(ids)


def build_prompts(workload: Workload, tokenizer, seed: int = 0) -> list[list[int]]:
    """One prompt per request of exactly ``prompt_len`` tokens: a window of real text in the
    model's own tokens, starting at a seeded random offset (wrapping around the corpus).

    prefix-repetition: the request's shared prefix, then its own suffix window. multi-turn: a
    later turn's entry is its new message only; the client puts the history before it."""
    corpus = corpus_token_ids(tokenizer)
    rng = random.Random(seed)
    if workload.name == PREFIX_REPETITION:
        return prefix_repetition.build_prompts(workload, corpus, rng)
    if workload.name == MULTI_TURN:
        lens = multi_turn.message_lens(workload.requests)
        return [window(corpus, rng.randrange(len(corpus)), n) for n in lens]
    return [window(corpus, rng.randrange(len(corpus)), r.prompt_len) for r in workload.requests]
