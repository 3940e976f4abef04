"""Tensor parallelism (issue 15): how one model is split over N ranks, and the two collectives its step needs.

Megatron's split, as vLLM, SGLang and gpt-fast do it: QKV and gate_up by output rows (whole heads per rank; KV heads
split when their count divides by N, else replicated, each rank holding the one its query heads read), o_proj and
down_proj by input columns, each followed by one all-reduce of the residual's update; lm_head by vocabulary rows,
the logits gathered. The embedding, the norms and the RoPE tables are whole on every rank. A rank's model is an
ordinary `LlamaModel` of the rank's shapes (`local_config`) with `tp` set: `LlamaModel._run` adds the collectives.

Torch's process group (gloo on the CPU, NCCL on GPUs) is the transport; `TensorParallel` holds no state of its own
beyond the rank and size, and, when asked (`--tp-allreduce peer`), the decode step's one-kernel all-reduce over the
ranks' peer memory (kernels/peer_allreduce.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from graph_executor.loading.config import ModelConfig
from graph_executor.loading.shape_rules import check_split, part_config

if TYPE_CHECKING:  # Triton's kernel: imported where a rank asks for it (a CPU install need not have Triton)
    from graph_executor.kernels.peer_allreduce import PeerAllReduce


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    size: int
    # the decode step's all-reduces over peer memory (`with_peer_allreduce`); None: every all-reduce is NCCL's / gloo's
    peer: PeerAllReduce | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of {self.size} does not exist")

    # -- shapes -------------------------------------------------------------------------------------------

    def check(self, config: ModelConfig) -> None:
        """ValueError (one line) unless the model splits evenly over the ranks (`shape_rules.check_split`)."""
        check_split(config, self.size)

    def kv_heads(self, config: ModelConfig) -> range:
        """The KV heads this rank holds (split, or the one replicated head its query heads read)."""
        kv, n = config.num_kv_heads, self.size
        if kv % n == 0:
            return range(self.rank * kv // n, (self.rank + 1) * kv // n)
        first = self.rank * kv // n
        return range(first, first + 1)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shapes of this rank's model (`shape_rules.part_config`: the vocabulary stays whole, it sizes the
        embedding; lm_head holds `vocab_rows`)."""
        return part_config(config, self.size)

    def vocab_rows(self, config: ModelConfig) -> range:
        part = config.vocab_size // self.size
        return range(self.rank * part, (self.rank + 1) * part)

    # -- this rank's parts of whole tensors: one description (`checkpoint_part`), the fused layouts derived -----

    def checkpoint_part(self, name: str, config: ModelConfig) -> tuple[slice, ...] | None:
        """The index of this rank's part of HF checkpoint tensor `name` of the whole model `config` (rows, or all
        rows and some columns): whole heads of q (and of k/v, split or replicated), a block of the intermediate
        size, a block of the vocabulary. None: every rank holds it whole (embedding, norms)."""
        hd = config.head_dim
        if name == "lm_head.weight":
            rows = self.vocab_rows(config)
            return (slice(rows.start, rows.stop),)
        if ".self_attn.q_proj." in name:
            part = config.q_size // self.size
            return (slice(self.rank * part, (self.rank + 1) * part),)
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            kv = self.kv_heads(config)
            return (slice(kv.start * hd, kv.stop * hd),)
        if ".self_attn.o_proj." in name:
            return (slice(None), self.checkpoint_part(".self_attn.q_proj.", config)[0])
        if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
            part = config.intermediate_size // self.size
            return (slice(self.rank * part, (self.rank + 1) * part),)
        if ".mlp.down_proj." in name:
            return (slice(None), self.checkpoint_part(".mlp.gate_proj.", config)[0])
        return None

    def fused_rows(self, fused: str, config: ModelConfig) -> torch.Tensor:
        """Rows of a whole fused weight that this rank holds, in its local layout: "qkv" ([q + 2 kv, H], its bias
        too) or "gate_up" ([2 I, H]): each checkpoint part's rows, offset by where that part sits in the fusion."""
        parts = {"qkv": [("q_proj", 0), ("k_proj", config.q_size), ("v_proj", config.q_size + config.kv_size)],
                 "gate_up": [("gate_proj", 0), ("up_proj", config.intermediate_size)]}[fused]
        kind = "self_attn" if fused == "qkv" else "mlp"
        rows = []
        for part, offset in parts:
            index = self.checkpoint_part(f".{kind}.{part}.", config)[0]
            rows.append(torch.arange(index.start, index.stop) + offset)
        return torch.cat(rows)

    # -- the collectives of a step ------------------------------------------------------------------------

    def partial_residual(self, x: torch.Tensor) -> None:
        """Before a projection split by input columns adds its product into the residual x (the fused steps' GEMVs and
        GEMMs accumulate in place): ranks > 0 start from zero, so that the all-reduce after it sums the residual once
        and every rank's part."""
        if self.rank > 0:
            x.zero_()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (each rank holds a partial product of the same shape): with a peer
        all-reduce, one it takes (a decode step's vector) in its kernel, the rest through the process group."""
        if self.size > 1:
            if self.peer is not None and self.peer.takes(x):
                return self.peer(x)
            dist.all_reduce(x)
        return x

    def with_peer_allreduce(self, capacity: int, dtype: torch.dtype, device: torch.device) -> TensorParallel:
        """This rank with a peer all-reduce for vectors of up to `capacity` elements of `dtype`: every rank calls it
        at the same point (the regions' handles are swapped over the process group). GPU ranks map each other's
        memory through CUDA IPC; CPU ranks share files (the kernel then runs under Triton's interpreter: tests)."""
        from graph_executor.kernels.peer_allreduce import CudaIpcMemory, PeerAllReduce, SharedFileMemory

        if device.type == "cuda":
            self._check_peer_access(device)
        memory = CudaIpcMemory(device) if device.type == "cuda" else SharedFileMemory()
        return dataclasses.replace(self, peer=PeerAllReduce(self.rank, self.size, capacity, dtype, device,
                                                            self.exchange, memory))

    def _check_peer_access(self, device: torch.device) -> None:
        """ValueError on every rank alike unless each rank's GPU can reach every other's memory directly (NVLink or
        PCIe peer access; ranks on one GPU need none): the ranks agree before any of them maps a peer's region, so
        that none waits in the kernel for a rank that refused."""
        mine = device.index if device.index is not None else torch.cuda.current_device()
        devices = [int(d) for d in self.exchange(str(mine).encode())]
        blocked = [d for d in devices if d != mine and not torch.cuda.can_device_access_peer(mine, d)]
        verdicts = self.exchange(b",".join(str(d).encode() for d in blocked))
        pairs = [(devices[r], int(d)) for r, v in enumerate(verdicts) for d in v.split(b",") if d]
        if pairs:
            raise ValueError(f"--tp-allreduce peer needs peer access between the GPUs; GPU {pairs[0][0]} cannot reach "
                             f"GPU {pairs[0][1]}'s memory: use --tp-allreduce nccl")

    def exchange(self, handle: bytes) -> list[bytes]:
        """Every rank's `handle` (<= 255 bytes: a peer memory region's name), in rank order, over the process group's
        CPU side (gloo): once at start, outside any graph."""
        if len(handle) > 255:
            raise ValueError(f"a handle of at most 255 bytes, got {len(handle)}")
        mine = torch.zeros(256, dtype=torch.uint8)
        mine[0] = len(handle)
        if handle:  # (frombuffer refuses an empty buffer: the peer-access check sends b"" for "none blocked")
            mine[1:1 + len(handle)] = torch.frombuffer(bytearray(handle), dtype=torch.uint8)
        parts = [torch.zeros(256, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(parts, mine)
        return [bytes(p[1:1 + int(p[0])].tolist()) for p in parts]

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """[n, V / N] logits of this rank's vocabulary rows -> [n, V] on every rank."""
        if self.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=-1)

    def gather_vocab_into(self, out: torch.Tensor, local: torch.Tensor,
                          staging: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's vocabulary rows' logits, local [V / N] or [T, V / N] -> out [V] or [T, V] on every rank, in
        place, with no allocation (graph-safe): rows go through `staging` (at least T * V elements of local's dtype:
        the ranks' parts land rank after rank, then one copy interleaves them into the rows)."""
        if self.size == 1:
            return out.copy_(local)
        if local.dim() == 1:
            dist.all_gather_into_tensor(out, local)
            return out
        t, part = local.shape
        parts = staging.view(-1)[:self.size * t * part].view(self.size * t, part)  # [N * T, V / N]: rank by rank
        dist.all_gather_into_tensor(parts, local)
        out.view(t, self.size, part).copy_(parts.view(self.size, t, part).transpose(0, 1))
        return out


class StepCollectives:
    """What a fused step (decode, prefill, batched decode, verify) adds on a tensor-parallel rank, in one place: the
    residual zeroed on ranks > 0 before a projection split by input columns accumulates into it and all-reduced
    after (`around_residual`), and lm_head's vocabulary rows written to buffers allocated here, then gathered into
    the step's logits (`logits_target`, `gather`). Without ranks (`tp` None or of size 1) each does nothing and the
    logits are the step's own."""

    def __init__(self, tp: TensorParallel | None, rows: int, vocab_size: int, device: torch.device) -> None:
        """`rows`: the most logits rows the step writes (1 for a [V] logits vector)."""
        self.tp = tp if tp is not None and tp.size > 1 else None
        if self.tp is not None:
            f32 = dict(device=device, dtype=torch.float32)
            self.local = torch.empty(rows, vocab_size // self.tp.size, **f32)  # [rows, V / N]
            self.staging = torch.empty(rows * vocab_size, **f32) if rows > 1 else None

    def before_residual(self, x: torch.Tensor) -> None:
        if self.tp is not None:
            self.tp.partial_residual(x)

    def after_residual(self, x: torch.Tensor) -> None:
        if self.tp is not None:
            self.tp.all_reduce(x)

    def logits_target(self, logits: torch.Tensor) -> torch.Tensor:
        """Where lm_head writes: `logits` itself, or on a rank its vocabulary rows' buffer of the same rows."""
        if self.tp is None:
            return logits
        return self.local[0] if logits.dim() == 1 else self.local[:logits.shape[0]]

    def gather(self, logits: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """After lm_head wrote `logits_target(logits)`: the logits, whole on every rank."""
        if self.tp is None:
            return logits
        return self.tp.gather_vocab_into(logits, written, self.staging)


def shard_model(full, tp: TensorParallel, slots: int = 1):
    """This rank's `LlamaModel` with its slices of `full`'s dense weights (a whole model built the same way on every
    rank: tests, and dummy weights). Packed weights are not split here."""
    from graph_executor.model import LlamaModel

    cfg = full.config
    local = LlamaModel(tp.local_config(cfg), full.max_context, full.device, full.dtype, slots=slots, tp=tp,
                       full_config=cfg)
    qkv, gate_up = tp.fused_rows("qkv", cfg), tp.fused_rows("gate_up", cfg)
    q_cols = tp.checkpoint_part(".self_attn.o_proj.", cfg)[1]
    i_cols = tp.checkpoint_part(".mlp.down_proj.", cfg)[1]
    vocab = tp.vocab_rows(cfg)
    with torch.no_grad():
        local.embed_tokens.copy_(full.embed_tokens)
        local.norm.copy_(full.norm)
        local.lm_head.copy_(full.lm_head[vocab.start:vocab.stop])
        for mine, whole in zip(local.layers, full.layers):
            mine.attn_norm.copy_(whole.attn_norm)
            mine.mlp_norm.copy_(whole.mlp_norm)
            mine.qkv_proj.copy_(whole.qkv_proj.index_select(0, qkv.to(whole.qkv_proj.device)))
            if whole.qkv_bias is not None:
                mine.qkv_bias.copy_(whole.qkv_bias.index_select(0, qkv.to(whole.qkv_bias.device)))
            mine.o_proj.copy_(whole.o_proj[:, q_cols])
            mine.gate_up_proj.copy_(whole.gate_up_proj.index_select(0, gate_up.to(whole.gate_up_proj.device)))
            mine.down_proj.copy_(whole.down_proj[:, i_cols])
    return local
