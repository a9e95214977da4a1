"""The stop rule: why a request ends after a token (EOS, a stop token id, its length), and its
stop strings, matched as its tokens come.

A stop string ends a request once the decode of its output contains one; the text it returns is
cut before the first one by position. ``StopStringMatcher`` stops at the token and with the text
that decoding the whole output at every token gives (``first_stop`` over it), but each token
decodes only the tokens since the last point where the text was whole (vLLM's incremental
detokenizer) and searches only the new text and the characters a stop string could share with
the text before. (One difference: with SentencePiece's byte fallback, a run of byte tokens
that ends in an incomplete character decodes whole to one U+FFFD per byte; the matcher keeps
the characters it had, so only a stop string with U+FFFD in it could match otherwise.)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from splitwiser.sampling import SamplingParams


def stop_reason(
    token: int,
    num_generated: int,
    max_new_tokens: int,
    params: SamplingParams,
    eos: tuple[int, ...],
) -> str | None:
    """Why a request ends after its ``num_generated``-th token, or ``None`` if it goes on."""
    stops = token in params.stop_token_ids or (not params.ignore_eos and token in eos)
    if stops and num_generated >= params.min_new_tokens:
        return "stop"
    if num_generated >= max_new_tokens:
        return "length"
    return None


def first_stop(text: str, stop: tuple[str, ...], start: int = 0) -> tuple[int, str] | None:
    """The first stop string in ``text[start:]`` by position (the smaller string on a tie), and
    where it starts; ``None`` if there is none."""
    found = [(i, s) for i, s in ((text.find(s, start), s) for s in stop) if i >= 0]
    return min(found) if found else None


def decoder(tokenizer) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, straight from the Rust tokenizer
    where that is all it does (a fast tokenizer with no clean-up of spaces): the Python around
    it costs more than the decode of a few tokens, and a request decodes at every token."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if tokenizer.is_fast else None
    if backend is None or tokenizer.clean_up_tokenization_spaces:
        return partial(tokenizer.decode, skip_special_tokens=True)
    return partial(backend.decode, skip_special_tokens=True)


class IncrementalDetokenizer:
    """A request's output text as its tokens come, split in two: ``committed``, the text of the
    tokens up to the last point where it ended on a whole character (it never changes), and
    ``pending``, the text of the tokens since, in context (it may still change: an incomplete
    UTF-8 character). ``committed + pending`` is the decode of every token so far.

    Each token decodes a window from the previous commit point (vLLM's prefix and read
    offsets), so a tokenizer that drops a leading space or joins bytes across tokens decodes
    the new tokens as in context. Special tokens are dropped as they come: the decode skips
    them. The window is bounded except while the text ends in a broken character: a run of
    such tokens stays in it until the character is whole, as in vLLM.

    A tokenizer that cleans up spaces (" ." to ".") may change text before the window: its
    ``text`` is decoded whole (once, at the end), and its stop strings are found as they come
    in the text decoded so far."""

    def __init__(self, tokenizer):
        self._decode = decoder(tokenizer)
        # its decode may change text before the window (see above)
        self.cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._special_ids = frozenset(tokenizer.all_special_ids)
        self._ids: list[int] = []  # the tokens that are not special
        self._pieces: list[str] = []  # the committed text, joined only when asked for
        self.num_committed = 0  # characters of committed text
        self._prefix = 0  # where the decode window starts, an index into _ids
        self._read = 0  # the tokens whose text is committed
        self._prefix_text = ""  # decode(_ids[_prefix : _read]) on its own
        self.pending = ""

    def add(self, token: int) -> str:
        """Take one token; the text it commits ("" while the text ends in a broken character)."""
        if token in self._special_ids:
            return ""
        self._ids.append(token)
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            self.pending = text[len(self._prefix_text) :]
            return ""  # no new text yet, or a character whose bytes are not all there yet
        new = text[len(self._prefix_text) :]
        self._pieces.append(new)
        self.num_committed += len(new)
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        self.pending = ""
        return new

    @property
    def committed(self) -> str:
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def text(self) -> str:
        """The decode of every token so far."""
        if self.cleans_up:
            return self._decode(self._ids)
        return self.committed + self.pending


class StopStringMatcher:
    """One request's stop strings over its tokens: ``add`` says whether the token completed one;
    then ``cut`` is where the text ends (before the first stop string) and ``stop_str`` which
    one it was. Tokens after a match are decoded, not searched."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        # NOTE: the committed text before _searched holds no stop string, nor the start of one:
        # a stop string that ends after it starts at most len(longest) - 1 characters before
        self._overlap = max((len(s) for s in stop), default=1) - 1
        self._searched = 0
        self._recent = ""  # the committed text from _searched on
        self.cut: int | None = None  # characters of text before the first stop string
        self.stop_str: str | None = None
        self.new_text = ""  # the text the last token committed (see IncrementalDetokenizer)

    @property
    def matched(self) -> bool:
        return self.cut is not None

    def add(self, token: int) -> bool:
        """Take one token; whether a stop string is now in the text (this token or before)."""
        d = self.detokenizer
        self.new_text = d.add(token)
        if self.matched or not self.stop:
            return self.matched
        self._recent += self.new_text
        found = first_stop(self._recent + d.pending, self.stop)
        if found is not None:
            self.cut, self.stop_str = self._searched + found[0], found[1]
            return True
        drop = max(0, d.num_committed - self._overlap) - self._searched
        if drop > 0:
            self._recent, self._searched = self._recent[drop:], self._searched + drop
        return False

    @property
    def text(self) -> str:
        """The decode of every token so far."""
        return self.detokenizer.text

    @property
    def stopped_text(self) -> str:
        """The text cut before the first stop string (all of it if none matched)."""
        text = self.text
        if self.cut is None:
            return text
        if self.detokenizer.cleans_up:
            found = first_stop(text, self.stop)
            return text if found is None else text[: found[0]]
        return text[: self.cut]
