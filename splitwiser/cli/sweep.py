"""``splitwiser sweep``: goodput per system over a range of offered loads, in one run."""

from __future__ import annotations

import click

from splitwiser.cli.bench import BASELINE_HELP, bench_config, csv_list, shared_options
from splitwiser.cli.common import command_line
from splitwiser.systems import COLOCATED


@click.command()
@shared_options
@click.option(
    "--rate",
    "rates",
    required=True,
    metavar="R1,R2,...",
    help="Offered loads in requests/s, increasing: Poisson arrivals at each (seeded); trace "
    "workloads: the trace's arrival times scaled to each mean rate.",
)
@click.option(
    "--slo",
    default=None,
    metavar="ttft_ms=..,tpot_ms=..",
    help="Required. Every SLO a request must meet (keys ttft_ms, tpot_ms, e2el_ms), each in "
    "milliseconds or as a multiple of the unloaded latency measured in the run (ttft_ms=5x: "
    "5 times the colocated system's single-request TTFT, splitwiser's without it).",
)
@click.option(
    "--mps-split",
    "mps_splits",
    multiple=True,
    metavar="P,T",
    help="Repeatable: one more Splitwiser system with these MPS thread percentages of the "
    "prompt and token workers (needs MPS on a CUDA GPU).",
)
@click.option(
    "--baseline",
    "baselines",
    default=COLOCATED,
    show_default=True,
    help=BASELINE_HELP,
)
@click.pass_context
def sweep(ctx, rates, slo, mps_splits, baselines, **options) -> None:
    """Replay one workload through Splitwiser and the baselines at each offered load; print
    and save each system's SLO attainment per load and its goodput.

    Each system starts once, is warmed up, and serves every load in increasing order.
    Goodput is the highest rate at which >= 90% of requests meet every SLO at once,
    interpolated between the measured rates (DistServe).
    """
    from splitwiser.benchmark.sweep import run_sweep
    from splitwiser.benchmark.sweep_config import (
        SweepConfig,
        parse_rates,
        parse_splits,
        parse_sweep_slo,
    )
    from splitwiser.benchmark.sweep_report import sweep_table

    absolute, multiples = parse_sweep_slo(slo)
    config = SweepConfig(
        bench=bench_config(ctx, baselines=csv_list(baselines), slo=absolute, **options),
        rates=parse_rates(rates),
        mps_splits=parse_splits(mps_splits),
        slo_multiples=multiples,
    )
    result = run_sweep(config, command=command_line(ctx), show=True)
    click.echo(sweep_table(result.summary))
    click.echo(f"results: {result.run_dir}")
