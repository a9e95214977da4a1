"""What a run leaves behind: ``<out>/<run-id>/`` with ``summary.json``, ``requests.csv``,
``telemetry.csv`` and the plots; and the comparison table printed at the end."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from pathlib import Path

from splitwiser.benchmark.metrics import HEADLINE
from splitwiser.systems import SPLITWISER

REQUEST_COLUMNS = (
    "system", "request_id", "arrival_s", "submit_s", "prompt_len", "output_len",
    "num_output_tokens", "ttft_ms", "tpot_ms", "mean_itl_ms", "e2el_ms", "finish_s",
    "handoff_ms", "kv_bytes_copied", "error",
)  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 4)


def request_rows(runs) -> list[dict]:
    rows = []
    for name, run in runs.items():
        for r in sorted(run.records, key=lambda r: r.request_id):
            itl = r.itl_s
            rows.append({
                "system": name, "request_id": r.request_id, "arrival_s": round(r.arrival_s, 6),
                "submit_s": None if r.submit_s is None else round(r.submit_s, 6),
                "prompt_len": r.prompt_len, "output_len": r.output_len,
                "num_output_tokens": r.num_output_tokens, "ttft_ms": _ms(r.ttft_s),
                "tpot_ms": _ms(r.tpot_s), "mean_itl_ms": _ms(sum(itl) / len(itl)) if itl else None,
                "e2el_ms": _ms(r.e2el_s),
                "finish_s": None if r.finish_s is None else round(r.finish_s, 6),
                "handoff_ms": _ms(r.handoff_s), "kv_bytes_copied": r.kv_bytes_copied,
                "error": r.error,
            })  # fmt: skip
    return rows


def write_csv(path: Path, rows: list[dict], columns) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _free_name(out: Path, base: str) -> str:
    for n in range(1000):
        name = base if n == 0 else f"{base}-{n}"
        if not (out / name).exists():
            return name
    raise FileExistsError(f"no free run directory for {base} under {out}")


def write_results(
    config, summary: dict, runs, out: Path, device, *, kind: str = "", write_files=None
) -> Path:
    """Write every file of the run into a hidden folder, then rename it to ``out/<run-id>``:
    a folder named like a run always holds a complete summary (``summary.json``, or
    ``<kind>.json``). ``write_files(run_dir)`` writes the rest and returns their names.
    ``config``: the run's ``BenchConfig``. Returns the folder."""
    if config.run_id is not None:
        name = config.run_id
        if (out / name).exists():
            raise FileExistsError(f"{out / name} already exists; choose another --run-id")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        parts = [stamp, kind, config.workload, device.type]
        name = _free_name(out, "-".join(p for p in parts if p))
    summary["run_id"] = name
    partial = out / f".{name}.partial-{os.getpid()}"
    partial.mkdir()
    summary_name = f"{kind or 'summary'}.json"
    try:
        if write_files is None:
            summary["files"] = _write_files(config, summary, runs, partial)
        else:
            summary["files"] = [summary_name, *write_files(partial)]
        with open(partial / summary_name, "w") as f:
            json.dump(summary, f, indent=2, default=str)
            f.write("\n")
        if (out / name).exists():  # taken while this run wrote
            raise FileExistsError(f"{out / name} appeared while the results were written")
        partial.rename(out / name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out / name


def _write_files(config, summary: dict, runs, run_dir: Path) -> list[str]:
    write_csv(run_dir / "requests.csv", request_rows(runs), REQUEST_COLUMNS)
    telemetry = [
        {"system": name, **row} for name, run in runs.items() for row in run.telemetry.samples
    ]
    write_csv(
        run_dir / "telemetry.csv",
        telemetry,
        ("system", "time_s", "process", "cpu_percent", "rss_mib", "uss_mib", "pss_mib"),
    )
    gpu = [{"system": n, **row} for n, run in runs.items() for row in run.telemetry.gpu_samples]
    if gpu:
        columns = ["system"] + sorted({k for row in gpu for k in row} - {"system"})
        write_csv(run_dir / "gpu_telemetry.csv", gpu, columns)
    files = ["summary.json", "requests.csv", "telemetry.csv"] + (
        ["gpu_telemetry.csv"] if gpu else []
    )
    if config.plots:
        from splitwiser.benchmark import plots

        files += plots.write_plots(run_dir, summary, runs)
    return files


def format_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def _count(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def comparison_table(summary: dict) -> str:
    """Metrics per system, then Splitwiser's ratio to each baseline (its value / theirs)."""
    systems = summary["systems"]
    names = list(systems)
    ratio_cols = [f"x {b}" for b in summary["ratios"]]
    header = ["metric", *names, *ratio_cols]
    rows = [header]
    for key, label, _ in HEADLINE:
        if all(systems[n].get(key) is None for n in names):
            continue
        row = [label, *(format_value(systems[n].get(key)) for n in names)]
        row += [format_value(summary["ratios"][b].get(key)) for b in summary["ratios"]]
        rows.append(row)
    rows.append(["completed/failed", *(f"{systems[n]['completed']}/{systems[n]['failed']}"
                                       for n in names), *[""] * len(ratio_cols)])  # fmt: skip
    for key, label in (("mean_sm_util_percent", "mean SM util %"),
                       ("max_gpu_memory_used_mib", "max GPU memory MiB")):  # fmt: skip
        gpu = [(systems[n].get("telemetry") or {}).get("gpu") or {} for n in names]
        if any(g.get(key) is not None for g in gpu):
            rows.append([label, *(format_value(g.get(key)) for g in gpu), *[""] * len(ratio_cols)])
    kv = [systems[n].get("kv_cache") or {} for n in names]
    if any(k.get("prefix_cache_queries") is not None for k in kv):  # tokens found / looked up
        rows.append(["prefix cache hit %", *(
            "-" if k.get("prefix_cache_hit_rate") is None
            else f"{100 * k['prefix_cache_hit_rate']:.1f}" for k in kv
        ), *[""] * len(ratio_cols)])  # fmt: skip
    if any(k.get("num_preemptions") is not None for k in kv):
        rows.append(["preemptions", *(_count(k.get("num_preemptions")) for k in kv),
                     *[""] * len(ratio_cols)])  # fmt: skip
    if any(k.get("kv_pool_tokens") is not None for k in kv):
        rows.append(["KV pool tokens", *(_count(k.get("kv_pool_tokens")) for k in kv),
                     *[""] * len(ratio_cols)])  # fmt: skip
    same = summary.get("token_agreement_with_splitwiser") or {}
    if same:  # greedy: the same prompt ids should give the same tokens everywhere
        rows.append(["tokens = splitwiser %", *(
            "" if n == SPLITWISER or same.get(n) is None else f"{100 * same[n]:.0f}"
            for n in names
        ), *[""] * len(ratio_cols)])  # fmt: skip
    if any(systems[n].get("median_handoff_ms") is not None for n in names):  # the splits
        rows.append(["median handoff ms", *(format_value(systems[n].get("median_handoff_ms"))
                                            for n in names), *[""] * len(ratio_cols)])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if ratio_cols:
        lines.append("ratios are Splitwiser's value divided by the baseline's")
    return "\n".join(lines)
