"""Streaming text out of generated token ids: incremental detokenization and stop-string matching.

`IncrementalDetokenizer` turns one token at a time into newly completed text, using vLLM's
prefix-offset / read-offset method: each step decodes a short window of ids twice (with and without
the new ones) and emits the difference. Decoding a window with some context before it, instead of the
new token alone, is what makes tokenizers that drop or merge a token's leading space (SentencePiece
"▁", byte-level BPE split characters) decode the same as a full decode would.

`StopStringMatcher` works on that text: it holds back any tail that could still become a stop string.
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens kept as left context for the first generated tokens (as vLLM).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Per-request detokenizer: `add` each generated id, then `flush` once at the end.

    The pieces returned by `add` plus `flush()` concatenate to
    `tokenizer.decode(generated_ids, skip_special_tokens=skip_special_tokens)` for byte-level BPE tokenizers
    (Llama 3, SmolLM2, GPT-2 family). For SentencePiece tokenizers the stream keeps the leading space of the first
    generated word, which a standalone decode strips: the stream is the continuation of the prompt.
    """

    def __init__(self, tokenizer: _Decoder, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._ids: list[int] = context  # context + generated ids
        self._prefix_offset = 0  # start of the window decoded each step
        self._read_offset = len(context)  # ids before this have been emitted as text

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Record one generated id; return the text it completes ('' while a character is still partial)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        # A trailing U+FFFD is a UTF-8 character whose remaining bytes are in tokens not yet generated.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Release text held back at the end of generation (e.g. a genuinely invalid byte sequence)."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]


class StopStringMatcher:
    """Cuts the streamed text at the first stop string (which is not emitted, as OpenAI does)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stops must be non-empty strings, got {stops!r}")
        self._stops = tuple(stops)
        self._max_len = max((len(s) for s in stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add streamed text; return (text safe to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        cut = self._first_match(buffer)
        if cut is not None:
            self._held = ""
            self.stopped = True
            return buffer[:cut], True
        hold_from = self._partial_match_start(buffer)
        self._held = buffer[hold_from:]
        return buffer[:hold_from], False

    def flush(self) -> str:
        """At the end of generation: the held tail never became a stop string, so it is output."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_match(self, buffer: str) -> int | None:
        found = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _partial_match_start(self, buffer: str) -> int:
        # The earliest start of a tail that is a proper prefix of some stop string; full matches
        # were handled by the caller, so only the last (max_len - 1) characters can qualify.
        for start in range(max(0, len(buffer) - self._max_len + 1), len(buffer)):
            tail = buffer[start:]
            if any(s.startswith(tail) for s in self._stops):
                return start
        return len(buffer)
