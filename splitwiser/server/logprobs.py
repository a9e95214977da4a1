"""Log-probabilities in OpenAI's two shapes, as vLLM answers them: completions'
``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (the drawn token is always among
its ``top_logprobs``) and chat's ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``.
A token's string is its id decoded alone."""

from __future__ import annotations

import math

from splitwiser.outputs import TokenLogprobs


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0  # JSON has no -inf (vLLM's stand-in)


class LogprobsFormat:
    """One choice's log-probabilities, token by token; ``offset``: text before its first token."""

    def __init__(self, tokenizer, offset: int = 0):
        self._tokenizer = tokenizer
        self._offset = offset

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def completion(self, steps: list[TokenLogprobs]) -> dict:
        answer = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        for lp in steps:
            text = self._text(lp.token_id)
            top = {self._text(t): _value(v) for t, v in lp.top}
            top.setdefault(text, _value(lp.logprob))
            answer["text_offset"].append(self._offset)
            answer["token_logprobs"].append(_value(lp.logprob))
            answer["tokens"].append(text)
            answer["top_logprobs"].append(top)
            self._offset += len(text)
        return answer

    def chat(self, steps: list[TokenLogprobs]) -> dict:
        return {"content": [self._chat_entry(lp) for lp in steps]}

    def _chat_entry(self, lp: TokenLogprobs) -> dict:
        entry = self._entry(lp.token_id, lp.logprob)
        entry["top_logprobs"] = [self._entry(t, v) for t, v in lp.top]
        return entry

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self._text(token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode())}
