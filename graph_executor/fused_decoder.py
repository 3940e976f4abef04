"""The decode step on the GPU as 7 fused kernel launches per layer (see kernels/gemv.py), over a workspace
allocated once: the body of the decode CUDA graph. Numerically the same function as `LlamaModel.forward` on
one token (up to rounding: RMSNorm is applied inside the GEMV in float32). Dense and packed weights alike:
`kernels/projections.py` picks each slot's kernel.

On a tensor-parallel rank (`model.tp`, graph_executor/tensor_parallel.py) the same kernels run on the rank's part:
o_proj and down_proj add their partial products into the residual as on one rank, except that ranks > 0 zero it
first (rank 0's copy carries the residual once), then one all-reduce sums it; lm_head writes the rank's vocabulary
rows, gathered into the logits. The collectives are the process group's (NCCL ones can sit inside a CUDA graph)."""

from __future__ import annotations

import torch

from graph_executor.kernels import gemv_dense_splitk, l2_prefetch
from graph_executor.kernels import pdl as pdl_launch
from graph_executor.kernels.decode_attention import DecodeAttention, one_block_splits
from graph_executor.kernels.decode_plan import DEFER_DOWN_MAX_FLOATS, options_for, plan_for
from graph_executor.kernels.gemv import GemvConfig, GemvPlan
from graph_executor.kernels.gemv_fp8 import Fp8Config, Fp8Plan
from graph_executor.kernels.gemv_splitk import SplitKConfig, SplitKPlan, SplitKScratch
from graph_executor.kernels.l2_prefetch import L2Prefetch
from graph_executor.kernels.projections import (
    ProjectionConfig,
    decode_scratch_size,
    embedding,
    gemv_residual,
    on_gemv_kernels,
    pending_source_ok,
    rmsnorm_gemv,
    silu_gemv_pending,
    silu_gemv_residual,
)
from graph_executor.kernels.rope_append import rope_append
from graph_executor.model import LlamaModel
from graph_executor.tensor_parallel import StepCollectives

# Block configs per projection for the packed formats: the best of the probes' sweeps (bench/probes/int4_splitk.py,
# lowbit_gemv.py) on LLaMA-2-7B shapes on an H200, each projection over 32 layers in one graph (read TB/s in the
# comments; the fp16 kernels reach 2.8-4.0 TB/s on the same shapes). See bench/NOTES.md.
# The partials of each split-K program are added by a second kernel (`reduce_kernel`), not by the last program of each
# row block (barrier + membar + atomic: ~30% of an int4 GEMV's time in the twenty-fourth session's ablation).
# Measured on an H200 (twenty-fifth session, bench/results/2026-12-02-h200-reduce-kernel/): int4 GEMVs qkv 2.31 ->
# 2.84 TB/s, o 1.51 -> 1.61, gate_up 2.54 -> 2.97, down 2.09 -> 2.43; the 7B int4 step 2.044 -> 1.798 ms at context
# 300, 2.353 -> 2.098 at 2000; the int8 step 2.591 -> 2.345 ms. The TB/s in the comments are those before the second
# kernel.
INT4_PLAN = SplitKPlan(  # split-K dp4a kernels (kernels/gemv_splitk.py; bench/probes/int4_splitk.py --layout shipped)
    # 32 rows x 128 words (1,024 weights of K) a program on 4 warps: with the second kernel the step at 32x128 is
    # 0.973-0.977x the 32x64 step at context 300, 0.984x at 2000 (packed_plans, int4_blocks_with_reduce.md in the
    # folder above); the TB/s in the comments are 32x64's with the fixup (the float kernel's in brackets)
    qkv=SplitKConfig(32, 128, 4, reduce_kernel=True),  # 2.19 TB/s (bench/probes/float_lowbit_gemv.py: 1.27)
    o=SplitKConfig(32, 128, 4, reduce_kernel=True),  # 1.55 (0.96)
    gate_up=SplitKConfig(32, 128, 4, reduce_kernel=True),  # 2.46 (1.50)
    down=SplitKConfig(32, 128, 4, reduce_kernel=True),  # 2.05 (1.01)
    lm_head=SplitKConfig(32, 128, 4, reduce_kernel=True),
)
INT8_PLAN = SplitKPlan(  # the same kernels over int8 codes (int4_splitk.py --bits 8; the float kernel in brackets)
    qkv=SplitKConfig(32, 128, 4, reduce_kernel=True),  # 3.01 TB/s (2.99)
    o=SplitKConfig(32, 128, 4, reduce_kernel=True),  # 2.06 (2.05)
    gate_up=SplitKConfig(64, 128, 8, reduce_kernel=True),  # 3.34 (3.13)
    down=SplitKConfig(32, 256, 8, reduce_kernel=True),  # 2.80 (2.72)
    lm_head=SplitKConfig(32, 128, 4, reduce_kernel=True),
)
# the widest head for which the options' kv_early applies (measured a gain on SmolLM2's and Llama-3.2-1B's 64, a loss
# on 7B's 128)
KV_EARLY_MAX_HEAD_DIM = 64

FP8_GEMV_PLAN = GemvPlan(  # FP8 codes through the fp16 GEMVs (the path before the split-K FP8 kernels)
    qkv=GemvConfig(16, 256, 4, 3),  # 2.87 TB/s
    o=GemvConfig(8, 1024, 4, 3),  # 2.23
    gate_up=GemvConfig(8, 512, 4, 3),  # 3.17
    down=GemvConfig(8, 1024, 4, 3),  # 2.74
    lm_head=GemvConfig(8, 512, 4, 3),  # 3.10
)
# Per projection the faster of the two FP8 paths in one sweep (bench/probes/fp8_splitk.py, H200, 32 layers per graph;
# bench/results/2026-11-30-h200-fp8-splitk/): the split-K kernels (kernels/gemv_fp8.py) win only where the fp16
# kernels' loop lacks programs (lm_head 3.42 against 3.10 TB/s); on qkv and o the fp16 kernels stay ahead. Both are
# held near 2.1-3.4 TB/s by per-kernel overheads at these sizes, not by the conversion (bench/NOTES.md).
FP8_PLAN = Fp8Plan(
    qkv=FP8_GEMV_PLAN.qkv,
    o=FP8_GEMV_PLAN.o,
    gate_up=Fp8Config(32, 512, 4, reduce_kernel=True),  # 3.20 (3.17), both before the second kernel
    down=Fp8Config(64, 512, 8, reduce_kernel=True),  # 2.78 (2.74)
    lm_head=Fp8Config(64, 512, 8, reduce_kernel=True),  # 3.42 (3.10)
)


LAYER_GEMVS = ("qkv", "o", "gate_up", "down")  # a layer's decode GEMVs, in the order the step runs them


class FusedDecoder:
    def __init__(self, model: LlamaModel, plan: GemvPlan | None = None, split_size: int | None = None,
                 int4: SplitKPlan = INT4_PLAN, int8: SplitKPlan = INT8_PLAN,
                 fp8: Fp8Plan | GemvPlan = FP8_PLAN, pdl: bool | None = None, fuse_rope: bool | None = None,
                 early_weights: bool | None = None, l2_prefetch_mb: int | None = None,
                 split_combine: bool | None = None, tail_prefetch_mb: int | None = None,
                 v_early: bool | None = None, defer_down: bool | None = None,
                 kv_early: bool | None = None) -> None:
        """`fp8`: per projection an Fp8Config runs FP8 slots through the split-K kernels, a GemvConfig through the fp16
        kernels (FP8_GEMV_PLAN: all of them, the old path). `plan`: the dense weights' configs (None:
        `decode_plan.plan_for` the model's hidden size). `pdl`: launch the dense GEMVs, RoPE and attention with
        programmatic dependent launch (kernels/pdl.py); None: where the device has it (Hopper: the same logits, bit for
        bit; on an H200 a SmolLM2-135M step 0.73 -> 0.59 ms, Llama-3.2-1B 1.10 -> 1.04, LLaMA-2-7B 4.05 -> 4.01;
        bench/NOTES.md, issue 12). `fuse_rope`: RoPE and the KV append inside the decode attention kernel
        (`DecodeAttention(..., rope=)`: one kernel fewer per layer). `early_weights`: every GEMV loads its (first)
        weights before it waits for the kernel before it (`pdl.with_early_weights`): with PDL those loads overlap that
        kernel's last wave. None (both): `decode_plan.options_for` the model's hidden size (measured per model size on
        an H200: each is a gain on some shapes and a loss on others). `l2_prefetch_mb`: the decode attention kernel asks
        L2 for up to this many MiB of the layer's next weights (o_proj, gate_up, down, the next layer's qkv or the
        lm_head, in that order; kernels/l2_prefetch.py), on sm_90+ only; None: the options'. `split_combine`: the
        attention's last split program per head combines the splits (no reduce kernel;
        `DecodeAttention(fused_reduce=)`); None: the options'. `tail_prefetch_mb`: each GEMV on gemv.py's kernels asks
        L2 for up to this many MiB of the next projection's weights once its rows are stored (the next kernel's first
        loads during this one's tail), on sm_90+ only; None: the options'. `v_early`: the attention kernel issues each
        block's V loads with its K loads (`DecodeAttention(v_early=)`); None: the options'. `defer_down`: down_proj's
        split-K partials are added by the next layer's qkv and o_proj GEMVs (and the lm_head's) instead of a reduce
        kernel after it (gemv.PendingResidual: one kernel fewer per layer, the same bits); only where every down_proj is
        on the dense split-K kernels with a reduce kernel, the qkv, o and lm_head slots on gemv.py's kernels, and not on
        a tensor-parallel rank (its all-reduce needs x settled); None: the options' where it applies and a qkv program's
        share of the partials is at most `decode_plan.DEFER_DOWN_MAX_FLOATS`. True where it does not apply: ValueError.
        `kv_early`: with `fuse_rope`, the attention kernel loads its keys and values before it waits for the QKV
        projection (`DecodeAttention(kv_early=)`, the same bits); None: the options' where `fuse_rope` is on, a split
        is one block and a head at most KV_EARLY_MAX_HEAD_DIM wide. True without `fuse_rope`, or with splits of more
        than one block: ValueError."""
        cfg = model.config
        device = model.embed_tokens.device
        plan = plan_for(cfg.hidden_size) if plan is None else plan
        options = options_for(cfg.hidden_size)
        fuse_rope = options.fuse_rope if fuse_rope is None else fuse_rope
        early_weights = options.early_weights if early_weights is None else early_weights
        self.pdl = pdl_launch.supported(device) if pdl is None else pdl
        self.fuse_rope = fuse_rope
        self.early_weights = early_weights
        split_combine = options.split_combine if split_combine is None else split_combine
        v_early = options.v_early if v_early is None else v_early
        if kv_early and not fuse_rope:
            raise ValueError("kv_early takes the new K and V from registers: it needs fuse_rope (RoPE and the KV "
                             "append inside the attention kernel)")
        if kv_early is None:  # the options' where it applies (RoPE inside, splits of one block) and was measured: a
            # head of 64 (SmolLM2, Llama-3.2-1B). Heads of 128 hold twice the tiles' registers before the wait (7B
            # lost 10-13%)
            kv_early = options.kv_early and fuse_rope and one_block_splits(split_size) and \
                cfg.head_dim <= KV_EARLY_MAX_HEAD_DIM
        # the step's GEMV slots in the order it reads them: per layer qkv, o, gate_up, down (LAYER_GEMVS); then lm_head
        slots = [(getattr(layer, f"{name}_proj"), name) for layer in model.layers
                 for name in LAYER_GEMVS] + [(model.lm_head, "lm_head")]
        prefetching = l2_prefetch.supported(device)
        budget = options.l2_prefetch_mb if l2_prefetch_mb is None else l2_prefetch_mb
        # per layer: the weights the step reads after its attention (o, gate_up, down, then the next qkv or the
        # lm_head), up to the budget (None: nothing to ask for)
        self.prefetch: list[L2Prefetch | None] = [None] * len(model.layers)
        if budget > 0 and prefetching:
            for index in range(len(model.layers)):
                after = slots[index * len(LAYER_GEMVS) + 1:(index + 1) * len(LAYER_GEMVS) + 1]
                self.prefetch[index] = l2_prefetch.plan([w for w, _ in after], budget << 20)
        if self.pdl:  # every config of every format: the launch mode is each kernel call's
            plan, int4, int8, fp8 = (pdl_launch.with_pdl(p) for p in (plan, int4, int8, fp8))
        if early_weights:
            plan, int4, int8, fp8 = (pdl_launch.with_early_weights(p) for p in (plan, int4, int8, fp8))
        self.model = model
        self.plan = {name: ProjectionConfig(*(getattr(p, name) for p in (plan, int4, int8, fp8)))
                     for name in ("qkv", "o", "gate_up", "down", "lm_head")}
        dtype = model.dtype

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=dtype)

        self.x = empty(1, cfg.hidden_size)  # the residual stream, [1, H]
        self.qkv = empty(cfg.q_size + 2 * cfg.kv_size)
        self.q = empty(cfg.num_heads, cfg.head_dim)
        self.attn = empty(cfg.num_heads, cfg.head_dim)
        self.gate_up = empty(2 * cfg.intermediate_size)
        self.attention = DecodeAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.max_context,
                                         device, cfg.sliding_window, split_size, pdl=self.pdl,
                                         fused_reduce=split_combine, v_early=v_early, kv_early=kv_early)
        # packed int4/int8 and FP8 slots run split-K kernels that share one scratch (one after another on one stream)
        sizes = [decode_scratch_size(w, self.plan[name]) for w, name in slots]
        floats, counters = max(f for f, _ in sizes), max(c for _, c in sizes)
        self.scratch = SplitKScratch.zeros(floats, counters, device) if floats or counters else None
        # per layer and projection: the next slot's weights its GEMV's tail asks L2 for (None: nothing)
        self.tail: list[dict[str, L2Prefetch | None]] = [dict.fromkeys(LAYER_GEMVS) for _ in model.layers]
        tail_budget = options.tail_prefetch_mb if tail_prefetch_mb is None else tail_prefetch_mb
        if tail_budget > 0 and prefetching:
            for i, (w, name) in enumerate(slots[:-1]):
                if on_gemv_kernels(w, self.plan[name]):
                    self.tail[i // len(LAYER_GEMVS)][name] = l2_prefetch.plan([slots[i + 1][0]], tail_budget << 20)
        self.collectives = StepCollectives(model.tp, 1, cfg.vocab_size, device)  # a tensor-parallel rank's
        deferrable = model.tp is None and on_gemv_kernels(model.lm_head, self.plan["lm_head"]) and all(
            pending_source_ok(layer.down_proj, self.plan["down"]) and on_gemv_kernels(layer.qkv_proj, self.plan["qkv"])
            and on_gemv_kernels(layer.o_proj, self.plan["o"]) for layer in model.layers)
        if defer_down and not deferrable:
            raise ValueError("defer_down needs every down_proj on the dense split-K kernels with a reduce kernel, the "
                             "qkv, o and lm_head slots on gemv.py's kernels, and one rank")
        if defer_down is None:  # the options' choice, where each qkv program's share of the partials is small
            share = cfg.hidden_size * gemv_dense_splitk.split(model.layers[0].down_proj, self.plan["down"].dense) \
                if deferrable and model.layers else DEFER_DOWN_MAX_FLOATS + 1
            defer_down = options.defer_down and share <= DEFER_DOWN_MAX_FLOATS
        self.defer_down = deferrable and defer_down

    @torch.inference_mode()
    def step(self, token: torch.Tensor, position: torch.Tensor, logits: torch.Tensor,
             slot: torch.Tensor | None = None, context: int | None = None) -> torch.Tensor:
        """token, position: [1] int64 on the device; logits: [vocab] (float32) written in place. `slot` [1] int64:
        the KV slot to decode (read from the device; None: slot 0). `context`: the position is below it (the
        attention launches only the splits that can hold keys: `DecodeAttention.__call__`); None: the cache's
        length."""
        m, cfg, c = self.model, self.model.config, self.collectives
        eps, g, sc = cfg.rms_norm_eps, self.plan, self.scratch
        stride = m.kv_caches.stride(0)
        embedding(m.embed_tokens, token, self.x)
        x = self.x[0]  # [H]
        pending = None  # the last down_proj's partials while x is unsettled (defer_down)
        for index, layer in enumerate(m.layers):
            cache = m.kv_cache[index]  # [2, nkv, C, hd]
            tail = self.tail[index]
            rmsnorm_gemv(layer.qkv_proj, x, layer.attn_norm, eps, self.qkv, bias=layer.qkv_bias, cfg=g["qkv"],
                         scratch=sc, prefetch=tail["qkv"], pending=pending)
            if self.fuse_rope:
                self.attention(self.qkv, cache[0], cache[1], position, self.attn, slots=slot, slot_stride=stride,
                               rope=m.rope, prefetch=self.prefetch[index], context=context)
            else:
                rope_append(self.qkv, position, m.rope, self.q, cache[0], cache[1], cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim, pdl=self.pdl, slots=slot, slot_stride=stride)
                self.attention(self.q, cache[0], cache[1], position, self.attn, slots=slot, slot_stride=stride,
                               prefetch=self.prefetch[index], context=context)
            c.before_residual(x)
            gemv_residual(layer.o_proj, self.attn.view(-1), x, cfg=g["o"], scratch=sc, prefetch=tail["o"],
                          pending=pending)
            pending = None  # o_proj stored x settled
            c.after_residual(x)
            rmsnorm_gemv(layer.gate_up_proj, x, layer.mlp_norm, eps, self.gate_up, cfg=g["gate_up"], scratch=sc,
                         prefetch=tail["gate_up"])
            c.before_residual(x)
            if self.defer_down:  # the scratch holds the partials until the next o_proj (qkv and attention use none)
                pending = silu_gemv_pending(layer.down_proj, self.gate_up, x, g["down"], scratch=sc)
            else:
                silu_gemv_residual(layer.down_proj, self.gate_up, x, cfg=g["down"], scratch=sc,
                                   prefetch=tail["down"])
            c.after_residual(x)
        out = c.logits_target(logits)
        rmsnorm_gemv(m.lm_head, x, m.norm, eps, out, cfg=g["lm_head"], scratch=sc, pending=pending)
        return c.gather(logits, out)
