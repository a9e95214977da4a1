"""One benchmark request and the length arithmetic every workload shares (the fixed and trace
workloads in workloads.py, prefix_repetition.py and multi_turn.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    request_id: int
    arrival_s: float  # seconds after the measured run starts (a later turn: see think_s)
    prompt_len: int  # tokens (a later turn: its whole history plus its new message)
    output_len: int  # tokens the client takes, forced with ignore_eos
    # tokens asked for (max_tokens); None: output_len. Where larger, the client cancels the
    # request once it has output_len tokens (as a user closing the stream)
    max_tokens: int | None = None
    # multi-turn: the conversation; None: an independent request. A turn after the first is
    # sent think_s after the previous turn's answer arrived, its prompt the previous prompt,
    # that answer's tokens and its own new message (its arrival_s is nominal)
    conversation: int | None = None
    turn: int = 0
    think_s: float = 0.0
    prefix: int | None = None  # prefix-repetition: which shared prefix its prompt starts with

    @property
    def num_asked_tokens(self) -> int:
        return self.output_len if self.max_tokens is None else self.max_tokens

    @property
    def is_follow_up(self) -> bool:
        """A conversation's turn after the first: its prompt exists only once the previous
        turn's answer did."""
        return self.conversation is not None and self.turn > 0


def scale_lengths(
    context_tokens: int, generated_tokens: int, length_scale: float
) -> tuple[int, int]:
    """A trace request's (prompt, output) lengths multiplied by ``length_scale``, both >= 1."""
    return max(1, round(context_tokens * length_scale)), max(
        1, round(generated_tokens * length_scale)
    )


def cap_lengths(
    context_tokens: int, generated_tokens: int, max_context: int, length_scale: float = 1.0
) -> tuple[int, int]:
    """Scale a trace request's lengths, then fit prompt + output into ``max_context`` tokens.

    The output keeps at most half of the context; the prompt takes what is left. Both stay >= 1.
    """
    prompt, output = scale_lengths(context_tokens, generated_tokens, length_scale)
    output = min(output, max(1, max_context // 2))
    prompt = min(prompt, max_context - output)
    return prompt, output


def window(corpus: list[int], start: int, length: int) -> list[int]:
    """``length`` tokens of the corpus from ``start``, wrapping around."""
    reps = (start + length) // len(corpus) + 1
    return (corpus * reps)[start : start + length]
