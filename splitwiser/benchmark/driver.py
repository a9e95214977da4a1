"""``run_bench``: one workload through Splitwiser and each baseline, in one invocation.

This process checks the input and the output folder, starts MPS (see ``mps.session``), builds
the workload, then runs each system in a process of its own (see ``system``); it never touches
CUDA. Then metrics, ratios, and the results, written into a hidden folder renamed at the end.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from splitwiser import mps
from splitwiser.benchmark.config import BenchConfig
from splitwiser.benchmark.metrics import compute_metrics, ratios, token_agreement
from splitwiser.benchmark.workloads import BenchRequest, build_prompts, build_workload
from splitwiser.config import resolve_device, resolve_dtype
from splitwiser.errors import ConfigError
from splitwiser.models.loader import load_model_config, load_tokenizer
from splitwiser.models.shape import ModelShape
from splitwiser.systems import SEQUENTIAL, SPLITWISER
from splitwiser.systems.process import SystemJob, SystemRun, run_in_child


@dataclass
class BenchResult:
    run_dir: Path
    summary: dict
    runs: dict[str, SystemRun]


def check_out(config: BenchConfig) -> Path:
    """The results root, created and shown writable before any work; a taken --run-id fails."""
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write results to {out}: {exc.strerror or exc}") from None
    if config.run_id is not None and (out / config.run_id).exists():
        raise ConfigError(f"{out / config.run_id} already exists; choose another --run-id")
    return out


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


def describe_model(spec: str | None, model_config, model_impl: str = "auto") -> dict:
    from splitwiser.models.registry import resolve_model_impl

    shape = ModelShape.from_hf(model_config)
    return {
        "spec": spec or "default (embedded)",
        "model_type": shape.model_type,
        # which front-end Splitwiser's workers run: own model code or the Hugging Face modules
        "model_impl": resolve_model_impl(model_config, model_impl),
        "num_hidden_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
    }


def environment(device: torch.device, mps_state: dict, device_info: dict) -> dict:
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
    return env | device_info  # the GPU as the systems' processes saw it


def _agreement(runs: dict[str, SystemRun], reference: str) -> dict[str, float]:
    """Per other system, the fraction of requests whose tokens equal ``reference``'s (greedy,
    the same prompt ids, both completed)."""
    if reference not in runs:
        return {}
    out = {}
    for name, run in runs.items():
        value = token_agreement(run.records, runs[reference].records)
        if name != reference and value is not None:
            out[name] = value
    return out


def run_bench(config: BenchConfig, *, command: str | None = None, show: bool = True):
    """Run the benchmark and write ``<out>/<run-id>/``; returns a :class:`BenchResult`."""
    from splitwiser.benchmark.report import write_results

    engine = config.engine
    device = resolve_device(engine.device, init_cuda=False)  # this process never touches CUDA
    dtype = resolve_dtype(engine.dtype, device)
    model_config = load_model_config(engine.model)
    # the context every system serves (Splitwiser's, sliding window applied), or less
    max_context = ModelShape.from_hf(model_config).max_model_len(config.max_context)
    workload = build_workload(
        config.workload,
        rate=config.rate,
        trace_speedup=config.trace_speedup,
        max_context=max_context,
        **config.workload_options(),
    )
    requests: list[BenchRequest] = list(workload.requests)
    prompts = build_prompts(workload, load_tokenizer(engine.model), seed=config.seed)
    out = check_out(config)  # the input is valid: before any work, a place for the results
    runs: dict[str, SystemRun] = {}
    with mps.session(config.mps, engine.device) as (daemon, mps_state):
        mps_state["split"] = config.mps_split
        mps_env = daemon.env() if daemon is not None else {}
        for name in (SPLITWISER, *config.baselines):
            job = SystemJob(name, config, str(device), mps_env, requests, prompts, show)
            runs[name] = run_in_child(job)
    # NOTE: after the session: the summary records how the daemon's stop went
    env = environment(device, mps_state, runs[SPLITWISER].device_info)
    systems = {}
    for name, run in runs.items():
        metrics = compute_metrics(run.records, run.duration_s, config.slo)
        metrics["telemetry"] = run.telemetry.summary(metrics["total_output_tokens"])
        gpu = metrics["telemetry"]["gpu"] or {}
        metrics["joules_per_output_token"] = gpu.get("joules_per_output_token")
        metrics |= run.extra
        metrics["pid"] = run.pid
        systems[name] = metrics
    summary = {
        "run_id": None,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_dict() | {"device": str(device), "dtype": str(dtype).split(".")[-1]},
        "model": describe_model(engine.model, model_config, engine.model_impl),
        "workload": workload.describe(),
        "environment": env,
        "systems": systems,
        "ratios": ratios(systems, SPLITWISER),
        f"token_agreement_with_{SEQUENTIAL}": _agreement(runs, SEQUENTIAL),
        f"token_agreement_with_{SPLITWISER}": _agreement(runs, SPLITWISER),
    }
    run_dir = write_results(config, summary, runs, out, device)
    return BenchResult(run_dir, summary, runs)
