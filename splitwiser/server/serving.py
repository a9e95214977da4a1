"""Completions and chat completions: a request's prompts to runtime requests, their steps to
OpenAI's answers, streamed (one chunk per token step) or whole.

A chunk goes out for every generated token, even one whose text is held back (an incomplete
UTF-8 character, or the end of the text that could still grow into a stop string); the last
token's chunk carries ``finish_reason``. Nothing is sent before the first token exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitwiser.core.stop import StopStringMatcher
from splitwiser.errors import InvalidRequestError, SplitwiserError
from splitwiser.outputs import RequestOutput, TokenLogprobs
from splitwiser.server.bridge import Generation, Step
from splitwiser.server.chat import render_chat
from splitwiser.server.errors import BadRequest, NotFound, error_body
from splitwiser.server.logprobs import LogprobsFormat
from splitwiser.server.protocol import ChatCompletionRequestMsg, CompletionRequestMsg

DONE = "data: [DONE]\n\n"
log = logging.getLogger("splitwiser.serve")


def _json(payload) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse(payload: dict) -> str:
    return f"data: {_json(payload)}\n\n"


class ChoiceText:
    """One choice's text as its tokens come: the part safe to send now, and the rest at the end.

    Its stop strings are matched as the engine matches them (``StopStringMatcher``: a few
    tokens decoded per token, whatever the length of the output); only committed text (whole
    characters) is sent, and of it only what no stop string can still take back."""

    def __init__(self, tokenizer, stop: tuple[str, ...], include_stop: bool):
        self._matcher = StopStringMatcher(tokenizer, stop)
        self._include_stop = include_stop
        # NOTE: a stop string not yet complete may be the end of the text now: hold back that
        # much, so text sent is never taken back when the stop string completes
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self._num_sent = 0  # characters
        self._unsent = ""  # the committed text after the first _num_sent characters

    def add(self, token: int) -> str:
        self.token_ids.append(token)
        m = self._matcher
        m.add(token)
        self._unsent += m.new_text
        end = m.detokenizer.num_committed - self._holdback
        if m.cut is not None:  # a stop string ends the request here: cut before it
            end = min(end, m.cut)
        if end <= self._num_sent:
            return ""
        n = end - self._num_sent
        delta, self._unsent, self._num_sent = self._unsent[:n], self._unsent[n:], end
        return delta

    def finish(self, output: RequestOutput) -> str:
        """The rest of the final text."""
        text = self.final_text(output)
        delta = text[self._num_sent :]
        self._num_sent = len(text)
        return delta

    def final_text(self, output: RequestOutput) -> str:
        stop = self.stop_string(output)
        if stop is None or not self._include_stop:
            return output.text
        text = self._matcher.text
        return text[: text.find(stop) + len(stop)]

    def stop_string(self, output: RequestOutput) -> str | None:
        """The stop string that ended the choice, if one did."""
        return self._matcher.stop_str if output.finish_reason == "stop" else None


def stop_reason(output: RequestOutput, text: ChoiceText, params) -> int | str | None:
    """vLLM's ``stop_reason``: the stop token id or string that ended the choice; None for EOS
    or a length finish."""
    if output.finish_reason != "stop":
        return None
    if output.token_ids and output.token_ids[-1] in params.stop_token_ids:
        return output.token_ids[-1]
    return text.stop_string(output)


def usage(prompt_lens: list[int], num_generated: int, num_cached: int | None = None) -> dict:
    """OpenAI's ``usage``; with ``num_cached`` (prompt tokens found in the prefix cache, known
    once every choice ended) its ``prompt_tokens_details.cached_tokens`` as well."""
    prompt = sum(prompt_lens)
    body = {"prompt_tokens": prompt, "completion_tokens": num_generated,
            "total_tokens": prompt + num_generated}  # fmt: skip
    if num_cached is not None:
        body["prompt_tokens_details"] = {"cached_tokens": num_cached}
    return body


@dataclass
class Choice:
    index: int
    prompt_index: int
    params: object  # SamplingParams
    text: ChoiceText
    prefix: str = ""  # echo: the prompt's text, sent before the first token's
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs_format: LogprobsFormat | None = None  # asked for log-probabilities
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # so far
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache, once ended

    def step_text(self, step: Step) -> str:
        if step.logprobs is not None:
            self.logprobs.append(step.logprobs)
        delta = self.prefix + (self.text.add(step.token) if step.token is not None else "")
        self.prefix = ""
        if step.output is not None:
            delta += self.text.finish(step.output)
            self.finish_reason = step.output.finish_reason
            self.stop_reason = stop_reason(step.output, self.text, self.params)
            self.num_cached_tokens = step.output.num_cached_tokens
        return delta


class Serving:
    """The handlers' logic over one pipeline bridge and its served model."""

    def __init__(
        self, *, bridge, tokenizer, vocab_size, max_model_len, model_name, chat_template, metrics
    ):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._model_max_len = max_model_len
        self.model_name = model_name
        self.chat_template = chat_template
        self.metrics = metrics

    @property
    def max_model_len(self) -> int:
        """The context served: the engine's once it started (a default pool may bound the
        model's), else the model's."""
        return self.bridge.max_model_len or self._model_max_len

    # ------------------------------------------------------------------ checks

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise NotFound(f"The model `{name}` does not exist.", param="model")

    def max_tokens(self, prompt_len: int, requested: int | None) -> int:
        """``requested`` if prompt and output fit the context (None: the rest of it)."""
        n = self.max_model_len
        if prompt_len >= n:
            raise BadRequest(
                f"This model's maximum context length is {n} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input messages.",
                param="input_tokens",
            )
        if requested is None:
            return n - prompt_len
        if prompt_len + requested > n:
            raise BadRequest(
                f"This model's maximum context length is {n} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the messages, {requested} in "
                f"the completion). Please reduce the length of the messages or completion.",
                param="max_tokens",
            )
        return requested

    def token_ids(self, prompt: str | list[int], add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)
        return list(prompt)

    def _start(self, prompts: list[list[int]], req, requested: int | None):
        """Submit every prompt ``req.n`` times: the choices, in OpenAI's index order, and
        their generation. Every prompt is checked before any is submitted."""
        runs, choices = [], []
        for p, ids in enumerate(prompts):
            max_new = self.max_tokens(len(ids), requested)
            for j in range(req.n):
                params = req.sampling_params(max_new, j)
                text = ChoiceText(self.tokenizer, req.stop_strings, req.include_stop_str_in_output)
                lps = None if params.logprobs is None else LogprobsFormat(self.tokenizer)
                choices.append(Choice(len(choices), p, params, text, logprobs_format=lps))
                runs.append((ids, params))
            self.metrics.request_started(max_new, req.n)
        try:
            return choices, self.bridge.generate(runs, self.metrics)
        except InvalidRequestError as exc:  # a token outside the vocabulary, a pool too small
            raise BadRequest(str(exc)) from None

    # ------------------------------------------------------------------ completions

    async def completion(self, req: CompletionRequestMsg, request: Request) -> Response:
        self.check_model(req.model)
        prompts = [self.token_ids(p, req.add_special_tokens) for p in req.prompts]
        choices, gen = self._start(prompts, req, req.max_tokens)
        if req.echo:
            for c in choices:
                c.prefix = self.tokenizer.decode(prompts[c.prompt_index], skip_special_tokens=True)
        answer = _Answer("cmpl", "text_completion", self.model_name, req, prompts, choices)
        if req.stream:
            return _stream(answer.completion_chunks(gen))
        return await _unless_disconnected(request, answer.completion(gen))

    # ------------------------------------------------------------------ chat

    def chat_prompt(self, req: ChatCompletionRequestMsg) -> str:
        return render_chat(
            self.tokenizer,
            self.chat_template,
            req.chat_messages(),
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            kwargs=req.chat_template_kwargs,
        )

    async def chat(self, req: ChatCompletionRequestMsg, request: Request) -> Response:
        self.check_model(req.model)
        ids = self.token_ids(self.chat_prompt(req), req.add_special_tokens)
        choices, gen = self._start([ids], req, req.requested_max_tokens)
        answer = _Answer("chatcmpl", "chat.completion", self.model_name, req, [ids], choices)
        if req.stream:
            return _stream(answer.chat_chunks(gen))
        return await _unless_disconnected(request, answer.chat(gen))


class _Answer:
    """One HTTP request's answer, built from its generation's steps."""

    def __init__(self, prefix, kind, model, req, prompts, choices):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.kind = kind  # "text_completion" or "chat.completion"
        self.model = model
        self.req = req
        self.prompts = prompts
        self.choices = choices
        self.created = int(time.time())
        self.num_generated = 0

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        return usage([len(p) for p in self.prompts], self.num_generated, self._num_cached())

    def _num_cached(self) -> int | None:
        """Prompt tokens the prefix cache served, each prompt counted once as in
        ``prompt_tokens`` (with ``n`` > 1: the fewest of its choices); None until every choice
        ended."""
        cached = [c.num_cached_tokens for c in self.choices]
        if None in cached:
            return None
        per_prompt = [len(p) for p in self.prompts]
        for c in self.choices:
            per_prompt[c.prompt_index] = min(per_prompt[c.prompt_index], c.num_cached_tokens)
        return sum(per_prompt)

    def _advance(self, step: Step) -> tuple[Choice, str]:
        """The step's choice and its new text; a failed request raises its error."""
        if step.error is not None:
            raise step.error
        choice = self.choices[step.index]
        self.num_generated += step.token is not None
        return choice, choice.step_text(step)

    # ---- whole answers
    async def _collect(self, gen: Generation) -> dict[int, str]:
        texts = {c.index: "" for c in self.choices}
        try:
            async for step in gen.steps():
                choice, delta = self._advance(step)
                texts[choice.index] += delta
        finally:  # also when cancelled (the client went away): its requests stop
            gen.cancel()
        return texts

    @staticmethod
    def _logprobs(choice: Choice, steps: list[TokenLogprobs], kind: str) -> dict | None:
        fmt = choice.logprobs_format
        if fmt is None or not steps:
            return None
        return fmt.chat(steps) if kind.startswith("chat") else fmt.completion(steps)

    def _extra(self, choice: Choice, body: dict) -> dict:
        if self.req.return_token_ids:
            body["token_ids"] = list(choice.text.token_ids)
            body["prompt_token_ids"] = self.prompts[choice.prompt_index]
        return body

    async def completion(self, gen: Generation) -> JSONResponse:
        texts = await self._collect(gen)
        choices = [
            self._extra(c, {"index": c.index, "text": texts[c.index],
                            "logprobs": self._logprobs(c, c.logprobs, "text_completion"),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            for c in self.choices
        ]  # fmt: skip
        return JSONResponse(
            {**self._head("text_completion"), "choices": choices, "usage": self.usage()}
        )

    async def chat(self, gen: Generation) -> JSONResponse:
        texts = await self._collect(gen)
        choices = [
            self._extra(c, {"index": c.index,
                            "message": {"role": "assistant", "content": texts[c.index]},
                            "logprobs": self._logprobs(c, c.logprobs, "chat.completion"),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            for c in self.choices
        ]  # fmt: skip
        return JSONResponse(
            {**self._head("chat.completion"), "choices": choices, "usage": self.usage()}
        )

    # ---- streams
    async def _chunks(self, gen: Generation, kind: str, choice_body) -> AsyncIterator[str]:
        """The stream's events: each batch of steps that arrived together goes out as one
        write (an event per step), the last with ``[DONE]``. Cancels whatever still runs when
        left early (the client went away, an error)."""
        # every chunk starts with the same id, object, created and model: made once
        head = f'data: {_json(self._head(kind))[:-1]},"choices":['
        ready: list[str] = []
        try:
            async for batch in gen.batches():
                for step in batch:
                    choice, delta = self._advance(step)
                    body = choice_body(choice, delta)
                    step_lps = [step.logprobs] if step.logprobs is not None else []
                    body["logprobs"] = self._logprobs(choice, step_lps, kind)
                    body["finish_reason"] = choice.finish_reason if step.is_last else None
                    body["stop_reason"] = choice.stop_reason if step.is_last else None
                    if self.req.return_token_ids:
                        body["token_ids"] = [] if step.token is None else [step.token]
                    usage = f',"usage":{_json(self.usage())}' if self.req.continuous_usage else ""
                    ready.append(f"{head}{_json(body)}]{usage}}}\n\n")
                if not gen.ended:  # the last batch goes out with [DONE]
                    yield "".join(ready)
                    ready.clear()
            if self.req.include_usage:
                ready.append(sse({**self._head(kind), "choices": [], "usage": self.usage()}))
        except Exception as exc:  # the 200 is sent: the error goes in the stream
            if not isinstance(exc, SplitwiserError):
                log.exception("stream %s failed", self.id)
            ready.append(sse(error_body(500, str(exc) or type(exc).__name__)))
        except asyncio.CancelledError:  # cut: the server stopping past its --shutdown-timeout
            # (or the client gone, then nobody reads it): the stream still ends as an error does
            ready.append(sse(error_body(503, "the request was cancelled: the server is stopping")))
        finally:
            gen.cancel()
        ready.append(DONE)
        yield "".join(ready)

    def completion_chunks(self, gen: Generation) -> AsyncIterator[str]:
        return self._chunks(
            gen, "text_completion",
            lambda c, delta: {"index": c.index, "text": delta},
        )  # fmt: skip

    def chat_chunks(self, gen: Generation) -> AsyncIterator[str]:
        started: set[int] = set()

        def body(c: Choice, delta: str) -> dict:
            message = {"content": delta}
            if c.index not in started:  # the role rides on the first token's chunk
                started.add(c.index)
                message = {"role": "assistant", "content": delta}
            return {"index": c.index, "delta": message}

        return self._chunks(gen, "chat.completion.chunk", body)


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    # Starlette cancels the iterator when the client goes away; its ``finally`` cancels the
    # requests. No gzip, no buffering: each chunk is sent as it is made.
    return StreamingResponse(chunks, media_type="text/event-stream")


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, answer) -> Response:
    """``answer`` (a coroutine), cancelled if the client goes away first (its requests with it;
    Starlette cancels only streams by itself)."""
    task = asyncio.ensure_future(answer)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            t.cancel()
    if not task.cancelled() and task.done():
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nobody reads it: the client is gone
