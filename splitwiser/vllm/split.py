"""``VLLMSplitPipeline``: the phase split on vLLM, with vLLM's own KV connector (NIXL).

Two engines share the device: a prefill engine (``kv_producer``) and a decode engine
(``kv_consumer``), as vLLM's disaggregated-serving proxy drives them:

1. the prefill engine runs the prompt with ``max_tokens=1`` and ``do_remote_decode``; it keeps
   the prompt's KV blocks and returns where they are (``kv_transfer_params``);
2. the decode engine gets the same prompt with those parameters, reads the blocks over NIXL
   instead of computing them, and generates every output token, streamed to the caller.

The handoff is timed like Splitwiser's: from the prefill engine's result (the KV published) to
the decode engine's first token (the KV read and the request admitted into a decode step).
``kv_bytes_copied`` counts the prompt's K/V that NIXL moved.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from splitwiser.vllm.engine_proc import EngineSpec
from splitwiser.vllm.messages import EngineAddMsg, EngineTokensMsg
from splitwiser.vllm.pipeline import (
    STARTUP_TIMEOUT_S,
    _EnginePool,
    _Request,
    core_lists,
    vllm_params,
)

PREFILL, DECODE = 0, 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _SplitRequest(_Request):
    """A request of the split pipeline: also when its KV handoff started."""

    prefill_done_s: float | None = None  # the prefill engine's result arrived (KV published)
    handoff_pending: bool = False  # KV sent to the decode engine, no token from it yet


class VLLMSplitPipeline(_EnginePool):
    """A prefill engine and a decode engine on one device, KV moved by vLLM's NixlConnector.

    Each engine holds half the device's memory; on CPU each binds half the cores, under MPS
    (``mps_pipe_dir``) they get ``mps_thread_percentage = (prefill, decode)`` of the threads.
    Other keywords as :class:`splitwiser.vllm.VLLMPipeline`.
    """

    request_type = _SplitRequest

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        dtype=None,
        mps_pipe_dir: str | None = None,
        mps_thread_percentage: tuple[int, int] | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        **engine_options,
    ):
        super().__init__(model, device, dtype, engine_options)
        self.kv_bytes_per_token = self.shape.kv_bytes_per_token(self.dtype)
        buffer_device = "cpu" if self.device.type == "cpu" else "cuda"
        shares = mps_thread_percentage or (None, None)
        specs = []
        for role, name, cores, share in zip(
            ("kv_producer", "kv_consumer"), ("prefill", "decode"), core_lists(2), shares
        ):
            connector = {
                "kv_connector": "NixlConnector",
                "kv_role": role,
                "kv_buffer_device": buffer_device,
            }
            env = self._env(mps_pipe_dir, share)
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())  # one per engine
            args = self._engine_args(0.5, kv_transfer_config=connector)
            cpu_cores = cores if self.device.type == "cpu" else None
            specs.append(EngineSpec(f"sw-vllm-{name}", args, env, cpu_cores))
        self._start(specs, startup_timeout_s)
        self.num_local_prefills = 0  # requests the decode engine had to prefill itself

    def _dispatch(self, request_id: int, req: _SplitRequest) -> None:  # under the lock
        # prefill only: one token, never stopped early (NIXL keeps the blocks of a request
        # that ended on its length), and the blocks kept for the decode engine to read
        params = vllm_params(req.params, 1) | {
            "ignore_eos": True,
            "stop": [],
            "stop_token_ids": [],
            "detokenize": False,
        }
        req.engine = PREFILL
        self.engines[PREFILL].send(
            EngineAddMsg(request_id, req.prompt_token_ids, params, {"do_remote_decode": True})
        )

    def _on_tokens(self, engine: int, msg: EngineTokensMsg) -> None:
        with self._lock:
            req = self._requests.get(msg.request_id)
            if req is None or req.engine != engine:
                return
            if engine == DECODE:
                if req.handoff_pending and msg.token_ids:
                    req.metrics.handoff_s = msg.time_s - req.prefill_done_s
                    req.handoff_pending = False
                self._append(req, msg)
                return
            if msg.finish_reason is None:
                return
            # 2) the prompt's KV is published: hand the request to the decode engine
            req.prefill_done_s = msg.time_s
            req.metrics.first_scheduled_time = msg.time_s
            kv = msg.kv_transfer_params
            if kv and kv.get("remote_block_ids"):
                req.metrics.kv_bytes_copied = len(req.prompt_token_ids) * self.kv_bytes_per_token
            else:  # nothing to read: the decode engine computes the prompt again
                self.num_local_prefills += 1
                kv = None
            req.engine = DECODE
            req.handoff_pending = kv is not None
            params = vllm_params(req.params, req.max_tokens)
            add = EngineAddMsg(msg.request_id, req.prompt_token_ids, params, kv)
            self.engines[DECODE].send(add)

    def stats(self) -> dict:
        return super().stats() | {"num_local_prefills": self.num_local_prefills}
