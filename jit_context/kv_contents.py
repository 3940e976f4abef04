"""Which tokens the executor's KV cache holds, so that a request whose prompt starts with them skips their prefill
(prefix reuse across the turns of a conversation: turn n + 1's prompt is turn n's prompt, its reply and a new
message).

The cache holds one sequence (batch 1): the last finished request's prompt and every generated token that a later
step consumed, at positions [0, len). A request's steps write K/V only at positions at or after its first
prefilled position, so what lies before it stays valid for the next request. Anything that ends a request
abnormally (an error, a cancel) forgets the contents: what its steps wrote is not tracked.

The cache's last position is the executor's scratch row (`ipc.step_buffers.SCRATCH_ROWS`): graph warm-ups and
padding rows write there at any time, so it never counts as held.
"""

from __future__ import annotations

from ipc.step_buffers import SCRATCH_ROWS


class KvContents:
    def __init__(self, max_context: int) -> None:
        self._ids: list[int] = []  # token ids whose K/V sit at positions [0, len(_ids))
        self._rows = max_context - SCRATCH_ROWS  # positions that only a request writes

    def reusable(self, prompt_ids: list[int]) -> int:
        """Leading prompt tokens whose K/V the cache already holds; at most all but the last prompt token, whose
        prefill gives the first token's logits."""
        limit = min(len(self._ids), len(prompt_ids) - 1)
        n = 0
        while n < limit and self._ids[n] == prompt_ids[n]:
            n += 1
        return n

    def forget(self) -> None:
        """A request starts writing: until it ends normally, nothing is known to be valid."""
        self._ids = []

    def hold(self, ids: list[int]) -> None:
        """A request ended normally with K/V for exactly these ids at positions [0, len(ids))."""
        self._ids = list(ids[:self._rows])

    def __len__(self) -> int:
        return len(self._ids)
