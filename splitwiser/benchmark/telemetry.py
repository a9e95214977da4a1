"""Telemetry sampled in a background thread while a system runs.

- GPU (NVML, when the run is on CUDA and a driver answers): utilisation, memory used, power, and
  the energy counter (joules per output token); SM utilisation and occupancy from GPM on Hopper
  and later. Without a GPU or a driver the GPU part is ``None`` with the reason.
- Processes (psutil): this process and its Splitwiser workers (``sw-*``): CPU % and RSS at every
  sample; USS and PSS (shared pages such as the weights and the KV pool split among the
  processes mapping them, so PSS adds up across processes where RSS counts shared pages once per
  process) every ``memory_interval_s`` and at the first and last samples.

Reading USS and PSS makes the kernel walk the process's page tables (``/proc/PID/smaps_rollup``):
measured on the 2-core CPU machine, 14-17 ms per worker and 30 ms for a pipeline's parent (it
maps the KV pool), against 0.1 ms for CPU % and RSS. At every 0.25 s sample that took about a
third of a core from the system being measured, and more from the systems with more processes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

MIB = 1 << 20


class _NVML:
    """One device through NVML; every reading degrades to ``None`` where unsupported."""

    def __init__(self, device: torch.device):
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(
                uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
            )
        except (AttributeError, pynvml.NVMLError):
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.name = pynvml.nvmlDeviceGetName(self.handle)
        self.driver = pynvml.nvmlSystemGetDriverVersion()
        self._gpm_prev = None
        try:
            self.gpm = bool(pynvml.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice)
        except (pynvml.NVMLError, AttributeError):
            self.gpm = False

    def _try(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except self.nv.NVMLError:
            return None

    def energy_mj(self) -> int | None:
        return self._try(self.nv.nvmlDeviceGetTotalEnergyConsumption)

    def _gpm(self) -> dict:
        """SM utilisation and occupancy (%) between this sample and the previous one."""
        nv = self.nv
        try:
            sample = nv.nvmlGpmSampleAlloc()
            nv.nvmlGpmSampleGet(self.handle, sample)
        except nv.NVMLError:
            self.gpm = False
            return {}
        prev, self._gpm_prev = self._gpm_prev, sample
        if prev is None:
            return {}
        ids = {"sm_util_percent": nv.NVML_GPM_METRIC_SM_UTIL}
        ids["sm_occupancy_percent"] = nv.NVML_GPM_METRIC_SM_OCCUPANCY
        ids["dram_bw_util_percent"] = nv.NVML_GPM_METRIC_DRAM_BW_UTIL
        req = nv.c_nvmlGpmMetricsGet_t()
        req.version = nv.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = len(ids)
        req.sample1, req.sample2 = prev, sample
        for i, metric_id in enumerate(ids.values()):
            req.metrics[i].metricId = metric_id
        try:
            nv.nvmlGpmMetricsGet(req)
        except nv.NVMLError:
            return {}
        finally:
            nv.nvmlGpmSampleFree(prev)
        return {name: req.metrics[i].value for i, name in enumerate(ids)}

    def sample(self) -> dict:
        util = self._try(self.nv.nvmlDeviceGetUtilizationRates)
        mem = self._try(self.nv.nvmlDeviceGetMemoryInfo)
        power = self._try(self.nv.nvmlDeviceGetPowerUsage)
        row = {
            "gpu_util_percent": None if util is None else util.gpu,
            "gpu_memory_used_mib": None if mem is None else mem.used / MIB,
            "gpu_power_w": None if power is None else power / 1e3,
        }
        if self.gpm:
            row |= self._gpm()
        return row

    def close(self) -> None:
        if self._gpm_prev is not None:
            self.nv.nvmlGpmSampleFree(self._gpm_prev)
        self.nv.nvmlShutdown()


def open_gpu(device: torch.device) -> tuple[_NVML | None, str | None]:
    """An NVML reader for ``device``, or ``None`` and why not."""
    if device.type != "cuda":
        return None, f"no GPU telemetry on device {device.type}"
    try:
        return _NVML(device), None
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"NVML unavailable: {type(exc).__name__}: {exc}"


@dataclass
class TelemetryLog:
    samples: list[dict] = field(default_factory=list)  # one row per process per tick
    gpu_samples: list[dict] = field(default_factory=list)  # one row per tick
    gpu_name: str | None = None
    gpu_unavailable: str | None = None
    energy_j: float | None = None

    def summary(self, output_tokens: int) -> dict:
        procs: dict[str, dict] = {}
        for row in self.samples:
            p = procs.setdefault(row["process"], {"cpu": [], "rss": [], "uss": []})
            p["cpu"].append(row["cpu_percent"])
            p["rss"].append(row["rss_mib"])
            if row["uss_mib"] is not None:
                p["uss"].append(row["uss_mib"])
        totals: dict[float, float] = {}
        for row in self.samples:
            if row["pss_mib"] is not None:  # the samples that read it
                totals[row["time_s"]] = totals.get(row["time_s"], 0.0) + row["pss_mib"]
        out: dict = {
            "max_total_pss_mib": max(totals.values()) if totals else None,
            "processes": {
                name: {
                    "mean_cpu_percent": sum(p["cpu"]) / len(p["cpu"]),
                    "max_rss_mib": max(p["rss"]),
                    "max_uss_mib": max(p["uss"]) if p["uss"] else None,
                }
                for name, p in procs.items()
            },
        }
        if self.gpu_unavailable:
            out["gpu"] = None
            out["gpu_unavailable"] = self.gpu_unavailable
            return out
        gpu: dict = {"name": self.gpu_name, "energy_j": self.energy_j}
        for key in ("gpu_util_percent", "sm_util_percent", "sm_occupancy_percent",
                    "dram_bw_util_percent", "gpu_power_w"):  # fmt: skip
            vals = [s[key] for s in self.gpu_samples if s.get(key) is not None]
            gpu[f"mean_{key}"] = sum(vals) / len(vals) if vals else None
        mem = [s["gpu_memory_used_mib"] for s in self.gpu_samples if s["gpu_memory_used_mib"]]
        gpu["max_gpu_memory_used_mib"] = max(mem) if mem else None
        if self.energy_j is not None and output_tokens:
            gpu["joules_per_output_token"] = self.energy_j / output_tokens
        out["gpu"] = gpu
        return out


class TelemetrySampler:
    """``with TelemetrySampler(device) as log:`` samples every ``interval_s`` until the end."""

    def __init__(
        self, device: torch.device, interval_s: float = 0.25, memory_interval_s: float = 5.0
    ):
        self.device = device
        self.interval_s = interval_s
        self.memory_interval_s = memory_interval_s
        self.log = TelemetryLog()
        self._stop = threading.Event()
        self._procs: dict[int, psutil.Process] = {}
        self._me = psutil.Process(os.getpid())

    def _processes(self) -> list[tuple[str, psutil.Process]]:
        found = [("driver", self._me)]
        for child in self._me.children(recursive=True):
            try:
                name = child.name()
            except psutil.Error:
                continue
            if name.startswith("sw-"):
                found.append((name, child))
        live = []
        for name, proc in found:
            # NOTE: keep one Process object per pid: cpu_percent() measures since its last call
            proc = self._procs.setdefault(proc.pid, proc)
            live.append((name, proc))
        return live

    def _tick(self, t0: float, gpu: _NVML | None, full_memory: bool) -> None:
        """One sample; ``full_memory``: USS and PSS too (see the module's note on their cost)."""
        now = time.monotonic() - t0
        for name, proc in self._processes():
            try:
                with proc.oneshot():
                    cpu = proc.cpu_percent(None)
                    mem, uss, pss = proc.memory_info(), None, None
                    if full_memory:
                        try:
                            full = proc.memory_full_info()
                            uss, pss = full.uss / MIB, getattr(full, "pss", 0) / MIB or None
                        except psutil.AccessDenied:
                            pass
            except psutil.Error:
                continue
            self.log.samples.append(
                {"time_s": now, "process": name, "cpu_percent": cpu,
                 "rss_mib": mem.rss / MIB, "uss_mib": uss, "pss_mib": pss}
            )  # fmt: skip
        if gpu is not None:
            self.log.gpu_samples.append({"time_s": now, **gpu.sample()})

    def _run(self, gpu: _NVML | None) -> None:
        t0 = last_full = time.monotonic()
        energy0 = gpu.energy_mj() if gpu else None
        self._tick(t0, gpu, full_memory=True)
        while not self._stop.wait(self.interval_s):
            full = time.monotonic() - last_full >= self.memory_interval_s
            if full:
                last_full = time.monotonic()
            self._tick(t0, gpu, full_memory=full)
        self._tick(t0, gpu, full_memory=True)
        if gpu is not None:
            energy1 = gpu.energy_mj()
            if energy0 is not None and energy1 is not None:
                self.log.energy_j = (energy1 - energy0) / 1e3
            else:  # integrate the power samples instead
                pts = [(s["time_s"], s["gpu_power_w"]) for s in self.log.gpu_samples
                       if s["gpu_power_w"] is not None]  # fmt: skip
                self.log.energy_j = (
                    sum((t1 - t0_) * (p0 + p1) / 2 for (t0_, p0), (t1, p1) in zip(pts, pts[1:]))
                    or None
                )
            gpu.close()

    def __enter__(self) -> TelemetryLog:
        gpu, reason = open_gpu(self.device)
        self.log.gpu_unavailable = reason
        self.log.gpu_name = gpu.name if gpu else None
        self._thread = threading.Thread(target=self._run, args=(gpu,), daemon=True)
        self._thread.start()
        return self.log

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
