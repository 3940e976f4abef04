"""GPU probe (issue 10, the packed prefill at 128-512 tokens): the int4 x float16 GEMM of
bench.probes.gluon_int4_gemm_smem split into warp-specialized partitions, as Hopper GEMMs are built.

Why (35th session, bench/NOTES.md): in the one-role loop of the shared-memory form the same 8-16 warps wait for the
copies, sync the CTA, issue the MMA, dequantize, store, fence and wait for the MMA, so every step takes ~1,700-2,800
cycles against the MMA's 512-1,024 and the card's issue slots sit idle. Here:

- a loader partition (LW warps, 4 by default) keeps STAGES steps of activations, codes, scales and offsets in
  flight by cp.async, and hands each stage over with an mbarrier once its copies of it have landed (LAG 0: the
  copies arrive on it themselves and the MMA partition fences for the async proxy);
- one to three dequantizing partitions (DQ_PARTS, DQ_WARPS each, taking steps in turn) turn each stage's codes into
  a float16 [BLOCK_N, BLOCK_K] tile in a ring of B_BUFS shared buffers, a few steps ahead of the MMA;
- the default partition (num_warps: tokens as M, 16 a warp) only waits on mbarriers and issues the wgmma, keeping one
  in flight, and releases a step's buffers once its MMA is done.

    python -m bench.probes.gluon_int4_gemm_ws [--tokens 128,256,512] [--check]

Measured on the H200 (35th and 36th sessions, bench/NOTES.md): right in every config; with one dequantizing partition
no faster than the one-role loop (its serial chain a step is the limit), with two on alternate steps 8% faster
(gate_up 512 tokens 0.338 -> 0.310 ms), still 1.2-1.6x dequantize + cuBLAS at 256-512 tokens.
"""
from __future__ import annotations

import argparse

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from bench.probes.gluon_int4_gemm import check_table, run_each_twice, sweep_table, x_load_layout
from bench.probes.gluon_int4_gemm_smem import _dequant_tile


@gluon.jit
def _loader(x_ptr, codes_ptr, scale_ptr, offset_ptr, M, K, stride_xm, pid_n, pid_t, x_smem, c_smem, s_smem, o_smem,
            ready, empty, BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, KG: gl.constexpr,
            LAG: gl.constexpr, LW: gl.constexpr):
    """Step k's copies into stage k % STAGES once its consumers released it; stage k - LAG handed over (ready) once
    the partition's copies of it have landed: LAG cp.async groups in flight behind the one being issued (LAG 1 left
    only ~2 steps a memory latency in flight: the first card run)."""
    STAGES: gl.constexpr = x_smem.type.shape[0]
    NW: gl.constexpr = BLOCK_K // 8
    NG: gl.constexpr = BLOCK_K // 32
    XL: gl.constexpr = x_load_layout(BLOCK_T, BLOCK_K, LW)
    CL: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (NW // 4), NW // 4], [LW, 1], [1, 0])
    SL: gl.constexpr = gl.BlockedLayout([1, NG], [32, 1], [LW, 1], [1, 0])
    x_rows = pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, XL))
    x_ptrs = x_ptr + gl.expand_dims(x_rows.to(gl.int64) * stride_xm, 1) + \
        gl.expand_dims(gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, XL)), 0)
    x_mask = gl.expand_dims(x_rows < M, 1)
    c_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, CL))
    c_ptrs = codes_ptr.to(gl.pointer_type(gl.int32)) + gl.expand_dims(c_rows.to(gl.int64) * (KG * 4), 1) + \
        gl.expand_dims(gl.arange(0, NW, layout=gl.SliceLayout(0, CL)), 0)
    q_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, SL))
    q_off = gl.expand_dims(q_rows.to(gl.int64) * KG, 1) + \
        gl.expand_dims(gl.arange(0, NG, layout=gl.SliceLayout(0, SL)), 0)
    steps = K // BLOCK_K
    for k in range(steps):
        s = k % STAGES
        mbarrier.wait(empty.index(s), ((k // STAGES) & 1) ^ 1)
        async_copy.async_copy_global_to_shared(x_smem.index(s), x_ptrs + k * BLOCK_K, mask=x_mask)
        async_copy.async_copy_global_to_shared(c_smem.index(s), c_ptrs + k * NW)
        async_copy.async_copy_global_to_shared(s_smem.index(s), scale_ptr + q_off + k * NG)
        async_copy.async_copy_global_to_shared(o_smem.index(s), offset_ptr + q_off + k * NG)
        if LAG == 0:  # each thread's arrival once its copies have landed (no wait here; the consumers fence)
            async_copy.mbarrier_arrive(ready.index(s), increment_count=False)
        else:
            async_copy.commit_group()
        if LAG > 0 and k >= LAG:
            async_copy.wait_group(LAG)  # this thread's copies of step k - LAG have landed
            fence_async_shared()  # ...and are visible to the async proxy (the wgmma reads x)
            mbarrier.arrive(ready.index((k - LAG) % STAGES))  # (after the partition's barrier: every thread's)
    if LAG > 0:
        async_copy.wait_group(0)
        fence_async_shared()
    for i in gl.static_range(LAG):
        last = steps - LAG + i
        mbarrier.arrive(ready.index(last % STAGES), pred=last >= 0)


@gluon.jit
def _dequantizer(K, c_smem, s_smem, o_smem, w_smem, ready, empty, b_ready, b_empty, BLOCK_N: gl.constexpr,
                 BLOCK_K: gl.constexpr, DQ_WARPS: gl.constexpr, PART: gl.constexpr = 0, PARTS: gl.constexpr = 1,
                 PIPE: gl.constexpr = False):
    """Step k's codes (stage k % STAGES) -> float16 weights in B buffer k % B_BUFS, once the MMA released it; the
    steps k = PART mod PARTS (PARTS dequantizing partitions, each its own serial chain a step). PIPE: the next step's
    codes, scales and offsets are read (and their stage released) before this step's tile is stored, so their shared
    loads and the stage wait leave the chain."""
    STAGES: gl.constexpr = c_smem.type.shape[0]
    B_BUFS: gl.constexpr = w_smem.type.shape[0]
    NG: gl.constexpr = BLOCK_K // 32
    D3: gl.constexpr = gl.BlockedLayout([1, 4, 8], [32 // NG, NG, 1], [DQ_WARPS, 1, 1], [2, 1, 0])
    DW: gl.constexpr = gl.SliceLayout(2, D3)
    SG: gl.constexpr = gl.SliceLayout(2, gl.BlockedLayout([1, 1, 4], [32 // NG, NG, 1], [DQ_WARPS, 1, 1], [2, 1, 0]))
    j = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, D3)))
    sel = gl.expand_dims(gl.expand_dims(0x4040 | (j // 2) | ((j // 2) << 8), 0), 0)
    steps = K // BLOCK_K
    if PIPE:  # the first step's operands before the loop
        mbarrier.wait(ready.index(PART % STAGES), (PART // STAGES) & 1, pred=PART < steps)
        words = c_smem.index(PART % STAGES).load(DW)
        sc = s_smem.index(PART % STAGES).load(SG)
        of = o_smem.index(PART % STAGES).load(SG)
        mbarrier.arrive(empty.index(PART % STAGES), pred=PART < steps)
    for k in range(PART, steps, PARTS):
        if PIPE:
            w = _dequant_tile(words, sc, of, sel, BLOCK_N, BLOCK_K)
            kn = k + PARTS  # the next step's operands now (stale reads past the last step are never used)
            mbarrier.wait(ready.index(kn % STAGES), (kn // STAGES) & 1, pred=kn < steps)
            words = c_smem.index(kn % STAGES).load(DW)
            sc = s_smem.index(kn % STAGES).load(SG)
            of = o_smem.index(kn % STAGES).load(SG)
            mbarrier.arrive(empty.index(kn % STAGES), pred=kn < steps)
        else:
            s = k % STAGES
            mbarrier.wait(ready.index(s), (k // STAGES) & 1)
            words = c_smem.index(s).load(DW)
            sc = s_smem.index(s).load(SG)
            of = o_smem.index(s).load(SG)
            mbarrier.arrive(empty.index(s))  # codes, scales and offsets read (the MMA still holds x)
            w = _dequant_tile(words, sc, of, sel, BLOCK_N, BLOCK_K)
        b = k % B_BUFS
        mbarrier.wait(b_empty.index(b), ((k // B_BUFS) & 1) ^ 1)
        w_smem.index(b).store(w)
        fence_async_shared()
        mbarrier.arrive(b_ready.index(b))


@gluon.jit
def _mma(out_ptr, M, N, K, stride_om, pid_n, pid_t, x_smem, w_smem, ready, empty, b_ready, b_empty,
         BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, num_warps: gl.constexpr,
         LAG: gl.constexpr):
    STAGES: gl.constexpr = x_smem.type.shape[0]
    B_BUFS: gl.constexpr = w_smem.type.shape[0]
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    acc = gl.zeros([BLOCK_T, BLOCK_N], gl.float32, layout=MMA)
    steps = K // BLOCK_K
    for k in range(steps):
        s = k % STAGES
        b = k % B_BUFS
        mbarrier.wait(ready.index(s), (k // STAGES) & 1)
        mbarrier.wait(b_ready.index(b), (k // B_BUFS) & 1)
        if LAG == 0:  # the loader's cp.async writes, seen through the mbarrier, ordered before the async proxy's read
            fence_async_shared()
        acc = warpgroup_mma(x_smem.index(s), w_smem.index(b).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        # MMA k - 1 is done: its activation stage and B buffer go back
        mbarrier.arrive(empty.index((k + STAGES - 1) % STAGES), pred=k > 0)
        mbarrier.arrive(b_empty.index((k + B_BUFS - 1) % B_BUFS), pred=k > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    o_toks = pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, MMA))
    o_cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, MMA))
    ptrs = out_ptr + gl.expand_dims(o_toks.to(gl.int64) * stride_om, 1) + gl.expand_dims(o_cols, 0)
    gl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(o_toks < M, 1))


@gluon.jit
def ws_int4_gemm(x_ptr, codes_ptr, scale_ptr, offset_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                 BLOCK_T: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                 B_BUFS: gl.constexpr, DQ_WARPS: gl.constexpr, KG: gl.constexpr, LOAD_REGS: gl.constexpr,
                 DQ_REGS: gl.constexpr, num_warps: gl.constexpr, LAG: gl.constexpr = 1, DQ_PARTS: gl.constexpr = 1,
                 LW: gl.constexpr = 4, DQ_PIPE: gl.constexpr = False):
    """out [M, N] float16 = x [M, K] float16 @ W^T, W int4 [N, K] in groups of 32 with float16 scales and offsets,
    row-major; KG = K / 32 (a constexpr: 4-byte copies of each row's scales); K % BLOCK_K == 0, N % BLOCK_N == 0."""
    gl.static_assert(BLOCK_T == 16 * num_warps, "16 tokens a warp: one warpgroup's wgmma covers 64")
    gl.static_assert(LAG < STAGES, "the loader hands stage k - LAG over before it waits for stage k's release")
    NW: gl.constexpr = BLOCK_K // 8
    NG: gl.constexpr = BLOCK_K // 32
    XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, BLOCK_K], gl.float16)
    WS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float16)
    PLAIN: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_T, BLOCK_K], XS)
    c_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, NW], PLAIN)
    s_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, NG], PLAIN)
    o_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_N, NG], PLAIN)
    w_smem = gl.allocate_shared_memory(gl.float16, [B_BUFS, BLOCK_N, BLOCK_K], WS)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    b_ready = gl.allocate_shared_memory(gl.int64, [B_BUFS, 1], mbarrier.MBarrierLayout())
    b_empty = gl.allocate_shared_memory(gl.int64, [B_BUFS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):  # LAG 0: every loader thread arrives (cp.async.mbarrier.arrive.noinc)
        mbarrier.init(ready.index(i), count=LW * 32 if LAG == 0 else 1)
        mbarrier.init(empty.index(i), count=2)  # the dequantizer (codes) and the MMA (x)
    for i in gl.static_range(B_BUFS):
        mbarrier.init(b_ready.index(i), count=1)
        mbarrier.init(b_empty.index(i), count=1)
    pid_n = gl.program_id(0)
    pid_t = gl.program_id(1)
    gl.static_assert(B_BUFS % DQ_PARTS == 0, "each dequantizing partition keeps to its own B buffers")
    # a pipelined dequantizer waits for step k + DQ_PARTS before it hands step k over: that stage's release by the MMA
    # (step k + DQ_PARTS - STAGES) must not need step k
    gl.static_assert(not DQ_PIPE or STAGES >= DQ_PARTS + 2, "DQ_PIPE needs STAGES >= DQ_PARTS + 2")
    # the 35th session's stall samples: one dequantizer's chain a step (~225 instructions a warp, one issued every
    # ~7 cycles) held the MMA; more warps in it shorten no link, more partitions run chains side by side
    if DQ_PARTS == 3:
        gl.warp_specialize([
            (_mma, (out_ptr, M, N, K, stride_om, pid_n, pid_t, x_smem, w_smem, ready, empty, b_ready, b_empty,
                    BLOCK_T, BLOCK_N, BLOCK_K, num_warps, LAG)),
            (_loader, (x_ptr, codes_ptr, scale_ptr, offset_ptr, M, K, stride_xm, pid_n, pid_t, x_smem, c_smem, s_smem,
                       o_smem, ready, empty, BLOCK_T, BLOCK_N, BLOCK_K, KG, LAG, LW)),
            (_dequantizer, (K, c_smem, s_smem, o_smem, w_smem, ready, empty, b_ready, b_empty, BLOCK_N, BLOCK_K,
                            DQ_WARPS, 0, 3, DQ_PIPE)),
            (_dequantizer, (K, c_smem, s_smem, o_smem, w_smem, ready, empty, b_ready, b_empty, BLOCK_N, BLOCK_K,
                            DQ_WARPS, 1, 3, DQ_PIPE)),
            (_dequantizer, (K, c_smem, s_smem, o_smem, w_smem, ready, empty, b_ready, b_empty, BLOCK_N, BLOCK_K,
                            DQ_WARPS, 2, 3, DQ_PIPE)),
        ], [LW, DQ_WARPS, DQ_WARPS, DQ_WARPS], [LOAD_REGS, DQ_REGS, DQ_REGS, DQ_REGS])
    elif DQ_PARTS == 2:
        gl.warp_specialize([
            (_mma, (out_ptr, M, N, K, stride_om, pid_n, pid_t, x_smem, w_smem, ready, empty, b_ready, b_empty,
                    BLOCK_T, BLOCK_N, BLOCK_K, num_warps, LAG)),
            (_loader, (x_ptr, codes_ptr, scale_ptr, offset_ptr, M, K, stride_xm, pid_n, pid_t, x_smem, c_smem, s_smem,
                       o_smem, ready, empty, BLOCK_T, BLOCK_N, BLOCK_K, KG, LAG, LW)),
            (_dequantizer, (K, c_smem, s_smem, o_smem, w_smem, ready, empty, b_ready, b_empty, BLOCK_N, BLOCK_K,
                            DQ_WARPS, 0, 2, DQ_PIPE)),
            (_dequantizer, (K, c_smem, s_smem, o_smem, w_smem, ready, empty, b_ready, b_empty, BLOCK_N, BLOCK_K,
                            DQ_WARPS, 1, 2, DQ_PIPE)),
        ], [LW, DQ_WARPS, DQ_WARPS], [LOAD_REGS, DQ_REGS, DQ_REGS])
    else:
        gl.warp_specialize([
            (_mma, (out_ptr, M, N, K, stride_om, pid_n, pid_t, x_smem, w_smem, ready, empty, b_ready, b_empty,
                    BLOCK_T, BLOCK_N, BLOCK_K, num_warps, LAG)),
            (_loader, (x_ptr, codes_ptr, scale_ptr, offset_ptr, M, K, stride_xm, pid_n, pid_t, x_smem, c_smem, s_smem,
                       o_smem, ready, empty, BLOCK_T, BLOCK_N, BLOCK_K, KG, LAG, LW)),
            (_dequantizer, (K, c_smem, s_smem, o_smem, w_smem, ready, empty, b_ready, b_empty, BLOCK_N, BLOCK_K,
                            DQ_WARPS, 0, 1, DQ_PIPE)),
        ], [LW, DQ_WARPS], [LOAD_REGS, DQ_REGS])


# (BLOCK_T, BLOCK_N, BLOCK_K, STAGES, B_BUFS, MMA warps, DQ warps, LAG, LOAD_REGS, DQ_REGS, maxnreg). First card run
# (LAG 1): 128 x 128 x 64, 6 stages, 4 B buffers, 8 + 8 warps best; gate_up 512 tokens 0.342 ms, ~0.9 us a step
# Second run: LAG 4-5 1.3x slower than LAG 1 (the hand-over waits for the loader to get LAG steps further, which
# waits for releases). LAG 0: the copies signal the mbarrier themselves (cp.async.mbarrier.arrive.noinc per thread):
# third run, right and ~2-4% faster than LAG 1. Nsight Compute then showed the loader partition spilling (40
# registers: its pointer tensors), 52% of the stalls on local memory: budgets below leave no spill (sm_90 SASS, ptxas
# 13.4). maxnreg x all warps x 32 must fit the 64K registers (20 warps: <= 102; 16 warps: <= 128).
# Fourth run: no faster without the spill; stall samples: the MMA waits for the dequantizer's hand-over (its serial
# chain a step). (..., DQ_PARTS[, loader warps]): 2 dequantizing partitions taking steps in turn (36th session: 8%
# faster); DQ_PIPE was slower.
CONFIGS = [(128, 128, 64, 4, 3, 8, 4, 0, 72, 136, 128), (128, 128, 64, 4, 4, 8, 4, 0, 64, 96, 96, 2),
           (128, 128, 64, 6, 4, 8, 4, 0, 64, 88, 96, 2),
           # DQ_PARTS 3 ((..., 92, 3, 2): 22 warps, launched as 24) does not launch: 768 threads x 92 registers is
           # over the SM's 64 K (Triton: "out of resource: threads, Required: 768, Hardware limit: 640"), and under
           # 85 registers a thread its dequantizers spill
           # (..., DQ_PARTS, loader warps, DQ_PIPE): the dequantizer reading step k + DQ_PARTS before storing step k
           (128, 128, 64, 4, 3, 8, 4, 0, 72, 136, 128, 1, 4, 1), (128, 128, 64, 4, 4, 8, 4, 0, 64, 96, 96, 2, 4, 1),
           (64, 128, 64, 6, 3, 4, 4, 0, 40, 120, 128)]


def ws_gemm(x: torch.Tensor, w, out: torch.Tensor, cfg: tuple) -> torch.Tensor:
    """out [T, N] float16 = x [T, K] float16 @ W^T (int4 groups of 32, float16 scales and offsets, row-major)."""
    block_t, block_n, block_k, stages, b_bufs, warps, dq_warps, lag, load_regs, dq_regs, maxnreg = cfg[:11]
    n, k = w.shape
    if k % block_k or n % block_n or w.group != 32 or w.offset is None or w.tiles is not None:
        raise ValueError(f"ws_gemm: {n} x {k} int4 (group {w.group}) does not fit config {cfg}")
    t = x.shape[0]
    ws_int4_gemm[(n // block_n, triton.cdiv(t, block_t))](
        x, w.codes, w.scale, w.offset, out, t, n, k, x.stride(0), out.stride(0), BLOCK_T=block_t, BLOCK_N=block_n,
        BLOCK_K=block_k, STAGES=stages, B_BUFS=b_bufs, DQ_WARPS=dq_warps, KG=k // 32, LOAD_REGS=load_regs,
        DQ_REGS=dq_regs, num_warps=warps, maxnreg=maxnreg, LAG=lag, DQ_PARTS=cfg[11] if len(cfg) > 11 else 1,
        LW=cfg[12] if len(cfg) > 12 else 4, DQ_PIPE=bool(cfg[13]) if len(cfg) > 13 else False)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="128,256,512")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--check", action="store_true", help="no timing: every config's error at 100 tokens")
    ap.add_argument("--once", default="", help="SHAPE:TOKENS: every config run twice (an Nsight Compute target)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    if args.once:
        return run_each_twice(args.once, CONFIGS, ws_gemm, dev, g)
    if args.check:
        return check_table(dev, g, CONFIGS, ws_gemm)
    return sweep_table("ws", CONFIGS, ws_gemm, [int(v) for v in args.tokens.split(",")], args.reps, dev, g)


if __name__ == "__main__":
    main()
