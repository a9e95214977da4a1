"""Options and helpers shared by the subcommands that run workers on a GPU."""

from __future__ import annotations

import shlex

import click


def mps_options(default: str, help: str):
    """``--mps [on|off|auto]`` (bare ``--mps`` means on) and ``--no-mps``; the command receives
    one ``mps`` argument."""

    def decorate(fn):
        fn = click.option("--no-mps", "no_mps", is_flag=True, help="Same as --mps off.")(fn)
        return click.option(
            "--mps", "mps_mode", type=click.Choice(["on", "off", "auto"]), is_flag=False,
            flag_value="on", default=default, show_default=True, help=help,
        )(fn)  # fmt: skip

    return decorate


def resolve_mps(ctx: click.Context, mps_mode: str, no_mps: bool) -> str:
    if no_mps and ctx.get_parameter_source("mps_mode") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give --mps or --no-mps, not both")
    return "off" if no_mps else mps_mode


def command_line(ctx: click.Context) -> str | None:
    """The command as typed, for the results."""
    return shlex.join(["splitwiser", *ctx.obj["argv"]]) if ctx.obj else None
