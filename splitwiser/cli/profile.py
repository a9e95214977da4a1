"""``splitwiser profile``: Nsight Compute (or Nsight Systems) over the prompt and token phases."""

from __future__ import annotations

from dataclasses import fields

import click

from splitwiser.cli.common import command_line, mps_options, resolve_mps
from splitwiser.profiling import ProfileConfig

_PROFILE = {f.name: f.default for f in fields(ProfileConfig)}


@click.command()
@click.option(
    "--phase",
    type=click.Choice(["prompt", "token", "both"]),
    default="both",
    show_default=True,
    help="Which phase's kernels to profile (one report each).",
)
@click.option(
    "--model",
    default=None,
    help="HF directory, hub id or random:<preset>. [default: embedded model]",
)
@click.option("--dtype", default=None, help="float32, bfloat16 or float16. [default: bfloat16]")
@mps_options(_PROFILE["mps"], "Run the workers under CUDA MPS.")
@click.option("--num-requests", default=_PROFILE["num_requests"], show_default=True, type=int)
@click.option("--prompt-len", default=_PROFILE["prompt_len"], show_default=True, type=int)
@click.option("--output-len", default=_PROFILE["output_len"], show_default=True, type=int)
@click.option(
    "--kernels",
    default=_PROFILE["kernels"],
    show_default=True,
    type=int,
    help="Kernels profiled per phase (ncu --launch-count).",
)
@click.option(
    "--metrics",
    default=_PROFILE["metrics"],
    show_default=True,
    help="default, full (ncu --set full), or a comma list of metric names.",
)
@click.option(
    "--tool",
    type=click.Choice(["ncu", "nsys"]),
    default="ncu",
    show_default=True,
    help="ncu: per-kernel metrics; nsys: a timeline of both phases.",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Output folder. [default: results/profile/<date>-<time>-<phase>]",
)
@click.pass_context
def profile(ctx, mps_mode, no_mps, **options) -> None:
    """Profile the prompt and token phases with Nsight Compute: compute-bound prefill against
    memory-bound decode, per phase, from NVTX-filtered kernels of every worker process."""
    from splitwiser.profiling import run_profile, summary_table

    config = ProfileConfig(mps=resolve_mps(ctx, mps_mode, no_mps), **options)
    out, summary = run_profile(config, command=command_line(ctx))
    for warning in summary["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if summary["phases"]:
        click.echo(summary_table(summary))
    click.echo(f"results: {out}")
