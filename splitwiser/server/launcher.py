"""``serve()``: the socket first, then the pipeline behind it, then a graceful end.

1) Read the model's facts (a bad ``--model`` fails here, before anything listens).
2) Bind the socket, so clients can connect (``/health`` answers 503) while the workers start.
3) Serve with uvicorn; the pipeline starts in a thread of its own (``PipelineBridge``).
4) On SIGTERM or Ctrl-C: stop accepting, ``/health`` 503, let in-flight requests finish for up
   to ``shutdown_timeout_s``, cancel the rest, close the workers. A second Ctrl-C cancels at
   once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from dataclasses import dataclass

import uvicorn

from splitwiser.config import EngineConfig
from splitwiser.errors import ConfigError
from splitwiser.server.app import DEFAULT_MAX_BODY_BYTES, ServeConfig, build_app, build_serving
from splitwiser.server.bridge import PipelineBridge
from splitwiser.server.chat import ChatTemplate

log = logging.getLogger("splitwiser.serve")


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the log line says which)
    shutdown_timeout_s: float = 30.0  # in-flight requests get this long to finish
    log_level: str = "info"
    access_log: bool = True


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(False)  # the workers are spawned: they never hold the port
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server; a signal marks the bridge stopping and is remembered, not re-raised."""

    def __init__(self, config: uvicorn.Config, bridge: PipelineBridge):
        super().__init__(config)
        self.bridge = bridge
        self.signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self.signal is None:
            self.signal = sig
            log.info("%s: finishing requests in flight (at most %.0f s), then stopping",
                     signal.Signals(sig).name, self.config.timeout_graceful_shutdown)  # fmt: skip
        self.bridge.stopping = True  # /health 503 from now on
        super().handle_exit(sig, frame)


def _setup_logging(level: str) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level.upper())


def serve(
    engine: EngineConfig,
    listen: ListenConfig,
    *,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    chat_template: str | None = None,
) -> int | None:
    """Serve until SIGTERM or Ctrl-C; returns the signal that ended it."""
    from splitwiser.models.loader import load_model_config, load_tokenizer
    from splitwiser.models.shape import ModelShape

    _setup_logging(listen.log_level)
    # 1) the model's facts
    shape = ModelShape.from_hf(load_model_config(engine.model))
    tokenizer = load_tokenizer(engine.model)
    max_model_len = shape.max_model_len(engine.max_model_len)
    embedded = engine.model is None or engine.model.startswith("random:")
    template = ChatTemplate.choose(tokenizer, chat_template, embedded)
    config = ServeConfig(model_name=model_name, model_root=_model_root(engine.model),
                         api_key=api_key, max_body_bytes=max_body_bytes)  # fmt: skip
    # 2) the socket
    sock = bind(listen.host, listen.port)
    host, port = sock.getsockname()[:2]
    # 3) the app, the pipeline behind it
    from splitwiser.pipeline import pipeline_from_config  # the engine's imports, once serving

    bridge = PipelineBridge(lambda: pipeline_from_config(engine))
    serving = build_serving(config, bridge, tokenizer=tokenizer, shape=shape,
                            max_model_len=max_model_len, chat_template=template)  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app):
        bridge.start()
        log.info("listening on http://%s:%d (model %s; /health is 503 until the workers are "
                 "ready)", host, port, model_name)  # fmt: skip
        try:
            yield
        finally:
            await asyncio.to_thread(bridge.close)
            log.info("pipeline closed")

    app = build_app(config, bridge, serving, lifespan=lifespan)
    server = _Server(
        uvicorn.Config(
            app,
            log_level=listen.log_level,
            access_log=listen.access_log,
            timeout_graceful_shutdown=listen.shutdown_timeout_s,
        ),
        bridge,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        bridge.close()  # a start that uvicorn's own failure left running
    return server.signal


def _model_root(spec: str | None) -> str:
    """Where the model (and its tokenizer) lives: a directory where there is one."""
    if spec is None:
        from splitwiser.models.default import default_model_dir

        return str(default_model_dir())
    return spec
