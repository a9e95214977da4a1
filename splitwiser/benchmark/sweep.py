"""``run_sweep``: each system through the same workload at each offered load, in one run.

As in ``run_bench``, this process checks the input, starts MPS and builds the workload once;
each system then runs in a process of its own (``systems.process.run_in_child``), started
ONCE for all its points: built, warmed up, timed on one request alone, then replayed at each
rate in increasing order, each point after the previous one drained. Per point the bench's metrics,
the SLO attainment and, from the engine's phase log, decode step times and interference
(``goodput``); per system the goodput in requests/s.

Arrivals: the fixed workload's are Poisson at each rate with the run's seed (the same draws,
scaled, so a rate's schedule is exactly ``splitwiser bench --rate R``'s); a trace's own arrival
times are scaled so that their mean rate is each rate in turn.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field, replace

from tqdm import tqdm

from splitwiser import mps
from splitwiser.benchmark.driver import check_out, describe_model, environment
from splitwiser.benchmark.goodput import (
    decode_step_stats,
    goodput_rps,
    interference,
    slo_attainment,
)
from splitwiser.benchmark.metrics import (
    RequestRecord,
    compute_metrics,
    phase_summary,
    token_agreement,
)
from splitwiser.benchmark.sweep_config import SweepConfig
from splitwiser.benchmark.telemetry import TelemetryLog, TelemetrySampler
from splitwiser.benchmark.workloads import (
    TRACE_WORKLOADS,
    BenchRequest,
    Workload,
    build_prompts,
    build_workload,
)
from splitwiser.config import resolve_device, resolve_dtype
from splitwiser.errors import ConfigError, SplitwiserError
from splitwiser.models.loader import load_model_config, load_tokenizer
from splitwiser.models.shape import ModelShape
from splitwiser.systems import COLOCATED, SEQUENTIAL, SPLITWISER, BenchSystem, get_system
from splitwiser.systems.process import (
    SystemJob,
    build_system,
    device_info,
    kv_cache_facts,
    run_in_child,
    start_measuring,
    start_system,
    warm_up,
)

NUM_UNLOADED = 3  # times the single request runs alone; its latencies are the median


@dataclass(frozen=True)
class SweepJob:
    """One system's whole sweep, for its process."""

    name: str  # the system's name in the results (splitwiser-mps-70-30, colocated, ...)
    system: SystemJob  # what to build and warm up: its name picks the pipeline
    points: tuple[tuple[float, tuple[BenchRequest, ...]], ...]  # (rate, schedule), increasing
    unloaded_index: int  # the request timed alone (median prompt length)
    # --slo multiples (key -> factor): phase control steers by these times the system's own
    # single request (the sweep's reference system runs in another process)
    slo_multiples: dict = field(default_factory=dict)


@dataclass
class PointRun:
    rate: float
    records: list[RequestRecord]
    duration_s: float
    telemetry: TelemetryLog
    phase_log: list | None  # PhaseRecords, seconds after the point began; None: not an engine
    phases: dict | None  # phase_summary of the point's counters
    kv_cache: dict  # prefix cache hits and preemptions over the point (kv_cache_facts)
    # phase control: its level at the point's end and its steps during the point (seconds
    # after the point began); None: the system has none
    phase_control: dict | None = None


@dataclass
class SweepRun:
    name: str
    points: list[PointRun]
    unloaded: dict  # the single request alone: ttft_ms, tpot_ms, e2el_ms (medians)
    extra: dict  # system facts over the whole sweep (phases, pool, workers)
    pid: int
    device_info: dict


@dataclass
class SweepResult:
    run_dir: object  # Path
    summary: dict
    runs: dict[str, SweepRun]


def _median_ms(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) * 1e3 if values else None


def _time_alone(job: SweepJob, system: BenchSystem) -> dict:
    """The unloaded latency: one request alone, ``NUM_UNLOADED`` times, after the warm-up."""
    req = replace(job.system.requests[job.unloaded_index], arrival_s=0.0, conversation=None)
    prompt = job.system.prompts[job.unloaded_index]
    runs = []
    for _ in range(NUM_UNLOADED):
        system.reset_prefix_cache()  # each time uncached: the latency of a new prompt
        runs.append(system.replay([req], [prompt], lambda n: None)[0][0])
    ok = [r for r in runs if r.ok]
    return {"prompt_len": req.prompt_len, "output_len": req.output_len, "num_runs": len(ok),
            "ttft_ms": _median_ms([r.ttft_s for r in ok]),
            "tpot_ms": _median_ms([r.tpot_s for r in ok]),
            "e2el_ms": _median_ms([r.e2el_s for r in ok])}  # fmt: skip


def run_points(job: SweepJob) -> SweepRun:
    """In the system's process: build it once, warm up, time one request alone, then replay
    every point; close it."""
    spec = job.system
    device, dtype = start_system(spec)
    total = sum(len(requests) for _, requests in job.points)
    points: list[PointRun] = []
    with build_system(spec, device, dtype) as system:
        warm_up(spec, system)
        unloaded = _time_alone(job, system)
        _steer_by_slo(job, system, unloaded)
        first = system.phase_counters()
        bar = tqdm(total=total, desc=f"{job.name:>10}", unit="req", disable=not spec.show)
        with bar:
            for rate, requests in job.points:
                bar.set_postfix_str(f"{rate:g} req/s")
                before = system.phase_counters()
                start = start_measuring(system)
                control = system.phase_control()
                # NOTE: the replay's clock starts right after this: the log's times and the
                # requests' differ by the microseconds between the two calls
                since = time.monotonic()
                with TelemetrySampler(device) as telemetry:
                    records, duration_s = system.replay(list(requests), spec.prompts, bar.update)
                log, phases = None, None
                if system.is_engine:
                    log = [replace(s, start_s=s.start_s - since, end_s=s.end_s - since)
                           for s in system.phase_log(since)]  # fmt: skip
                    now = system.phase_counters()
                    phases = phase_summary({k: v - before[k] for k, v in now.items()})
                points.append(PointRun(rate, records, duration_s, telemetry, log, phases,
                                       kv_cache_facts(system, start),
                                       _control_during(system, since, control)))  # fmt: skip
        records = [r for p in points for r in p.records]
        extra = system.facts(spec.config, records, first)
    return SweepRun(job.name, points, unloaded, extra, os.getpid(), device_info(device))


def _steer_by_slo(job: SweepJob, system: BenchSystem, unloaded: dict) -> None:
    """Phase control's SLOs: those given in ms (already in the engine's config) and the
    multiples of this system's single request."""
    if not job.slo_multiples:
        return
    engine = job.system.config.engine
    slo = {"ttft_ms": engine.ttft_slo_ms, "tpot_ms": engine.tpot_slo_ms}
    for key, factor in job.slo_multiples.items():
        if key in slo and unloaded.get(key) is not None:
            slo[key] = factor * unloaded[key]
    system.set_phase_slo(slo["ttft_ms"], slo["tpot_ms"])


def _control_during(system: BenchSystem, since: float, before: dict | None) -> dict | None:
    """Phase control over one point: its level at the start and end, and its steps."""
    state = system.phase_control()
    if state is None or state["mode"] != "slo":
        return None
    steps = [{**d, "time_s": d["time_s"] - since} for d in state["decisions"]
             if d["time_s"] >= since]  # fmt: skip
    kept = ("level", "prefill_concurrency", "max_prefill_tokens", "ttft_slo_ms", "tpot_slo_ms")
    return {"start_level": before["level"], **{k: state[k] for k in kept}, "steps": steps}


def _schedules(config: SweepConfig, workload: Workload) -> tuple:
    """(rate, the requests with arrivals at that rate) for each rate of the sweep."""
    requests = workload.requests
    if workload.arrival == "poisson":
        base_rate = workload.info["rate"]
    else:  # a trace: its own mean rate
        span = requests[-1].arrival_s - requests[0].arrival_s
        if len(requests) < 2 or span <= 0:
            raise ConfigError(
                "a trace sweep needs at least 2 requests at distinct times; raise --num-requests"
            )
        base_rate = (len(requests) - 1) / span
    return tuple(
        (rate, tuple(replace(r, arrival_s=r.arrival_s * base_rate / rate) for r in requests))
        for rate in config.rates
    )


def _unloaded_index(workload: Workload) -> int:
    """The request of median prompt length (among those that need no earlier answer)."""
    firsts = [r for r in workload.requests if not r.is_follow_up]
    by_length = sorted(firsts, key=lambda r: (r.prompt_len, r.request_id))
    return by_length[len(by_length) // 2].request_id


def resolve_slo(config: SweepConfig, runs: dict[str, SweepRun]) -> tuple[dict, dict | None]:
    """The SLOs in milliseconds: those given, and the multiples of the reference system's
    unloaded latency (colocated if it ran, else splitwiser); and that reference."""
    slo = dict(config.bench.slo)
    if not config.slo_multiples:
        return slo, None
    name = COLOCATED if COLOCATED in runs else SPLITWISER
    unloaded = runs[name].unloaded
    for key, factor in config.slo_multiples.items():
        if unloaded[key] is None:
            raise SplitwiserError(f"--slo {key}={factor:g}x: {name}'s single request has no {key}")
        slo[key] = factor * unloaded[key]
    return slo, {"system": name, **unloaded}


def point_summary(
    point: PointRun, slo: dict, mixed_steps: bool, references: dict[str, PointRun]
) -> dict:
    """One point's figures: rate, attainment, the bench metrics, decode steps, interference, and
    its tokens' agreement with each of ``references``' at the same point (splitwiser's, and the
    sequential baseline's where it ran: ``generate()`` alone, the exactness reference)."""
    metrics = compute_metrics(point.records, point.duration_s, slo)
    out = {"rate": point.rate, "slo_attainment": slo_attainment(point.records, slo), **metrics}
    out["telemetry"] = point.telemetry.summary(metrics["total_output_tokens"])
    out["joules_per_output_token"] = (out["telemetry"]["gpu"] or {}).get("joules_per_output_token")
    out["kv_cache"] = point.kv_cache
    if point.phase_control is not None:
        out["phase_control"] = point.phase_control
    if point.phase_log is not None:
        out |= decode_step_stats(point.phase_log, mixed_steps)
        out["interference"] = interference(point.phase_log, mixed_steps)
        out["phases"] = point.phases
    for name, reference in references.items():
        out[f"token_agreement_with_{name}"] = token_agreement(point.records, reference.records)
    return out


def summarize_systems(config: SweepConfig, runs: dict[str, SweepRun], slo: dict) -> dict:
    """``systems.<name>``: its points, its goodput, its unloaded latency and facts."""
    systems = {}
    references = {ref: runs[ref] for ref in (SPLITWISER, SEQUENTIAL) if ref in runs}
    for name, run in runs.items():
        mixed_steps = get_system(config.systems[name][0]).has_mixed_steps
        points = [
            point_summary(p, slo, mixed_steps,
                          {ref: r.points[i] for ref, r in references.items() if ref != name})
            for i, p in enumerate(run.points)
        ]  # fmt: skip
        goodput = goodput_rps([p["rate"] for p in points], [p["slo_attainment"] for p in points],
                              config.attainment_target)  # fmt: skip
        systems[name] = {**goodput, "single_request": run.unloaded, "points": points,
                         **run.extra, "pid": run.pid}  # fmt: skip
    return systems


def goodput_ratios(systems: dict, baseline: str = COLOCATED) -> dict[str, float | None]:
    """Each system's goodput divided by ``baseline``'s (None where either has none)."""
    if baseline not in systems:
        return {}
    base = systems[baseline]["goodput_rps"]
    return {
        name: s["goodput_rps"] / base if s["goodput_rps"] is not None and base else None
        for name, s in systems.items()
    }


def run_sweep(config: SweepConfig, *, command: str | None = None, show: bool = True):
    """Run the sweep and write ``<out>/<run-id>/``; returns a :class:`SweepResult`."""
    from splitwiser.benchmark.sweep_report import write_sweep

    bench, engine = config.bench, config.bench.engine
    device = resolve_device(engine.device, init_cuda=False)
    if config.mps_splits and device.type != "cuda":
        raise ConfigError(f"--mps-split needs MPS on a CUDA GPU; this run is on {device.type}")
    dtype = resolve_dtype(engine.dtype, device)
    model_config = load_model_config(engine.model)
    trace = bench.workload in TRACE_WORKLOADS
    workload = build_workload(
        bench.workload, rate=None if trace else 1.0, trace_speedup=1.0 if trace else None,
        max_context=ModelShape.from_hf(model_config).max_model_len(bench.max_context),
        **bench.workload_options(),
    )  # fmt: skip
    schedules = _schedules(config, workload)
    prompts = build_prompts(workload, load_tokenizer(engine.model), seed=bench.seed)
    out = check_out(bench)  # the input is valid: before any work, a place for the results
    runs: dict[str, SweepRun] = {}
    with mps.session(bench.mps, engine.device) as (daemon, mps_state):
        if config.mps_splits and daemon is None:
            raise ConfigError(f"--mps-split needs MPS, which this run cannot use: "
                              f"{mps_state['reason']}")  # fmt: skip
        mps_env = daemon.env() if daemon is not None else {}
        for name, (kind, system_config) in config.systems.items():
            system = SystemJob(kind, system_config, str(device), mps_env,
                               list(workload.requests), prompts, show)  # fmt: skip
            job = SweepJob(name, system, schedules, _unloaded_index(workload),
                           dict(config.slo_multiples or {}))  # fmt: skip
            runs[name] = run_in_child(job, target=run_points)
    slo, slo_reference = resolve_slo(config, runs)
    systems = summarize_systems(config, runs, slo)
    # the base schedule's rate (Poisson at 1/s) or speed-up (the trace as recorded) is no point's
    described = {k: v for k, v in workload.describe().items() if k not in ("rate", "trace_speedup")}
    summary = {
        "run_id": None,
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config.to_dict() | {"device": str(device), "dtype": str(dtype).split(".")[-1]},
        "model": describe_model(engine.model, model_config, engine.model_impl),
        "workload": described | {"rates": list(config.rates)},
        "environment": environment(
            device, mps_state | {"splits": config.mps_splits}, runs[SPLITWISER].device_info
        ),  # fmt: skip
        "slo": slo,
        "slo_reference": slo_reference,
        "attainment_target": config.attainment_target,
        "systems": systems,
        "goodput_ratio_to_colocated": goodput_ratios(systems),
    }
    run_dir = write_sweep(config, summary, runs, out, device)
    return SweepResult(run_dir, summary, runs)
