"""The batch-1 decode step as one persistent kernel (kernels/persistent_step.py) and the lm_head's GEMV: the same `step`
as `fused_decoder.FusedDecoder` for dense fp16/bf16 models on one GPU, two launches instead of ~7 per layer.

What it does not take (`unsupported` says why, and the caller keeps FusedDecoder): packed weights, a
tensor-parallel rank, a head_dim that is not a power of two."""

from __future__ import annotations

import os

import torch
import triton

from graph_executor.kernels import persistent_step as ps
from graph_executor.kernels.decode_plan import plan_for
from graph_executor.kernels.gemv import rmsnorm_gemv
from graph_executor.kernels.persistent_step import PersistentConfig
from graph_executor.model import LlamaModel


def unsupported(model: LlamaModel) -> str | None:
    """Why the persistent step cannot run this model (None: it can)."""
    cfg = model.config
    if model.tp is not None:
        return "a tensor-parallel rank (the step's all-reduces are separate collectives)"
    if model.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"activation dtype {model.dtype}"
    slots = [model.embed_tokens, model.lm_head] + [getattr(layer, f"{name}_proj") for layer in model.layers
                                                     for name in ("qkv", "o", "gate_up", "down")]
    if any(not isinstance(w, torch.Tensor) or w.dtype != model.dtype for w in slots):
        return "packed (quantized) weights"
    if cfg.head_dim & (cfg.head_dim - 1):
        return f"head_dim {cfg.head_dim} is not a power of two"
    return None


class PersistentDecoder:
    """Workspace allocated once; `step` is graph-safe (one launch, no host reads)."""

    def __init__(self, model: LlamaModel, config: PersistentConfig = PersistentConfig(),
                 programs: int | None = None) -> None:
        """`programs`: the grid (None: the device's SM count x config.per_sm; under the interpreter always 1: its
        programs run one after another, so a barrier could never be passed by more)."""
        why = unsupported(model)
        if why is not None:
            raise ValueError(f"the persistent decode step cannot run this model: {why}")
        cfg = model.config
        device = model.embed_tokens.device
        self.model, self.config = model, config
        self.interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if programs is None:
            programs = (torch.cuda.get_device_properties(device).multi_processor_count * config.per_sm
                        if device.type == "cuda" else 1)
        self.programs = 1 if self.interpret else programs
        dtype = model.dtype

        def empty(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=kind)

        self.nqkv = cfg.q_size + 2 * cfg.kv_size
        self.x = empty(cfg.hidden_size)
        self.qkv = empty(self.nqkv)
        self.attn = empty(cfg.q_size)
        self.gate_up = empty(2 * cfg.intermediate_size)
        self.num_splits = triton.next_power_of_2(triton.cdiv(model.max_context, config.split))
        self.acc = empty(cfg.num_heads, self.num_splits, cfg.head_dim, kind=torch.float32)
        self.m = empty(cfg.num_heads, self.num_splits, kind=torch.float32)
        self.l = empty(cfg.num_heads, self.num_splits, kind=torch.float32)
        self.counters = torch.zeros(2, device=device, dtype=torch.int32)  # barrier arrivals, programs out
        self.head_counts = torch.zeros(cfg.num_heads, device=device, dtype=torch.int32)  # a head's units finished
        layers = model.layers
        first = layers[0]
        kinds = [lambda lay: lay.qkv_proj, lambda lay: lay.o_proj, lambda lay: lay.gate_up_proj,
                 lambda lay: lay.down_proj, lambda lay: lay.attn_norm, lambda lay: lay.mlp_norm]
        if cfg.qkv_bias:
            kinds.append(lambda lay: lay.qkv_bias)
        size = dtype.itemsize
        table = torch.zeros(len(layers), ps.OFFSETS, dtype=torch.int64)
        for i, layer in enumerate(layers):
            for j, kind in enumerate(kinds):
                delta = kind(layer).data_ptr() - kind(first).data_ptr()
                if delta % size:
                    raise ValueError("layer weights are not aligned to their element size")
                table[i, j] = delta // size
        self.offsets = table.to(device)
        self.bias = first.qkv_bias if cfg.qkv_bias else first.attn_norm  # a placeholder pointer without a bias
        caches = model.kv_caches  # [slots, L, 2, nkv, C, hd]
        self.kv_strides = (caches.stride(2), caches.stride(1), caches.stride(0), caches.stride(3), caches.stride(4))
        p = self.programs
        h_pieces, q_pieces, i_pieces = (ps.pieces(k) for k in (cfg.hidden_size, cfg.q_size, cfg.intermediate_size))
        self.blocks = dict(HA=h_pieces[0], HB=h_pieces[1], QA=q_pieces[0], QB=q_pieces[1], IA=i_pieces[0],
                           IB=i_pieces[1],
            BN_QKV=ps.rows_per_unit(self.nqkv, p, config.max_rows),
            BN_O=ps.rows_per_unit(cfg.hidden_size, p, config.max_rows),
            BN_GU=ps.rows_per_unit(2 * cfg.intermediate_size, p, config.max_rows),
            BN_DOWN=ps.rows_per_unit(cfg.hidden_size, p, config.max_rows),
        )
        self.lm_head = plan_for(cfg.hidden_size).lm_head  # gemv.py's kernel, as FusedDecoder runs it
        self.window = cfg.sliding_window or (1 << 30)
        self._resident = False  # the grid was checked against the device's SMs (at the first launch)
        # [programs, STAMP_SLOTS] int64: set by bench.probes.persistent_phases to have each program stamp its SM's
        # clock at each phase's start and end (None: no stamps, the runtime's kernel)
        self.stamps: torch.Tensor | None = None

    def _check_resident(self, compiled) -> None:
        """Raise unless the grid's programs fit on the device's SMs at once (registers, shared memory, threads)."""
        props = torch.cuda.get_device_properties(self.model.embed_tokens.device)
        compiled._init_handles()  # loads the module: its register count is known from then on
        threads = 32 * self.config.num_warps
        regs = -(-max(compiled.n_regs, 1) // 8) * 8  # a thread's registers, in the SM's allocation granule
        per_sm = min(getattr(props, "regs_per_multiprocessor", 65536) // (regs * threads),
                     getattr(props, "max_threads_per_multi_processor", 2048) // threads,
                     getattr(props, "shared_memory_per_multiprocessor", 233472) // max(compiled.metadata.shared, 1))
        if self.programs > per_sm * props.multi_processor_count:
            raise ValueError(f"the persistent step's {self.programs} programs cannot all be resident: {per_sm} fit an "
                             f"SM ({compiled.n_regs} registers a thread, {compiled.metadata.shared} B shared) x "
                             f"{props.multi_processor_count} SMs")
        self._resident = True

    @torch.inference_mode()
    def step(self, token: torch.Tensor, position: torch.Tensor, logits: torch.Tensor,
             slot: torch.Tensor | None = None) -> torch.Tensor:
        """token, position: [1] int64 on the device; logits: [vocab] (float32) written in place. `slot` [1] int64:
        the KV slot to decode (read from the device; None: slot 0)."""
        m, cfg, c = self.model, self.model.config, self.config
        first = m.layers[0]
        args = (m.embed_tokens, first.qkv_proj, first.o_proj, first.gate_up_proj, first.down_proj, first.attn_norm,
                first.mlp_norm, self.bias, self.offsets,
                token, position, slot if slot is not None else position,
                m.kv_caches, *self.kv_strides, m.rope,
                self.x, self.qkv, self.attn, self.gate_up, self.acc, self.m, self.l, self.head_counts, self.counters,
                self.nqkv, cfg.rms_norm_eps, cfg.head_dim ** -0.5, self.window, len(m.layers))
        consts = dict(NUM_HEADS=cfg.num_heads, GROUP=cfg.num_heads // cfg.num_kv_heads, HEAD_DIM=cfg.head_dim,
                      SPLIT=c.split, BLOCK=min(64, c.split), NUM_SPLITS=self.num_splits, HAS_BIAS=cfg.qkv_bias,
                      SLOTS=slot is not None, EMBED_BLOCK=64, H=cfg.hidden_size, I=cfg.intermediate_size,
                      INTERPRET=self.interpret, **self.blocks)
        grid = (self.programs,)
        launch = dict(num_warps=c.num_warps, **consts)
        if self.stamps is not None:
            launch.update(stamps_ptr=self.stamps, STAMPS=True)
        if not self._resident and not self.interpret:  # compiled, not launched: a grid not resident at once would hang
            self._check_resident(ps._step_kernel.warmup(*args, grid=grid, **launch))
        ps._step_kernel[grid](*args, **launch)
        return rmsnorm_gemv(m.lm_head, self.x, m.norm, cfg.rms_norm_eps, logits, cfg=self.lm_head)
