"""Experiment for issue 10: is the shipped int4 GEMV (graph_executor/kernels/gemv_lowbit.py: per-chunk group sums
through tl.reshape + tl.sum) bound by that reduction? Variant "flat" keeps a 2-D [BLOCK_N, BLOCK_K/2] float32
accumulator as the fp16 kernel does, dequantizes each code in registers with its group's scale and offset
(gathered per element: L1 hits), and reduces once at the end. Both compute x += W @ a (o_proj's kernel without
fusions) over 32 layers' weights in one CUDA graph; the variant is checked against the shipped kernel first.

    python -m bench.probes.int4_variants
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bench.floors import time_gpu
from bench.probes import float_lowbit_gemv as gemv_lowbit
from graph_executor.kernels.gemv import GemvConfig
from graph_executor.quant.formats import Int4Groups, quantize_int4

SHAPES = {"o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
CONFIGS = [(4, 1024, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 8, 3), (8, 1024, 8, 3),
           (2, 2048, 4, 3), (4, 2048, 8, 4)]


@triton.jit
def _int4_flat_kernel(codes_ptr, scale_ptr, offset_ptr, a_ptr, x_ptr, N, K, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
    NGK = K // GROUP
    for k0 in range(0, K, BLOCK_K):
        half = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte index along the row
        ok = half < K // 2
        mask = row_ok[:, None] & ok[None, :]
        b = tl.load(codes_ptr + rows[:, None] * (K // 2) + half[None, :], mask=mask, other=0)  # [BN, BK/2] u8
        ae = tl.load(a_ptr + 2 * half, mask=ok, other=0.0).to(tl.float32)
        ao = tl.load(a_ptr + 2 * half + 1, mask=ok, other=0.0).to(tl.float32)
        g = rows[:, None] * NGK + (2 * half[None, :]) // GROUP  # both nibbles of a byte share a group
        s = tl.load(scale_ptr + g, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(offset_ptr + g, mask=mask, other=0.0).to(tl.float32)
        lo = (b & 0xF).to(tl.float32)
        hi = (b >> 4).to(tl.float32)
        acc += s * (lo * ae[None, :] + hi * ao[None, :]) + o * (ae + ao)[None, :]
    res = tl.load(x_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(x_ptr + rows, (res + tl.sum(acc, axis=1)).to(x_ptr.dtype.element_ty), mask=row_ok)


def flat(w: Int4Groups, a: torch.Tensor, x: torch.Tensor, cfg: GemvConfig) -> torch.Tensor:
    n, k = w.shape
    _int4_flat_kernel[(triton.cdiv(n, cfg.block_n),)](w.codes, w.scale, w.offset, a, x, n, k, GROUP=w.group,
                                                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return x


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    print(torch.cuda.get_device_name())
    for name, (n, k) in SHAPES.items():
        weights = [quantize_int4(torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02)
                   for _ in range(32)]
        a = torch.randn(k, device=dev, dtype=torch.float16, generator=g)
        x0 = torch.randn(n, device=dev, dtype=torch.float16, generator=g)
        ref = gemv_lowbit.gemv_residual(weights[0], a, x0.clone().float().half())
        got = flat(weights[0], a, x0.clone(), GemvConfig(8, 512, 4, 3))
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err < 2e-3, f"{name}: flat variant differs from the shipped kernel by {err:.2e}"
        nbytes = sum(w.nbytes for w in weights)
        for kernel_name, fn in (("shipped", gemv_lowbit.gemv_residual), ("flat", flat)):
            best = None
            for c in CONFIGS:
                cfg = GemvConfig(*c)
                x = x0.clone()
                try:
                    for w in weights:
                        fn(w, a, x, cfg)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for w in weights:
                            fn(w, a, x, cfg)
                    ms = time_gpu(graph.replay, dev) * 1e3
                except Exception as e:  # noqa: BLE001 - a config this kernel cannot take
                    print(f"  {name} {kernel_name} {c}: {type(e).__name__}")
                    continue
                if best is None or ms < best[0]:
                    best = (ms, c)
            print(f"{name:8s} int4 {kernel_name:8s} best {best[0]:.3f} ms ({nbytes / best[0] / 1e9:.2f} TB/s) "
                  f"with {best[1]}  (max rel. diff vs shipped {err:.1e})", flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
