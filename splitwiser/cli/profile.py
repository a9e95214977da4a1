"""``splitwiser profile``: Nsight Compute (or Nsight Systems) over the prompt and token phases."""

from __future__ import annotations

import shlex
from dataclasses import fields

import click

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
@click.option(
    "--mps",
    "mps_mode",
    type=click.Choice(["on", "off", "auto"]),
    is_flag=False,
    flag_value="on",
    default=_PROFILE["mps"],
    show_default=True,
    help="Run the workers under CUDA MPS.",
)
@click.option("--no-mps", is_flag=True, help="Same as --mps off.")
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

    if no_mps and ctx.get_parameter_source("mps_mode") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give --mps or --no-mps, not both")
    config = ProfileConfig(mps="off" if no_mps else mps_mode, **options)
    command = shlex.join(["splitwiser", *ctx.obj["argv"]]) if ctx.obj else None
    out, summary = run_profile(config, command=command)
    if summary["phases"]:
        click.echo(summary_table(summary))
    click.echo(f"results: {out}")
