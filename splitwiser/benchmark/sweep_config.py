"""The configuration of one ``splitwiser sweep`` run and the parsing of its lists, validated
before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitwiser.benchmark.config import BenchConfig
from splitwiser.benchmark.goodput import ATTAINMENT_TARGET
from splitwiser.benchmark.metrics import SLO_KEYS, parse_slo
from splitwiser.errors import ConfigError
from splitwiser.mps import parse_split
from splitwiser.systems import SPLITWISER


def parse_rates(text: str) -> tuple[float, ...]:
    """``"1,2,4"`` -> ``(1.0, 2.0, 4.0)``: each a positive, finite number of requests/s."""
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise ConfigError("--rate needs at least one rate in requests/s, e.g. --rate 1,2,4")
    rates = []
    for part in parts:
        try:
            rate = float(part)
        except ValueError:
            raise ConfigError(
                f"bad --rate value {part!r}; give requests per second, e.g. --rate 1,2,4"
            ) from None
        if not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(f"--rate values must be positive and finite, got {part}")
        rates.append(rate)
    return tuple(rates)


def parse_sweep_slo(text: str | None) -> tuple[dict[str, float], dict[str, float]]:
    """``"ttft_ms=500,tpot_ms=4x"`` -> the SLOs in milliseconds (``{"ttft_ms": 500.0}``) and
    those given as multiples of the single-request latency measured in the run
    (``{"tpot_ms": 4.0}``)."""
    absolute, multiples = [], {}
    for part in (text or "").split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not (sep and key in SLO_KEYS and value.lower().endswith("x")):
            absolute.append(part)  # parse_slo says what is wrong with it
            continue
        try:
            factor = float(value[:-1])
        except ValueError:
            factor = math.nan
        if not (factor > 0 and math.isfinite(factor)):
            raise ConfigError(f"bad --slo multiple {value!r} for {key}; give e.g. {key}=5x")
        multiples[key] = factor
    slo = parse_slo(",".join(absolute)) if any(p.strip() for p in absolute) else {}
    for key in slo.keys() & multiples.keys():
        raise ConfigError(f"--slo gives {key} twice")
    return slo, multiples


def parse_splits(texts) -> tuple[tuple[int, int], ...]:
    """Each ``--mps-split P,T`` given."""
    return tuple(parse_split(t) for t in texts)


def split_name(split: tuple[int, int]) -> str:
    """The MPS-split Splitwiser system's name in the results: ``splitwiser-mps-70-30``."""
    return f"{SPLITWISER}-mps-{split[0]}-{split[1]}"


@dataclass(frozen=True)
class SweepConfig:
    """One sweep: the systems, workload and SLOs of ``bench`` (its ``rate``, ``trace_speedup``
    and ``mps_split`` unused), replayed at each rate of ``rates``."""

    bench: BenchConfig
    rates: tuple[float, ...]  # offered loads, requests/s, increasing
    # one more Splitwiser system per split: MPS active thread percentages (prompt, token)
    mps_splits: tuple[tuple[int, int], ...] = ()
    # SLOs as multiples of the single-request latency of the reference system (colocated if it
    # runs, else splitwiser) measured in the run; bench.slo holds those given in milliseconds
    slo_multiples: dict[str, float] = field(default_factory=dict)
    attainment_target: float = ATTAINMENT_TARGET

    def __post_init__(self) -> None:
        bench = self.bench
        if not self.rates:
            raise ConfigError("--rate needs at least one rate in requests/s, e.g. --rate 1,2,4")
        for rate in self.rates:
            if not (isinstance(rate, (int, float)) and rate > 0 and math.isfinite(rate)):
                raise ConfigError(f"--rate values must be positive and finite, got {rate!r}")
        for prev, rate in zip(self.rates, self.rates[1:]):
            if rate == prev:
                raise ConfigError(f"--rate lists {rate:g} twice; give each rate once")
            if rate < prev:
                raise ConfigError(
                    f"--rate must list rates in increasing order ({rate:g} after {prev:g})"
                )
        if bench.rate is not None or bench.trace_speedup is not None:
            raise ConfigError("a sweep sets the arrival rates: give them as --rate r1,r2,...")
        if bench.mps_split is not None:
            raise ConfigError("a sweep takes MPS splits in mps_splits (--mps-split, repeatable)")
        if not (bench.slo or self.slo_multiples):
            raise ConfigError(
                "--slo is required: goodput counts the requests meeting every SLO, e.g. "
                "--slo ttft_ms=500,tpot_ms=50 (or multiples of the unloaded latency: ttft_ms=5x)"
            )
        unknown = set(self.slo_multiples) - set(SLO_KEYS)
        if unknown or set(self.slo_multiples) & set(bench.slo):
            raise ConfigError(f"bad --slo multiples {self.slo_multiples}")
        if self.mps_splits and bench.mps == "off":
            raise ConfigError("--mps-split needs MPS; drop --no-mps or --mps-split")
        if len(set(self.mps_splits)) < len(self.mps_splits):
            raise ConfigError("--mps-split lists one split twice")
        if len(set(bench.baselines)) < len(bench.baselines):
            raise ConfigError("--baseline lists one system twice")
        if "tpot_ms" in self.slo_multiples and bench.workload == "fixed" and bench.output_len < 2:
            raise ConfigError("--slo tpot_ms=..x needs --output-len >= 2 (TPOT of one request)")
        if not 0 < self.attainment_target <= 1:
            raise ConfigError(
                f"the attainment target is a share in (0, 1], got {self.attainment_target}"
            )

    @property
    def systems(self) -> dict[str, tuple[str, BenchConfig]]:
        """Each system's name in the results -> the system to build and its configuration."""
        from dataclasses import replace

        systems = {SPLITWISER: (SPLITWISER, self.bench)}
        for split in self.mps_splits:
            systems[split_name(split)] = (SPLITWISER, replace(self.bench, mps_split=split))
        return systems | {name: (name, self.bench) for name in self.bench.baselines}

    def to_dict(self) -> dict:
        """As ``sweep.json`` records it: the bench's fields next to the sweep's own."""
        bench = self.bench.to_dict()
        for name in ("rate", "trace_speedup", "mps_split"):
            bench.pop(name)
        return bench | {
            "rates": list(self.rates),
            "mps_splits": [list(s) for s in self.mps_splits],
            "slo_multiples": self.slo_multiples,
            "attainment_target": self.attainment_target,
        }
