"""The batch-1 decode step's GEMV config per projection for dense (fp16/bf16) weights: `gemv.GEMV_PLAN`'s kernels,
with the projections that the split-K kernels of `gemv_dense_splitk.py` were measured to speed up moved onto them.

Measured on an H200 (`bench.probes.dense_splitk`: 32 layers per graph, PDL on, each projection's fp16 kernel against
every split-K block config, then the whole step with the winners; bench/NOTES.md, issue 12):
- LLaMA-2-7B (hidden 4096, seventeenth session): down_proj 4096 x 11008 2.99 TB/s on gemv.py's 16x512 against 3.55
  split-K 16x1024 on 8 warps; o_proj did not gain (2.85 against 2.81 at best). Step 3.907 -> 3.830 ms at context 300,
  4.242 -> 4.143 at 2000.
- Llama-3.2-1B (hidden 2048, eighteenth session): qkv 3072 x 2048 1.59 -> 1.86 TB/s (split-K 16x256, 4 warps), down
  2048 x 8192 2.01 -> 2.83 (32x512, 8 warps), o lost (1.91 -> 1.68). Step 1.047 -> 0.957 ms at context 300 (0.914x),
  1.101 -> 1.009 at 2000.
- SmolLM2-135M (hidden 576, eighteenth session): down 576 x 1536 0.47 -> 0.52 TB/s (32x256, 8 warps), o lost badly
  (0.42 -> 0.25). Step 0.621 -> 0.609 ms at context 300 (0.981x), 0.661 -> 0.646 at 2000.
A model takes the plan (and the step options below) of the largest measured hidden size not above its own (Mistral,
Llama-3-8B: 7B's; Qwen2.5-7B (3584) and TinyLlama (2048): 1B's; Qwen2-0.5B (896): SmolLM2's), except that between
1025 and 2047 (Qwen2-1.5B) the GEMVs keep SmolLM2's plan of before the thirty-ninth session: the one-chunk configs
below are about K <= 1024.

The step's two fusions (`StepOptions`, twentieth session, H200, `bench.probes.step_variants`, 5 alternating rounds,
ms per step at context 300 / 2000; bench/results/2026-12-02-h200-stepfusions/):
- RoPE + KV append inside the decode attention kernel: LLaMA-2-7B 3.801 -> 3.782 / 4.120 -> 4.075, SmolLM2-135M
  0.613 -> 0.585 / 0.647 -> 0.639; Llama-3.2-1B 0.962 -> 0.973 / 1.018 -> 1.009 (mixed: left off there until the
  46th session, when with the keys and values loaded before the wait it measured -1.1..-4.3%: on since).
- The GEMVs' weights loaded before their PDL wait: SmolLM2-135M 0.613 -> 0.552 / 0.647 -> 0.596 (both fusions: 0.528
  / 0.584), Llama-3.2-1B 0.962 -> 0.965 / 1.018 -> 1.025, LLaMA-2-7B 3.801 -> 3.943 / 4.120 -> 4.266. Where a
  kernel is short (latency-bound) its weights in flight during the previous kernel's tail are a gain; where each
  kernel streams for ~10 us at full bandwidth the early loads only compete with the previous kernel's and hold
  registers while waiting.
Checked after the choice (the same probe, the production step against neither): 7B 0.994 / 0.988, SmolLM2 0.860 /
0.891, 1B unchanged (RoPE inside there 1.007 / 0.987 over 9 rounds: still mixed). The attention's in-kernel split
combine (SmolLM2 a further -2% / -1.5%, 7B +1.6% / +0.7%): taken below hidden 2048 in the twenty-first session, once
the batched-vs-lone identity tests passed with it on the card. Twenty-fifth session (bench/results/
2026-12-02-h200-reduce-kernel/): the split-K dense projections' partials added by a second kernel
(`reduce_kernel`, not the last program's fixup): 7B 3.754 -> 3.670 ms at 300 (0.978x), 1B 0.969 -> 0.932 (0.963x);
SmolLM2 0.527 -> 0.511 / 0.570 -> 0.555 (split combine on, as shipped). The attention's V loads issued with its K
loads (`v_early`): with the splits' reduce kernel SmolLM2 0.540 -> 0.521 / 0.582 -> 0.565, 7B 3.772 -> 3.870 / 4.061
-> 4.234, 1B within 1%; with the split combine SmolLM2 0.527 -> 0.545 / 0.570 -> 0.593: not taken. Not taken
either: o_proj's weights alone loaded early on 7B (+0.6% / 0.0%); the L2 prefetches (StepOptions' comments).

The small models' gemv.py configs (thirty-ninth session, bench/results/2026-12-04-h200-session39/, step_variants with
per-projection configs, 5-7 alternating rounds, ms per step at context 300 / 2000, SmolLM2-135M with every step
option as shipped): 7B's plan 0.478 / 0.524; qkv 16x1024 on 8 warps 0.457 / 0.503 (8x1024x4: 0.475 / 0.551; 4x1024x4,
8x1024x8, 32x1024x8 between), gate_up 8x1024 on 4 warps 0.459 / 0.495 (16x1024x8 0.488 / 0.531, 4x1024x4 0.453 /
0.503); o 2x1024 or 4x1024 on 4 warps -1% (on 8 warps +3%); lm_head's 16x512 kept (16x1024 on 8 or 16 warps, 8x1024x4
and 32x512x8 1-3% slower). Together (qkv 16x1024x8, gate_up 8x1024x4, o 2x1024x4): **0.424 / 0.489 (-11% / -6.5%)**.
Llama-3.2-1B's gate_up in one chunk of 2048 (4x2048x4, 8x2048x8, with or without the early weights) lost 1-7%.

Forty-first session (bench/results/2026-12-04-h200-session41/): o_proj reading its residual right after its wait on
7B and 1B (O_RESIDUAL_EARLY below), the attention's keys and values loaded before its wait on the small models
(StepOptions.kv_early). Measured and removed: o_proj combining the attention's split partials in its prologue (one
program per 16-32 rows recombining every head's splits): SmolLM2 step 0.426 -> 0.519-0.601 ms at context 300, 0.488
-> 1.07-1.81 at 2000 (every o program repeats the whole combine); larger attention splits (128 or 256 positions,
4 or 8 warps) 3-40% slower, 32 on 2 warps equal.
"""

from __future__ import annotations

import dataclasses

from graph_executor.kernels.gemv import GEMV_PLAN, GemvConfig, GemvPlan
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig

# gemv.py's o_proj reading its residual rows right after the wait (GemvConfig.residual_early, the same bits).
# Measured (H200, 41st session, step_variants, 7 alternating rounds, ms per step at context 300 / 2000, two pairs):
# LLaMA-2-7B 3.738 / 3.744 -> 3.677 / 3.679 and 4.050 / 4.043 -> 3.984 / 3.985 (-1.6%); Llama-3.2-1B 0.919 / 0.919 ->
# 0.905 / 0.907 and 1.001 / 1.000 -> 0.993 / 0.991 (-1.5% / -0.9%); SmolLM2-135M's 2x1024 o within +-0.3%: not there.
# Hidden 1025-2047 (its o is 1B's and 7B's config) takes it unmeasured.
O_RESIDUAL_EARLY = dataclasses.replace(GEMV_PLAN.o, residual_early=True)

# (smallest hidden size, plan), largest first
MEASURED_PLANS: tuple[tuple[int, GemvPlan], ...] = (
    (4096, dataclasses.replace(GEMV_PLAN, o=O_RESIDUAL_EARLY, down=DenseSplitKConfig(16, 1024, 8, reduce_kernel=True))),
    # gate_up on split-K too (46th session, step_variants, 5 alternating rounds, context 300): 0.902 -> 0.871 ms
    # (-3.4%; 32x256x8 0.873, 64x256x8 0.877, 16x512x4 0.883); on 7B 16x1024x8 -0.5%, on 8B +0.9%: not from 4096.
    # Hidden 2049-4095 (Llama-3.2-3B's 3072, Qwen2.5-7B's 3584) take it, and 1B's options, unmeasured
    (2048, dataclasses.replace(GEMV_PLAN, qkv=DenseSplitKConfig(16, 256, 4, reduce_kernel=True), o=O_RESIDUAL_EARLY,
                               gate_up=DenseSplitKConfig(16, 256, 4, reduce_kernel=True),
                               down=DenseSplitKConfig(32, 512, 8, reduce_kernel=True))),
    # SmolLM2 before the thirty-ninth session, kept where K > 1024 would not fit one chunk of 1024 (unmeasured there)
    (1025, dataclasses.replace(GEMV_PLAN, o=O_RESIDUAL_EARLY, down=DenseSplitKConfig(32, 256, 8, reduce_kernel=True))),
    # SmolLM2: qkv and gate_up read their whole K (576) in one masked chunk (7B's 16x256 read it in three, two of them
    # after the PDL wait), so with the early weights (this size's StepOptions) all of a program's weights are in
    # flight before its wait and nothing but the activation is loaded after it; o_proj's 2x1024 (7B's 2x2048 was one
    # chunk too) masks less of its block
    (0, dataclasses.replace(GEMV_PLAN, qkv=GemvConfig(16, 1024, 8, 3), o=GemvConfig(2, 1024, 4, 3),
                            gate_up=GemvConfig(8, 1024, 4, 3), down=DenseSplitKConfig(32, 256, 8, reduce_kernel=True))),
)
DEFAULT_PLAN = MEASURED_PLANS[0][1]  # LLaMA-2-7B's


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The batch-1 decode step's fusions and options (FusedDecoder's arguments of the same names)."""
    fuse_rope: bool  # RoPE and the KV append inside the decode attention kernel (one kernel fewer per layer)
    early_weights: bool  # every GEMV loads its (first) weights before it waits for the kernel before it
    # MiB of the layer's next weights (o, gate_up, down, the next layer's qkv) the decode attention kernel asks L2 to
    # hold (kernels/l2_prefetch.py; sm_90+); 0: none. Measured (H200, step at contexts 300 / 2000): 8 MiB +0.1% /
    # +0.1% on 7B, -0.4% / +1.0% on 1B, -1.0% / -0.8% on SmolLM2 (noise); 24 and 40 MiB slower everywhere: 0.
    l2_prefetch_mb: int = 0
    # the decode attention's last split program per head combines the splits (DecodeAttention(fused_reduce=): no
    # reduce kernel). Measured SmolLM2 -2% / -1.5%, 7B +1.6% / +0.7%: on below hidden 2048 (the batched-vs-lone
    # identity tests, test_runtime_batching and test_prefix_reuse with the GGUF, pass with it on the card).
    split_combine: bool = False
    # MiB of the next projection's weights each GEMV's programs ask L2 for once their rows are stored (gemv.py's
    # kernels only: projections.on_gemv_kernels); 0: none. Measured (H200): 4 MiB +0.8-2.9% on every shape, 16 MiB
    # up to +7%: 0.
    tail_prefetch_mb: int = 0
    # the one-query decode attention issues each block's V loads with its K loads (DecodeAttention(v_early=)).
    # Measured (H200, context 300 / 2000): with the reduce kernel after the splits SmolLM2 -3.6% / -3.5%, 1B -0.8% /
    # +0.2%, 7B +2.5% / +4.1%; with the split combine (SmolLM2's choice) SmolLM2 +3.2% / +4.0%: off everywhere
    v_early: bool = False
    # down_proj's split-K partials added by the next layer's qkv and o_proj GEMVs and the lm_head instead of a reduce
    # kernel (FusedDecoder(defer_down=), gemv.PendingResidual; the same bits), where a qkv program's share of them is
    # at most DEFER_DOWN_MAX_FLOATS: each qkv program reads every partial of the hidden size. Measured (H200, 38th
    # session, step_variants, 7 alternating rounds, context 300 / 2000): SmolLM2-135M (6 x 576 floats) 0.511 / 0.506
    # -> 0.484 / 0.482 ms and 0.553 / 0.550 -> 0.529 / 0.529 (-5% / -4%); LLaMA-2-7B (11 x 4096) +4.2% / +3.6%.
    defer_down: bool = False
    # with fuse_rope, the attention kernel loads each split's keys and values (and its position, cos and sin) before
    # its PDL wait, during the QKV projection, and takes the new row from registers; a split without keys of the
    # token ends before the wait (DecodeAttention(kv_early=), the same bits): only the QKV row is loaded after the
    # wait. Measured (H200, 41st session, step_variants, 7 alternating rounds, ms per step): SmolLM2-135M at a
    # 4096-position cache 0.427 / 0.423 -> 0.379 / 0.373 at context 300 and 0.490 / 0.492 -> 0.444 / 0.444 at 2000
    # (-12% / -9.5%); at a 512-position cache 0.405 -> 0.363 at 50, 0.403 -> 0.369 at 300. LLaMA-2-7B (before the
    # early exit of empty splits) +13% at 300 and 2000 on its 2 warps (the early tiles take 255 registers a thread,
    # one 64-thread program an SM), +10% on 4: on below hidden 4096 only (1B with RoPE inside since the 46th session:
    # see MEASURED_OPTIONS), and there for heads of at most 64 (fused_decoder.KV_EARLY_MAX_HEAD_DIM: Qwen2-1.5B's and
    # Qwen2.5-7B's 128 keep it off, unmeasured)
    kv_early: bool = False
    # the graph runner captures a batch-1 decode graph per context bucket (graphs.DECODE_CONTEXT_MIN: from 512,
    # doubling, below the cache), each launching only the attention splits that can hold keys
    # (FusedDecoder.step(context=), the same bits). Measured (H200, 42nd session, step_variants, 5 alternating rounds,
    # 4096-position cache, ms per step at context 128 / 300 on the 512 bucket's grid): SmolLM2-135M 0.380 / 0.383 ->
    # 0.372 / 0.378 and 0.377 / 0.380 -> 0.366 / 0.373 (-2% / -1.5%), the bench's decode through two processes 2,676 /
    # 2,654 -> 2,688 / 2,689 tokens/s; Llama-3.2-1B 0.909 / 0.912 -> 0.908 / 0.912; LLaMA-2-7B +0.2..0.5% on 512's grid
    # and +3.2% on 1024's (repeated: +3.3% twice in one run), 2048's at context 1000 -1.1% but at 2000 +6.1%;
    # Llama-3-8B +2.7% on 512's, +4.4% on 2048's at 2000. On below hidden 2048 only.
    context_graphs: bool = False


# A qkv program's share of a deferred down_proj's partials (splits x hidden size, float32) up to which `defer_down`
# applies: measured a gain at 3,456 (SmolLM2) and a loss at 45,056 (7B); unmeasured between, so about twice the gain's.
DEFER_DOWN_MAX_FLOATS = 8192

# (smallest hidden size, options), largest first: the measurements above
MEASURED_OPTIONS: tuple[tuple[int, StepOptions], ...] = (
    (4096, StepOptions(fuse_rope=True, early_weights=False)),
    # RoPE inside the attention with its keys and values loaded before the wait (46th session, H200, Llama-3.2-1B):
    # the bench's decode at max context 4096, three alternating rounds, 0.90 -> 0.87 ms P50 (1,109 -> 1,150 tokens/s
    # through two processes, each round); step_variants 7 rounds: -4.3% / -1.8% / -1.1% at context 128 / 300 / 2000
    (2048, StepOptions(fuse_rope=True, early_weights=False, kv_early=True)),
    (0, StepOptions(fuse_rope=True, early_weights=True, split_combine=True, defer_down=True, kv_early=True,
                    context_graphs=True)),
)


def _check(hidden_size: int) -> None:
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")


def options_for(hidden_size: int) -> StepOptions:
    """The step's fusions for a model of this hidden size: those measured on the largest hidden size not above it."""
    _check(hidden_size)
    return next(options for smallest, options in MEASURED_OPTIONS if hidden_size >= smallest)


def plan_for(hidden_size: int) -> GemvPlan:
    """The decode plan for a model of this hidden size: the one measured on the largest hidden size not above it."""
    _check(hidden_size)
    return next(plan for smallest, plan in MEASURED_PLANS if hidden_size >= smallest)
