"""Incremental detokenization and stop strings, on the real SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

import pytest

from jit_context.detokenizer import IncrementalDetokenizer, StopStringMatcher
from jit_context.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(gguf_tokenizer) -> Tokenizer:
    """The default model's tokenizer from its GGUF file (conftest: one load per session)."""
    return gguf_tokenizer


@pytest.fixture(scope="module")
def prompt_ids(tok) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": "Say something."}])


def stream(tok, prompt_ids, ids) -> list[str]:
    """Pieces returned by add() for each id, then flush()."""
    detok = IncrementalDetokenizer(tok, prompt_ids)
    return [detok.add(i) for i in ids] + [detok.flush()]


def test_ascii_pieces_concatenate_to_full_decode(tok, prompt_ids):
    text = "Hello world! The quick brown fox jumps over the lazy dog.  Two  spaces,\n\ttabs and 1234.5 numbers."
    ids = tok.encode(text)
    pieces = stream(tok, prompt_ids, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all(pieces[:-1])  # ASCII never needs holding back


@pytest.mark.parametrize("text", ["😀 中文 naïve café 🎉🇫🇷 ok", "日本語のテキスト、句読点。", "🤖🤖🤖"])
def test_multibyte_characters_are_never_split(tok, prompt_ids, text):
    ids = tok.encode(text)
    pieces = stream(tok, prompt_ids, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some character did span several tokens and was held back


def test_empty_prompt_and_special_tokens_skipped(tok):
    ids = tok.encode("Hi there 😀") + [2]  # <|im_end|> at the end, as the model emits it
    pieces = stream(tok, [], ids)
    assert "".join(pieces) == tok.decode(ids) == "Hi there 😀"


def test_special_tokens_kept_when_asked(tok, prompt_ids):
    """skip_special_tokens False (vLLM's param; the tool-call parsers' way to see a marker that is a special
    token): the pieces add up to the decode with them."""
    ids = tok.encode("Hi") + [1] + tok.encode(" there") + [1]  # 1: <|im_start|>, a special token
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=False)
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special_tokens=False) and text.count("<|im_start|>") == 2
    assert "<|im_start|>" not in "".join(IncrementalDetokenizer(tok, prompt_ids).add(t) for t in ids)


def test_incomplete_character_is_released_by_flush(tok, prompt_ids):
    ids = tok.encode("a😀")[:-1]  # cut inside the emoji's bytes
    pieces = stream(tok, prompt_ids, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces[:-1]) and pieces[-1].endswith("\ufffd")


# ---------------------------------------------------------------- stop strings


def run_stop(tok, prompt_ids, text, stops):
    """Stream text token by token through detokenizer + matcher: (emitted text, stopped, tokens consumed)."""
    detok, matcher = IncrementalDetokenizer(tok, prompt_ids), StopStringMatcher(stops)
    emitted, ids = [], tok.encode(text)
    for n, token_id in enumerate(ids, start=1):
        piece, stopped = matcher.feed(detok.add(token_id))
        emitted.append(piece)
        if stopped:
            return "".join(emitted), True, n
    piece, _ = matcher.feed(detok.flush())
    return "".join(emitted) + piece + matcher.flush(), False, len(ids)


def test_stop_string_spanning_two_tokens(tok, prompt_ids):
    text = "The answer is forty-two. Anything else?"
    ids = tok.encode(text)
    pieces = [tok.decode(ids[:i + 1])[len(tok.decode(ids[:i])):] for i in range(len(ids))]
    i = next(k for k in range(len(pieces) - 1) if len(pieces[k]) >= 2 and len(pieces[k + 1]) >= 2 and k > 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]  # straddles the boundary between tokens i and i+1
    emitted, stopped, consumed = run_stop(tok, prompt_ids, text, (stop,))
    assert stopped and consumed == i + 2
    assert emitted == text[:text.index(stop)]


def test_stop_string_at_the_very_start(tok, prompt_ids):
    emitted, stopped, consumed = run_stop(tok, prompt_ids, "Hello there", ("Hel",))
    assert (emitted, stopped, consumed) == ("", True, 1)


def test_partial_stop_prefix_is_released_not_matched(tok, prompt_ids):
    text = "hello world"
    emitted, stopped, _ = run_stop(tok, prompt_ids, text, ("world peace",))
    assert (emitted, stopped) == (text, False)  # "world" is held back until the final flush
    # A partial match in the middle is released as soon as the text diverges, without a flush.
    matcher = StopStringMatcher(("world peace",))
    assert matcher.feed("hello world") == ("hello ", False)
    assert matcher.feed(", hi") == ("world, hi", False)
    assert matcher.flush() == ""


def test_matcher_earliest_stop_wins_and_stays_stopped():
    matcher = StopStringMatcher(("END", "\n\n"))
    out = [matcher.feed(c) for c in "ab\n\ncd END"]
    assert "".join(e for e, _ in out) == "ab" and out[3] == ("", True)
    assert matcher.feed("more") == ("", True) and matcher.flush() == ""
    assert StopStringMatcher(("xyz", "b")).feed("abcxyz") == ("a", True)


def test_matcher_overlapping_prefixes():
    matcher = StopStringMatcher(("aab",))
    assert matcher.feed("aa") == ("", False)
    assert matcher.feed("a") == ("a", False)  # "aaa": only the last "aa" can still start "aab"
    assert matcher.feed("b!") == ("", True)
    assert StopStringMatcher(()).feed("anything") == ("anything", False)
    with pytest.raises(ValueError, match="stops"):
        StopStringMatcher(("",))
