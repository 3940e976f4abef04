"""Batch-1 GEMVs over packed weights (`Int4Groups`, `Int8Groups`) for the decode step: split-K, one shot per
program, `dp4a` on an integer copy of the activation. Same three fusions as the fp16 GEMVs of gemv.py:

- `rmsnorm_gemv`:  out = W @ (rmsnorm(x) * norm_w) [+ bias]
- `gemv_residual`: x += W @ a
- `silu_gemv_residual`: x += W @ (silu(g) * u), [g, u] = gate_up

Why this shape (bench/probes/int4_splitk.py, H200): a program owns BLOCK_N rows and one slice of BLOCK_KW
32-bit words of codes along K (8 int4 or 4 int8 weights a word) and has no loop, so all its loads are in flight
at once; the grid is N / BLOCK_N x (words per row / BLOCK_KW) programs, enough to fill the card even for
N = 4096. The program writes its slice of the activation per group of 32 (or the weight's group when smaller)
as two int8 digits, a ~= d (hi + lo / 256) with d = max|a| / 127 (error <= d / 512: ~1e-5 of the output, where
one digit, llama.cpp's q8_1, gives ~5e-3), packed four to a word; then per word of codes:

- int4: byte j holds weights 2j (low nibble) and 2j + 1 (high nibble) of the word's eight: two masks, a shift
  and four `dp4a.u32.s32` against the digits of the even and the odd positions;
- int8: two `dp4a.s32.s32` against the digits of four consecutive positions;

and per group: scale d sum(q (hi + lo / 256)) + offset sum(a) (sum(a) exact; symmetric int4: scale (d sum(...)
- 8 sum(a))). Against the float kernels this reads the same bytes with a few times fewer instructions per
weight (bench/NOTES.md).

Each program writes its partial sums to a float32 scratch ([SPLIT, N], plus the sum of squares of its x slice
for RMSNorm); the last program of a row block to finish (a counter per block) adds the SPLIT partials in order,
applies 1 / rms and the bias or the residual, writes the output and resets the counter: deterministic, and the
scratch is clean for the next call (and the next graph replay). Calls on one stream may share a scratch.

Under the Triton interpreter (CPU tests) `dp4a` is computed with shifts and multiplies instead of inline PTX.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from graph_executor.kernels.act_digits import digit_words, digits
from graph_executor.kernels.pdl import launch_options, wait_for_prior
from graph_executor.quant.formats import INT4_ZERO, Int4Groups, Int8Groups

Packed = Int4Groups | Int8Groups


@dataclass(frozen=True)
class SplitKConfig:
    block_n: int = 32  # output rows per program
    block_kw: int = 64  # 32-bit words of codes (8 int4 or 4 int8 weights each) along K per program
    num_warps: int = 4
    pdl: bool = False  # launch with programmatic dependent launch (kernels/pdl.py; Hopper and later only)
    early: bool = False  # load the codes and scales before waiting for the previous kernel (pdl.with_early_weights)
    # the K slices' partial sums added by a second kernel (`_reduce_kernel`, same order, same bits) instead of by the
    # last program of each row block: no program waits on a membar, an atomic and a barrier before it exits
    reduce_kernel: bool = False


DEFAULT = SplitKConfig()  # int4: 32 x 512 weights a program
DEFAULT_INT8 = SplitKConfig(block_kw=128)  # int8: the same 512 weights of K, twice the bytes


@dataclass(frozen=True)
class SplitKPlan:
    """A config per projection of the decode step."""

    qkv: SplitKConfig
    o: SplitKConfig
    gate_up: SplitKConfig
    down: SplitKConfig
    lm_head: SplitKConfig


def _split(w: Packed, cfg: SplitKConfig) -> int:
    return triton.cdiv(w.shape[1] // w.per_word, cfg.block_kw)


def splitk_floats(n: int, split: int, block_n: int) -> int:
    """Float32 scratch of one split-K call over n rows in `split` K slices and row blocks of block_n: the [split, n]
    partial sums, then one RMSNorm sum of squares per (row block, slice). The FP8 kernels (gemv_fp8) share it."""
    return split * n + triton.cdiv(n, block_n) * split


def scratch_floats(w: Packed, cfg: SplitKConfig) -> int:
    """Float32 scratch one call over w needs: partial sums and the RMSNorm sums of squares."""
    return splitk_floats(w.shape[0], _split(w, cfg), cfg.block_n)


@dataclass(frozen=True)
class SplitKScratch:
    """Scratch the split-K kernels share (one stream): partial sums and the per-row-block (per-tile) counters,
    zeroed once and left zeroed by every call. The decode GEMVs here and in gemv_fp8 and the prefill GEMM
    (gemm_lowbit) use it."""

    partial: torch.Tensor  # float32 [floats]
    count: torch.Tensor  # int32 [blocks]

    @staticmethod
    def allocate(weights: list[Packed], cfgs: list[SplitKConfig], device: torch.device) -> SplitKScratch:
        """Big enough for every weight with its config."""
        floats = max(scratch_floats(w, c) for w, c in zip(weights, cfgs, strict=True))
        blocks = max(triton.cdiv(w.shape[0], c.block_n) for w, c in zip(weights, cfgs, strict=True))
        return SplitKScratch.zeros(floats, blocks, device)

    @staticmethod
    def zeros(floats: int, counters: int, device: torch.device) -> SplitKScratch:
        """`floats` float32 partials and `counters` int32 counters, zeroed (at least one of each)."""
        return SplitKScratch(torch.zeros(max(1, floats), device=device, dtype=torch.float32),
                             torch.zeros(max(1, counters), device=device, dtype=torch.int32))


@triton.jit
def _dp4a(a, b, c, SIGNED_A: tl.constexpr, EMULATE: tl.constexpr):
    """c + the dot product of a's four bytes (signed or unsigned) with b's four signed bytes (int32 tensors)."""
    if EMULATE:
        for j in tl.static_range(4):
            ab = (a >> (8 * j)) & 0xFF
            if SIGNED_A:
                ab = ab - ((ab & 0x80) << 1)
            bb = (b >> (8 * j)) & 0xFF
            c += ab * (bb - ((bb & 0x80) << 1))
        return c
    elif SIGNED_A:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _splitk_kernel(codes_ptr, scale_ptr, offset_ptr, a_ptr, nw_ptr, b_ptr, out_ptr, part_ptr, count_ptr, N, K, eps,
                   MODE: tl.constexpr, HAS_OFFSET: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                   SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_KW: tl.constexpr, INT4: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr,
                   EARLY: tl.constexpr, FIXUP: tl.constexpr = True, TILE_N: tl.constexpr = 0,
                   TILE_KW: tl.constexpr = 0):
    """MODE 0: out = W @ (rmsnorm(a) * nw) [+ b]; 1: out += W @ a; 2: out += W @ (silu(a[:K]) * a[K:]). EARLY:
    codes, scales and offsets are loaded before the wait for the previous kernel (constant in a step: no race).
    Every load of the weight's bytes is issued before the activation's math: the offsets loaded after it (as until
    the twenty-fourth session) left their latency exposed, and the int4 GEMVs ran 5-7% slower (bench/NOTES.md)."""
    if not EARLY:
        wait_for_prior(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    w, s, o, rows, row_ok = load_tile(codes_ptr, scale_ptr, offset_ptr, pid_n, pid_k, N, K, HAS_OFFSET, GROUP,
                                      BLOCK_N, BLOCK_KW, INT4, TILE_N, TILE_KW)
    if EARLY:
        wait_for_prior(PDL)
    partial, ss = tile_partial(w, s, o, pid_k, a_ptr, nw_ptr, K, MODE, HAS_OFFSET, ZERO, GROUP, BLOCK_N, BLOCK_KW,
                               INT4, EMULATE)
    if FIXUP:
        fixup(partial, ss, rows, row_ok, pid_n, pid_k, part_ptr, count_ptr, scale_ptr, b_ptr, out_ptr, N, K, eps,
              MODE, HAS_BIAS, False, SPLIT, SPLIT_P2, BLOCK_N)
    else:
        store_partial(partial, ss, rows, row_ok, pid_n, pid_k, part_ptr, N, MODE, SPLIT)


@triton.jit
def load_tile(codes_ptr, scale_ptr, offset_ptr, pid_n, pid_k, N, K, HAS_OFFSET: tl.constexpr, GROUP: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, INT4: tl.constexpr, TILE_N: tl.constexpr,
              TILE_KW: tl.constexpr):
    """A split-K GEMV program's weight block (row block pid_n, K slice pid_k): codes int32 [BLOCK_N, BLOCK_KW],
    scales and offsets float32 [BLOCK_N, NG] (the scales again where there are no offsets), its rows and their
    mask. Every load of the weight's bytes is issued before the activation's math (`tile_partial`)."""
    EPW: tl.constexpr = 8 if INT4 else 4  # weights per word
    WPG: tl.constexpr = GROUP // EPW  # words per group
    NG: tl.constexpr = BLOCK_KW // WPG
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    KW = tl.multiple_of(K // EPW, WPG)  # a row is whole groups: 16-byte aligned for groups of 32
    kws = pid_k * BLOCK_KW + tl.arange(0, BLOCK_KW)
    g = pid_k * NG + tl.arange(0, NG)
    if TILE_N == BLOCK_N and TILE_KW == BLOCK_KW:  # tile-major storage, one whole tile a program: one contiguous
        # run of codes and one of each group array, no masks (tiled weights are whole tiles), so every load is 16 B
        tile = (pid_n * tl.cdiv(KW, TILE_KW) + pid_k).to(tl.int64)
        w = tl.load(codes_ptr + tile * (BLOCK_N * BLOCK_KW) + (tl.arange(0, BLOCK_N)[:, None] * BLOCK_KW
                                                               + tl.arange(0, BLOCK_KW)[None, :]))
        at = tile * (BLOCK_N * NG) + (tl.arange(0, BLOCK_N)[:, None] * NG + tl.arange(0, NG)[None, :])
        s = tl.load(scale_ptr + at).to(tl.float32)
        o = s
        if HAS_OFFSET:
            o = tl.load(offset_ptr + at).to(tl.float32)
    else:
        if TILE_N > 0:  # tile-major storage (formats.tile_major) read by blocks other than its tiles
            code_at = tile_offsets(rows, kws, KW, TILE_N, TILE_KW)
            at = tile_offsets(rows, g, K // GROUP, TILE_N, TILE_KW // WPG)
        else:
            code_at = rows[:, None].to(tl.int64) * KW + kws[None, :]
            at = rows[:, None].to(tl.int64) * (K // GROUP) + g[None, :]
        # int32 [BLOCK_N, BLOCK_KW]
        w = tl.load(codes_ptr + code_at, mask=row_ok[:, None] & (kws < KW)[None, :], other=0)
        gmask = row_ok[:, None] & (g < K // GROUP)[None, :]
        s = tl.load(scale_ptr + at, mask=gmask, other=0.0).to(tl.float32)  # [BLOCK_N, NG]
        o = s
        if HAS_OFFSET:
            o = tl.load(offset_ptr + at, mask=gmask, other=0.0).to(tl.float32)
    return w, s, o, rows, row_ok


@triton.jit
def tile_partial(w, s, o, pid_k, a_ptr, nw_ptr, K, MODE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 ZERO: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 INT4: tl.constexpr, EMULATE: tl.constexpr):
    """A weight block from `load_tile` times its K slice of the activation: the partial sums float32 [BLOCK_N] and
    (MODE 0) the slice's sum of squares."""
    EPW: tl.constexpr = 8 if INT4 else 4
    WPG: tl.constexpr = GROUP // EPW
    NG: tl.constexpr = BLOCK_KW // WPG
    QGROUP: tl.constexpr = 32 if GROUP > 32 else GROUP  # the activation's quantization group
    NQ: tl.constexpr = BLOCK_KW * EPW // QGROUP
    # this program's slice of the activation, float32 [BLOCK_KW * EPW], as two int8 digits a group:
    # a ~= d (hi + lo / 256), |error| <= d / 512 (d = max|a| / 127); the groups' sums exact. They are formed while the
    # weight's loads are in flight: made once by the kernel that wrote the activation instead, the GEMVs ran no
    # faster (bench/NOTES.md, thirty-sixth session)
    ka = pid_k * BLOCK_KW * EPW + tl.arange(0, BLOCK_KW * EPW)
    a, ss = activation_slice(a_ptr, nw_ptr, ka, ka < K, K, MODE)
    hi, lo, amax, a_sum = digits(a, QGROUP, GROUP)  # [NQ, QGROUP] x 2, [NQ], [NG]
    w0, w1, w2, w3 = digit_words(hi, lo, INT4)  # int4: hi / lo of the positions 8kw + 2j (+ 1), [BLOCK_KW] each
    if INT4:
        q_even = w & 0x0F0F0F0F  # byte j: weight 2j of the word's eight
        q_odd = (w >> 4) & 0x0F0F0F0F  # weight 2j + 1
        dot = _dp4a(q_odd, w1[None, :], _dp4a(q_even, w0[None, :], tl.zeros_like(w), False, EMULATE), False, EMULATE)
        dot = _dp4a(q_odd, w3[None, :], _dp4a(q_even, w2[None, :], dot * 256, False, EMULATE), False, EMULATE)
    else:
        dot = _dp4a(w, w0[None, :], tl.zeros_like(w), True, EMULATE)
        dot = _dp4a(w, w2[None, :], dot * 256, True, EMULATE)
    qsum = tl.sum(tl.reshape(dot, [BLOCK_N, NQ, QGROUP // EPW]), axis=2).to(tl.float32) * (amax / 32512.0)[None, :]
    if NQ != NG:  # weight groups of several activation groups
        qsum = tl.sum(tl.reshape(qsum, [BLOCK_N, NG, NQ // NG]), axis=2)  # [BLOCK_N, NG]
    if HAS_OFFSET:
        terms = s * qsum + o * a_sum[None, :]
    else:
        terms = s * (qsum - ZERO * a_sum[None, :])
    partial = tl.sum(terms, axis=1)  # [BLOCK_N]
    return partial, ss


@triton.jit
def tile_offsets(rows, cols, ROW_LEN, TILE_R: tl.constexpr, TILE_C: tl.constexpr):
    """Element offsets [R, C] of (rows [R], cols [C]) in a row-major [N, ROW_LEN] matrix stored tile-major: tiles of
    TILE_R rows x TILE_C columns, the tiles of a row block one after another along the row, row blocks one after
    another (N a multiple of TILE_R, ROW_LEN of TILE_C; formats.tile_major). A program whose block is one tile then
    reads one contiguous run of bytes instead of TILE_R runs a row apart."""
    r = rows[:, None].to(tl.int64)
    c = cols[None, :]
    return (r // TILE_R) * (TILE_R * ROW_LEN) + (c // TILE_C) * (TILE_R * TILE_C) + (r % TILE_R) * TILE_C + c % TILE_C


@triton.jit
def store_partial(partial, ss, rows, row_ok, pid_n, pid_k, part_ptr, N, MODE: tl.constexpr, SPLIT: tl.constexpr):
    """The end of a split-K GEMV program whose partials `_reduce_kernel` adds (here and in gemv_fp8): its partial
    sums [BLOCK_N], and (MODE 0) its slice's sum of squares, one copy from row block 0."""
    tl.store(part_ptr + pid_k * N + rows, partial, mask=row_ok)
    if MODE == 0 and pid_n == 0:
        tl.store(part_ptr + SPLIT * N + pid_k, ss)


@triton.jit
def _reduce_kernel(part_ptr, scale_ptr, b_ptr, out_ptr, N, K, eps, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ROW_SCALE: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    """The second kernel of a `reduce_kernel` call: out[rows] = the SPLIT partials added in order, then what
    `fixup`'s last program applies (the row scale, 1 / rms and the bias, or the residual), in the same order."""
    wait_for_prior(PDL)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _add_partials(part_ptr, part_ptr + SPLIT * N, rows, rows < N, scale_ptr, b_ptr, out_ptr, N, K, eps, MODE,
                  HAS_BIAS, ROW_SCALE, SPLIT, SPLIT_P2, BLOCK)


@triton.jit
def _add_partials(part_ptr, sq_ptr, rows, row_ok, scale_ptr, b_ptr, out_ptr, N, K, eps, MODE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                  BLOCK: tl.constexpr):
    """out[rows] = the SPLIT partials [SPLIT, N] added in order, times the row scale (ROW_SCALE), then 1 / rms from
    the slices' sums of squares at sq_ptr and the bias (MODE 0), or plus the residual (MODES 1, 2): what `fixup`'s
    last program and `_reduce_kernel` both write. Loads through L2 (.cg): other programs wrote the partials."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(SPLIT):
        total += tl.load(part_ptr + i * N + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
    if ROW_SCALE:
        total *= tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    if MODE == 0:
        sq = tl.load(sq_ptr + tl.arange(0, SPLIT_P2), mask=tl.arange(0, SPLIT_P2) < SPLIT, other=0.0,
                     cache_modifier=".cg")
        total = total / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
        if HAS_BIAS:
            total += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        total += tl.load(out_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)


REDUCE_BLOCK = 256  # outputs a `_reduce_kernel` program adds up


@triton.jit
def activation_slice(a_ptr, nw_ptr, cols, col_ok, K, MODE: tl.constexpr):
    """The start of every split-K decode GEMV (here and in gemv_fp8): this program's K slice `cols` of the
    activation, float32, as the projection multiplies it (MODE 0: times the norm weight; 2: SwiGLU of [gate, up]),
    and with MODE 0 the slice's share of sum(x^2) (1 / rms is applied once, in `fixup`; else 0)."""
    a = tl.load(a_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    ss = 0.0
    if MODE == 0:
        ss = tl.sum(a * a, axis=0)
        a = a * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if MODE == 2:
        up = tl.load(a_ptr + K + cols, mask=col_ok, other=0.0).to(tl.float32)
        a = a / (1.0 + tl.exp(-a)) * up
    return a, ss


@triton.jit
def fixup(partial, ss, rows, row_ok, pid_n, pid_k, part_ptr, count_ptr, scale_ptr, b_ptr, out_ptr, N, K, eps,
          MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, SPLIT: tl.constexpr,
          SPLIT_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    """The end of every split-K decode GEMV (here and in gemv_fp8): store this program's partial sums [BLOCK_N]
    (and, MODE 0, its slice's sum of squares `ss`); the last program of the row block to arrive adds the SPLIT
    partials in order, applies the row scale (ROW_SCALE), 1 / rms and the bias (MODE 0) or the residual (MODES 1,
    2), writes the output and resets the block's counter."""
    tl.store(part_ptr + pid_k * N + rows, partial, mask=row_ok)
    if MODE == 0:
        tl.store(part_ptr + SPLIT * N + pid_n * SPLIT + pid_k, ss)
    tl.debug_barrier()  # every thread's stores are issued before the release below
    done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
    if done == SPLIT - 1:  # the last program of this row block: add the partials in order
        _add_partials(part_ptr, part_ptr + SPLIT * N + pid_n * SPLIT, rows, row_ok, scale_ptr, b_ptr, out_ptr, N, K,
                      eps, MODE, HAS_BIAS, ROW_SCALE, SPLIT, SPLIT_P2, BLOCK_N)
        tl.atomic_xchg(count_ptr + pid_n, 0)


def _check(w: Packed, scratch: SplitKScratch, cfg: SplitKConfig, vectors: dict[str, tuple[torch.Tensor, int]]) -> None:
    if not isinstance(w, (Int4Groups, Int8Groups)):
        raise ValueError(f"expected Int4Groups or Int8Groups weights, got {type(w).__name__}")
    n, k = w.shape
    per_word = w.per_word
    if w.group % per_word or cfg.block_kw % (w.group // per_word):
        raise ValueError(f"block_kw {cfg.block_kw} words of {per_word} weights does not hold whole groups of "
                         f"{w.group}")
    check_call(w, scratch, (scratch_floats(w, cfg), triton.cdiv(n, cfg.block_n)), cfg, vectors)


def check_call(w, scratch: SplitKScratch, needs: tuple[int, int], cfg, vectors: dict[str, tuple[torch.Tensor, int]]
               ) -> None:
    """ValueError unless the scratch holds `needs` (floats, counters) for one split-K call over w with cfg, and
    every vector (name -> (tensor, length)) is a contiguous 1-D tensor of its length on w's device (the FP8
    kernels check their calls with it too)."""
    n, k = w.shape
    if scratch.partial.numel() < needs[0] or scratch.count.numel() < needs[1]:
        raise ValueError(f"split-K scratch too small for a [{n}, {k}] weight with {cfg}")
    for name, (t, size) in vectors.items():
        if t.dim() != 1 or t.numel() != size or not t.is_contiguous() or t.device != w.device:
            raise ValueError(f"{name}: expected a contiguous [{size}] tensor on {w.device}, got "
                             f"{tuple(t.shape)} on {t.device}")


def _launch(w: Packed, a: torch.Tensor, nw: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor,
            eps: float, mode: int, scratch: SplitKScratch, cfg: SplitKConfig) -> torch.Tensor:
    n, k = w.shape
    split = _split(w, cfg)
    int4 = isinstance(w, Int4Groups)
    offset = w.offset if w.offset is not None else w.scale  # unused when HAS_OFFSET is False
    tiles = w.tiles or (0, 0)
    _splitk_kernel[(triton.cdiv(n, cfg.block_n), split)](
        w.codes.view(torch.int32), w.scale, offset, a, nw if nw is not None else a, bias if bias is not None else out,
        out, scratch.partial, scratch.count, n, k, eps, MODE=mode, HAS_OFFSET=w.offset is not None,
        ZERO=float(INT4_ZERO) if int4 and w.offset is None else 0.0, HAS_BIAS=bias is not None, SPLIT=split,
        SPLIT_P2=triton.next_power_of_2(split), GROUP=w.group, BLOCK_N=cfg.block_n, BLOCK_KW=cfg.block_kw,
        INT4=int4, EMULATE=not w.codes.is_cuda, num_warps=cfg.num_warps, num_stages=1, PDL=cfg.pdl, EARLY=cfg.early,
        FIXUP=not cfg.reduce_kernel, TILE_N=tiles[0], TILE_KW=tiles[1], **launch_options(cfg.pdl))
    if cfg.reduce_kernel:
        launch_reduce(scratch, None, bias, out, n, k, eps, mode, split, cfg.pdl)
    return out


def launch_reduce(scratch: SplitKScratch, row_scale: torch.Tensor | None, bias: torch.Tensor | None,
                  out: torch.Tensor, n: int, k: int, eps: float, mode: int, split: int, pdl: bool) -> None:
    """The second kernel of a split-K call with `reduce_kernel` (here and in gemv_fp8): out [n] from the `split`
    partials its first kernel stored in scratch (row_scale: FP8's float32 [n])."""
    _reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK),)](
        scratch.partial, row_scale if row_scale is not None else scratch.partial, bias if bias is not None else out,
        out, n, k, eps, MODE=mode, HAS_BIAS=bias is not None, ROW_SCALE=row_scale is not None, SPLIT=split,
        SPLIT_P2=triton.next_power_of_2(split), BLOCK=REDUCE_BLOCK, PDL=pdl, num_warps=4, **launch_options(pdl))


def rmsnorm_gemv(w: Packed, x: torch.Tensor, norm_w: torch.Tensor, eps: float, out: torch.Tensor,
                 scratch: SplitKScratch, bias: torch.Tensor | None = None, cfg: SplitKConfig = DEFAULT) -> torch.Tensor:
    """w [N, K], x [K], norm_w [K], bias [N] or None -> out [N] = W @ (rmsnorm(x) * norm_w) [+ bias]."""
    n, k = w.shape
    vectors = dict(x=(x, k), norm_w=(norm_w, k), out=(out, n))
    if bias is not None:
        vectors["bias"] = (bias, n)
    _check(w, scratch, cfg, vectors)
    return _launch(w, x, norm_w, bias, out, eps, 0, scratch, cfg)


def gemv_residual(w: Packed, a: torch.Tensor, x: torch.Tensor, scratch: SplitKScratch,
                  cfg: SplitKConfig = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ a [K], in place."""
    n, k = w.shape
    _check(w, scratch, cfg, dict(a=(a, k), x=(x, n)))
    return _launch(w, a, None, None, x, 0.0, 1, scratch, cfg)


def silu_gemv_residual(w: Packed, gate_up: torch.Tensor, x: torch.Tensor, scratch: SplitKScratch,
                       cfg: SplitKConfig = DEFAULT) -> torch.Tensor:
    """x [N] += w [N, K] @ (silu(gate_up[:K]) * gate_up[K:]), in place."""
    n, k = w.shape
    _check(w, scratch, cfg, dict(gate_up=(gate_up, 2 * k), x=(x, n)))
    return _launch(w, gate_up, None, None, x, 0.0, 2, scratch, cfg)
