"""The figures of a load sweep, as pure functions of what the systems recorded.

- SLO attainment: the share of a point's requests that met every SLO at once (a failed request
  meets none).
- Goodput (DistServe): the highest request rate at which attainment is still >= the target
  (90%), interpolated linearly between the measured rates.
- Decode step times and interference, from a pipeline's phase log (``pipe.phase_log``): for the
  split, a decode step "during prefill" overlaps in time a prefill batch of any prompt worker;
  for the colocated engine, it is a mixed step (prefill chunks in the same forward).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from splitwiser.benchmark.metrics import RequestRecord, meets_slo

ATTAINMENT_TARGET = 0.9  # DistServe's: 90% of requests within every SLO


def slo_attainment(records: Sequence[RequestRecord], slo: dict[str, float]) -> float:
    """The share of ``records`` that completed and met every SLO of ``slo`` at once."""
    if not records:
        return 0.0
    return sum(r.ok and meets_slo(r, slo) for r in records) / len(records)


def goodput_rps(
    rates: Sequence[float], attainments: Sequence[float], target: float = ATTAINMENT_TARGET
) -> dict:
    """``goodput_rps``: the highest rate whose attainment is >= ``target``, moved towards the
    next measured rate by linear interpolation of the attainment between the two; ``None`` when
    no rate meets it. ``highest_rate_met``: the highest rate measured met it, so the goodput is
    at least that rate (the sweep stopped short of the limit)."""
    if len(rates) != len(attainments) or list(rates) != sorted(set(rates)):
        raise ValueError("rates must be increasing, one attainment each")
    met = [i for i, a in enumerate(attainments) if a >= target]
    if not met:
        return {"goodput_rps": None, "highest_rate_met": False}
    i = met[-1]
    if i == len(rates) - 1:
        return {"goodput_rps": float(rates[i]), "highest_rate_met": True}
    (r0, a0), (r1, a1) = (rates[i], attainments[i]), (rates[i + 1], attainments[i + 1])
    return {"goodput_rps": r0 + (a0 - target) / (a0 - a1) * (r1 - r0), "highest_rate_met": False}


def _stats(durations_s: list[float]) -> dict:
    if not durations_s:
        return {"num_steps": 0, "median_ms": None, "mean_ms": None, "p99_ms": None}
    ms = np.asarray(durations_s) * 1e3
    return {"num_steps": len(ms), "median_ms": float(np.median(ms)),
            "mean_ms": float(ms.mean()), "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def _duration(step) -> float:
    return step.end_s - step.start_s


def decode_steps(log: Sequence, colocated: bool) -> list:
    """The steps that advance running requests: decode steps (colocated: and mixed steps)."""
    kinds = ("decode", "mixed") if colocated else ("decode",)
    return [s for s in log if s.kind in kinds]


def decode_step_stats(log: Sequence, colocated: bool) -> dict:
    """``median_``, ``mean_`` and ``p99_decode_step_ms`` over ``decode_steps``."""
    stats = _stats([_duration(s) for s in decode_steps(log, colocated)])
    return {"num_decode_steps": stats["num_steps"]} | {
        f"{k.removesuffix('_ms')}_decode_step_ms": stats[k]
        for k in ("median_ms", "mean_ms", "p99_ms")
    }


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping intervals joined; sorted, disjoint (so their ends increase too)."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def overlaps_prefill(log: Sequence) -> list[tuple[object, bool]]:
    """Each decode step of a split pipeline's log, and whether a prefill batch ran during it
    (their open intervals intersect)."""
    busy = _merged([(s.start_s, s.end_s) for s in log if s.kind == "prefill"])
    starts = [start for start, _ in busy]
    out = []
    for step in decode_steps(log, colocated=False):
        # the last prefill interval starting before this step ends has the latest end of those
        i = bisect.bisect_left(starts, step.end_s) - 1
        out.append((step, i >= 0 and busy[i][1] > step.start_s))
    return out


def interference(log: Sequence, colocated: bool) -> dict:
    """Decode step times during prefill against without it: the split's decode steps that
    overlap a prefill batch against the others; the colocated engine's mixed steps against
    its decode-only steps. ``mean_ratio``: during / without (> 1: prefill slows decode)."""
    if colocated:
        during = [_duration(s) for s in log if s.kind == "mixed"]
        without = [_duration(s) for s in log if s.kind == "decode"]
        basis = "mixed steps (prefill chunks with the decodes) vs decode-only steps"
    else:
        split = overlaps_prefill(log)
        during = [_duration(s) for s, overlapped in split if overlapped]
        without = [_duration(s) for s, overlapped in split if not overlapped]
        basis = "decode steps overlapping a prefill batch in time vs the others"
    d, w = _stats(during), _stats(without)
    ratio = d["mean_ms"] / w["mean_ms"] if d["mean_ms"] and w["mean_ms"] else None
    return {"basis": basis, "during_prefill": d, "without_prefill": w, "mean_ratio": ratio}
