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

from splitwiser.vllm.engine_proc import AddMsg, EngineSpec, TokensMsg
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


def kv_bytes_per_token(model_config, dtype) -> int:
    """K and V of one token over every layer, in bytes."""
    c = model_config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * dtype.itemsize


class VLLMSplitPipeline(_EnginePool):
    """A prefill engine and a decode engine on one device, KV moved by vLLM's NixlConnector.

    Each engine holds half the device's memory; on CPU each binds half the cores, under MPS
    (``mps_pipe_dir``) they get ``mps_thread_percentage = (prefill, decode)`` of the threads.
    Other keywords as :class:`splitwiser.vllm.VLLMPipeline`.
    """

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
        self.kv_bytes_per_token = kv_bytes_per_token(self.model_config, self.dtype)
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

    def _dispatch(self, request_id: int, req: _Request) -> None:  # under the lock
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
            AddMsg(request_id, req.prompt_token_ids, params, {"do_remote_decode": True})
        )

    def _on_tokens(self, engine: int, msg: TokensMsg) -> None:
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
            self.engines[DECODE].send(AddMsg(msg.request_id, req.prompt_token_ids, params, kv))

    def stats(self) -> dict:
        return super().stats() | {"num_local_prefills": self.num_local_prefills}
