"""Judge a finished sweep's requests again at other SLOs: each system's attainment per rate and
its goodput, by the sweep's own rules (a request meets the SLOs when every one holds, a failed
request meets none; goodput interpolated as ``splitwiser sweep`` does).

    python bench/rejudge_slo.py OUT/<run-id>/requests.csv --slo ttft_ms=150.7,tpot_ms=19.1

For comparing runs whose SLO multiples resolved to different milliseconds, and for choosing the
multiples at which a system first reaches the attainment target.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from types import SimpleNamespace

from splitwiser.benchmark.goodput import ATTAINMENT_TARGET, goodput_rps, slo_attainment
from splitwiser.benchmark.metrics import parse_slo


def _record(row: dict) -> SimpleNamespace:
    """What the sweep's ``slo_attainment`` reads of a request, from its ``requests.csv`` row."""
    seconds = {k: None if row[f"{k}_ms"] == "" else float(row[f"{k}_ms"]) / 1e3
               for k in ("ttft", "tpot", "e2el")}  # fmt: skip
    return SimpleNamespace(ok=not row["error"], ttft_s=seconds["ttft"], tpot_s=seconds["tpot"],
                           e2el_s=seconds["e2el"])  # fmt: skip


def rejudge(rows: list[dict], slo: dict[str, float]) -> dict[str, dict]:
    """Per system: ``{"attainment": {rate: share}, **goodput_rps(...)}``, in the file's order."""
    records: dict[str, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        records[row["system"]][float(row["rate"])].append(_record(row))
    out = {}
    for system, by_rate in records.items():
        rates = sorted(by_rate)
        shares = [slo_attainment(by_rate[r], slo) for r in rates]
        out[system] = {"attainment": dict(zip(rates, shares)),
                       **goodput_rps(rates, shares, ATTAINMENT_TARGET)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("requests_csv")
    ap.add_argument("--slo", required=True, help="ttft_ms=..,tpot_ms=..,e2el_ms=.. (ms)")
    args = ap.parse_args(argv)
    with open(args.requests_csv) as f:
        result = rejudge(list(csv.DictReader(f)), parse_slo(args.slo))
    for system, r in result.items():
        shares = " ".join(f"{rate:g}:{100 * a:.0f}%" for rate, a in r["attainment"].items())
        goodput = "-" if r["goodput_rps"] is None else f"{r['goodput_rps']:.2f}"
        print(f"{system:>12}  goodput {goodput:>6} req/s  {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
