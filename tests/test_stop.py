"""The stop-string matcher against the rule it replaces: decode the whole output at every token
and cut before the first stop string. Same text, same token, for a byte-level BPE tokenizer and
a SentencePiece-style one; and the tokens it decodes grow linearly with the output."""

from __future__ import annotations

import random
from importlib import resources

import pytest

from splitwiser.core.stop import StopStringMatcher, first_stop
from splitwiser.models.default import build_tokenizer


def sentencepiece_style_tokenizer():
    """A Llama-style tokenizer: "▁" for spaces, the leading one stripped, bytes as
    <0x..> tokens that join into characters (some of them 2 and 3 bytes long)."""
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pieces = ["<s>", "▁the", "▁cat", "▁sat", "▁", "on", "mat", "."]
    pieces += [f"<0x{b:02X}>" for b in (0xC3, 0xA9, 0xE4, 0xB8, 0xAD, 0x41)]
    backend = Tokenizer(BPE({p: i for i, p in enumerate(pieces)}, [], byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")


def token_units(tok, style: str) -> list[list[int]]:
    """What a random stream is made of: any token for byte-level BPE (it decodes broken bytes
    the same in context); for the SentencePiece style, words and whole characters split over
    byte tokens (a run of byte tokens that is not UTF-8 decodes to one \\ufffd per byte, so the
    text of tokens long before changes as it grows: no decode of recent tokens can follow)."""
    if style == "byte-level":
        return [[t] for t in range(len(tok))]
    return [[t] for t in range(8)] + [
        [tok.convert_tokens_to_ids(f"<0x{b}>") for b in c]
        for c in (("C3", "A9"), ("E4", "B8", "AD"), ("41",))
    ]


def whole_decode_rule(tok, ids: list[int], stop: tuple[str, ...]) -> tuple[int, str]:
    """The token a request stops at (len(ids) if none) and its text, decoding all of it."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        found = first_stop(text, stop)
        if found is not None:
            return n, text[: found[0]]
    return len(ids), text


@pytest.mark.parametrize("style", ["byte-level", "sentencepiece"])
def test_matcher_is_the_whole_decode_rule_on_random_streams(style):
    tok = build_tokenizer() if style == "byte-level" else sentencepiece_style_tokenizer()
    units = token_units(tok, style)
    rng = random.Random(0)
    num_matched = 0
    for _ in range(300):
        ids = [t for _ in range(rng.randrange(1, 30)) for t in rng.choice(units)]
        # stop strings cut from the stream's own text (across tokens), or from another's
        text = tok.decode(ids if rng.random() < 0.8 else rng.choice(units) * 3)
        stop = []
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(text) + 1)
            stop.append(text[i : i + rng.randrange(1, 7)] or "x")
        stop = tuple(s for s in stop if style == "byte-level" or "\ufffd" not in s) or ("x",)
        n_stop, expected = whole_decode_rule(tok, ids, stop)
        matcher = StopStringMatcher(tok, stop)
        for n, t in enumerate(ids, 1):
            so_far = tok.decode(ids[:n], skip_special_tokens=True)
            if matcher.add(t):
                break
            # byte fallback: while a character is incomplete, the whole run of byte tokens it
            # ends decodes to \ufffd; the matcher keeps the characters before it
            if style == "byte-level" or not so_far.endswith("\ufffd"):
                assert matcher.text == so_far
        assert (n, matcher.stopped_text) == (n_stop, expected), (ids, stop)
        if matcher.matched:
            num_matched += 1
            whole = tok.decode(ids[:n], skip_special_tokens=True)
            assert whole[matcher.cut :].startswith(matcher.stop_str)
            assert first_stop(whole, stop) == (matcher.cut, matcher.stop_str)
    assert 100 < num_matched < 300  # both endings are tested


class CountingTokenizer:
    """A tokenizer that counts the tokens it is asked to decode."""

    is_fast = False
    clean_up_tokenization_spaces = False

    def __init__(self, tok):
        self.tok = tok
        self.all_special_ids = tok.all_special_ids
        self.num_decoded = 0

    def decode(self, ids, **kwargs) -> str:
        self.num_decoded += len(ids)
        return self.tok.decode(ids, **kwargs)


def corpus_tokens(tok, n: int) -> list[int]:
    """``n`` tokens of English text: the tokenizer's corpus, again as often as it takes."""
    text = resources.files("splitwiser.models").joinpath("corpus.txt").read_text("utf-8")
    ids = tok(text).input_ids
    return (ids * (n // len(ids) + 1))[:n]


def num_decoded(tok, ids: list[int]) -> int:
    counting = CountingTokenizer(tok)
    matcher = StopStringMatcher(counting, ("a stop string that never comes",))
    assert not any(matcher.add(t) for t in ids)
    assert matcher.text == tok.decode(ids, skip_special_tokens=True)
    return counting.num_decoded


def test_decoded_tokens_grow_linearly_with_the_output():
    """Decoding the whole output at every token decodes n^2/2 tokens over n (4x for 2x)."""
    tok = build_tokenizer()
    ids = corpus_tokens(tok, 2000)
    short, long = num_decoded(tok, ids[:1000]), num_decoded(tok, ids)
    assert long / short < 2.5
    assert long < 10 * len(ids)


@pytest.mark.parametrize("include_stop", [False, True])
def test_streamed_text_is_never_taken_back_and_ends_at_the_stop_string(include_stop):
    """The server's text of a choice, sent as the tokens come: always a prefix of the final
    text, which is the engine's (cut before the stop string, or through it if asked)."""
    from splitwiser.outputs import RequestMetrics, RequestOutput
    from splitwiser.server.serving import ChoiceText

    tok = build_tokenizer()
    units = token_units(tok, "byte-level")
    rng = random.Random(1)
    for _ in range(200):
        ids = [t for _ in range(rng.randrange(1, 30)) for t in rng.choice(units)]
        text = tok.decode(ids)
        i = rng.randrange(len(text) + 1)
        stop = (text[i : i + rng.randrange(1, 7)] or "x", "never")
        n_stop, cut_text = whole_decode_rule(tok, ids, stop)
        found = first_stop(tok.decode(ids[:n_stop], skip_special_tokens=True), stop)
        final = cut_text
        if found is not None and include_stop:
            final = cut_text + found[1]
        choice, sent = ChoiceText(tok, stop, include_stop), ""
        for t in ids[:n_stop]:
            sent += choice.add(t)
            assert final.startswith(sent)
        reason = "stop" if found is not None else "length"
        out = RequestOutput(0, None, [1], ids[:n_stop], cut_text, reason, RequestMetrics(0.0))
        assert sent + choice.finish(out) == final
        assert choice.stop_string(out) == (None if found is None else found[1])
