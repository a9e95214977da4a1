"""``splitwiser mps start|stop|status``: the CUDA MPS control daemon for operators."""

from __future__ import annotations

import json

import click


@click.group(name="mps")
def mps_group() -> None:
    """The CUDA MPS control daemon: start (or reuse), stop what splitwiser started, status."""


@mps_group.command("start")
def mps_start() -> None:
    """Start a private MPS control daemon, or report the one already running."""
    from splitwiser import mps

    daemon = mps.start_daemon()
    if daemon.owned:
        mps.record(daemon)
        click.echo(f"started the MPS control daemon (pid {daemon.pid}), pipe {daemon.pipe_dir}")
    else:
        click.echo(f"an MPS control daemon already runs on {daemon.pipe_dir}; it stays running")
    click.echo(f"clients need: export CUDA_MPS_PIPE_DIRECTORY={daemon.pipe_dir}")


@mps_group.command("stop")
def mps_stop() -> None:
    """Stop the daemon that `splitwiser mps start` started; never any other."""
    from splitwiser import mps

    daemon = mps.stop_recorded()
    if daemon is None:
        click.echo("no MPS daemon started by splitwiser is recorded; nothing stopped")
    else:
        click.echo(f"stopped the MPS control daemon on {daemon.pipe_dir}")


@mps_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def mps_status(as_json) -> None:
    """Where the control binary is, and which daemon runs."""
    from splitwiser import mps

    recorded = mps.load_recorded()
    running = mps.find_running() if mps.find_control_binary() else None
    info = {
        "control_binary": mps.find_control_binary(),
        "started_by_splitwiser": recorded.status() if recorded else None,
        "running": running.status() if running else None,
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"control binary: {info['control_binary'] or 'not found'}")
    click.echo(f"started by splitwiser: {info['started_by_splitwiser'] or 'none'}")
    click.echo(f"running daemon: {info['running'] or 'none'}")
