"""``splitwiser profile``: a short representative workload under Nsight Compute (or Nsight
Systems), one report per phase, a CSV export and a per-phase summary."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from splitwiser import mps
from splitwiser.errors import ConfigError, SplitwiserError
from splitwiser.profiling import ncu as ncu_lib


class ProfilerError(SplitwiserError):
    """No GPU, no profiler on PATH, or the profiler's run failed."""


# Nsight Compute's release notes list profiling with MPS enabled as not supported
NCU_UNDER_MPS = "Nsight Compute does not support profiling under MPS (a documented limitation)"


@dataclass(frozen=True)
class ProfileConfig:
    phase: str = "both"  # prompt, token or both
    model: str | None = None
    dtype: str | None = None
    mps: str = "off"
    num_requests: int = 8
    prompt_len: int = 512
    output_len: int = 16
    kernels: int = 300  # kernels profiled per phase
    metrics: str = "default"  # default, full, or a comma list of metric names
    tool: str = "ncu"  # ncu or nsys
    out: str | None = None  # None: results/profile/<date>-<time>-<phase>

    def __post_init__(self) -> None:
        if self.phase not in (*ncu_lib.PHASES, "both"):
            raise ConfigError(f"--phase must be prompt, token or both, got {self.phase!r}")
        if self.tool not in ("ncu", "nsys"):
            raise ConfigError(f"--tool must be ncu or nsys, got {self.tool!r}")
        for name in ("num_requests", "prompt_len", "output_len", "kernels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value!r}")
        if not self.metrics.strip():
            raise ConfigError("--metrics is default, full, or a comma list of metric names")

    @property
    def phases(self) -> tuple[str, ...]:
        return ncu_lib.PHASES if self.phase == "both" else (self.phase,)


# where NVIDIA's installers put the tools when they are not on PATH; the newest version first
_INSTALL_GLOBS = {
    "ncu": ("/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda*/bin/ncu",
            "/usr/local/cuda*/nsight-compute*/ncu"),
    "nsys": ("/opt/nvidia/nsight-systems/*/bin/nsys", "/usr/local/cuda*/bin/nsys"),
}  # fmt: skip


def _version_key(path: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", path)]


def find_tool(tool: str) -> str:
    """The profiler's path, after checking there is a GPU to profile: ``$SPLITWISER_<TOOL>``,
    then PATH, then the installers' default locations."""
    if not mps.gpu_present():
        raise ProfilerError("splitwiser profile needs an NVIDIA GPU and its driver; none was found")
    override = os.environ.get(f"SPLITWISER_{tool.upper()}")
    if override:
        if not os.access(override, os.X_OK):
            raise ProfilerError(f"SPLITWISER_{tool.upper()}={override} is not an executable")
        return override
    path = shutil.which(tool)
    if path is None:
        found = [p for pattern in _INSTALL_GLOBS[tool] for p in glob.glob(pattern)
                 if os.access(p, os.X_OK)]  # fmt: skip
        path = max(found, key=_version_key) if found else None
    if path is None:
        product = "Nsight Compute" if tool == "ncu" else "Nsight Systems"
        raise ProfilerError(
            f"{tool} ({product}) was not found on PATH nor under /opt/nvidia or /usr/local/cuda; "
            f"install it, add it to PATH, or set SPLITWISER_{tool.upper()}"
        )
    return path


def tool_version(path: str) -> str | None:
    """``ncu --version`` / ``nsys --version``: the version number, for the summary."""
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"(\d{4}\.\d+(?:\.\d+)*)", proc.stdout)
    return found.group(1) if found else None


def target_command(config: ProfileConfig, workers_out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "splitwiser.profiling.target",
           "--num-requests", str(config.num_requests), "--prompt-len", str(config.prompt_len),
           "--output-len", str(config.output_len), "--workers-out", str(workers_out)]  # fmt: skip
    if config.model:
        cmd += ["--model", config.model]
    if config.dtype:
        cmd += ["--dtype", config.dtype]
    return cmd


def _run(cmd: list[str], log: Path, hint: str = "", env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ProfilerError(
            f"{Path(cmd[0]).name} failed (exit {proc.returncode}): {tail[0]} (log: {log}){hint}"
        )
    return proc.stdout


def _mps_mode(config: ProfileConfig) -> tuple[str, list[str]]:
    """The MPS mode to run in, and warnings for the summary. ``auto`` leaves MPS off under ncu,
    which cannot profile it; ``on`` tries, and says why a failure may follow."""
    if config.tool != "ncu" or config.mps == "off":
        return config.mps, []
    if config.mps == "auto":
        return "off", [f"MPS not used: {NCU_UNDER_MPS}"]
    return "on", [f"{NCU_UNDER_MPS}; the figures under MPS may be missing or unreliable"]


def run_profile(config: ProfileConfig, command: str | None = None) -> tuple[Path, dict]:
    """Profile each phase; returns the output folder and the summary written there."""
    tool = find_tool(config.tool)
    out = Path(config.out or f"results/profile/{time.strftime('%Y%m%d-%H%M%S')}-{config.phase}")
    out.mkdir(parents=True, exist_ok=True)
    mps_mode, warnings = _mps_mode(config)
    summary: dict = {
        "command": command,
        "config": vars(config).copy(),
        "tool": {"name": config.tool, "path": tool, "version": tool_version(tool)},
        "warnings": warnings,
        "phases": {},
    }
    with mps.session(mps_mode, "cuda") as (daemon, mps_state):
        summary["mps"] = mps_state
        # the profiled target and its workers join the daemon; this process never does
        env = os.environ | daemon.env() if daemon is not None else None
        if mps_mode != config.mps:
            mps_state |= {"requested": config.mps, "reason": f"not used: {NCU_UNDER_MPS}"}
        ncu_hint = f"; {NCU_UNDER_MPS}: try --no-mps" if mps_state["active"] else ""
        if config.tool == "nsys":
            target = target_command(config, out / "workers.json")
            _run(ncu_lib.nsys_command(tool, str(out / "timeline"), target), out / "nsys.log",
                 env=env)  # fmt: skip
            summary["report"] = "timeline.nsys-rep"
        for phase in config.phases if config.tool == "ncu" else ():
            workers = out / f"workers-{phase}.json"
            report = out / f"profile-{phase}.ncu-rep"
            cmd = ncu_lib.ncu_command(
                tool, phase, str(report), config.kernels, config.metrics,
                target_command(config, workers),
            )  # fmt: skip
            _run(cmd, out / f"ncu-{phase}.log", ncu_hint, env)
            csv_text = _run(ncu_lib.export_command(tool, str(report)), out / f"export-{phase}.log")
            (out / f"profile-{phase}.csv").write_text(csv_text)
            roles = {int(pid): role for pid, role in json.loads(workers.read_text()).items()}
            rows = [r for r in ncu_lib.parse_raw_csv(csv_text) if roles.get(r.pid) == phase]
            summary["phases"][phase] = ncu_lib.summarize(rows) | {
                "report": report.name,
                "csv": f"profile-{phase}.csv",
            }
            if not rows:
                log = f"ncu-{phase}.log"
                warnings.append(f"no kernel of the {phase} phase was profiled (see {log})")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out, summary


def summary_table(summary: dict) -> str:
    cols = (
        ("kernels", "num_kernels", "{:.0f}"),
        ("time ms", "duration_ms", "{:.2f}"),
        ("SM %", "sm_throughput_pct", "{:.1f}"),
        ("DRAM %", "dram_throughput_pct", "{:.1f}"),
        ("occupancy %", "achieved_occupancy_pct", "{:.1f}"),
        ("DRAM read MB", "dram_bytes_read", "{:.1f}"),
        ("DRAM write MB", "dram_bytes_write", "{:.1f}"),
        ("DRAM GB/s", "dram_gb_s", "{:.0f}"),
    )
    lines = ["phase   " + "".join(f"{c:>14}" for c, _, _ in cols)]
    for phase, s in summary["phases"].items():
        cells = []
        for _, key, fmt in cols:
            v = s.get(key)
            v = v / 1e6 if key.startswith("dram_bytes") and v is not None else v
            cells.append(f"{'-' if v is None else fmt.format(v):>14}")
        lines.append(f"{phase:<8}" + "".join(cells))
        for k in s["top_kernels"][:3]:
            lines.append(f"  {k['share'] or 0:6.1%}  {k['name'][:80]}")
    return "\n".join(lines)
