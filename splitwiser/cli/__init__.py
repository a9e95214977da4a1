"""The ``splitwiser`` command. Errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import signal
import sys
import threading


def _interrupted_while_starting(signum, frame) -> None:
    # nothing has started yet: no worker, no daemon, nothing to close
    sys.stderr.write("splitwiser: interrupted\n")
    os._exit(130)


# a Ctrl-C while torch and transformers load is one line, not an import traceback
_starting = threading.current_thread() is threading.main_thread()
if _starting:
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import importlib  # noqa: E402

import click  # noqa: E402

from splitwiser import __version__  # noqa: E402
from splitwiser.errors import SplitwiserError  # noqa: E402

# each command's module, imported when that command runs (or --help lists it): `splitwiser mps
# status` and an error in the arguments do not wait for torch, transformers and the engine
COMMANDS = {
    "bench": ("splitwiser.cli.bench", "bench"),
    "sweep": ("splitwiser.cli.sweep", "sweep"),
    "serve": ("splitwiser.cli.serve", "serve"),
    "generate": ("splitwiser.cli.generate", "generate"),
    "profile": ("splitwiser.cli.profile", "profile"),
    "mps": ("splitwiser.cli.mps", "mps_group"),
    "model": ("splitwiser.cli.generate", "model"),
}

if _starting:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _fail(message: str) -> None:
    click.echo(f"splitwiser: error: {message}", err=True)
    sys.exit(2)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: ``with`` blocks close their pipelines (workers first)."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the clean-up finish
    raise _Terminated()


class _Group(click.Group):
    """Every error -- bad usage or a ``SplitwiserError`` -- is one line and exit code 2."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        argv = list(sys.argv[1:] if args is None else args)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            code = super().main(argv, prog_name, standalone_mode=False, obj={"argv": argv}, **extra)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            _fail(f"{exc.format_message()}{hint}")
        except click.ClickException as exc:
            _fail(exc.format_message())
        except click.Abort as exc:
            if isinstance(exc.__cause__, _Terminated):
                click.echo("splitwiser: terminated", err=True)
                sys.exit(128 + signal.SIGTERM)
            click.echo("splitwiser: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SplitwiserError as exc:
            _fail(str(exc))

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="splitwiser")
def main() -> None:
    """Splitwiser: prompt and token phases in separate worker processes on one device."""
