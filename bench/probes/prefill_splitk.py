"""Probe: a split-K Triton GEMM for the fp16 prefill projections at 64-128 prompt rows, against cuBLAS and cuBLASLt.

Why (issue 12, TTFT at 50-128 tokens): the 7B prefill of 100 tokens replays its 128-row graph in ~4.9 ms against a
weight-read floor of ~3.1; its four GEMMs a layer read their weights at 2.4-3.8 TB/s (`prefill_gemm.md`, 36th
session: o 0.0126-0.014 ms for 33.5 MB, down 0.028-0.034 for 90 MB). At <= 128 rows cuBLAS's 128-wide output tiles
give o_proj and down_proj (N = 4096) only 32 tiles for the H200's 132 SMs. Splitting K over the grid fills the card:
each program multiplies one [BLOCK_T, BLOCK_N] output tile over its K slice with tl.dot (float32), stores the
partial to a float32 scratch, and the last program of the tile (a counter) adds the partials in order, adds the
residual (o and down accumulate into it) and stores float16, then resets the counter (gemm_lowbit's scheme).
Predicted: o and down near 3.8 TB/s, ~-8 us a layer, ~-0.25 ms on the 100-token TTFT.

Per (projection, rows): cuBLAS (`mm`: the step's torch.mm / addmm_), cuBLASLt (`lt`), and the best of a sweep of
split-K configs (each checked against a float64 product first), each over `layers` distinct weights in one CUDA
graph (weights from HBM, as in a step); ms per layer and read TB/s; then a layer's sum.

    python -m bench.probes.prefill_splitk [--tokens 64,100,128] [--layers 16] [--shapes o,down,qkv,gate_up]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl

from bench.probes.prefill_gemm import (
    RESIDUAL,
    SHAPES,
    cublas_layer_ms,
    print_layer_sums,
    reference_case,
    timed_graph,
)


@triton.jit
def store_in_order(acc, at, mask, tile, split_stride, pid_k, counter, SPLIT, ACCUMULATE: tl.constexpr):
    """A split-K program's tile `acc` (float32) into out at `at` (masked by `mask`; ACCUMULATE: added to what is
    there). SPLIT > 1: acc goes to the partials at `tile` (split i's at tile + (i - pid_k) * split_stride) and the
    tile's last program (its `counter`) adds them in order (deterministic), stores, and resets the counter. Both
    Triton GEMM probes (this one and prefill_tma's) finish their tiles so."""
    if SPLIT > 1:
        tl.store(tile, acc)
        tl.debug_barrier()  # every thread's stores are issued before the release below
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT - 1:
            acc = tl.zeros_like(acc)
            for i in range(SPLIT):
                acc += tl.load(tile + (i - pid_k) * split_stride, cache_modifier=".cg")
            if ACCUMULATE:
                acc += tl.load(at, mask=mask, other=0.0).to(tl.float32)
            tl.store(at, acc.to(at.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter, 0)
    else:
        if ACCUMULATE:
            acc += tl.load(at, mask=mask, other=0.0).to(tl.float32)
        tl.store(at, acc.to(at.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_gemm_kernel(x_ptr, w_ptr, out_ptr, part_ptr, count_ptr, T, N, K, K_SPLIT, SPLIT,
                        ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Program (n, t, s): out[t tile, n tile] (+)= x[t tile, K slice s] @ W[n tile, K slice s]^T; x [T, K], W [N, K],
    out [T, N] row-major. SPLIT > 1: partials [SPLIT, grid_t * BLOCK_T, grid_n * BLOCK_N] float32, the tile's last
    program adds them in order (deterministic) and resets the tile's counter."""
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok, col_ok = rows < T, cols < N
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    at = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    grid_n = tl.num_programs(0)
    t_pad = tl.num_programs(1) * BLOCK_T
    n_pad = grid_n * BLOCK_N
    tile = part_ptr + (pid_k * t_pad + rows[:, None]).to(tl.int64) * n_pad + cols[None, :]
    store_in_order(acc, at, row_ok[:, None] & col_ok[None, :], tile, t_pad * n_pad, pid_k,
                   count_ptr + pid_t * grid_n + pid_n, SPLIT, ACCUMULATE)


def splitk_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, part: torch.Tensor, count: torch.Tensor,
                cfg: tuple[int, int, int, int, int, int], accumulate: bool) -> None:
    """out [T, N] (+)= x [T, K] @ w [N, K]^T with cfg = (block_t, block_n, block_k, split, warps, stages); part and
    count: float32 / int32 scratch (counters zero), big enough (see `scratch`)."""
    block_t, block_n, block_k, split, warps, stages = cfg
    t, k = x.shape
    n = w.shape[0]
    per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    splits = triton.cdiv(k, per)
    grid = (triton.cdiv(n, block_n), triton.cdiv(t, block_t), splits)
    _splitk_gemm_kernel[grid](x, w, out, part, count, t, n, k, per, splits, ACCUMULATE=accumulate,
                              BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def scratch(t: int, n: int, cfg: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    block_t, block_n, _, split = cfg[:4]
    tiles_t, tiles_n = triton.cdiv(t, block_t), triton.cdiv(n, block_n)
    return (torch.zeros(max(1, split * tiles_t * block_t * tiles_n * block_n), device=device),
            torch.zeros(tiles_t * tiles_n, dtype=torch.int32, device=device))


def configs(t: int) -> list[tuple[int, int, int, int, int, int]]:
    block_t = min(128, max(16, triton.next_power_of_2(t)))
    out = []
    for block_n, block_k, split in itertools.product((64, 128), (64, 128), (1, 2, 4, 8)):
        warps = 8 if block_t * block_n >= 128 * 128 else 4
        out.append((block_t, block_n, block_k, split, warps, 3 if block_k == 128 else 4))
    return out


def check(t: int, n: int, k: int, cfg: tuple[int, ...], accumulate: bool, device: torch.device) -> float:
    """Relative error (max |diff| / max |ref|) of one call against float64, every element; run twice (the second
    call on the counters the first left: they must be reset)."""
    x, w, base, ref = reference_case(t, n, k, accumulate, device)
    part, count = scratch(t, n, cfg, device)
    worst = 0.0
    for _ in range(2):
        out = base.clone()
        splitk_gemm(x, w, out, part, count, cfg, accumulate)
        worst = max(worst, ((out.double() - ref).abs().max() / ref.abs().max()).item())
    assert int(count.abs().sum()) == 0, "a counter was not reset"
    return worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="64,100,128", help="prompt rows, comma-separated")
    ap.add_argument("--layers", type=int, default=16, help="distinct weights a graph (each read from HBM)")
    ap.add_argument("--reps", type=int, default=20, help="graph replays timed (median)")
    ap.add_argument("--shapes", default="o,down,qkv,gate_up", help=f"projections of {list(SHAPES)}")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}: fp16 prefill GEMMs of LLaMA-2-7B, {args.layers} distinct weights a graph, "
          f"ms per layer (median of {args.reps} replays / layers); TB/s = weight bytes / time")
    print("| projection | rows | mm ms | mm TB/s | lt ms | lt TB/s | split-K ms | split-K TB/s | its config "
          "(t, n, k, split, warps, stages) | its rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    sums: dict[tuple[int, str], float] = {}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        accumulate = name in RESIDUAL
        weights = [torch.randn(n, k, device=device, dtype=torch.float16, generator=g) * 0.02
                   for _ in range(args.layers)]
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, k, device=device, dtype=torch.float16, generator=g)
            out = torch.zeros(t, n, device=device, dtype=torch.float16)
            mm, lt = cublas_layer_ms(x, out, weights, accumulate, args.reps)
            best = (float("inf"), None, 0.0)
            for cfg in configs(t):
                err = check(t, n, k, cfg, accumulate, device)
                if err > 2e-3:
                    print(f"| {name} | {t} | config {cfg} wrong: relative error {err:.2e} |||||||||")
                    continue
                part, count = scratch(t, n, cfg, device)

                def ours(x=x, out=out, weights=weights, cfg=cfg, part=part, count=count) -> None:
                    for w in weights:
                        splitk_gemm(x, w, out, part, count, cfg, accumulate)
                ms = timed_graph(ours, args.reps) / args.layers
                if ms < best[0]:
                    best = (ms, cfg, err)
            nbytes = 2.0 * n * k
            ms, cfg, err = best
            for v, val in (("mm", mm), ("lt", lt), ("ours", ms)):
                sums[(t, v)] = sums.get((t, v), 0.0) + val
            print(f"| {name} | {t} | {mm:.4f} | {nbytes / mm / 1e9:.2f} | {lt:.4f} | {nbytes / lt / 1e9:.2f} | "
                  f"{ms:.4f} | {nbytes / ms / 1e9:.2f} | {cfg} | {err:.1e} |", flush=True)
        del weights
        torch.cuda.empty_cache()
    print_layer_sums(sums, "split-K")


if __name__ == "__main__":
    main()
