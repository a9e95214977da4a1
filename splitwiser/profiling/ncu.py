"""Nsight Compute: the command lines, the raw-page CSV export, and the per-phase summary.

The workers wrap each prefill batch in NVTX push/pop ranges ``prompt`` > ``prefill b=.. t=..``
and each decode step in ``token`` > ``decode b=..``; ``--nvtx-include "prompt/"`` then profiles
the prompt phase's kernels only (not the parent's weight initialisation, not the other phase).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

PHASES = ("prompt", "token")
DURATION = "gpu__time_duration.sum"  # ns
SM_THROUGHPUT = "sm__throughput.avg.pct_of_peak_sustained_elapsed"
DRAM_THROUGHPUT = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
DRAM_READ = "dram__bytes_read.sum"
DRAM_WRITE = "dram__bytes_write.sum"
OCCUPANCY = "sm__warps_active.avg.pct_of_peak_sustained_active"  # achieved occupancy
DEFAULT_METRICS = (DURATION, SM_THROUGHPUT, DRAM_THROUGHPUT, DRAM_READ, DRAM_WRITE, OCCUPANCY)


def metric_args(metrics: str) -> list[str]:
    """``default``: the summary's metrics; ``full``: the full section set plus them; otherwise
    a comma list of metric names, to which the summary's own are added."""
    if metrics == "default":
        return ["--metrics", ",".join(DEFAULT_METRICS)]
    if metrics == "full":
        return ["--set", "full", "--metrics", ",".join(DEFAULT_METRICS)]
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    return ["--metrics", ",".join(dict.fromkeys([*DEFAULT_METRICS, *names]))]


def ncu_command(
    ncu: str, phase: str, report: str, kernels: int, metrics: str, target: list[str]
) -> list[str]:
    """Profile the kernels of one phase in every process of ``target``, clocks unlocked."""
    return [
        ncu,
        "--target-processes", "all",  # the workers are child processes
        "--nvtx", "--nvtx-include", f"{phase}/",
        "--clock-control", "none",  # the clocks the workload really runs at
        "--launch-count", str(kernels),
        *metric_args(metrics),
        "--export", report, "--force-overwrite",
        *target,
    ]  # fmt: skip


def export_command(ncu: str, report: str) -> list[str]:
    """The raw page as CSV, values in base units (ns, bytes), one row per kernel."""
    return [ncu, "--import", report, "--csv", "--page", "raw", "--print-units", "base"]


def nsys_command(nsys: str, report: str, target: list[str]) -> list[str]:
    return [
        nsys, "profile", "--trace", "cuda,nvtx", "--sample", "none", "--cpuctxsw", "none",
        "--output", report, "--force-overwrite", "true", *target,
    ]  # fmt: skip


@dataclass
class KernelRow:
    id: int
    pid: int
    name: str
    metrics: dict[str, float] = field(default_factory=dict)


def _number(text: str) -> float | None:
    text = text.strip().replace(",", "")  # thousands separators
    try:
        return float(text)
    except ValueError:
        return None  # "n/a", empty


# the units row, scaled to the summary's base units (ns, bytes); "--print-units base" asks for
# those already, this keeps a report exported with other settings right
_SCALE = {
    "nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
    "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
    "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024.0, "MiB": 1024.0**2, "GiB": 1024.0**3,
}  # fmt: skip


def parse_raw_csv(text: str) -> list[KernelRow]:
    """Rows of ``ncu --import R --csv --page raw``: a header row, a units row, one row per
    kernel. Lines ncu prints before the header (``==PROF==`` notes) are skipped; columns that
    are not metrics (NVTX stacks, launch attributes as text) are ignored."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError('no ncu raw-page header (a line starting with "ID") in the CSV')
    reader = csv.reader(io.StringIO("\n".join(lines[start:])))
    header = next(reader)
    col = {name: i for i, name in enumerate(header)}
    for need in ("ID", "Process ID", "Kernel Name"):
        if need not in col:
            raise ValueError(f"the ncu CSV has no {need!r} column")
    metric_cols = {name: i for name, i in col.items() if "__" in name}  # unit__counter.rollup
    scale: dict[str, float] = {}
    rows = []
    for rec in reader:
        if not rec:
            continue
        kernel_id = _number(rec[col["ID"]])
        if kernel_id is None:  # the units row
            scale = {n: _SCALE.get(rec[i].strip(), 1.0) for n, i in metric_cols.items()
                     if i < len(rec)}  # fmt: skip
            continue
        metrics = {}
        for name, i in metric_cols.items():
            value = _number(rec[i]) if i < len(rec) else None
            if value is not None:
                metrics[name] = value * scale.get(name, 1.0)
        pid = _number(rec[col["Process ID"]])
        rows.append(KernelRow(int(kernel_id), int(pid or 0), rec[col["Kernel Name"]], metrics))
    return rows


def _weighted(rows: list[KernelRow], metric: str) -> float | None:
    """Duration-weighted mean: a long kernel counts for more than a short one."""
    pairs = [(r.metrics[DURATION], r.metrics[metric]) for r in rows
             if DURATION in r.metrics and metric in r.metrics]  # fmt: skip
    total = sum(d for d, _ in pairs)
    return sum(d * v for d, v in pairs) / total if total else None


def _short(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def summarize(rows: list[KernelRow], top: int = 10) -> dict:
    """One phase's kernels: time, throughput as % of peak, occupancy, DRAM traffic, top kernels."""
    duration_ns = sum(r.metrics.get(DURATION, 0.0) for r in rows)
    read = sum(r.metrics.get(DRAM_READ, 0.0) for r in rows)
    write = sum(r.metrics.get(DRAM_WRITE, 0.0) for r in rows)
    by_name: dict[str, list[KernelRow]] = {}
    for r in rows:
        by_name.setdefault(r.name, []).append(r)
    kernels = sorted(
        by_name.items(), key=lambda kv: -sum(r.metrics.get(DURATION, 0.0) for r in kv[1])
    )
    return {
        "num_kernels": len(rows),
        "duration_ms": duration_ns / 1e6,
        "sm_throughput_pct": _weighted(rows, SM_THROUGHPUT),
        "dram_throughput_pct": _weighted(rows, DRAM_THROUGHPUT),
        "achieved_occupancy_pct": _weighted(rows, OCCUPANCY),
        "dram_bytes_read": read,
        "dram_bytes_write": write,
        "dram_gb_s": (read + write) / duration_ns if duration_ns else None,  # bytes/ns = GB/s
        "top_kernels": [
            {
                "name": _short(name),
                "count": len(ks),
                "duration_ms": sum(k.metrics.get(DURATION, 0.0) for k in ks) / 1e6,
                "share": sum(k.metrics.get(DURATION, 0.0) for k in ks) / duration_ns
                if duration_ns
                else None,
                "sm_throughput_pct": _weighted(ks, SM_THROUGHPUT),
                "dram_throughput_pct": _weighted(ks, DRAM_THROUGHPUT),
            }
            for name, ks in kernels[:top]
        ],
    }
