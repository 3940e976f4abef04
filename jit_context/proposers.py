"""Proposers of speculative tokens, host side: given the tokens so far, guess the next few.

`NgramProposer` is prompt lookup (vLLM's `ngram` method, HF's prompt_lookup_num_tokens): the longest suffix of
the sequence, n from n_max down to n_min tokens, that also occurred earlier (in the prompt or the output)
proposes the tokens that followed an earlier occurrence: the most recent one with k tokens after it, else the most
recent one. Why not always the most recent: while a reply copies from its prompt, the suffix's most recent
occurrence is often a few tokens back in the reply itself, whose continuation runs into the present and proposes
fewer tokens; an older occurrence proposes all k. Measured by replaying SmolLM2-135M's greedy replies to the bench's
8 grounded prompts (CPU, 381 tokens, k = 8, a verify costing 1.26 decode steps as on the H200): 60 verify steps
instead of 76, modelled speed-up 3.11x against 2.67x; the 4 open prompts unchanged (bench/NOTES.md, sixteenth
session). It keeps a hash index of every n-gram's end positions, updated as tokens arrive, so a lookup costs
O(n_max) dictionary probes and a bisection whatever the length of the sequence (the plain decode loop asks it once
per token while the device computes the next one).
"""

from __future__ import annotations

from bisect import bisect_right

DEFAULT_NGRAM_MIN = 2
DEFAULT_NGRAM_MAX = 4


class NgramProposer:
    def __init__(self, n_min: int = DEFAULT_NGRAM_MIN, n_max: int = DEFAULT_NGRAM_MAX) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"n-gram sizes need 1 <= min <= max, got min {n_min}, max {n_max}")
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], list[int]] = {}  # n-gram -> indices of its last token, ascending
        self._indexed = 0  # n-grams ending before this index are in _ends

    def reset(self, tokens: list[int]) -> None:
        """Start a new sequence (a request's prompt)."""
        self.tokens = list(tokens)
        self._ends.clear()
        self._indexed = 0

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def prepare(self) -> None:
        """Index what `propose` would search now (all but the current suffix): call it while the device works (a
        request's prefill), so that the first proposal does not pay for the prompt (2.3 ms for 2,000 tokens on the
        CPU machine, against ~2 us for each proposal after)."""
        self._index_until(len(self.tokens) - 1)

    def _index_until(self, end: int) -> None:
        """Index the n-grams ending at positions [_indexed, end): every occurrence but the current suffix."""
        seq, index = self.tokens, self._ends
        for i in range(self._indexed, end):
            for n in range(self.n_min, min(self.n_max, i + 1) + 1):
                index.setdefault(tuple(seq[i - n + 1:i + 1]), []).append(i)
        self._indexed = max(self._indexed, end)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed an earlier occurrence of the longest matching suffix (the most recent one with
        k tokens after it, else the most recent one); [] when no suffix of n_min or more tokens occurred before."""
        seq = self.tokens
        if k < 1 or len(seq) < self.n_min + 1:
            return []
        self._index_until(len(seq) - 1)
        for n in range(min(self.n_max, len(seq) - 1), self.n_min - 1, -1):
            ends = self._ends.get(tuple(seq[-n:]))
            if ends:
                full = bisect_right(ends, len(seq) - 1 - k)  # ends[:full] have k tokens after them
                end = ends[full - 1] if full else ends[-1]
                return seq[end + 1:end + 1 + k]
        return []
