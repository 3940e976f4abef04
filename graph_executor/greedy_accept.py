"""Greedy acceptance of a verify step, in the executor (`Verify.accept`).

A greedy request without a repetition penalty keeps the longest prefix of its proposals that equals the target's
argmax and adds the argmax after it: exactly `jit_context.acceptance.accept`'s greedy branch, whose result layout
this keeps ([k + 1] argmax tokens, then the count kept). Run here, right after the verify step on the executor's
stream, it spares the JIT context a cross-process hand-over and ~8 small kernels per verify step; the executor then
waits for its own stream and returns the result with its answer (bench/NOTES.md, issue 11).

The device ops are fixed-shape per token count: the GPU path captures them at the end of each verify graph, the
copy of the result into pinned host memory included.
"""

from __future__ import annotations

import torch

from ipc.step_buffers import MAX_VERIFY_TOKENS, StepBuffers


class GreedyAcceptance:
    def __init__(self, buffers: StepBuffers) -> None:
        self.buffers = buffers
        device = buffers.verify_logits.device
        self.cuda = device.type == "cuda"
        # [MAX_VERIFY_TOKENS + 1] int64: the argmax of each row, then the count of proposals kept
        self.result = torch.zeros(MAX_VERIFY_TOKENS + 1, dtype=torch.int64, device=device)
        self.host = torch.zeros(MAX_VERIFY_TOKENS + 1, dtype=torch.int64, pin_memory=True) if self.cuda \
            else self.result
        self._done = torch.cuda.Event() if self.cuda else None

    def run(self, ids: torch.Tensor) -> None:
        """ids [T] int64 on the device: the verify step's tokens (the last accepted one, then T - 1 proposals); the
        step's logits are in verify_logits[:T]. Enqueues the acceptance; next_token gets the added token."""
        t = ids.shape[0]
        if not 1 <= t <= MAX_VERIFY_TOKENS:
            raise ValueError(f"a verify step takes 1..{MAX_VERIFY_TOKENS} tokens, got {t}")
        target, count = self.result[:t], self.result[t:t + 1]  # [T], [1]
        torch.argmax(self.buffers.verify_logits[:t], dim=-1, out=target)
        kept = torch.cumprod((target[:t - 1] == ids[1:]).long(), 0)  # [T - 1]: 1 while the proposals match
        torch.sum(kept, 0, keepdim=True, out=count)
        torch.index_select(target, 0, count, out=self.buffers.token)  # the added token
        if self.cuda:
            self.host[:t + 1].copy_(self.result[:t + 1], non_blocking=True)

    def read(self, num_tokens: int) -> list[int]:
        """The result of the last `run` of num_tokens, once it has run: [T] argmax tokens, then the count kept.
        num_tokens 0: the caller's last verify step asked for no acceptance (ValueError)."""
        if not num_tokens:
            raise ValueError("no verify step with acceptance has run")
        if self._done is not None:
            self._done.record()
            # Busy-poll: the answer is on the critical path of the next step, and an event synchronize measured
            # ~0.3 ms slower here in the executor process (bench/NOTES.md, issue 11).
            while not self._done.query():
                pass
        return self.host[:num_tokens + 1].tolist()
