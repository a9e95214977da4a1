"""What a sweep leaves behind: ``<out>/<run-id>/`` with ``sweep.json``, ``points.csv`` (one row
per system and rate), ``requests.csv`` (one row per request, with its point's rate) and the
plots against the rate; and the table printed at the end."""

from __future__ import annotations

from pathlib import Path

from splitwiser.benchmark.report import (
    REQUEST_COLUMNS,
    format_value,
    request_rows,
    write_csv,
    write_results,
)
from splitwiser.systems import SEQUENTIAL, SPLITWISER

POINT_COLUMNS = (
    "system", "rate", "slo_attainment", "request_goodput", "completed", "failed", "duration",
    "request_throughput", "output_throughput", "total_token_throughput",
    "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms",
    "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms",
    "num_decode_steps", "median_decode_step_ms", "p99_decode_step_ms",
    "decode_steps_during_prefill", "median_step_ms_during_prefill",
    "mean_step_ms_during_prefill", "decode_steps_without_prefill",
    "median_step_ms_without_prefill", "mean_step_ms_without_prefill", "interference_mean_ratio",
    "token_agreement_with_splitwiser", "token_agreement_with_sequential",
    "prefix_cache_hit_rate", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
)  # fmt: skip
KV_CACHE_COLUMNS = ("prefix_cache_hit_rate", "prefix_cache_queries", "prefix_cache_hits",
                    "num_preemptions")  # fmt: skip


def point_rows(summary: dict) -> list[dict]:
    rows = []
    for name, system in summary["systems"].items():
        for point in system["points"]:
            row = {"system": name} | {k: point.get(k) for k in POINT_COLUMNS if k != "system"}
            row |= {k: (point.get("kv_cache") or {}).get(k) for k in KV_CACHE_COLUMNS}
            inter = point.get("interference")
            if inter is not None:
                for side in ("during_prefill", "without_prefill"):
                    stats = inter[side]
                    row[f"decode_steps_{side}"] = stats["num_steps"]
                    row[f"median_step_ms_{side}"] = stats["median_ms"]
                    row[f"mean_step_ms_{side}"] = stats["mean_ms"]
                row["interference_mean_ratio"] = inter["mean_ratio"]
            rows.append(row)
    return rows


def _request_rows(runs) -> list[dict]:
    rows = []
    for name, run in runs.items():
        for point in run.points:
            rows += [{"rate": point.rate, **row} for row in request_rows({name: point})]
    return rows


def write_sweep(config, summary: dict, runs, out: Path, device) -> Path:
    """Write the sweep's files into a hidden folder renamed to ``out/<run-id>`` at the end."""

    def write_files(run_dir: Path) -> list[str]:
        write_csv(run_dir / "points.csv", point_rows(summary), POINT_COLUMNS)
        write_csv(run_dir / "requests.csv", _request_rows(runs), ("rate", *REQUEST_COLUMNS))
        files = ["points.csv", "requests.csv"]
        if config.bench.plots:
            from splitwiser.benchmark.plots import write_sweep_plots

            files += write_sweep_plots(run_dir, summary)
        return files

    return write_results(
        config.bench, summary, runs, out, device, kind="sweep", write_files=write_files
    )


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def _kv_cells(kv: dict) -> list[str]:
    """The prefix cache's hit rate (tokens) and the preemptions; "-" where not reported."""
    preempted = kv.get("num_preemptions")
    return [_pct(kv.get("prefix_cache_hit_rate")), "-" if preempted is None else f"{preempted:g}"]


def sweep_table(summary: dict) -> str:
    """Each point (attainment, throughput, p90 latencies, decode steps, token agreement), then
    each system's goodput and its ratio to the colocated baseline's."""
    # each system's tokens against splitwiser's and, where it ran, the sequential baseline's
    refs = [r for r in (SPLITWISER, SEQUENTIAL) if r in summary["systems"]]
    header = ["system", "rate", "attained", "out tok/s", "p90 TTFT ms", "p90 TPOT ms",
              "step p50 ms", "step p99 ms", "failed", "prefix hit", "preempted"]  # fmt: skip
    points = [header + [f"tokens = {r}" for r in refs]]
    for name, system in summary["systems"].items():
        for p in system["points"]:
            points.append([name, f"{p['rate']:g}", _pct(p["slo_attainment"])] + [
                format_value(p.get(k)) for k in ("output_throughput", "p90_ttft_ms", "p90_tpot_ms",
                                         "median_decode_step_ms", "p99_decode_step_ms")
            ] + [str(p["failed"])] + _kv_cells(p.get("kv_cache") or {}) + [
                "-" if r == name else _pct(p.get(f"token_agreement_with_{r}")) for r in refs
            ])  # fmt: skip
    slo = ", ".join(f"{k}={v:.4g}" for k, v in summary["slo"].items())
    target = _pct(summary["attainment_target"])
    ratios = summary["goodput_ratio_to_colocated"]
    header = ["system", "goodput req/s", "met at the highest rate"]
    goodput = [header + (["x colocated"] if ratios else [])]
    for name, system in summary["systems"].items():
        met = "yes" if system["highest_rate_met"] else "no"
        row = [name, format_value(system["goodput_rps"]), met]
        goodput.append(row + ([format_value(ratios.get(name))] if ratios else []))
    return "\n".join([
        *_table(points), "",
        f"goodput: the highest rate with >= {target} of requests within every SLO ({slo})",
        *_table(goodput),
    ])  # fmt: skip
