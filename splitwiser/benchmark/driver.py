"""``run_bench``: one workload through Splitwiser and each baseline, in one invocation.

Per system: build it, warm it up (the first requests of the workload, short outputs, excluded
from the figures), replay the workload under telemetry, close it. Then metrics, ratios, results.
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from splitwiser import mps
from splitwiser.baselines import BatchedPipeline, SequentialPipeline
from splitwiser.benchmark.config import BenchConfig
from splitwiser.benchmark.metrics import RequestRecord, compute_metrics, ratios
from splitwiser.benchmark.replay import REPLAY
from splitwiser.benchmark.telemetry import TelemetryLog, TelemetrySampler
from splitwiser.benchmark.workloads import BenchRequest, build_prompts, build_workload
from splitwiser.config import resolve_device, resolve_dtype
from splitwiser.engine.engine import phase_summary
from splitwiser.engine.kv_pool import KVLayout
from splitwiser.errors import ConfigError
from splitwiser.models.loader import load_model_config, load_tokenizer
from splitwiser.pipeline import SplitwiserPipeline

WARMUP_OUTPUT_LEN = 4


@dataclass
class SystemRun:
    name: str
    records: list[RequestRecord]
    duration_s: float
    telemetry: TelemetryLog
    extra: dict  # system-specific facts (workers, pool size, ...)


@dataclass
class BenchResult:
    run_dir: Path
    summary: dict
    runs: dict[str, SystemRun]


def _build(name: str, config: BenchConfig, device, dtype, daemon):
    if name == "splitwiser":
        return SplitwiserPipeline(
            config.model,
            num_prompt_workers=config.num_prompt_workers,
            num_token_workers=config.num_token_workers,
            device=str(device),
            dtype=dtype,
            kv_handoff=config.kv_handoff,
            mps_pipe_dir=daemon.pipe_dir if daemon else None,
            mps_thread_percentage=config.mps_split if daemon else None,
        )
    if name == "sequential":
        return SequentialPipeline(config.model, device=str(device), dtype=dtype)
    return BatchedPipeline(
        config.model, device=str(device), dtype=dtype, batch_size=config.batch_size
    )


def _extra(
    name: str, pipe, layout: KVLayout, records: list[RequestRecord], kv_handoff: str, before: dict
):
    if name != "splitwiser":
        return {}
    after = pipe.stats()["phases"]
    done = [r for r in records if r.ok]
    moved_nothing = kv_handoff == "shared"
    return {
        "num_kv_blocks": pipe.num_kv_blocks,
        "kv_bytes_per_token": layout.bytes_per_token,
        # the prompt K/V that stayed in the shared pool instead of travelling to a token worker
        "kv_bytes_not_moved": sum(r.prompt_len for r in done) * layout.bytes_per_token
        if moved_nothing
        else 0,
        # prefill and decode as the workers timed them, over the measured run only
        "phases": phase_summary({k: after[k] - before[k] for k in after}),
        "workers": pipe.workers(),
        "stats": pipe.stats(),
    }


def _run_system(name, config, device, dtype, daemon, requests, prompts, layout, show) -> SystemRun:
    warm = [
        replace(r, arrival_s=0.0, output_len=min(r.output_len, WARMUP_OUTPUT_LEN))
        for r in requests[: config.warmup_requests]
    ]
    replay = REPLAY[name]
    with _build(name, config, device, dtype, daemon) as pipe:
        if warm:
            replay(pipe, warm, prompts[: len(warm)], lambda n: None)
        before = pipe.stats()["phases"] if name == "splitwiser" else {}
        bar = tqdm(total=len(requests), desc=f"{name:>10}", unit="req", disable=not show)
        with bar, TelemetrySampler(device) as telemetry:
            records, duration_s = replay(pipe, requests, prompts, bar.update)
        extra = _extra(name, pipe, layout, records, config.kv_handoff, before)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return SystemRun(name, records, duration_s, telemetry, extra)


def _source_revision() -> dict | None:
    """The git commit of the running code, and whether it had uncommitted changes; ``None``
    for an installed copy."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "splitwiser")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit or None, "uncommitted_changes": bool(dirty)}


def describe_model(spec: str | None, model_config) -> dict:
    c = model_config
    return {
        "spec": spec or "default (embedded)",
        "model_type": c.model_type,
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": getattr(c, "num_key_value_heads", None),
        "vocab_size": c.vocab_size,
        "max_position_embeddings": getattr(c, "max_position_embeddings", None),
    }


def environment(device: torch.device, mps_state: dict) -> dict:
    import transformers

    from splitwiser import __version__

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "splitwiser": __version__,
        "source": _source_revision(),
        "device": str(device),
        "mps": mps_state,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30}
        env["cuda"] = torch.version.cuda
    return env


def _agreement(runs: dict[str, SystemRun]) -> dict[str, float]:
    """Fraction of requests whose tokens equal the sequential baseline's (greedy, same ids)."""
    if "sequential" not in runs:
        return {}
    ref = {r.request_id: r.token_ids for r in runs["sequential"].records if r.ok}
    out = {}
    for name, run in runs.items():
        pairs = [(r.token_ids, ref[r.request_id]) for r in run.records if r.request_id in ref]
        if name != "sequential" and pairs:
            out[name] = sum(a == b for a, b in pairs) / len(pairs)
    return out


def run_bench(config: BenchConfig, *, command: str | None = None, show: bool = True):
    """Run the benchmark and write ``<out>/<run-id>/``; returns a :class:`BenchResult`."""
    from splitwiser.benchmark.report import write_results

    run_dir = None
    if config.run_id is not None:
        run_dir = Path(config.out) / config.run_id
        if run_dir.exists():
            raise ConfigError(f"{run_dir} already exists; choose another --run-id")
    with mps.session(config.mps, config.device) as (daemon, mps_state):
        mps_state["split"] = config.mps_split
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        model_config = load_model_config(config.model)
        model_len = getattr(model_config, "max_position_embeddings", None) or 2048
        max_context = min(config.max_context or model_len, model_len)
        workload = build_workload(
            config.workload,
            num_requests=config.num_requests,
            input_len=config.input_len,
            output_len=config.output_len,
            rate=config.rate,
            trace_speedup=config.trace_speedup,
            max_context=max_context,
            length_scale=config.length_scale,
            seed=config.seed,
        )
        requests: list[BenchRequest] = list(workload.requests)
        prompts = build_prompts(workload, load_tokenizer(config.model), seed=config.seed)
        layout = KVLayout.from_model_config(model_config, 16, dtype)
        runs = {}
        for name in ("splitwiser", *config.baselines):
            runs[name] = _run_system(
                name, config, device, dtype, daemon, requests, prompts, layout, show
            )
        env = environment(device, mps_state)
    systems = {}
    for name, run in runs.items():
        metrics = compute_metrics(run.records, run.duration_s, config.slo)
        metrics["telemetry"] = run.telemetry.summary(metrics["total_output_tokens"])
        gpu = metrics["telemetry"]["gpu"] or {}
        metrics["joules_per_output_token"] = gpu.get("joules_per_output_token")
        metrics |= run.extra
        systems[name] = metrics
    summary = {
        "run_id": None,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_dict() | {"device": str(device), "dtype": str(dtype).split(".")[-1]},
        "model": describe_model(config.model, model_config),
        "workload": workload.describe(),
        "environment": env,
        "systems": systems,
        "ratios": ratios(systems),
        "token_agreement_with_sequential": _agreement(runs),
    }
    run_dir = write_results(config, summary, runs, run_dir, device)
    return BenchResult(run_dir, summary, runs)
