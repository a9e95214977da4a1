"""The FastAPI app of ``splitwiser serve``: routes, the API key, body checks, error answers.

``/v1/*`` and ``/reset_prefix_cache`` (it changes what every tenant's requests cost) need the
API key; ``/health``, ``/version``, ``/metrics``, ``/tokenize`` and ``/detokenize`` stay open,
as in vLLM. Every error is OpenAI's JSON shape, and a bad body is a
400, never FastAPI's 422: handlers read and validate their bodies themselves.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from splitwiser import __version__
from splitwiser.errors import (
    InvalidRequestError,
    PipelineClosedError,
    SplitwiserError,
)
from splitwiser.server.bridge import PipelineBridge
from splitwiser.server.chat import ChatTemplate, render_chat
from splitwiser.server.errors import APIError, BadRequest, TooLarge, Unauthorized, error_body
from splitwiser.server.metrics import ServerMetrics
from splitwiser.server.protocol import (
    ChatCompletionRequestMsg,
    CompletionRequestMsg,
    DetokenizeRequestMsg,
    TokenizeRequestMsg,
)
from splitwiser.server.serving import Serving

DEFAULT_MAX_BODY_BYTES = 32 << 20
log = logging.getLogger("splitwiser.serve")


@dataclass(frozen=True)
class ServeConfig:
    """What the HTTP side serves; the engine's options are the pipeline's own config."""

    model_name: str  # the served name: requests' "model", /v1/models' id
    model_root: str  # /v1/models' root: the model's directory (or its spec)
    api_key: str | None = None  # None: /v1/* open
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger bodies get a 413


async def read_body(request: Request, msg_type: type[BaseModel], max_bytes: int) -> BaseModel:
    """The JSON body as ``msg_type``: 400 for a wrong media type, bad JSON or a bad field, 413
    past ``max_bytes``."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise BadRequest("Unsupported Media Type: Only 'application/json' is allowed")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"the request body is over {max_bytes} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > max_bytes:
            raise TooLarge(f"the request body is over {max_bytes} bytes")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    try:
        return msg_type.model_validate(data)
    except ValidationError as exc:
        raise _bad_field(exc) from None


def _bad_field(exc: ValidationError) -> BadRequest:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return BadRequest(f"{where}: {message}" if where else message, param=where or None)


def build_app(
    config: ServeConfig, bridge: PipelineBridge, serving: Serving, lifespan=None
) -> FastAPI:
    app = FastAPI(
        title="splitwiser", version=__version__, docs_url=None, redoc_url=None,
        openapi_url=None, lifespan=lifespan,
    )  # fmt: skip
    created = int(time.time())

    async def check_key(request: Request) -> None:  # async: a sync one would run in a thread pool
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise Unauthorized("Unauthorized: a missing or wrong API key", param="api_key")

    async def body(request: Request, msg_type):
        return await read_body(request, msg_type, config.max_body_bytes)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.post("/completions")
    async def completions(request: Request):
        return await serving.completion(await body(request, CompletionRequestMsg), request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await serving.chat(await body(request, ChatCompletionRequestMsg), request)

    @v1.get("/models")
    async def models():
        card = {
            "id": config.model_name, "object": "model", "created": created,
            "owned_by": "splitwiser", "root": config.model_root, "parent": None,
            "max_model_len": serving.max_model_len, "permission": [],
        }  # fmt: skip
        return {"object": "list", "data": [card]}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        serving_now, why = bridge.state()
        if serving_now:
            return Response(status_code=200)
        return JSONResponse(error_body(503, why), status_code=503)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache", dependencies=[Depends(check_key)])
    async def reset_prefix_cache():
        # vLLM's (dev) endpoint, for benchmarks: 200 with no body, also where blocks still in
        # use kept the cache from resetting (logged, as vLLM does)
        if not await asyncio.to_thread(bridge.reset_prefix_cache):
            log.warning("the prefix cache was not reset: blocks of running requests are in use")
        return Response(status_code=200)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await body(request, TokenizeRequestMsg)
        serving.check_model(req.model)
        if req.messages is not None:
            text = render_chat(
                serving.tokenizer, serving.chat_template,
                [{"role": m.role, "content": m.text()} for m in req.messages],
                add_generation_prompt=req.add_generation_prompt,
            )  # fmt: skip
            ids = serving.token_ids(text, add_special_tokens=False)
        else:
            ids = serving.token_ids(req.prompt, req.add_special_tokens)
        answer = {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}
        if req.return_token_strs:
            answer["token_strs"] = serving.tokenizer.convert_ids_to_tokens(ids)
        return answer

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await body(request, DetokenizeRequestMsg)
        serving.check_model(req.model)
        vocab = serving.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": serving.tokenizer.decode(req.tokens)}

    _add_error_handlers(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return JSONResponse(error_body(400, str(exc.errors()[0]["msg"])), 400)

    @app.exception_handler(SplitwiserError)
    async def runtime_error(request, exc: SplitwiserError):
        if isinstance(exc, InvalidRequestError):
            status = 400
        elif isinstance(exc, PipelineClosedError):
            status = 503
        else:  # a worker crashed past its retries, ...
            status = 500
        return JSONResponse(error_body(status, str(exc)), status)

    @app.exception_handler(Exception)  # a bug: still OpenAI's shape (uvicorn logs the traceback)
    async def unexpected_error(request, exc: Exception):
        return JSONResponse(error_body(500, str(exc) or type(exc).__name__), 500)


def build_serving(config: ServeConfig, bridge, *, tokenizer, shape, max_model_len,
                  chat_template: ChatTemplate) -> Serving:  # fmt: skip
    """The handlers' state for ``config``: tokenizer, context, chat template and metrics."""
    metrics = ServerMetrics(config.model_name, max_model_len, bridge.stats)
    return Serving(
        bridge=bridge, tokenizer=tokenizer, vocab_size=shape.vocab_size,
        max_model_len=max_model_len, model_name=config.model_name,
        chat_template=chat_template, metrics=metrics,
    )  # fmt: skip
