"""vLLM systems behind the ``generate`` / ``submit`` contract of ``SplitwiserPipeline``.

- ``VLLMPipeline``: one vLLM engine with the whole device (what users would run instead of us).
- ``VLLMParallelPipeline``: N engines on one device, each with an equal share of its memory
  (and of its cores on CPU, of its threads under MPS); each request goes to the least loaded
  engine. The setup of the published Splitwiser-on-vLLM results.
- ``VLLMSplitPipeline``: the phase split on vLLM, see ``split``.

Every engine runs in a process of its own (``procs``); the parent tokenises, checks prompts,
routes requests, and times every token as it arrives.
"""

from __future__ import annotations

import atexit
import importlib.util
import itertools
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

from splitwiser.config import resolve_device, resolve_dtype
from splitwiser.core.prompts import PromptChecker, submit_all
from splitwiser.errors import (
    ConfigError,
    PipelineClosedError,
    WorkerCrashedError,
)
from splitwiser.handle import RequestHandle
from splitwiser.models.loader import RANDOM_PREFIX, _resolve, load_model_config, load_tokenizer
from splitwiser.models.shape import ModelShape
from splitwiser.outputs import RequestMetrics, RequestOutput
from splitwiser.runtime import spawn
from splitwiser.sampling import SamplingParams
from splitwiser.vllm.engine_proc import EngineSpec
from splitwiser.vllm.messages import EngineAbortMsg, EngineAddMsg, EngineTokensMsg
from splitwiser.vllm.procs import EngineProcess

INSTALL_HINT = "bash bench/install_vllm_cpu.sh (CPU) or pip install 'splitwiser[vllm]' (GPU)"
DEFAULT_CPU_KV_BYTES = 1 << 30  # all engines together, on CPU
GPU_MEMORY_UTILIZATION = 0.9  # all engines together, on CUDA
STARTUP_TIMEOUT_S = 900.0


def require_vllm() -> None:
    """Raise a one-line ``ConfigError`` naming the install command when vLLM is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"vLLM is not installed; install it with: {INSTALL_HINT}")


def vllm_params(params: SamplingParams, max_tokens: int) -> dict:
    """Our sampling parameters as ``vllm.SamplingParams`` keywords (same semantics)."""
    return {
        "max_tokens": max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "seed": params.seed,
        "stop": list(params.stop or ()),
        "stop_token_ids": list(params.stop_token_ids),
        "ignore_eos": params.ignore_eos,
        "detokenize": bool(params.stop),  # stop strings need text; the parent decodes anyway
    }


def core_lists(num_engines: int) -> list[tuple[int, ...]]:
    """This process's cores split into ``num_engines`` contiguous shares; with fewer cores
    than engines, engines share cores round-robin."""
    cores = sorted(os.sched_getaffinity(0))
    n = len(cores)
    if n < num_engines:
        return [(cores[i % n],) for i in range(num_engines)]
    return [tuple(cores[i * n // num_engines : (i + 1) * n // num_engines])
            for i in range(num_engines)]  # fmt: skip


@dataclass
class _Request:
    handle: RequestHandle
    prompt: object  # the caller's prompt (str or token ids)
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    metrics: RequestMetrics
    engine: int | None = None  # index of the engine producing its tokens; None: not sent yet
    token_ids: list[int] = field(default_factory=list)


class _EnginePool:
    """What the vLLM pipelines share: model resolution, prompt checks, handles, engines."""

    request_type: type[_Request] = _Request  # what a pipeline keeps per request

    def __init__(self, model, device, dtype, engine_options: dict):
        # in an engine process re-running an unguarded main script: end it before any loading
        spawn.exit_if_bootstrapping()
        require_vllm()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if model is not None and str(model).startswith(RANDOM_PREFIX):
            raise ConfigError(
                "the vLLM systems load weights from a model directory; "
                f"{model!r} is a random preset (use a directory or the embedded default)"
            )
        self.model_path = _resolve(model)[0]
        self.model_config = load_model_config(model)
        self.tokenizer = load_tokenizer(model)
        self.shape = ModelShape.from_hf(self.model_config)
        # the context Splitwiser serves (the sliding window applied): the same prompts rejected
        max_len = self.shape.max_model_len(engine_options.get("max_model_len"))
        self.checker = PromptChecker(self.tokenizer, self.shape.vocab_size, max_len)
        self.engine_options = engine_options | {"max_model_len": max_len}
        self.engines: list[EngineProcess] = []
        self._requests: dict[int, _Request] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._error: str | None = None
        self._closed = False
        self_ref = weakref.ref(self)
        self._atexit = lambda: (p := self_ref()) is not None and p.close()
        atexit.register(self._atexit)

    # ---- engines
    def _engine_args(self, share: float, **extra) -> dict:
        """``EngineArgs`` keywords for an engine holding ``share`` of the device's memory."""
        args = {
            "model": self.model_path,
            "dtype": str(self.dtype).removeprefix("torch."),
            "seed": 0,
            "disable_log_stats": True,
            "enable_prefix_caching": False,
        }
        options = dict(self.engine_options)
        kv_bytes = options.pop("kv_cache_bytes", None)
        if kv_bytes is None and self.device.type == "cpu":
            kv_bytes = DEFAULT_CPU_KV_BYTES
        if kv_bytes is not None:
            args["kv_cache_memory_bytes"] = int(kv_bytes * share)
        else:
            args["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION * share
        return args | options | extra

    def _env(self, mps_pipe_dir: str | None, thread_percentage: int | None) -> dict:
        env = {
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),  # quiet bench
        }
        if mps_pipe_dir is not None:
            env["CUDA_MPS_PIPE_DIRECTORY"] = mps_pipe_dir
            if thread_percentage is not None:
                env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(thread_percentage)
        return env

    def _start(self, specs: list[EngineSpec], timeout_s: float) -> None:
        """Start the engines (on CPU all at once, on CUDA one after another so each sizes its
        memory alone); on any failure every engine started is stopped."""
        try:
            for index, spec in enumerate(specs):
                proc = EngineProcess(
                    spec,
                    on_tokens=lambda msg, i=index: self._on_tokens(i, msg),
                    on_death=self._on_death,
                )
                self.engines.append(proc)
                if self.device.type == "cuda":
                    proc.wait_ready(timeout_s)
            for proc in self.engines:
                proc.wait_ready(timeout_s)
        except BaseException:
            self.close()
            raise

    # ---- requests
    def submit(self, prompt, sampling_params: SamplingParams | None = None) -> RequestHandle:
        """Queue one request now (online use); wait on or stream the returned handle."""
        params = sampling_params or SamplingParams()
        ids = self.checker.token_ids(prompt)
        max_tokens = self.checker.max_new_tokens(len(ids), params)
        with self._lock:
            if self._closed:
                raise PipelineClosedError("the pipeline is closed")
            if self._error is not None:
                raise WorkerCrashedError(self._error)
            request_id = next(self._ids)
            handle = RequestHandle(request_id, cancel=self._cancel)
            metrics = RequestMetrics(arrival_time=time.monotonic())
            req = self.request_type(handle, prompt, ids, params, max_tokens, metrics)
            self._requests[request_id] = req
            self._dispatch(request_id, req)
        return handle

    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """Generate for every prompt (submitted at once), in the order given."""
        return submit_all(self.submit, prompts, sampling_params)

    def _dispatch(self, request_id: int, req: _Request) -> None:  # under the lock
        raise NotImplementedError

    def _on_tokens(self, engine: int, msg: EngineTokensMsg) -> None:
        with self._lock:
            req = self._requests.get(msg.request_id)
            if req is None or req.engine != engine:  # finished, cancelled, or a stale engine
                return
            self._append(req, msg)

    def _append(self, req: _Request, msg: EngineTokensMsg) -> None:  # under the lock
        for token in msg.token_ids:
            req.token_ids.append(token)
            req.metrics.token_times.append(msg.time_s)
            req.handle._push(token)
        if msg.finish_reason is not None:
            self._finish(req, msg.finish_reason, msg.time_s)

    def _finish(self, req: _Request, reason: str, time_s: float) -> None:  # under the lock
        del self._requests[req.handle.request_id]
        req.metrics.finish_time = time_s
        text, matched = self.checker.apply_stop_strings(req.token_ids, req.params.stop or ())
        req.handle._finish(
            RequestOutput(
                request_id=req.handle.request_id,
                prompt=req.prompt if isinstance(req.prompt, str) else None,
                prompt_token_ids=req.prompt_token_ids,
                token_ids=list(req.token_ids),
                text=text,
                finish_reason="stop" if matched else reason,
                metrics=req.metrics,
            )
        )

    def _cancel(self, request_id: int) -> None:
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return
            if req.engine is not None:
                self.engines[req.engine].send(EngineAbortMsg(request_id))
            self._finish(req, "abort", time.monotonic())

    def _on_death(self, reason: str) -> None:
        """An engine died: its requests (and, as routing depends on it, all) fail at once."""
        with self._lock:
            self._error = self._error or reason
            failed = list(self._requests.values())
            self._requests.clear()
        for req in failed:
            req.handle._fail(WorkerCrashedError(f"{reason}; the request was lost"))

    # ---- introspection and lifetime
    def workers(self) -> dict[str, dict]:
        """Engine processes: name -> pid and the KV cache vLLM sized."""
        return {
            e.spec.name: {
                "pid": e.pid,
                "num_kv_blocks": e.ready and e.ready.num_kv_blocks,
                "block_size": e.ready and e.ready.block_size,
            }  # fmt: skip
            for e in self.engines
        }

    def kv_counters(self) -> dict[str, float]:
        """vLLM's cumulative ``prefix_cache_queries``, ``prefix_cache_hits`` (prompt tokens) and
        ``num_preemptions`` from its own metrics, summed over the engines; {} without stats
        logging (``disable_log_stats=False`` turns it on)."""
        total: dict[str, float] = {}
        for engine in self.engines:
            for key, value in engine.control("counters").items():
                total[key] = total.get(key, 0) + value
        return total

    def reset_prefix_cache(self) -> bool:
        """Empty every engine's prefix cache (vLLM refuses while requests hold blocks)."""
        return all([engine.control("reset_prefix_cache") for engine in self.engines])

    @property
    def num_kv_tokens(self) -> int | None:
        """Tokens the engines' KV caches hold together, as vLLM sized them."""
        sizes = [e.ready and e.ready.num_kv_blocks and e.ready.num_kv_blocks * e.ready.block_size
                 for e in self.engines]  # fmt: skip
        return sum(sizes) if sizes and all(sizes) else None

    def stats(self) -> dict:
        with self._lock:
            per_engine = [0] * len(self.engines)
            for req in self._requests.values():
                if req.engine is not None:
                    per_engine[req.engine] += 1
            health = "closed" if self._closed else ("failed" if self._error else "ok")
            return {
                "num_unfinished": len(self._requests),
                "unfinished_per_engine": per_engine,
                "health": health,
                "error": self._error,
            }

    def close(self) -> None:
        """Stop every engine process; unfinished requests fail. Safe to call twice."""
        with self._lock:
            self._closed = True
            left = list(self._requests.values())
            self._requests.clear()
        for req in left:
            req.handle._fail(PipelineClosedError("the pipeline was closed"))
        for engine in self.engines:
            engine.close()
        atexit.unregister(self._atexit)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VLLMPipeline(_EnginePool):
    """``num_engines`` vLLM engines on one device (default one: plain vLLM), each with an equal
    share of the device's memory; on CPU each binds its own cores, under MPS
    (``mps_pipe_dir``) each gets ``mps_thread_percentage`` (default 100 / N) of the threads.

    ``kv_cache_bytes`` is the KV cache of all engines together (default 1 GiB on CPU; on CUDA
    90% of the GPU's memory for everything). Other keywords go to ``vllm.EngineArgs``
    (``enforce_eager``, ``max_num_seqs``, ``block_size``, ...).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        num_engines: int = 1,
        device: str = "auto",
        dtype=None,
        mps_pipe_dir: str | None = None,
        mps_thread_percentage: int | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        **engine_options,
    ):
        if not isinstance(num_engines, int) or isinstance(num_engines, bool) or num_engines < 1:
            raise ConfigError(f"num_engines must be an integer >= 1, got {num_engines!r}")
        super().__init__(model, device, dtype, engine_options)
        share = mps_thread_percentage or (100 // num_engines if num_engines > 1 else None)
        specs = [
            EngineSpec(
                f"sw-vllm-{i}",
                self._engine_args(1.0 / num_engines),
                self._env(mps_pipe_dir, share),
                cores if self.device.type == "cpu" else None,
            )
            for i, cores in enumerate(core_lists(num_engines))
        ]
        self._start(specs, startup_timeout_s)
        self._next = itertools.count()

    def _dispatch(self, request_id: int, req: _Request) -> None:  # under the lock
        # the least loaded engine; ties go round-robin
        load = [0] * len(self.engines)
        for other in self._requests.values():
            if other.engine is not None:
                load[other.engine] += 1
        start = next(self._next) % len(self.engines)
        order = [(start + k) % len(self.engines) for k in range(len(self.engines))]
        req.engine = min(order, key=lambda i: load[i])
        params = vllm_params(req.params, req.max_tokens)
        self.engines[req.engine].send(EngineAddMsg(request_id, req.prompt_token_ids, params))


class VLLMParallelPipeline(VLLMPipeline):
    """Splitwiser's vLLM setup: ``num_engines`` (default 2) independent engines sharing one
    device, requests spread across them. See :class:`VLLMPipeline`."""

    def __init__(self, model: str | None = None, *, num_engines: int = 2, **options):
        super().__init__(model, num_engines=num_engines, **options)
