"""Keeping the worker pool whole: notice a worker that died, hung, or never got ready, and
replace it within a restart rate. Runs on the engine thread; the engine decides what happens to
the requests a lost worker held."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from splitwiser.config import EngineConfig
from splitwiser.roles import workers_per_role
from splitwiser.runtime.procs import WorkerProc

log = logging.getLogger("splitwiser")


@dataclass
class LostWorker:
    worker: WorkerProc
    reason: str  # "died (exit code -9)", "hung: ...", "not ready after ..."


class Supervisor:
    """The workers by (role, index), and the restarts each role may still make.

    Restarts are a rate: at most ``max_worker_restarts`` per role within any
    ``worker_restart_window_s``. A slot whose restart the rate refuses stays vacant and is filled
    once the window allows; a role with every slot vacant has stopped (a crash loop), which the
    engine turns into a fatal error. ``clock`` (seconds) times the restarts against that window.
    """

    def __init__(
        self,
        config: EngineConfig,
        spawn: Callable[[str, int], WorkerProc],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self._spawn = spawn
        self._clock = clock
        self.workers: dict[tuple[str, int], WorkerProc] = {}
        self.vacant: set[tuple[str, int]] = set()
        self.num_configured = workers_per_role(config)
        self.restarts = dict.fromkeys(self.num_configured, 0)  # over the pipeline's life
        self._recent: dict[str, deque[float]] = {r: deque() for r in self.num_configured}

    def start_all(self) -> None:
        for role, num in self.num_configured.items():
            for index in range(num):
                self.workers[(role, index)] = self._spawn(role, index)

    def ready(self, role: str) -> dict[int, WorkerProc]:
        return {i: w for (r, i), w in self.workers.items() if r == role and w.ready is not None}

    # ------------------------------------------------------------------ losses

    def find_lost(self, busy: set[tuple[str, int]]) -> list[LostWorker]:
        """Workers that died, hung with work outstanding (``busy``: the keys of the workers
        that own requests), or never became ready; the last two are killed here, so every lost
        worker is dead when this returns."""
        lost = []
        start_s = self.config.worker_start_timeout_s
        live_s = self.config.worker_liveness_timeout_s
        for key, w in list(self.workers.items()):
            if w.ready is None and w.age_s() > start_s:
                w.kill()
                lost.append(LostWorker(w, f"was not ready after {start_s:.0f} s; killed"))
            elif w.ready is not None and key in busy and live_s and w.silent_s() > live_s:
                silent = w.silent_s()
                w.kill()
                lost.append(
                    LostWorker(
                        w, f"hung: sent nothing for {silent:.0f} s with work outstanding; killed"
                    )
                )
            elif not w.is_alive():
                lost.append(LostWorker(w, f"died (exit code {w.process.exitcode})"))
        return lost

    def remove(self, worker: WorkerProc) -> None:
        """Release a dead worker's process and channels; its slot waits for ``replace``."""
        key = (worker.cfg.role, worker.cfg.index)
        if self.workers.get(key) is worker:
            del self.workers[key]
        worker.stop(0.0)

    # ------------------------------------------------------------------ restarts

    def replace(self, role: str, index: int) -> None:
        self.vacant.add((role, index))
        self.refill()

    def refill(self) -> None:
        """Restart vacant slots as far as the rate allows."""
        for role, index in sorted(self.vacant):
            if not self._may_restart(role):
                continue
            self.vacant.discard((role, index))
            self._recent[role].append(self._clock())
            self.restarts[role] += 1
            self.workers[(role, index)] = self._spawn(role, index)  # ready at its ReadyMsg

    def _may_restart(self, role: str) -> bool:
        recent = self._recent[role]
        horizon = self._clock() - self.config.worker_restart_window_s
        while recent and recent[0] < horizon:
            recent.popleft()
        return len(recent) < self.config.max_worker_restarts

    def stopped_role(self) -> str | None:
        """A role none of whose workers is running or starting, and none may restart yet."""
        for role in self.num_configured:
            if not any(r == role for r, _ in self.workers):
                return role
        return None

    # ------------------------------------------------------------------ reporting

    def health(self) -> dict:
        """Per role: workers configured, ready, starting, vacant (a restart waits for the rate);
        restarts over the pipeline's life and within the current window."""
        out = {}
        for role in self.num_configured:
            mine = [w for (r, _), w in self.workers.items() if r == role]
            self._may_restart(role)  # drops restarts older than the window
            out[role] = {
                "configured": self.num_configured[role],
                "ready": sum(w.ready is not None for w in mine),
                "starting": sum(w.ready is None for w in mine),
                "vacant": sum(r == role for r, _ in self.vacant),
                "restarts": self.restarts[role],
                "restarts_in_window": len(self._recent[role]),
            }
        return out

    def stop_all(self, timeout_s: float) -> None:
        for worker in self.workers.values():
            worker.stop(timeout_s)
        self.workers.clear()
        self.vacant.clear()
