"""Probe: a TMA GEMM with the weights as the MMA's M side ("swap AB") for the fp16 prefill projections at 64-128
prompt rows, against cuBLAS and cuBLASLt.

Why (issue 12, TTFT at 50-128 tokens): the 7B 100-token prefill spends ~4.1 of its ~4.7 ms in cuBLAS GEMMs that
read the weights at 2.5-3.5 TB/s (`kernel_profile`, 38th session: o 2.46 TB/s, down 3.18, qkv 3.37, gate_up 3.5),
against ~4.3 for a plain read. The 37th session's split-K Triton GEMM lost (`prefill_splitk.md`): tokens were its
MMA's M side (tiles of 64-128 token rows, most of them padding at 100 rows), its loads masked pointer loads. Here:

- each program owns BLOCK_N weight rows (the MMA's M: 64 a warpgroup) and every prompt row (BLOCK_T, the MMA's N,
  padded to a power of two), so each weight byte is read once and no MMA row is padding;
- weights and activations come in through TMA descriptors (out-of-range rows and K columns arrive as zeros: no
  masks), pipelined over `STAGES` shared-memory buffers by Triton's software pipeliner, optionally warp-specialized
  (`tl.range(warp_specialize=True)`: a producer warp issues the copies);
- K may be split over the grid to fill the 132 SMs (o and down have 4096 rows: 32-64 programs unsplit); the
  partials go to float32 scratch and the tile's last program adds them in order (deterministic), adds the residual
  (o and down accumulate into it) and resets its counter: `prefill_splitk`'s scheme.

Predicted: o and down near 3.5-3.8 TB/s (from 2.5 / 3.2), qkv and gate_up at cuBLAS's or a little above; a layer
at 100 rows ~0.127 -> ~0.11 ms, -0.5 ms of the 100-token TTFT if all four win.

    python -m bench.probes.prefill_tma [--tokens 64,100,128] [--layers 16] [--shapes o,down,qkv,gate_up]
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
from bench.probes.prefill_splitk import store_in_order


@triton.jit
def _tma_swap_kernel(w_desc, x_desc, out_ptr, part_ptr, count_ptr, T, N, K, K_SPLIT, SPLIT,
                     ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                     STAGES: tl.constexpr, WS: tl.constexpr):
    """Program (n, s): out[:, n tile] (+)= (W[n tile, K slice s] @ x[:, K slice s]^T)^T; W [N, K] and x [T, K]
    through descriptors of blocks [BLOCK_N, BLOCK_K] and [BLOCK_T, BLOCK_K] (T <= BLOCK_T), out [T, N] row-major.
    SPLIT > 1: partials [SPLIT, grid_n * BLOCK_N, BLOCK_T] float32; the tile's last program adds them in order."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc = tl.zeros([BLOCK_N, BLOCK_T], dtype=tl.float32)  # [weight rows, prompt rows]
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        w = w_desc.load([pid_n * BLOCK_N, k0])  # [BLOCK_N, BLOCK_K]
        x = x_desc.load([0, k0])  # [BLOCK_T, BLOCK_K]
        acc = tl.dot(w, x.T, acc)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # output columns (weight rows)
    rows = tl.arange(0, BLOCK_T)  # prompt rows
    at = out_ptr + rows[None, :] * N + cols[:, None]
    n_pad = tl.num_programs(0) * BLOCK_N
    tile = part_ptr + (pid_k * n_pad + cols[:, None]) * BLOCK_T + rows[None, :]
    store_in_order(acc, at, (cols[:, None] < N) & (rows[None, :] < T), tile, n_pad * BLOCK_T, pid_k,
                   count_ptr + pid_n, SPLIT, ACCUMULATE)


Config = tuple[int, int, int, int, int, bool]  # block_n, block_k, split, warps, stages, warp-specialized


def descriptors(x: torch.Tensor, w: torch.Tensor, cfg: Config):
    """The TMA descriptors of x [T, K] and w [N, K] for cfg (built once per tensor pair: a graph keeps them)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_n, block_k = cfg[:2]
    block_t = max(16, triton.next_power_of_2(x.shape[0]))
    return (TensorDescriptor.from_tensor(w, [block_n, block_k]), TensorDescriptor.from_tensor(x, [block_t, block_k]))


def tma_gemm(descs, t: int, n: int, k: int, out: torch.Tensor, part: torch.Tensor, count: torch.Tensor,
             cfg: Config, accumulate: bool) -> None:
    """out [T, N] (+)= x [T, K] @ w [N, K]^T through `descriptors(x, w, cfg)`; part / count: `scratch`."""
    block_n, block_k, split, warps, stages, ws = cfg
    w_desc, x_desc = descs
    per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    splits = triton.cdiv(k, per)
    grid = (triton.cdiv(n, block_n), splits)
    _tma_swap_kernel[grid](w_desc, x_desc, out, part, count, t, n, k, per, splits, ACCUMULATE=accumulate,
                           BLOCK_N=block_n, BLOCK_T=x_desc.block_shape[0], BLOCK_K=block_k, STAGES=stages, WS=ws,
                           num_warps=warps)


def scratch(t: int, n: int, cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    block_n, _, split = cfg[:3]
    block_t = max(16, triton.next_power_of_2(t))
    tiles = triton.cdiv(n, block_n)
    return (torch.zeros(max(1, split * tiles * block_n * block_t), device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device))


def configs(n: int, k: int) -> list[Config]:
    out = []
    for block_n, block_k, split, ws in itertools.product((64, 128), (64, 128), (1, 2, 3, 4, 6, 8), (False, True)):
        programs = triton.cdiv(n, block_n) * split
        if not 96 <= programs <= 1100 or triton.cdiv(k, split) < 2 * block_k:
            continue
        for stages in ((3, 4) if block_k == 64 else (3,)):
            out.append((block_n, block_k, split, 4 if block_n == 64 else 8, stages, ws))
    return out


def check(t: int, n: int, k: int, cfg: Config, accumulate: bool, device: torch.device) -> float:
    """Relative error (max |diff| / max |ref|) of one call against float64, every element; run twice (the second
    call on the counters the first left: they must be reset)."""
    x, w, base, ref = reference_case(t, n, k, accumulate, device)
    part, count = scratch(t, n, cfg, device)
    descs = descriptors(x, w, cfg)
    worst = 0.0
    for _ in range(2):
        out = base.clone()
        tma_gemm(descs, t, n, k, out, part, count, cfg, accumulate)
        worst = max(worst, ((out.double() - ref).abs().max() / ref.abs().max()).item())
    assert int(count.abs().sum()) == 0, "a counter was not reset"
    return worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="64,100,128", help="prompt rows, comma-separated")
    ap.add_argument("--layers", type=int, default=16, help="distinct weights a graph (each read from HBM)")
    ap.add_argument("--reps", type=int, default=20, help="graph replays timed (median)")
    ap.add_argument("--shapes", default="o,down,qkv,gate_up", help=f"projections of {list(SHAPES)}")
    ap.add_argument("--top", type=int, default=3, help="configs listed per (projection, rows)")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}: fp16 prefill GEMMs of LLaMA-2-7B, "
          f"{args.layers} distinct weights a graph, ms per layer (median of {args.reps} replays / layers); TB/s = "
          "weight bytes / time; config = (block_n, block_k, split, warps, stages, warp-specialized)")
    print("| projection | rows | mm ms | mm TB/s | lt ms | lt TB/s | TMA ms | TMA TB/s | its config | its rel. error | "
          f"next {args.top - 1} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sums: dict[tuple[int, str], float] = {}
    failed: dict[bool, str] = {}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        accumulate = name in RESIDUAL
        weights = [torch.randn(n, k, device=device, dtype=torch.float16, generator=g) * 0.02
                   for _ in range(args.layers)]
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, k, device=device, dtype=torch.float16, generator=g)
            out = torch.zeros(t, n, device=device, dtype=torch.float16)
            mm, lt = cublas_layer_ms(x, out, weights, accumulate, args.reps)
            ranked: list[tuple[float, Config, float]] = []
            for cfg in configs(n, k):
                try:
                    err = check(t, n, k, cfg, accumulate, device)
                except Exception as e:  # a config this Triton cannot build (e.g. warp specialization on sm_90)
                    failed.setdefault(cfg[5], f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                if err > 2e-3:
                    print(f"| {name} | {t} | config {cfg} wrong: relative error {err:.2e} ||||||||||")
                    continue
                part, count = scratch(t, n, cfg, device)
                descs = [descriptors(x, w, cfg) for w in weights]

                def ours(out=out, cfg=cfg, part=part, count=count, descs=descs) -> None:
                    for d in descs:
                        tma_gemm(d, t, n, k, out, part, count, cfg, accumulate)
                ranked.append((timed_graph(ours, args.reps) / args.layers, cfg, err))
            ranked.sort(key=lambda r: r[0])
            nbytes = 2.0 * n * k
            ms, cfg, err = ranked[0] if ranked else (float("inf"), None, 0.0)
            for v, val in (("mm", mm), ("lt", lt), ("ours", ms)):
                sums[(t, v)] = sums.get((t, v), 0.0) + val
            rest = "; ".join(f"{r[0]:.4f} {r[1]}" for r in ranked[1:args.top])
            print(f"| {name} | {t} | {mm:.4f} | {nbytes / mm / 1e9:.2f} | {lt:.4f} | {nbytes / lt / 1e9:.2f} | "
                  f"{ms:.4f} | {nbytes / ms / 1e9:.2f} | {cfg} | {err:.1e} | {rest} |", flush=True)
        del weights
        torch.cuda.empty_cache()
    for key, why in failed.items():
        print(f"\nnot built (warp-specialized={key}): {why}")
    print_layer_sums(sums, "TMA")


if __name__ == "__main__":
    main()
