"""``multi-turn``: conversations whose every turn sends the whole history (each previous turn's
prompt and answer, as token ids) plus a new message, sent only once the previous answer arrived
and a think time passed; lengths from the Azure 2023 conversation trace.

The trace has no conversation ids; its ``ContextTokens`` count everything the model read, the
history included. So its rows are read in order and a row continues the conversation of the row
before it when its context holds that turn's whole prompt and answer (``ContextTokens >
previous ContextTokens + GeneratedTokens``): the row is that conversation's next turn, its prompt
exactly the row's context, of which the new message is what the history leaves. Otherwise (or
where the turn would not fit ``max_context``) the row starts a new conversation. The number of
turns, each new message's and each answer's length are thus the trace's (after
``--length-scale``); its first 1,000 rows make 677 conversations of 1 to 4 turns (323 later turns).

Token ids, not text: a turn's prompt is the previous turn's prompt ids, the answer's token ids as
the system produced them and the new message's ids, so a system whose answers equal another's
(greedy, exact) receives the same prompts.
"""

from __future__ import annotations

from splitwiser.benchmark.bench_request import BenchRequest, cap_lengths, scale_lengths
from splitwiser.errors import ConfigError


def build_requests(
    rows, max_context: int, length_scale: float, think_time_s: float
) -> tuple[list, dict]:
    """One request per trace row (``arrival_s``: the row's time), chained into conversations;
    the facts of the workload for the results."""

    if not (think_time_s >= 0 and think_time_s != float("inf")):
        raise ConfigError(f"--think-time must be >= 0 seconds, got {think_time_s!r}")
    requests: list[BenchRequest] = []
    history = None  # the previous turn's prompt + answer, tokens
    conversation, turn, num_capped = -1, 0, 0
    for i, row in enumerate(rows):
        context, answer = scale_lengths(row.context_tokens, row.generated_tokens, length_scale)
        if history is not None and history < context and context + answer <= max_context:
            turn += 1
        else:  # a new conversation, its first turn capped as the trace workloads cap a request
            conversation, turn = conversation + 1, 0
            capped = cap_lengths(row.context_tokens, row.generated_tokens, max_context,
                                 length_scale)  # fmt: skip
            num_capped += capped != (context, answer)
            context, answer = capped
        requests.append(BenchRequest(
            i, row.time_s, context, answer, conversation=conversation, turn=turn,
            think_s=think_time_s if turn else 0.0,
        ))  # fmt: skip
        history = context + answer
    turns = [r.turn + 1 for r in requests if _is_last_turn(requests, r)]
    info = {
        "rows": f"first {len(rows)} of the trace",
        "length_scale": length_scale,
        "max_context": max_context,
        "num_capped": num_capped,
        "num_conversations": len(turns),
        "turns": {"mean": sum(turns) / len(turns), "max": max(turns)} if turns else None,
        "num_follow_ups": sum(r.is_follow_up for r in requests),
        "think_time_s": think_time_s,
    }
    return requests, info


def _is_last_turn(requests, r) -> bool:
    nxt = r.request_id + 1
    return nxt >= len(requests) or requests[nxt].conversation != r.conversation


def message_lens(requests) -> list[int]:
    """Each turn's new message length: the prompt less the history before it (the previous
    turn's prompt and answer); a first turn's message is its whole prompt."""
    out = []
    for prev, r in zip((None, *requests), requests):
        out.append(r.prompt_len - (prev.prompt_len + prev.output_len)
                   if r.is_follow_up else r.prompt_len)  # fmt: skip
    return out


def follow_up_prompt(history: list[int], message: list[int]) -> list[int]:
    """A later turn's prompt: the history (previous prompt ids, then the answer's ids), then
    its new message's ids."""
    return [*history, *message]
