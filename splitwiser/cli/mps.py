"""``splitwiser mps start|stop|status``: the CUDA MPS control daemon for operators."""

from __future__ import annotations

import json

import click


@click.group(name="mps")
def mps_group() -> None:
    """The CUDA MPS control daemon: start (or reuse), stop what splitwiser started, status."""


@mps_group.command("start")
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Run a tiny CUDA client under the daemon and check that it served it.",
)
def mps_start(check) -> None:
    """Start a private MPS control daemon, or report the one already running."""
    from splitwiser import mps

    daemon = mps.start_daemon()
    if check and mps.gpu_present():
        result = mps.check_client(daemon)
        if not result["ok"]:
            kept = "stopped" if daemon.owned else "left running (not started here)"
            daemon.stop()  # only a daemon started here
            raise mps.MPSUnavailableError(
                f"no CUDA client could use the MPS daemon on {daemon.pipe_dir} ({kept}): "
                f"{result['problem']}"
            )
        click.echo(f"a CUDA client ran under MPS (server pid {result['server_pids'][0]})")
    elif check:
        click.echo("client check skipped: NVML sees no GPU on this machine")
    if daemon.owned:
        mps.record(daemon)
        click.echo(f"started the MPS control daemon (pid {daemon.pid}), pipe {daemon.pipe_dir}")
    else:
        click.echo(f"an MPS control daemon already runs on {daemon.pipe_dir}; it stays running")
    click.echo(f"clients need: export CUDA_MPS_PIPE_DIRECTORY={daemon.pipe_dir}")


@mps_group.command("stop")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for the daemon's clients to leave.",
)
def mps_stop(timeout_s) -> None:
    """Stop the daemon that `splitwiser mps start` started; never any other. One with a client
    still attached is left running (and recorded): exit 2."""
    from splitwiser import mps

    daemon, problem = mps.stop_recorded(timeout_s)
    if problem is not None:
        raise click.ClickException(problem)
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
