"""The one description of the executor's step buffers: the tensors a step reads and writes, their shapes and
dtypes, who writes each, and how they cross the process boundary (a `TensorSpec` each in `Ready.buffers`).

The executor allocates them once, before any graph is captured, at fixed addresses (the graphs read and write
them in place); the JIT context writes prompt ids and the sampled token into them and reads the logits (or, for a
plain greedy request with `Decode.argmax`, the executor writes the token and files it in `token_ring`). In one
process (`hybridrt generate` without a server) they are plain tensors; across processes, shared memory on the
CPU and CUDA IPC on a GPU. Nothing is copied per step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ipc.errors import ProtocolError
from ipc.messages import MAX_SPECULATIVE_TOKENS, StepBufferSpecs, TensorSpec
from ipc.shared_tensor import CudaIpcTensor, SharedTensor, ShmTensor, dtype_name, import_tensor

# Speculative decoding: a verify step runs the last accepted token plus up to MAX_SPECULATIVE_TOKENS proposals
# (ipc/messages.py, the protocol's limit: the launcher checks flags against it without importing torch).
MAX_VERIFY_TOKENS = MAX_SPECULATIVE_TOKENS + 1
# The last position of every KV slot is the executor's scratch row: a graph's warm-up runs and its first (upload)
# replay write their K/V there, as do the padding rows of a prompt bucket past the cache's end, whenever the executor
# captures (it captures while idle). No request's tokens are known to stay there (`KvContents`).
SCRATCH_ROWS = 1
# The executor's greedy tokens (`Decode.argmax`): the token after the decode step at position p sits at
# token_ring[p % TOKEN_RING] until the step TOKEN_RING positions later overwrites it. The JIT context enqueues each
# slot's copy after that step's event and waits for the copy on the host (TokenReader.pop) before it sends the step
# decode_ahead (<= 3, the reader's ring) positions later: no slot is rewritten before its copy has run.
TOKEN_RING = 16


def buffer_layout(vocab_size: int, max_context: int,
                  slots: int = 1) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every step buffer, in `StepBuffers` field order; `slots`: KV slots (sequences the
    executor holds at once). Slot s's token ids sit at input_ids[s * max_context:(s + 1) * max_context] (`slot_ids`)
    and its next input token at next_token[s]: with one slot, the layout of a batch-1 executor."""
    return {
        # the prompt, and a verify step's tokens: [s * C + p] is the token at position p of slot s (JIT writes)
        "input_ids": ((slots * max_context,), torch.int64),
        "next_token": ((slots,), torch.int64),  # [s]: the token slot s's next decode step consumes (sampler writes)
        "logits": ((vocab_size,), torch.float32),  # logits of the last position of the last Prefill/Decode (executor)
        # a DecodeBatch: row b = logits of its b-th sequence (executor writes)
        "batch_logits": ((slots, vocab_size), torch.float32),
        # a verify step of T tokens: row t = logits after its token t, rows [0, T) (executor writes)
        "verify_logits": ((MAX_VERIFY_TOKENS, vocab_size), torch.float32),
        # [p % TOKEN_RING]: the greedy token the executor took after a decode step at position p (executor writes)
        "token_ring": ((TOKEN_RING,), torch.int64),
    }


@dataclass(frozen=True)
class StepBuffers:
    input_ids: torch.Tensor  # [slots * max_context] int64
    next_token: torch.Tensor  # [slots] int64
    logits: torch.Tensor  # [vocab] float32
    batch_logits: torch.Tensor  # [slots, vocab] float32
    verify_logits: torch.Tensor  # [MAX_VERIFY_TOKENS, vocab] float32
    token_ring: torch.Tensor  # [TOKEN_RING] int64

    @classmethod
    def allocate(cls, vocab_size: int, max_context: int, device: torch.device, slots: int = 1) -> StepBuffers:
        """Plain tensors, for an executor and a JIT context in one process."""
        return cls(**{name: torch.zeros(shape, dtype=dtype, device=device)
                      for name, (shape, dtype) in buffer_layout(vocab_size, max_context, slots).items()})

    @property
    def slots(self) -> int:
        return self.next_token.shape[0]

    @property
    def token(self) -> torch.Tensor:
        """[1] int64: slot 0's next token, the input of the single-sequence steps (decode, verify's added token).
        Write it through this view: an `out=` of the whole [slots] buffer would resize it."""
        return self.next_token[:1]

    def chunk_logits(self, index: int) -> torch.Tensor:
        """[vocab] float32: where the logits of a DecodeBatch's prompt chunk `index` land (the last position's):
        `logits` for the first chunk, then batch_logits' last rows, counting down. A step's decode rows and chunks
        are all of distinct slots, so those rows are past its decode rows (a padded graph writes its padding rows
        first, the chunks' after)."""
        if not 0 <= index < self.slots:
            raise ValueError(f"prompt chunk {index} of a step: at most {self.slots - 1} chunks ride a decode")
        return self.logits if index == 0 else self.batch_logits[self.slots - index]

    def ring_slot(self, position: int) -> torch.Tensor:
        """[1] int64 (a view): where the executor files its greedy token after the decode step at `position`."""
        i = position % TOKEN_RING
        return self.token_ring[i:i + 1]

    def slot_ids(self, slot: int) -> torch.Tensor:
        """[max_context] int64: slot `slot`'s token ids by position (a view)."""
        context = self.input_ids.shape[0] // self.slots
        return self.input_ids[slot * context:(slot + 1) * context]


@dataclass
class SharedStepBuffers:
    """Step buffers in memory another process can map, with the mappings that keep them alive."""

    buffers: StepBuffers
    shared: dict[str, SharedTensor]  # name -> owner (executor) or mapping (JIT context)

    @classmethod
    def export(cls, vocab_size: int, max_context: int, device: torch.device, slots: int = 1) -> SharedStepBuffers:
        """The executor's side: allocate every buffer once (shm on the CPU, CUDA IPC on a GPU), zeroed."""
        shared: dict[str, SharedTensor] = {}
        try:
            for name, (shape, dtype) in buffer_layout(vocab_size, max_context, slots).items():
                if device.type == "cuda":
                    shared[name] = CudaIpcTensor.create(name, shape, dtype, device=device.index or 0)
                else:
                    shared[name] = ShmTensor.create(name, shape, dtype)
                shared[name].tensor.zero_()
        except BaseException:
            for s in shared.values():
                s.close()
            raise
        return cls(StepBuffers(**{name: s.tensor for name, s in shared.items()}), shared)

    @classmethod
    def open(cls, specs: StepBufferSpecs, vocab_size: int, max_context: int, slots: int = 1) -> SharedStepBuffers:
        """The JIT context's side: map what `Ready` names, refusing any buffer that does not match the layout."""
        layout = buffer_layout(vocab_size, max_context, slots)
        shared: dict[str, SharedTensor] = {}
        try:
            for name, (shape, dtype) in layout.items():
                spec: TensorSpec = getattr(specs, name)
                if tuple(spec.shape) != shape or spec.dtype != dtype_name(dtype):
                    raise ProtocolError("bad_fields", f"step buffer {name} is {spec.dtype}{list(spec.shape)}, "
                                                      f"expected {dtype_name(dtype)}{list(shape)}")
                shared[name] = import_tensor(spec)
        except BaseException:
            for s in shared.values():
                s.close()
            raise
        return cls(StepBuffers(**{name: s.tensor for name, s in shared.items()}), shared)

    def specs(self) -> StepBufferSpecs:
        return StepBufferSpecs(**{f.name: self.shared[f.name].spec for f in fields(StepBufferSpecs)})

    def close(self) -> None:
        for s in self.shared.values():
            s.close()
