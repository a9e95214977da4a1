"""Everything ``splitwiser bench`` and ``splitwiser sweep`` can run, one module per system over
one protocol (``base.BenchSystem``), and the one place a system's name is looked up.

A new system is one module and one line in ``SYSTEMS``. Importing this package imports neither
torch's models nor vLLM: each system imports what it runs when it is built.
"""

from __future__ import annotations

from splitwiser.errors import ConfigError
from splitwiser.systems.base import BenchSystem
from splitwiser.systems.batched import BatchedSystem
from splitwiser.systems.colocated import ColocatedSystem
from splitwiser.systems.http import HTTPSystem
from splitwiser.systems.sequential import SequentialSystem
from splitwiser.systems.splitwiser import SplitwiserSystem
from splitwiser.systems.vllm import VLLMParallelSystem, VLLMSplitSystem, VLLMSystem

SPLITWISER = "splitwiser"  # the system measured; every ratio is its value over a baseline's
COLOCATED = "colocated"  # the fair baseline: the sweep's goodput ratios and SLO reference
SEQUENTIAL = "sequential"  # generate() alone: the exactness reference of token agreement

# the systems by their names in --baseline and in the results
SYSTEMS: dict[str, type[BenchSystem]] = {
    SPLITWISER: SplitwiserSystem,
    SEQUENTIAL: SequentialSystem,
    "batched": BatchedSystem,
    COLOCATED: ColocatedSystem,
    "vllm": VLLMSystem,
    "vllm-parallel": VLLMParallelSystem,
    "vllm-split": VLLMSplitSystem,
}
# any OpenAI-compatible server, named by its URL
URL_SYSTEMS: dict[tuple[str, ...], type[BenchSystem]] = {("http://", "https://"): HTTPSystem}

BASELINES = (SEQUENTIAL, "batched")  # bench's default comparison
KNOWN_BASELINES = tuple(name for name in SYSTEMS if name != SPLITWISER)


def get_system(spec: str) -> type[BenchSystem]:
    """The system ``spec`` names: a name of ``SYSTEMS`` or a URL; ``ConfigError`` otherwise."""
    if spec in SYSTEMS:
        return SYSTEMS[spec]
    for schemes, system in URL_SYSTEMS.items():
        if spec.startswith(schemes):
            return system
    raise ConfigError(
        f"unknown baseline {spec!r}; use a comma list of {', '.join(KNOWN_BASELINES)}, "
        f"http://HOST:PORT/v1 (an OpenAI-compatible server), or none"
    )


def plot_color(name: str) -> str | None:
    """The plots' colour of the system named ``name`` in the results, if it has one."""
    system = SYSTEMS.get(name)
    return None if system is None else system.color


__all__ = [
    "BASELINES",
    "COLOCATED",
    "KNOWN_BASELINES",
    "SEQUENTIAL",
    "SPLITWISER",
    "SYSTEMS",
    "BenchSystem",
    "plot_color",
    "get_system",
]
