"""GPU probe (issue 10, the packed prefill at 128-512 tokens): an int4 x float16 GEMM in Gluon whose dequantized weights
go through shared memory as the wgmma's B operand, the activations as its A operand (tokens as M, 64 a warpgroup),
instead of the weights as a register operand (bench.probes.gluon_int4_gemm). Nsight Compute showed that design
latency-bound (each warpgroup waiting for its own MMA every step, 64 weight rows a program): here one program
dequantizes a [BLOCK_N, BLOCK_K] weight tile once for all its BLOCK_T tokens, into one of three shared buffers, while
the previous step's MMA runs (operands in shared memory only, so the MMA may stay in flight across the loop's back
edge: `warpgroup_mma_wait(1)`). Activation tiles and code words come through one cp.async ring; scales and offsets
one step ahead in registers. One inline-asm call per code byte gives its two weights as one float16x2 register (the
byte, Marlin's 0x6400 conversion, s q + o).

    python -m bench.probes.gluon_int4_gemm_smem [--tokens 128,256,512] [--reps 10]
    python -m bench.probes.gluon_int4_gemm_smem --check     # every config's error and where the wrong elements lie
    PROBE=bench.probes.gluon_int4_gemm_smem bash tools/ncu_gluon.sh gate_up:512    # Nsight Compute, every config
"""
from __future__ import annotations

import argparse

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from bench.probes.gluon_int4_gemm import (
    byte_weights,
    check_table,
    per_group,
    run_each_twice,
    sweep_table,
    x_load_layout,
)


@gluon.jit
def _dequant_tile(words, s, o, sel, BN: gl.constexpr, BK: gl.constexpr):
    """words int32 [BN, BK / 8] (8 codes each), s / o float16 [BN, BK / 32] (a group's) -> float16 [BN, BK]."""
    DW: gl.constexpr = words.type.layout
    w3, sel3 = gl.broadcast(gl.expand_dims(words, 2), sel)  # [BN, BK / 8, 8]: code j of each word
    s3, _ = gl.broadcast(gl.expand_dims(per_group(s, BN, BK // 32, 4, DW), 2), sel3)  # each word's group
    o3, _ = gl.broadcast(gl.expand_dims(per_group(o, BN, BK // 32, 4, DW), 2), sel3)
    return byte_weights(w3, sel3, s3, o3).reshape([BN, BK])


@gluon.jit
def smem_int4_gemm(x_ptr, codes_ptr, scale_ptr, offset_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                   BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                   num_warps: gl.constexpr, SCALES: gl.constexpr = 1, KG: gl.constexpr = 0,
                   SPLITG: gl.constexpr = 1):
    """out [M, N] float16 = x [M, K] float16 @ W^T, W int4 [N, K] in groups of 32 (float16 scale and offset);
    K % BLOCK_K == 0 and N % BLOCK_N == 0 (the wrapper checks)."""
    gl.static_assert(BLOCK_T == 16 * num_warps, "16 tokens a warp: one warpgroup's wgmma covers 64")
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, BLOCK_K], gl.float16)
    WS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float16)
    XL: gl.constexpr = x_load_layout(BLOCK_T, BLOCK_K, num_warps)
    NW: gl.constexpr = BLOCK_K // 8  # code words a row a step
    # SPLITG lanes share a group (1: a lane takes a whole group, 4 words, one LDS.128; 2: two words each), so that
    # 16 warps cover 128 rows without two lanes dequantizing the same words (a layout wider than the tile repeats)
    CV: gl.constexpr = 4 // SPLITG
    CL: gl.constexpr = gl.BlockedLayout([1, CV], [32 // (NW // CV), NW // CV], [num_warps, 1], [1, 0])  # copies
    NG: gl.constexpr = BLOCK_K // 32
    D3: gl.constexpr = gl.BlockedLayout([1, 4 // SPLITG, 8], [32 // (NG * SPLITG), NG * SPLITG, 1], [num_warps, 1, 1],
                                        [2, 1, 0])
    DW: gl.constexpr = gl.SliceLayout(2, D3)  # words [BLOCK_N, NW]
    SG: gl.constexpr = gl.SliceLayout(2, gl.BlockedLayout([1, 1, 4 // SPLITG], [32 // (NG * SPLITG), NG, SPLITG],
                                                          [num_warps, 1, 1], [2, 1, 0]))  # groups [BLOCK_N, NG]
    # AHEAD tiles in flight: step k's copy goes into the stage step k - 2's MMA read (done by every warpgroup once
    # all pass step k's barrier: each waited for its MMA k - 2 at the end of step k - 1); the wait before step k's
    # barrier leaves one group pending, and needs tiles k (MMA) and k + 1 (codes to dequantize)
    AHEAD: gl.constexpr = STAGES - 2
    gl.static_assert(AHEAD >= 2, "STAGES >= 4")

    pid_n = gl.program_id(0)
    pid_t = gl.program_id(1)
    steps = K // BLOCK_K
    x_rows = pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, XL))
    x_cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, XL))
    x_ptrs = x_ptr + gl.expand_dims(x_rows.to(gl.int64) * stride_xm, 1) + gl.expand_dims(x_cols, 0)
    x_mask = gl.expand_dims(x_rows < M, 1)
    c_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, CL))
    c_cols = gl.arange(0, NW, layout=gl.SliceLayout(0, CL))
    c_ptrs = codes_ptr.to(gl.pointer_type(gl.int32)) + gl.expand_dims(c_rows.to(gl.int64) * (K // 8), 1) + \
        gl.expand_dims(c_cols, 0)
    g_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, SG))
    g_cols = gl.arange(0, NG, layout=gl.SliceLayout(0, SG))
    s_off = gl.expand_dims(g_rows.to(gl.int64) * (K // 32), 1) + gl.expand_dims(g_cols, 0)  # [BLOCK_N, NG]
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, D3)))
    sel = gl.expand_dims(gl.expand_dims(0x4040 | (j // 2) | ((j // 2) << 8), 0), 0)  # prmt: [byte j/2, 0, j/2, 0]

    # SCALES: where each step's scales and offsets come from. 1 / 2: plain loads one / two steps ahead into
    # registers; 3: the cp.async ring beside the codes (KG = K / 32 as a constexpr, so that each row's NG float16
    # are known to be 4-byte aligned: 4-byte copies); 0: an ablation, the first step's loaded once (wrong values:
    # timing only). Why (35th session, per-instruction stalls): the MEMBAR that fence_async_shared lowers to waits
    # for every load in flight, the scale loads issued a step ahead included, so each step waited for one.
    SCL: gl.constexpr = gl.BlockedLayout([1, NG], [32, 1], [num_warps, 1], [1, 0])  # a row's NG halves a lane
    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_T, BLOCK_K], XS)
    c_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, NW], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    w_smem = gl.allocate_shared_memory(gl.float16, [3, BLOCK_N, BLOCK_K], WS)  # B of steps k - 1, k, k + 1
    if SCALES == 3:
        gs_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, NG], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        go_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, NG], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        q_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, SCL))
        q_off = gl.expand_dims(q_rows.to(gl.int64) * KG, 1) + \
            gl.expand_dims(gl.arange(0, NG, layout=gl.SliceLayout(0, SCL)), 0)
    for i in gl.static_range(AHEAD):
        async_copy.async_copy_global_to_shared(x_smem.index(i), x_ptrs + i * BLOCK_K, mask=x_mask & (i < steps))
        async_copy.async_copy_global_to_shared(c_smem.index(i), c_ptrs + i * NW, mask=i < steps)
        if SCALES == 3:
            async_copy.async_copy_global_to_shared(gs_smem.index(i), scale_ptr + q_off + i * NG, mask=i < steps)
            async_copy.async_copy_global_to_shared(go_smem.index(i), offset_ptr + q_off + i * NG, mask=i < steps)
        async_copy.commit_group()
    async_copy.wait_group(AHEAD - 1)
    gl.thread_barrier()
    if SCALES == 3:
        s = gs_smem.index(0).load(SG)
        o = go_smem.index(0).load(SG)
    else:
        s = gl.load(scale_ptr + s_off)
        o = gl.load(offset_ptr + s_off)
    w_smem.index(0).store(_dequant_tile(c_smem.index(0).load(DW), s, o, sel, BLOCK_N, BLOCK_K))
    fence_async_shared()
    if SCALES == 1 or SCALES == 2:
        s = gl.load(scale_ptr + s_off + NG, mask=1 < steps, other=0.0)
        o = gl.load(offset_ptr + s_off + NG, mask=1 < steps, other=0.0)
    # SCALES 2: step k + 2's scales and offsets in flight too (their load has two steps' time to land, not one)
    s2 = gl.load(scale_ptr + s_off + 2 * NG, mask=(2 < steps) & (SCALES == 2), other=0.0)
    o2 = gl.load(offset_ptr + s_off + 2 * NG, mask=(2 < steps) & (SCALES == 2), other=0.0)
    acc = gl.zeros([BLOCK_T, BLOCK_N], gl.float32, layout=MMA)
    for k in range(steps):
        async_copy.wait_group(AHEAD - 2)  # tiles k and k + 1, this thread's part
        gl.thread_barrier()  # every thread's part, every warp's B store of step k, every MMA k - 2 done
        nxt = k + AHEAD
        async_copy.async_copy_global_to_shared(x_smem.index(nxt % STAGES), x_ptrs + nxt * BLOCK_K,
                                               mask=x_mask & (nxt < steps))
        async_copy.async_copy_global_to_shared(c_smem.index(nxt % STAGES), c_ptrs + nxt * NW, mask=nxt < steps)
        if SCALES == 3:
            async_copy.async_copy_global_to_shared(gs_smem.index(nxt % STAGES), scale_ptr + q_off + nxt * NG,
                                                   mask=nxt < steps)
            async_copy.async_copy_global_to_shared(go_smem.index(nxt % STAGES), offset_ptr + q_off + nxt * NG,
                                                   mask=nxt < steps)
        async_copy.commit_group()
        acc = warpgroup_mma(x_smem.index(k % STAGES), w_smem.index(k % 3).permute((1, 0)), acc, is_async=True)
        # step k + 1's weights into the buffer MMA k - 2 read, while MMA k (and maybe k - 1) run
        if SCALES == 3:
            s = gs_smem.index((k + 1) % STAGES).load(SG)
            o = go_smem.index((k + 1) % STAGES).load(SG)
        w_next = _dequant_tile(c_smem.index((k + 1) % STAGES).load(DW), s, o, sel, BLOCK_N, BLOCK_K)
        w_smem.index((k + 1) % 3).store(w_next)
        fence_async_shared()  # the generic-proxy stores before the barrier that hands them to the next MMA
        if SCALES == 2:
            s = s2
            o = o2
            s2 = gl.load(scale_ptr + s_off + (k + 3) * NG, mask=k + 3 < steps, other=0.0)
            o2 = gl.load(offset_ptr + s_off + (k + 3) * NG, mask=k + 3 < steps, other=0.0)
        elif SCALES == 1:
            s = gl.load(scale_ptr + s_off + (k + 2) * NG, mask=k + 2 < steps, other=0.0)
            o = gl.load(offset_ptr + s_off + (k + 2) * NG, mask=k + 2 < steps, other=0.0)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)
    o_toks = pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, MMA))
    o_cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA))
    ptrs = out_ptr + gl.expand_dims(o_toks.to(gl.int64) * stride_om, 1) + gl.expand_dims(o_cols, 0)
    gl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(o_toks < M, 1))


# (BLOCK_T, BLOCK_N, BLOCK_K, STAGES, num_warps); Triton 3.6's ptxas crashes (-11) on 5 stages at 128 x 128 and
# 64 x 64; 128 x 128 x 128 needs 256 KiB of shared memory
CONFIGS = [(64, 128, 64, 4, 4), (128, 128, 64, 4, 8), (128, 128, 64, 6, 8), (128, 256, 64, 4, 8),
           # (..., SCALES) (the kernel's doc; 0 is a timing-only ablation that the sweep's error column skips). SCALES 3
           # and 0 crash ptxas 12.8 / 12.9 (-11); ptxas 13.4 builds them (TRITON_PTXAS_PATH; tools/smem_session.sh).
           # The 32-wide K steps lost 1.5-2.5x to these (35th session) and were dropped.
           (128, 128, 64, 4, 8, 2), (128, 128, 64, 4, 8, 3), (128, 256, 64, 4, 8, 3), (64, 128, 64, 4, 4, 3),
           (128, 128, 64, 6, 8, 3), (128, 128, 64, 4, 8, 0), (128, 256, 64, 4, 8, 0),
           # (..., SCALES, SPLITG): 256 tokens on 16 warps, 4 warps a scheduler instead of 2 (the 35th session's stall
           # samples: 8 warps an SM leave each one issuing every ~8 cycles, the loop latency-bound)
           (256, 128, 64, 4, 16, 1, 2), (256, 128, 64, 4, 16, 2, 2), (256, 128, 64, 4, 16, 0, 2),
           (128, 128, 64, 4, 8, 1, 2)]


def smem_gemm(x: torch.Tensor, w, out: torch.Tensor, cfg: tuple) -> torch.Tensor:
    """out [T, N] float16 = x [T, K] float16 @ W^T (int4 groups of 32, float16 scales and offsets, row-major)."""
    block_t, block_n, block_k, stages, warps = cfg[:5]
    n, k = w.shape
    if k % block_k or n % block_n or w.group != 32 or w.offset is None or w.tiles is not None:
        raise ValueError(f"smem_gemm: {n} x {k} int4 (group {w.group}) does not fit config {cfg}")
    t = x.shape[0]
    smem_int4_gemm[(n // block_n, triton.cdiv(t, block_t))](
        x, w.codes, w.scale, w.offset, out, t, n, k, x.stride(0), out.stride(0), BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_K=block_k, STAGES=stages, num_warps=warps, SCALES=cfg[5] if len(cfg) > 5 else 1,
        KG=k // 32 if len(cfg) > 5 and cfg[5] == 3 else 0, SPLITG=cfg[6] if len(cfg) > 6 else 1)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="128,256,512")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--check", action="store_true", help="no timing: every config's error at 100 tokens on the o "
                    "and down shapes, with where the wrong elements are")
    ap.add_argument("--once", default="", help="SHAPE:TOKENS: every config run twice, nothing else (a target for "
                    "Nsight Compute: PROBE=bench.probes.gluon_int4_gemm_smem tools/ncu_gluon.sh)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    if args.once:
        return run_each_twice(args.once, CONFIGS, smem_gemm, dev, g)
    if args.check:
        return check_table(dev, g, CONFIGS, smem_gemm)
    return sweep_table("smem", CONFIGS, smem_gemm, [int(v) for v in args.tokens.split(",")], args.reps, dev, g,
                       timing_only=lambda cfg: len(cfg) > 5 and cfg[5] == 0)  # SCALES 0: wrong by design


if __name__ == "__main__":
    main()
