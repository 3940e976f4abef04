"""GEMVs over a few token rows at once (T <= 64: a speculative verify step's k + 1 tokens, a short prompt) with the
decode step's fusions, so that each weight is read once, as a decode step reads it, in fewer launches per layer:

- `rmsnorm_gemv_rows`:  out[t] = W @ (rmsnorm(x[t]) * norm_w) [+ bias]
- `gemv_residual_rows`: x[t] += W @ a[t]
- `silu_gemv_residual_rows`: x[t] += W @ (silu(g[t]) * u[t]), [g, u] = gate_up[t]

Why not cuBLAS (what long prompts use): at 5 rows its GEMMs read the weights well below the decode GEMVs' rate and
leave RMSNorm, SwiGLU and the residual to separate kernels; on an H200 a verify of 5 tokens on LLaMA-2-7B took
1.19x a decode step that way, and on SmolLM2-135M 1.3x (bench/NOTES.md, issue 11). A 10-token prompt's prefill
on LLaMA-2-7B spent 3.73 of its 4.48 ms in cuBLAS at 3.05-3.83 TB/s, plus RMSNorm, SwiGLU and split-K reduction
kernels (bench/NOTES.md, issue 12).

Each program owns BLOCK_N weight rows and walks its slice of K in BLOCK_K chunks; the tile is multiplied by all
token rows at once on the tensor cores, the weights as the dot's left operand (BLOCK_N rows x BLOCK_K) and the
tokens, padded to ROWS = 16, 32 or 64, as its right one, accumulating [BLOCK_N, ROWS] in float32. Activations enter
the dot in the weights' dtype (as cuBLAS's do); float32 weights use exact (IEEE) products, never TF32. The
RMSNorm's sum of squares is gathered per token in the same loop, its scale applied to the sum at the end.

`split` > 1 cuts K into that many slices, one program each, so that a 4096-row projection still fills the card:
the partial sums go to a float32 `SplitKScratch` ([split, ROWS, N padded to BLOCK_N], then the sums of squares per
row block and slice) and the last program of a row block (a counter) adds them in order, applies the epilogue and
resets the counter: deterministic, graph-safe, the scratch left clean (the decode GEMVs' scheme, gemv_splitk.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.gemv_splitk import SplitKScratch
from graph_executor.kernels.pdl import launch_options, wait_for_prior

MAX_ROWS = 64  # token rows per call: the dot's N (16, 32 or 64 after padding)


@dataclass(frozen=True)
class RowsConfig:
    block_n: int = 32  # weight rows per program (the dot's M: >= 16)
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = False  # launch with programmatic dependent launch (kernels/pdl.py; Hopper and later only)
    split: int = 1  # programs along K (at most): > 1 sums partials in a SplitKScratch
    # split > 1: the partials added by a second kernel (`_reduce_rows_kernel`, same order, same bits) instead of by
    # the last program of each row block (gemv_splitk.SplitKConfig.reduce_kernel)
    reduce_kernel: bool = False

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1) or self.block_k < 16 or \
                self.block_k & (self.block_k - 1):
            raise ValueError(f"RowsConfig needs power-of-two block_n >= 16 and block_k >= 16, got {self}")
        if self.split < 1:
            raise ValueError(f"RowsConfig needs split >= 1, got {self}")


DEFAULT = RowsConfig()

RMSNORM, RESIDUAL, SILU_RESIDUAL = 0, 1, 2  # the kernel's MODE


def padded_rows(t: int) -> int:
    """The dot's N for t token rows: 16, 32 or 64."""
    return max(16, triton.next_power_of_2(t))


def k_split(k: int, cfg: RowsConfig) -> tuple[int, int]:
    """(K columns per program, programs along K): whole BLOCK_K steps, at most cfg.split programs."""
    per = triton.cdiv(triton.cdiv(k, cfg.split), cfg.block_k) * cfg.block_k
    return per, triton.cdiv(k, per)


def scratch_size(t: int, n: int, k: int, cfg: RowsConfig) -> tuple[int, int]:
    """(float32 partials, int32 counters) one call over t token rows and an [n, k] weight needs with cfg; (0, 0)
    when it runs unsplit. Calls on one stream may share a scratch as large as the largest."""
    _, split = k_split(k, cfg)
    if split == 1:
        return 0, 0
    rows, blocks = padded_rows(t), triton.cdiv(n, cfg.block_n)
    return split * rows * blocks * cfg.block_n + blocks * split * rows, blocks


def step_scratch(calls: list[tuple[int, int, int, RowsConfig]], packed: SplitKScratch | None,
                 device: torch.device) -> SplitKScratch | None:
    """One scratch for a step's multi-row GEMV calls (t rows over an [n, k] weight with a config, each) and the
    low-bit GEMM's partials (`packed`, or None): they run one after another on one stream. None (or `packed` itself)
    when no call splits K."""
    floats = counters = 0
    for t, n, k, cfg in calls:
        f, c = scratch_size(t, n, k, cfg)
        floats, counters = max(floats, f), max(counters, c)
    if floats == 0 and counters == 0:
        return packed
    if packed is not None:
        floats, counters = max(floats, packed.partial.numel()), max(counters, packed.count.numel())
    return SplitKScratch.zeros(floats, counters, device)


@triton.jit
def _gemv_rows_kernel(w_ptr, a_ptr, nw_ptr, b_ptr, out_ptr, part_ptr, count_ptr, T, N, K, K_SPLIT, SPLIT,
                      stride_a, stride_out, eps, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, SPLITTING: tl.constexpr,
                      PDL: tl.constexpr, FIXUP: tl.constexpr = True):
    """Program (n, s): weight rows n * BLOCK_N.., K columns s * K_SPLIT.. (SPLIT programs along K)."""
    wait_for_prior(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tokens = tl.arange(0, ROWS)
    token_ok = tokens < T
    acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
    ss = tl.zeros([ROWS], dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    for k0 in range(k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = token_ok[:, None] & col_ok[None, :]
        a = tl.load(a_ptr + tokens[:, None] * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:  # RMSNorm: scale by norm_w now, by 1 / rms (known after the loop) at the end
            ss += tl.sum(a * a, axis=1)
            a = a * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if MODE == 2:  # a_ptr rows hold [gate (K), up (K)]
            up = tl.load(a_ptr + tokens[:, None] * stride_a + K + cols[None, :], mask=mask, other=0.0)
            a = a / (1.0 + tl.exp(-a)) * up.to(tl.float32)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)
        if IEEE:
            acc += tl.dot(w, tl.trans(a.to(w.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(a.to(w.dtype)))
    ptrs = out_ptr + tokens[None, :] * stride_out + rows[:, None]  # [BLOCK_N, ROWS]: out[t, row]
    ok = row_ok[:, None] & token_ok[None, :]
    if SPLITTING:  # SPLIT > 1 (a runtime value: one compiled kernel serves every split)
        # partials [SPLIT, ROWS, n_pad], then the sums of squares [row blocks, SPLIT, ROWS]; `_fixup_rows` or (with
        # reduce_kernel) `_reduce_rows_kernel` adds them in order
        n_pad = tl.num_programs(0) * BLOCK_N
        tile = part_ptr + (pid_k * ROWS + tokens[None, :]).to(tl.int64) * n_pad + rows[:, None]
        tl.store(tile, acc)
        squares = part_ptr + SPLIT * ROWS * n_pad + pid_n * SPLIT * ROWS
        if MODE == 0 and (FIXUP or pid_n == 0):  # `_reduce_rows_kernel` reads row block 0's copy
            tl.store(squares + pid_k * ROWS + tokens, ss)
        if FIXUP:
            _fixup_rows(tile, squares, ptrs, ok, rows, row_ok, tokens, b_ptr, count_ptr, pid_n, pid_k, K, SPLIT, n_pad,
                        eps, MODE, HAS_BIAS, BLOCK_N, ROWS)
    else:
        _epilogue(acc, ss, ptrs, ok, rows, row_ok, b_ptr, K, eps, MODE, HAS_BIAS)


@triton.jit
def _fixup_rows(tile, squares, ptrs, ok, rows, row_ok, tokens, b_ptr, count_ptr, pid_n, pid_k, K, SPLIT, n_pad, eps,
                MODE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """After a program stored its partials: the last program of its row block to finish (the counter) adds the
    SPLIT partials in order, applies the epilogue and resets the counter."""
    tl.debug_barrier()  # every thread's stores are issued before the release below
    if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == SPLIT - 1:
        acc, ss = _add_partials(tile - pid_k * ROWS * n_pad, squares, tokens, SPLIT, n_pad, MODE, BLOCK_N, ROWS)
        _epilogue(acc, ss, ptrs, ok, rows, row_ok, b_ptr, K, eps, MODE, HAS_BIAS)
        tl.atomic_xchg(count_ptr + pid_n, 0)


@triton.jit
def _add_partials(tile0, squares, tokens, SPLIT, n_pad, MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                  ROWS: tl.constexpr):
    """A row block's SPLIT partial tiles (slice 0's at tile0, the next ROWS * n_pad floats on) and, MODE 0, its
    sums of squares at `squares`, added in order through L2 (other programs wrote them): [BLOCK_N, ROWS], [ROWS]."""
    acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
    ss = tl.zeros([ROWS], dtype=tl.float32)
    for i in range(SPLIT):
        acc += tl.load(tile0 + i * ROWS * n_pad, cache_modifier=".cg")
        if MODE == 0:
            ss += tl.load(squares + i * ROWS + tokens, cache_modifier=".cg")
    return acc, ss


@triton.jit
def _reduce_rows_kernel(part_ptr, b_ptr, out_ptr, T, N, K, SPLIT, n_pad, stride_out, eps, MODE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    """The second kernel of a split call with `reduce_kernel`: out tile = the SPLIT partials (and, MODE 0, row block
    0's sums of squares) added in order, then `_epilogue`: what `_fixup_rows` computes, bit for bit."""
    wait_for_prior(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tokens = tl.arange(0, ROWS)
    ptrs = out_ptr + tokens[None, :] * stride_out + rows[:, None]
    ok = row_ok[:, None] & (tokens < T)[None, :]
    tile = part_ptr + tokens[None, :].to(tl.int64) * n_pad + rows[:, None]  # rows < n_pad: the tiles are padded
    acc, ss = _add_partials(tile, part_ptr + SPLIT * ROWS * n_pad, tokens, SPLIT, n_pad, MODE, BLOCK_N, ROWS)
    _epilogue(acc, ss, ptrs, ok, rows, row_ok, b_ptr, K, eps, MODE, HAS_BIAS)


@triton.jit
def _epilogue(acc, ss, ptrs, ok, rows, row_ok, b_ptr, K, eps, MODE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """out tile (ptrs, ok) = acc [BLOCK_N, ROWS] / rms [+ bias] (MODE 0), or += acc (the residual stream)."""
    if MODE == 0:
        acc = acc * (1.0 / tl.sqrt(ss / K + eps))[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if MODE != 0:  # the residual stream: x[t] += W @ a[t]
        acc += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=ok)


def _launch(mode: int, w: torch.Tensor, a: torch.Tensor, nw: torch.Tensor | None, bias: torch.Tensor | None,
            out: torch.Tensor, eps: float, cfg: RowsConfig, scratch: SplitKScratch | None) -> torch.Tensor:
    n, k = w.shape
    t = a.shape[0]
    width = 2 * k if mode == SILU_RESIDUAL else k
    if not 1 <= t <= MAX_ROWS or a.shape[1] != width or out.shape != (t, n):
        raise ValueError(f"gemv_rows: w {tuple(w.shape)} needs a [T <= {MAX_ROWS}, {width}] and out [T, {n}]; "
                         f"got a {tuple(a.shape)}, out {tuple(out.shape)}")
    if a.stride(1) != 1 or out.stride(1) != 1 or not w.is_contiguous():
        raise ValueError("gemv_rows: w, and each row of a and out, must be contiguous")
    per, split = k_split(k, cfg)
    floats, counters = scratch_size(t, n, k, cfg)
    if split == 1:  # nothing to sum across programs: no scratch read or written (none allocated: no memset in a graph)
        part, count = w, w
    else:
        if scratch is None:
            scratch = SplitKScratch.zeros(floats, counters, w.device)
        elif (scratch.partial.numel() < floats or scratch.count.numel() < counters
              or scratch.partial.device != w.device):
            raise ValueError(f"gemv_rows: {t} rows over a {list(w.shape)} weight with {cfg} need a scratch of "
                             f"{floats} floats and {counters} counters on {w.device}, got {scratch.partial.numel()} "
                             f"and {scratch.count.numel()} on {scratch.partial.device}")
        part, count = scratch.partial, scratch.count
    _gemv_rows_kernel[(triton.cdiv(n, cfg.block_n), split)](
        w, a, nw if nw is not None else w, bias if bias is not None else w, out, part, count, t,
        n, k, per, split, a.stride(0), out.stride(0), eps, MODE=mode, HAS_BIAS=bias is not None,
        IEEE=w.dtype == torch.float32, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ROWS=padded_rows(t),
        SPLITTING=split > 1, FIXUP=not cfg.reduce_kernel,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, PDL=cfg.pdl, **launch_options(cfg.pdl))
    if split > 1 and cfg.reduce_kernel:
        _reduce_rows_kernel[(triton.cdiv(n, cfg.block_n),)](
            part, bias if bias is not None else w, out, t, n, k, split, triton.cdiv(n, cfg.block_n) * cfg.block_n,
            out.stride(0), eps, MODE=mode, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, ROWS=padded_rows(t),
            PDL=cfg.pdl, num_warps=4, **launch_options(cfg.pdl))
    return out


def rmsnorm_gemv_rows(w: torch.Tensor, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                      bias: torch.Tensor | None = None, cfg: RowsConfig = DEFAULT,
                      scratch: SplitKScratch | None = None) -> torch.Tensor:
    """w [N, K], x [T, K], norm_w [K], bias [N] or None -> out [T, N] (any float dtype: logits may be float32).
    A config split along K needs `scratch_size` of scratch; without it the call allocates its own, which is fine
    outside CUDA graphs (as for the other calls)."""
    return _launch(RMSNORM, w, x, norm_w, bias, out, eps, cfg, scratch)


def gemv_residual_rows(w: torch.Tensor, a: torch.Tensor, x: torch.Tensor, cfg: RowsConfig = DEFAULT,
                       scratch: SplitKScratch | None = None) -> torch.Tensor:
    """x [T, N] += a [T, K] @ w [N, K]^T, in place."""
    return _launch(RESIDUAL, w, a, None, None, x, 0.0, cfg, scratch)


def silu_gemv_residual_rows(w: torch.Tensor, gate_up: torch.Tensor, x: torch.Tensor, cfg: RowsConfig = DEFAULT,
                            scratch: SplitKScratch | None = None) -> torch.Tensor:
    """x [T, N] += (silu(gate_up[:, :K]) * gate_up[:, K:]) @ w [N, K]^T, in place."""
    return _launch(SILU_RESIDUAL, w, gate_up, None, None, x, 0.0, cfg, scratch)
