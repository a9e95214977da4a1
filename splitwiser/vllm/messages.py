"""Every message between a vLLM pipeline and its engine processes. Named ``Engine*Msg``, apart
from the Splitwiser workers' messages (``splitwiser.core.messages``), whose ``ShutdownMsg``
the engines share.

Parent -> engine: ``EngineAddMsg``, ``EngineAbortMsg``, ``EngineControlMsg``, ``ShutdownMsg``.
Engine -> parent: ``EngineReadyMsg`` once, then ``EngineTokensMsg`` per request and step, an
``EngineControlReplyMsg`` per ``EngineControlMsg``; ``EngineErrorMsg`` if it fails. Each engine
has two plain pipes of its own (``splitwiser.runtime.spawn.Channel``).
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- parent -> engine


@dataclass(frozen=True)
class EngineAddMsg:
    """Start a request."""

    request_id: int
    prompt_token_ids: list[int]
    params: dict  # vllm.SamplingParams keywords
    kv_transfer_params: dict | None = None  # NIXL: do_remote_decode / the producer's output


@dataclass(frozen=True)
class EngineAbortMsg:
    """Drop a request (cancelled by the caller); no further tokens are sent for it."""

    request_id: int


@dataclass(frozen=True)
class EngineControlMsg:
    """Between two steps: ``"counters"``, vLLM's cumulative KV counters from its own metrics
    (``vllm:prefix_cache_queries``, ``vllm:prefix_cache_hits``, ``vllm:num_preemptions``; only
    with stats logging on); ``"reset_prefix_cache"``, empty the prefix cache. Answered by one
    ``EngineControlReplyMsg``."""

    op: str


# ---------------------------------------------------------------- engine -> parent


@dataclass(frozen=True)
class EngineReadyMsg:
    """vLLM is loaded and its KV cache sized; sent once, before any tokens."""

    pid: int
    num_kv_blocks: int | None  # as vLLM sized them (None where its config does not say)
    block_size: int | None  # tokens per KV block


@dataclass(frozen=True)
class EngineTokensMsg:
    """What one step produced for one request."""

    request_id: int
    token_ids: list[int]  # new since the last message
    time_s: float  # time.monotonic() when the step returned (one clock for all processes)
    finish_reason: str | None  # vLLM's: "stop", "length", "abort"; None while running
    kv_transfer_params: dict | None = None  # set on a KV producer's finished request


@dataclass(frozen=True)
class EngineErrorMsg:
    """Why the engine failed to start or died: one line."""

    message: str


@dataclass(frozen=True)
class EngineControlReplyMsg:
    """The answer to an ``EngineControlMsg``."""

    op: str
    value: object  # "counters": {name without "vllm:": value}; "reset_prefix_cache": bool
