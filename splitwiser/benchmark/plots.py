"""PNG plots of a run: latency CDFs, throughput bars, telemetry over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from splitwiser.systems import SEQUENTIAL, plot_color  # noqa: E402


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    xs, ys = [xs[0], *xs], [0.0, *ys]  # start the curve at 0
    ax.step(xs, ys, where="post", label=label, color=plot_color(label))


def latency_cdfs(path: Path, runs) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("TTFT (ms)", "ttft_s"), ("TPOT (ms)", "tpot_s"), ("E2E latency (ms)", "e2el_s"))
    for ax, (title, attr) in zip(axes, panels):
        for name, run in runs.items():
            # NOTE: TPOT is undefined (None) for a request with one output token
            vals = [getattr(r, attr) for r in run.records if r.ok]
            _cdf(ax, [v * 1e3 for v in vals if v is not None and v > 0], name)
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Latency CDFs (from scheduled arrival)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def throughput_bars(path: Path, summary: dict) -> None:
    systems = summary["systems"]
    names = list(systems)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(
        axes, (("output_throughput", "output tokens/s"), ("request_throughput", "requests/s"))
    ):
        vals = [systems[n][key] for n in names]
        bars = ax.bar(names, vals, color=[plot_color(n) or "tab:gray" for n in names])
        base = systems.get(SEQUENTIAL, {}).get(key)
        for bar, v in zip(bars, vals):
            note = f"{v:.1f}" + (f"\n{v / base:.2f}x seq" if base else "")
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
        ax.set_ylabel(label)
        ax.set_ylim(0, max(vals) * 1.3 if max(vals) > 0 else 1)
        ax.grid(True, axis="y", alpha=0.3)
    wl = summary["workload"]
    fig.suptitle(f"Throughput: {wl['name']}, {wl['num_requests']} requests, {wl['arrival']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def telemetry_plot(path: Path, runs) -> None:
    has_gpu = any(run.telemetry.gpu_samples for run in runs.values())
    panels = [("total CPU %", "cpu_percent"), ("total PSS (MiB)", "pss_mib")]
    if has_gpu:
        panels += [("GPU util %", "gpu_util_percent"), ("GPU power (W)", "gpu_power_w"),
                   ("GPU memory used (MiB)", "gpu_memory_used_mib")]  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.6 * len(panels)), sharex=True)
    for ax, (title, key) in zip(axes, panels):
        for name, run in runs.items():
            if key in ("cpu_percent", "pss_mib"):
                totals: dict[float, float] = {}
                for row in run.telemetry.samples:
                    if row[key] is not None:  # PSS: only the samples that read it
                        totals[row["time_s"]] = totals.get(row["time_s"], 0.0) + row[key]
                xs = sorted(totals)
                ys = [totals[x] for x in xs]
            else:
                pts = [(s["time_s"], s.get(key)) for s in run.telemetry.gpu_samples]
                xs = [t for t, v in pts if v is not None]
                ys = [v for _, v in pts if v is not None]
            ax.plot(xs, ys, label=name, color=plot_color(name))
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    axes[-1].set_xlabel("seconds since the system's measured run started")
    fig.suptitle("Telemetry (this process and its sw-* workers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(run_dir: Path, summary: dict, runs) -> list[str]:
    latency_cdfs(run_dir / "latency_cdf.png", runs)
    throughput_bars(run_dir / "throughput.png", summary)
    telemetry_plot(run_dir / "telemetry.png", runs)
    return ["latency_cdf.png", "throughput.png", "telemetry.png"]


def _against_rate(ax, summary: dict, key: str, scale: float = 1.0) -> None:
    for name, system in summary["systems"].items():
        pts = [(p["rate"], p.get(key)) for p in system["points"]]
        pts = [(r, v * scale) for r, v in pts if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name, color=plot_color(name))
    ax.set_xlabel("offered load (requests/s)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _save(fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_plots(run_dir: Path, summary: dict) -> list[str]:
    """A sweep's figures against the offered load: SLO attainment (with the target and each
    system's goodput), p90 TTFT and TPOT, output throughput."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _against_rate(ax, summary, "slo_attainment", 100.0)
    ax.axhline(100 * summary["attainment_target"], color="gray", linestyle="--", linewidth=1)
    for name, system in summary["systems"].items():
        if system["goodput_rps"] is not None:
            ax.axvline(system["goodput_rps"], color=plot_color(name) or "gray", linestyle=":")
    ax.set_ylabel("requests within every SLO (%)")
    ax.set_ylim(0, 105)
    slo = ", ".join(f"{k} {v:.4g}" for k, v in summary["slo"].items())
    _save(fig, run_dir / "attainment.png", f"SLO attainment ({slo}); dotted: goodput")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (key, label) in zip(axes, (("p90_ttft_ms", "p90 TTFT (ms)"),
                                       ("p90_tpot_ms", "p90 TPOT (ms)"))):  # fmt: skip
        _against_rate(ax, summary, key)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylabel(label)
    _save(fig, run_dir / "latency_vs_rate.png", "Latency against offered load")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _against_rate(ax, summary, "output_throughput")
    ax.set_ylabel("output tokens/s")
    _save(fig, run_dir / "throughput_vs_rate.png", "Output throughput against offered load")
    files = ["attainment.png", "latency_vs_rate.png", "throughput_vs_rate.png"]
    if any("phase_control" in p for s in summary["systems"].values() for p in s["points"]):
        phase_control_plot(run_dir / "phase_control.png", summary)
        files.append("phase_control.png")
    return files


def phase_control_plot(path: Path, summary: dict) -> None:
    """Each SLO-controlled system's level over the sweep's points, laid end to end (0: the
    prefill's largest share; higher: decode's), each point's rate at its start."""
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, system in summary["systems"].items():
        t0, xs, ys = 0.0, [], []
        for point in system["points"]:
            control = point.get("phase_control")
            if control is None:
                continue
            xs.append(t0)
            ys.append(control["start_level"])
            for step in control["steps"]:
                xs.append(t0 + step["time_s"])
                ys.append(step["level"])
            ax.axvline(t0, color="gray", linewidth=0.5)
            ax.annotate(f"{point['rate']:g}/s", (t0, 0), fontsize=8, color="gray")
            t0 += point["duration"]
        if xs:
            xs.append(t0)
            ys.append(ys[-1])
            ax.step(xs, ys, where="post", label=name, color=plot_color(name))
    ax.set_xlabel("seconds of measured load (the points end to end)")
    ax.set_ylabel("level (0: prefill's largest share)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save(fig, path, "Phase control: its level over the sweep")
