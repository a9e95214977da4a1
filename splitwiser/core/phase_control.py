"""SLO-aware phase control: once per window, move the prompt workers' share of the machine toward
the phase whose latency SLO is missed.

The split's two phases contend for the same device: on the CPU for the same cores (the token
workers yield to the prompt workers under the default ``phase_priority``), on a GPU for the same
SMs. What a decode step waits for is the prefill work running beside it: how many prompt
workers run a batch at once, and how many tokens one batch holds (vLLM's token budget bounds
the same wait within one engine's steps). Both are the parent's to decide at every scheduling
tick, so a change takes effect at the next prefill batch, with no worker restarted.

The actuators form one ladder, from the prefill's largest share (level 0: every prompt worker
busy, the configured budget) to decode's largest (one prompt worker at a time, small budgets).
Each window with enough observations compares the p90 TTFT and TPOT of that window with their
SLOs and takes one step: toward decode when TPOT misses its SLO by clearly more than TTFT does,
toward prefill in the opposite case, nowhere otherwise (both met, or both missed alike: the
machine is short of capacity, and moving would trade one miss for another). The margin is
the hysteresis: a step that overshoots shows as the other phase missing by more, not at once
as a step back. Every step is logged with its reason.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

MIN_BUDGET = 256  # prefill tokens per batch at the decode end of the ladder
MARGIN = 1.25  # a phase must miss its SLO by this factor more than the other for a step
MIN_OBSERVATIONS = 8  # TTFTs and TPOTs in a window before it is judged (else it goes on)
DECISION_LOG_LEN = 256


@dataclass(frozen=True)
class Level:
    prefill_concurrency: int  # prompt workers running a batch at once
    max_prefill_tokens: int  # tokens of one prefill batch (longer prompts go in chunks)


@dataclass(frozen=True)
class PhaseDecision:
    """One step of the controller: when (``time.monotonic()``), to what, and why."""

    time_s: float
    level: int
    prefill_concurrency: int
    max_prefill_tokens: int
    why: str

    def as_dict(self) -> dict:
        return {
            "time_s": self.time_s, "level": self.level,
            "prefill_concurrency": self.prefill_concurrency,
            "max_prefill_tokens": self.max_prefill_tokens, "why": self.why,
        }  # fmt: skip


def ladder(num_prompt_workers: int, max_prefill_tokens: int) -> list[Level]:
    """Level 0 is the static configuration; each next level gives decode more: first fewer
    prompt workers at once, then budgets halved down to ``MIN_BUDGET``."""
    levels = [Level(c, max_prefill_tokens) for c in range(num_prompt_workers, 0, -1)]
    budget = max_prefill_tokens // 2
    while budget >= MIN_BUDGET:
        levels.append(Level(1, budget))
        budget //= 2
    return levels


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


class SloPhaseController:
    """``observe_ttft`` / ``observe_tpot`` as requests produce them; ``tick(now)`` once per
    scheduling pass returns the new ``Level`` when it took a step (else None). SLOs in seconds;
    None: that phase has no SLO (never missed)."""

    def __init__(
        self,
        ttft_slo_s: float | None,
        tpot_slo_s: float | None,
        levels: list[Level],
        window_s: float,
        now: float,
    ):
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        self.levels = levels
        self.window_s = window_s
        self.level = 0
        self.window_start = now
        self.ttfts: list[float] = []
        self.tpots: list[float] = []
        self.decisions: deque[PhaseDecision] = deque(maxlen=DECISION_LOG_LEN)

    @property
    def current(self) -> Level:
        return self.levels[self.level]

    def set_slo(self, ttft_slo_s: float | None, tpot_slo_s: float | None) -> None:
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s

    def observe_ttft(self, ttft_s: float) -> None:
        self.ttfts.append(ttft_s)

    def observe_tpot(self, tpot_s: float) -> None:
        self.tpots.append(tpot_s)

    def _ratio(self, values: list[float], slo_s: float | None) -> float | None:
        """The window's p90 over the SLO (0 without an SLO); None: too few observations."""
        if slo_s is None:
            return 0.0
        if len(values) < MIN_OBSERVATIONS:
            return None
        return _p90(values) / slo_s

    def tick(self, now: float) -> Level | None:
        if now - self.window_start < self.window_s:
            return None
        ttft_r = self._ratio(self.ttfts, self.ttft_slo_s)
        tpot_r = self._ratio(self.tpots, self.tpot_slo_s)
        if ttft_r is None or tpot_r is None:
            return None  # too few of either to compare them: the window goes on
        self.window_start = now
        self.ttfts, self.tpots = [], []
        step = 0
        if tpot_r > 1 and tpot_r > MARGIN * ttft_r and self.level < len(self.levels) - 1:
            step = 1
        elif ttft_r > 1 and ttft_r > MARGIN * tpot_r and self.level > 0:
            step = -1
        if not step:
            return None
        self.level += step
        level = self.current
        toward = "decode" if step > 0 else "prefill"
        why = (
            f"toward {toward}: p90 TTFT at {ttft_r:.2f}x its SLO, p90 TPOT at {tpot_r:.2f}x "
            f"(a step needs one over 1 and {MARGIN:g}x the other)"
        )
        self.decisions.append(
            PhaseDecision(
                now, self.level, level.prefill_concurrency, level.max_prefill_tokens, why
            )  # fmt: skip
        )
        return level

    def snapshot(self) -> dict:
        level = self.current
        return {
            "mode": "slo", "level": self.level, "num_levels": len(self.levels),
            "prefill_concurrency": level.prefill_concurrency,
            "max_prefill_tokens": level.max_prefill_tokens,
            "ttft_slo_ms": None if self.ttft_slo_s is None else self.ttft_slo_s * 1e3,
            "tpot_slo_ms": None if self.tpot_slo_s is None else self.tpot_slo_s * 1e3,
            "decisions": [d.as_dict() for d in self.decisions],
        }  # fmt: skip
