"""GPU probe (issue 10, the packed prefill): an int4 x float16 GEMM written in Gluon (Triton 3.6's explicit-layout
dialect) whose wgmma takes its weight operand from registers and runs while the next step's weights are dequantized
(`warpgroup_mma(is_async=True)`, waited for before the loop's back edge: an MMA left in flight across it read registers
the loop-carried copies rewrote, garbage on the card). Each lane reads whole 32-bit words of codes and one inline-asm
call per byte gives its two weights as one float16x2 register: the byte (prmt), Marlin's 0x6400 conversion (lop3 +
float16x2 FMA) and s q + o. The codes come from a one-step register prefetch or through the cp.async ring with the
activation tiles (CODES_SMEM). Split along K: float32 partials added in order by gemm_lowbit's reduce kernel. Times it
against the shipped GEMM and the dequantize + torch.mm path per LLaMA-2-7B projection and token count, with a float64
check of every config after its timed replays.

    python -m bench.probes.gluon_int4_gemm [--tokens 16,32,64,128] [--reps 10] [--large] [--no-pair]
    python -m bench.probes.gluon_int4_gemm --check          # every config's error and where the wrong elements lie
    python -m bench.probes.gluon_int4_gemm --once gate_up:512   # Nsight Compute's target (tools/ncu_gluon.sh)
"""
from __future__ import annotations

import argparse

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait


@gluon.constexpr_function
def codes_layout(block_n, block_k, num_warps):
    """uint8 [block_n, block_k / 2] codes laid out as the float16 wgmma register operand is, two columns a byte."""
    reg = [[8, 0]] + [[0, 4 << i] for i in range((block_k // 8).bit_length() - 1)]
    lane = [[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]]
    warp = [[16 << i, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, block_k // 2])


@gluon.constexpr_function
def words_layout(block_n, block_k, num_warps):
    """int32 [block_n, block_k / 8, 4]: word w of a row's step, broadcast to the 4 lanes of a quad (dim 2: which
    byte of the word the lane takes), so that taking byte t of each word gives `codes_layout`."""
    reg = [[0, 1 << i, 0] for i in range((block_k // 8).bit_length() - 1)] + [[8, 0, 0]]  # words first: 16 B loads
    lane = [[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16 << i, 0, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, block_k // 8, 4])


@gluon.jit
def _byte_pair(word, sel):
    """byte `sel` picks (prmt selector [b, 0, b, 0]) of each int32 word -> (low nibble, high nibble) float16."""
    return gl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, s, c;
        prmt.b32 t, $2, 0, $3;
        lop3.b32 t, t, 0x00F0000F, 0x64006400, 0xEA;
        mov.b32 s, 0x2C003C00;
        mov.b32 c, 0xD400E400;
        fma.rn.f16x2 t, t, s, c;
        mov.b32 {$0, $1}, t;
        }""",
        constraints="=h,=h,r,r", args=[word, sel], dtype=(gl.float16, gl.float16), is_pure=True, pack=1)


@gluon.jit
def _pairs_of(v, BN: gl.constexpr, BK: gl.constexpr):
    """int32 [BN, BK / 8, 4] (a lane's word or byte selector) -> [BN, BK]: the same value for both codes of the byte."""
    return gl.join(v, v).reshape([BN, BK])


@gluon.jit
def per_group(h, BN: gl.constexpr, NG: gl.constexpr, PER: gl.constexpr, L: gl.constexpr):
    """float16 [BN, NG] (a group's scale or offset; its layout a slice along a third dim) -> int32 [BN, NG * PER] in
    layout L: its bits in both halves (one float16x2 operand), repeated for each of the group's PER elements."""
    v = h.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    v = gl.expand_dims(v | (v << 16), 2)
    v, _ = gl.broadcast(v, gl.full([BN, NG, PER], 0, gl.int32, layout=v.type.layout))
    return gl.convert_layout(v.reshape([BN, NG * PER]), L)


@gluon.jit
def byte_weights(words, sel, s2, o2):
    """One inline-asm call per code byte (pack = 2: two float16 elements, one register): byte `sel` picks (prmt
    selector [b, 0, b, 0]) of the int32 word, Marlin's 0x6400 conversion (lop3 + float16x2 FMA) gives its two
    codes, then s q + o with s2 / o2 the scale and offset in both halves (`per_group`). All four operands int32,
    shaped as the float16 result."""
    return gl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, m, c;
        prmt.b32 t, $1, 0, $3;
        lop3.b32 t, t, 0x00F0000F, 0x64006400, 0xEA;
        mov.b32 m, 0x2C003C00;
        mov.b32 c, 0xD400E400;
        fma.rn.f16x2 t, t, m, c;
        fma.rn.f16x2 $0, t, $5, $7;
        }""",
        constraints="=r,r,r,r,r,r,r,r,r", args=[words, sel, s2, o2], dtype=gl.float16, is_pure=True, pack=2)


@gluon.jit
def _dequant_pairs(b, s, o, BN: gl.constexpr, BK: gl.constexpr, A: gl.constexpr, sel):
    """The weights [BN, BK] float16 in the wgmma operand layout A from whole code words b (int32 [BN, BK / 8, 4],
    broadcast to the quad), one inline-asm call per byte writing its two weights as one float16x2 register: the
    byte, Marlin's conversion and s q + o, with no unpacking into halves and repacking between."""
    b, sel = gl.broadcast(b, sel)
    words = _pairs_of(b, BN, BK)
    L: gl.constexpr = words.type.layout
    w = byte_weights(words, _pairs_of(sel, BN, BK), per_group(s, BN, BK // 32, 32, L),
                     per_group(o, BN, BK // 32, 32, L))
    return gl.convert_layout(w, A, assert_trivial=True)


@gluon.constexpr_function
def grouped_layout(block_n, block_k, num_warps):
    """The float16 operand [block_n, block_k] viewed as [block_n, block_k / 32, 32] (groups of 32)."""
    def split(c):  # column offset c -> (group, in-group) basis
        return [c // 32, c % 32]
    reg = [[0] + split(1), [8, 0, 0]] + [[0] + split(8 << i) for i in range((block_k // 8).bit_length() - 1)]
    lane = [[0] + split(2), [0] + split(4), [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16 << i, 0, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, block_k // 32, 32])


@gluon.constexpr_function
def x_load_layout(block_t, block_k, num_warps):
    per = block_k // 8  # threads along K, 16 bytes each
    return gl.BlockedLayout([1, 8], [32 // per, per], [num_warps, 1], [1, 0])


@gluon.jit
def _dequant(b, s, o, BN: gl.constexpr, BK: gl.constexpr, A: gl.constexpr, G3: gl.constexpr, ASM: gl.constexpr,
             sel, PAIR: gl.constexpr = False):
    if PAIR:
        return _dequant_pairs(b, s, o, BN, BK, A, sel)
    if ASM:  # b: int32 words [BN, BK / 8, 4] (each broadcast to the quad), sel: the lane's byte selector
        lo, hi = _byte_pair(b, sel)
        lo = lo.reshape([BN, BK // 2])
        hi = hi.reshape([BN, BK // 2])
    else:
        lo = ((b & 0xF).to(gl.uint16) | 0x6400).to(gl.float16, bitcast=True) - 1024.0
        hi = ((b >> 4).to(gl.uint16) | 0x6400).to(gl.float16, bitcast=True) - 1024.0
    q = gl.join(lo, hi).reshape([BN, BK])
    q3 = gl.convert_layout(q.reshape([BN, BK // 32, 32]), G3, assert_trivial=True)
    w3 = q3 * gl.expand_dims(s, 2) + gl.expand_dims(o, 2)
    return gl.convert_layout(w3.reshape([BN, BK]), A, assert_trivial=True)


@gluon.jit
def gluon_int4_gemm(x_ptr, codes_ptr, scale_ptr, offset_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                    BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                    SPLIT: gl.constexpr, ASM: gl.constexpr, num_warps: gl.constexpr,
                    CODES_SMEM: gl.constexpr = False, PAIR: gl.constexpr = True):
    """CODES_SMEM (with ASM): the codes come through the cp.async ring with the activation tiles (AHEAD steps ahead)
    instead of a one-step register prefetch from global memory."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_T, 16])
    A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    C: gl.constexpr = codes_layout(BLOCK_N, BLOCK_K, num_warps)
    G3: gl.constexpr = grouped_layout(BLOCK_N, BLOCK_K, num_warps)
    S: gl.constexpr = gl.SliceLayout(2, G3)
    XL: gl.constexpr = x_load_layout(BLOCK_T, BLOCK_K, num_warps)
    XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, BLOCK_K], gl.float16)
    NG: gl.constexpr = BLOCK_K // 32

    pid_n = gl.program_id(0)
    pid_t = gl.program_id(1)
    pid_k = gl.program_id(2)
    k_per = gl.cdiv(gl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per
    k_hi = gl.minimum(k_lo + k_per, K)
    steps = gl.cdiv(k_hi - k_lo, BLOCK_K)

    # codes [BLOCK_N, BLOCK_K / 2] and their groups' scale and offset, in the operand's own layout
    c_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, C))
    c_cols = gl.arange(0, BLOCK_K // 2, layout=gl.SliceLayout(0, C))
    c_ptrs = codes_ptr + gl.expand_dims(c_rows.to(gl.int64) * (K // 2), 1) + gl.expand_dims(c_cols, 0) + k_lo // 2
    WL: gl.constexpr = words_layout(BLOCK_N, BLOCK_K, num_warps)
    sel = 0
    if ASM:  # whole int32 words (16-byte loads), each lane of a quad taking its byte of each
        w_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))
        w_cols = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, WL)))
        w_off = gl.expand_dims(w_rows.to(gl.int64) * (K // 8), 1) + gl.expand_dims(w_cols, 0) + k_lo // 8
        c_ptrs = codes_ptr.to(gl.pointer_type(gl.int32)) + gl.expand_dims(w_off, 2)  # [BN, W, 1]
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(0, WL)))
        sel = gl.expand_dims(gl.expand_dims(0x4040 | (t << 8) | t, 0), 0)  # [b_t, 0, b_t, 0]
    s_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, S))
    s_cols = gl.arange(0, NG, layout=gl.SliceLayout(0, S))
    s_off = gl.expand_dims(s_rows.to(gl.int64) * (K // 32), 1) + gl.expand_dims(s_cols, 0) + k_lo // 32
    # x [BLOCK_T, BLOCK_K] tiles into shared memory (cp.async), STAGES deep
    x_rows = pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, XL))
    x_cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, XL))
    x_ptrs = x_ptr + gl.expand_dims(x_rows * stride_xm, 1) + gl.expand_dims(x_cols, 0) + k_lo
    x_mask = gl.expand_dims(x_rows < M, 1)
    x_smem = gl.allocate_shared_memory(gl.float16, [STAGES, BLOCK_T, BLOCK_K], XS)
    # The wgmma runs while the next step's weights are dequantized, and is waited for (wait 0) before the loop's back
    # edge: an MMA still in flight across the back edge reads registers the loop-carried copies may rewrite (the
    # wait-1 form of the thirty-third session gave garbage in most configs on the card, the synchronous form none).
    # AHEAD = STAGES - 1 tiles in flight: step k's copy goes into the stage step k - 1 read, which every warp's MMA
    # has finished once all warps pass step k's barrier (each warp waited for its own; one warp's wait says nothing
    # of the others', whose tensor cores read the same shared tile for their own rows).
    AHEAD: gl.constexpr = STAGES - 1
    gl.static_assert(AHEAD >= 2, "STAGES >= 3: the next step's codes are read while this step's MMA runs")
    if CODES_SMEM:
        gl.static_assert(ASM, "CODES_SMEM reads whole words")
        CL: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (BLOCK_K // 32), BLOCK_K // 32], [num_warps, 1], [1, 0])
        cw_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, CL))
        cw_cols = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, CL))
        cw_ptrs = codes_ptr.to(gl.pointer_type(gl.int32)) + gl.expand_dims(cw_rows.to(gl.int64) * (K // 8), 1) + \
            gl.expand_dims(cw_cols, 0) + k_lo // 8
        c_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, BLOCK_K // 8],
                                           gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    for i in gl.static_range(AHEAD):
        async_copy.async_copy_global_to_shared(x_smem.index(i), x_ptrs + i * BLOCK_K, mask=x_mask & (i < steps))
        if CODES_SMEM:  # the step's codes in the same group as its activation tile
            async_copy.async_copy_global_to_shared(c_smem.index(i), cw_ptrs + i * (BLOCK_K // 8), mask=i < steps)
        async_copy.commit_group()

    acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, layout=MMA)
    s = gl.load(scale_ptr + s_off)
    o = gl.load(offset_ptr + s_off)
    if CODES_SMEM:  # step 0's codes from the ring
        async_copy.wait_group(AHEAD - 1)
        gl.thread_barrier()
        w = _dequant(gl.expand_dims(c_smem.index(0).load(gl.SliceLayout(2, WL)), 2), s, o, BLOCK_N, BLOCK_K, A, G3,
                     ASM, sel, PAIR)
    else:  # step 0's codes, and step 1's prefetched into registers
        w = _dequant(gl.load(c_ptrs), s, o, BLOCK_N, BLOCK_K, A, G3, ASM, sel, PAIR)
        b = gl.load(c_ptrs + BLOCK_K // (8 if ASM else 2), mask=1 < steps, other=0)
    s = gl.load(scale_ptr + s_off + NG, mask=1 < steps, other=0.0)
    o = gl.load(offset_ptr + s_off + NG, mask=1 < steps, other=0.0)
    for k in range(steps):
        async_copy.wait_group(AHEAD - 2)  # tiles k and k + 1, this thread's part
        gl.thread_barrier()  # every thread's part; every warp done with step k - 1 (its MMA and its codes' stage)
        nxt = k + AHEAD  # into the stage step k - 1 read
        async_copy.async_copy_global_to_shared(x_smem.index(nxt % STAGES), x_ptrs + nxt * BLOCK_K,
                                               mask=x_mask & (nxt < steps))
        if CODES_SMEM:
            async_copy.async_copy_global_to_shared(c_smem.index(nxt % STAGES), cw_ptrs + nxt * (BLOCK_K // 8),
                                                   mask=nxt < steps)
        async_copy.commit_group()
        fence_async_shared()
        acc = warpgroup_mma(w, x_smem.index(k % STAGES).permute((1, 0)), acc, is_async=True)
        # step k + 1's weights while step k's MMA runs (past the last step: unused)
        if CODES_SMEM:
            words = gl.expand_dims(c_smem.index((k + 1) % STAGES).load(gl.SliceLayout(2, WL)), 2)
            w_next = _dequant(words, s, o, BLOCK_N, BLOCK_K, A, G3, ASM, sel, PAIR)
        else:
            w_next = _dequant(b, s, o, BLOCK_N, BLOCK_K, A, G3, ASM, sel, PAIR)
            b = gl.load(c_ptrs + (k + 2) * (BLOCK_K // (8 if ASM else 2)), mask=k + 2 < steps, other=0)
        s = gl.load(scale_ptr + s_off + (k + 2) * NG, mask=k + 2 < steps, other=0.0)
        o = gl.load(offset_ptr + s_off + (k + 2) * NG, mask=k + 2 < steps, other=0.0)
        acc, w = warpgroup_mma_wait(num_outstanding=0, deps=(acc, w))
        w = w_next
    async_copy.wait_group(0)
    o_rows = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
    o_toks = pid_t * BLOCK_T + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(0, MMA))
    if SPLIT > 1:  # float32 partials [SPLIT, grid_t * BLOCK_T, grid_n * BLOCK_N] for gemm_lowbit's reduce kernel
        m_pad = gl.num_programs(1) * BLOCK_T
        n_pad = gl.num_programs(0) * BLOCK_N
        ptrs = out_ptr + gl.expand_dims((pid_k * m_pad + o_toks).to(gl.int64) * n_pad, 0) + gl.expand_dims(o_rows, 1)
        gl.store(ptrs, acc)
    else:
        ptrs = out_ptr + gl.expand_dims(o_toks * stride_om, 0) + gl.expand_dims(o_rows, 1)
        gl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=gl.expand_dims(o_toks < M, 0))


H, I = 4096, 11008  # LLaMA-2-7B
SHAPES = {"qkv": (3 * H, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}  # (N, K)
CONFIGS = [  # (block_t, block_k, stages, split, num_warps): weight rows a program = 16 x num_warps; each timed with
    # the codes from a one-step register prefetch and through the cp.async ring (CODES_SMEM)
    (16, 128, 4, 1, 4), (16, 128, 4, 2, 4), (16, 128, 4, 4, 4), (16, 128, 4, 8, 4),
    (32, 128, 4, 1, 4), (32, 128, 4, 2, 4), (32, 128, 4, 4, 4),
    (64, 128, 4, 1, 4), (64, 128, 4, 2, 4), (64, 64, 4, 4, 4),
    (128, 64, 4, 1, 4), (128, 64, 4, 2, 4)]
# (256, 64, 3, 1, 8) spills 56 B a thread (Triton 3.6, sm_90)
LARGE = [(128, 64, 4, 1, 8), (128, 64, 4, 1, 4), (128, 128, 4, 1, 8), (128, 64, 5, 1, 4),
         # 128-256 weight rows a program (8-16 warps): the activation tile read from L2 once per 128-256 rows, not 64
         (64, 64, 4, 1, 8), (64, 64, 4, 1, 16), (32, 128, 4, 1, 16)]


def gluon_gemm(x: torch.Tensor, w, out: torch.Tensor, partial: torch.Tensor, cfg: tuple, pair: bool = True
               ) -> torch.Tensor:
    """out [T, N] float16 = x [T, K] float16 @ W^T (int4 groups of 32 with float16 scales and offsets); split along
    K: float32 partials in `partial`, added in order by gemm_lowbit's reduce kernel (deterministic)."""
    from graph_executor.kernels.gemm_lowbit import INT4, _gemm_reduce_kernel

    block_t, block_k, stages, split, warps, codes_smem = cfg
    n, k = w.shape
    t = x.shape[0]
    grid = (triton.cdiv(n, 16 * warps), triton.cdiv(t, block_t), split)
    if split > 1 and partial.numel() < split * grid[0] * grid[1] * 16 * warps * block_t:
        raise ValueError("gluon_gemm: partial scratch too small")
    gluon_int4_gemm[grid](
        x, w.codes, w.scale, w.offset, partial if split > 1 else out, t, n, k, x.stride(0), out.stride(0),
        BLOCK_N=16 * warps, BLOCK_T=block_t, BLOCK_K=block_k, STAGES=stages, SPLIT=split, ASM=True, num_warps=warps,
        CODES_SMEM=codes_smem, PAIR=pair)
    if split > 1:
        _gemm_reduce_kernel[grid[:2]](partial, w.scale, out, out, t, n, split, out.stride(0), FORMAT=INT4,
                                      HAS_BIAS=False, ACCUMULATE=False, BLOCK_N=16 * warps, BLOCK_T=block_t,
                                      num_warps=4)
    return out


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """relative error per element [T, N] (float64), against max(|ref|, rms(ref)); NaN where got is NaN."""
    return (got.double() - ref).abs() / torch.maximum(ref.abs(), ref.pow(2).mean().sqrt())


def check_row(name: str, cfg: tuple, err: torch.Tensor) -> str:
    """A --check table row: the worst error (NaN counts as inf), how many elements are wrong (error > 1e-2 or
    NaN) and the token and weight-row ranges they lie in."""
    bad = (err > 1e-2) | err.isnan()
    where = "- | -"
    if bad.any():
        tok, row = bad.nonzero(as_tuple=True)
        where = f"{int(tok.min())}-{int(tok.max())} | {int(row.min())}-{int(row.max())}"
    return f"| {name} | {cfg} | {float(err.nan_to_num(float('inf')).max()):.1e} | {int(bad.sum())} | {where} |"


def case(name: str, tokens: int, dev: torch.device, g: torch.Generator) -> tuple:
    """(w, x, out) for one 7B projection: random int4 weights (groups of 32, offsets), float16 activations
    [tokens, K], an output [tokens, N]."""
    from graph_executor.quant.formats import quantize_int4

    n, k = SHAPES[name]
    w = quantize_int4(torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02, 32)
    x = torch.randn(tokens, k, device=dev, dtype=torch.float16, generator=g)
    return w, x, torch.empty(tokens, n, device=dev, dtype=torch.float16)


def check_table(dev: torch.device, g: torch.Generator, configs: list[tuple], gemm) -> None:
    """--check: every config once on fresh output (NaN-filled), no graphs, on the o and down shapes at 100 tokens;
    gemm(x, w, out, cfg) -> out. Prints `check_row` per config."""
    print("| shape | config | worst rel err | wrong | tokens | rows |\n|---|---|---|---|---|---|")
    for name in ("o", "down"):
        w, x, out = case(name, 100, dev, g)
        ref = x.double() @ w.dequantize(torch.float32).double().T
        for cfg in configs:
            out.fill_(float("nan"))
            print(check_row(name, cfg, rel_error(gemm(x, w, out, cfg), ref)), flush=True)


def rotating_weights(n: int, k: int, dev: torch.device, g: torch.Generator) -> tuple[list, list[torch.Tensor]]:
    """Copies of one random [N, K] weight, int4 (groups of 32) and float16, enough of each to span 256 MiB (at most
    32), so that a timed pass over them reads from HBM, not L2; the copies differ by 0.001 x their index."""
    from graph_executor.quant.formats import quantize_int4

    w16 = torch.randn(n, k, device=dev, dtype=torch.float16, generator=g) * 0.02
    copies = max(1, min(32, -(-256 * 1024**2 // (n * k // 2))))
    weights = [quantize_int4(w16 + 0.001 * i, 32) for i in range(copies)]
    dense = [w16 + 0.001 * i for i in range(min(copies, max(1, -(-256 * 1024**2 // (2 * n * k)))))]
    return weights, dense


def graph_ms(fn, ws: list, dev: torch.device, reps: int) -> float:
    """ms per call of fn(w): one CUDA graph over every copy in ws (graphed warms up on a side stream)."""
    from bench.floors import time_gpu
    from bench.probes.verify_plan import graphed

    graph = graphed(lambda: [fn(wt) for wt in ws])
    return time_gpu(graph.replay, dev, repeats=reps) * 1e3 / len(ws)


def run_each_twice(spec: str, configs: list[tuple], gemm, dev: torch.device, g: torch.Generator) -> None:
    """--once SHAPE:TOKENS (an Nsight Compute target): every config's gemm(x, w, out, cfg) twice (the first
    compiles), no graphs, nothing else."""
    name, t = spec.split(":")
    w, x, out = case(name, int(t), dev, g)
    for cfg in configs:
        for _ in range(2):
            gemm(x, w, out, cfg)
    torch.cuda.synchronize()


def sweep_table(label: str, configs: list[tuple], gemm, tokens: list[int], reps: int, dev: torch.device,
                g: torch.Generator, timing_only=lambda cfg: False) -> None:
    """The probes' sweep against fp16 torch.mm and dequantize + torch.mm: per 7B projection and token count the best
    config of `configs` (those whose N and K blocks, cfg[1] and cfg[2], divide the shape) by graph time over rotating
    weights, the worst error of all of them on NaN-filled output against float64 (but those `timing_only` says are
    wrong by design), and every config's time."""
    from graph_executor.kernels import gemm_lowbit

    print(f"{torch.cuda.get_device_name()}: {label} int4 (g32, offsets) GEMM per 7B projection, ms (weights rotate "
          "past L2)")
    print(f"| shape | T | fp16 mm | dequantize + mm | {label} best | config | worst rel err (all configs) | "
          f"{label} / dequantize + mm | every config (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        weights, dense = rotating_weights(n, k, dev, g)
        for t in tokens:
            x = torch.randn(t, k, device=dev, dtype=torch.float16, generator=g)
            out = torch.empty(t, n, device=dev, dtype=torch.float16)
            mm = graph_ms(lambda wt: torch.mm(x, wt.t(), out=out), dense, dev, reps)
            buf = torch.empty(n, k, device=dev, dtype=torch.float16)
            dq = graph_ms(lambda wt: torch.mm(x, gemm_lowbit.dequantize(wt, buf).t(), out=out), weights, dev, reps)
            ref = x.double() @ weights[0].dequantize(torch.float32).double().T
            best, worst, each = None, 0.0, []
            for cfg in configs:
                if n % cfg[1] or k % cfg[2]:
                    continue
                ms = graph_ms(lambda wt, cfg=cfg: gemm(x, wt, out, cfg), weights, dev, reps)
                if not timing_only(cfg):
                    out.fill_(float("nan"))
                    worst = max(worst, float(rel_error(gemm(x, weights[0], out, cfg), ref)
                                             .nan_to_num(float("inf")).max()))
                each.append(f"{'x'.join(str(v) for v in cfg)}:{ms:.4f}")
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            ms, cfg = best
            print(f"| {name} | {t} | {mm:.4f} | {dq:.4f} | {ms:.4f} | {cfg} | {worst:.1e} | {ms / dq:.2f} | "
                  f"{' '.join(each)} |", flush=True)
        del weights, dense
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    from graph_executor.kernels import gemm_lowbit
    from graph_executor.kernels.gemv_splitk import SplitKScratch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="16,32,64,128")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--large", action="store_true", help="the long-prompt configs (LARGE: 128-256 tokens a "
                    "program, 4-8 warps) and the dequantize + torch.mm path beside")
    ap.add_argument("--no-pair", dest="pair", action="store_false", help="the thirty-third session's dequantization "
                    "(inline asm per byte giving two float16 halves, s q + o outside) instead of one float16x2 "
                    "register per byte, scale and offset inside the asm (the default: 3-10%% faster, 253 -> 235 SASS "
                    "instructions a step at 128 x 64 x 64)")
    ap.add_argument("--once", default="", help="SHAPE:TOKENS: two configs and torch.mm, each run twice, nothing "
                    "else (a target for Nsight Compute)")
    ap.add_argument("--check", action="store_true", help="no timing: every config's error, one line each, on the o "
                    "and down shapes at 100 tokens, with where the wrong elements are")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    scratch = SplitKScratch.zeros(64 * 1024**2, 65536, dev)
    if args.check:
        return check_table(dev, g, [(*c, smem) for c in CONFIGS + LARGE for smem in (False, True)],
                           lambda x, w, out, cfg: gluon_gemm(x, w, out, scratch.partial, cfg, args.pair))
    if args.once:  # for Nsight Compute: each config once (twice: the first compiles), then torch.mm, no graphs
        name, t = args.once.split(":")
        w, x, out = case(name, int(t), dev, g)
        for cfg in [(128, 64, 4, 1, 4, False), (128, 64, 4, 1, 4, True)]:
            for _ in range(2):
                gluon_gemm(x, w, out, scratch.partial, cfg, args.pair)
        w16 = w.dequantize(torch.float16)
        for _ in range(2):
            torch.mm(x, w16.t(), out=out)
        torch.cuda.synchronize()
        return None
    print(f"{torch.cuda.get_device_name()}: int4 (g32, offsets) GEMM per 7B projection, ms (weights rotate past L2)")
    print("| shape | T | fp16 mm | shipped | dequantize + mm | gluon best | config | worst rel err (all configs) | "
          "gluon / shipped |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        weights, dense = rotating_weights(n, k, dev, g)
        for t in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(t, k, device=dev, dtype=torch.float16, generator=g)
            out = torch.empty(t, n, device=dev, dtype=torch.float16)

            def timed(fn, ws) -> float:
                return graph_ms(fn, ws, dev, args.reps)

            mm = timed(lambda wt: torch.mm(x, wt.t(), out=out), dense)
            shipped = timed(lambda wt: gemm_lowbit.gemm(x, wt, out, scratch=scratch), weights)
            buf = torch.empty(n, k, device=dev, dtype=torch.float16)
            dq = timed(lambda wt: torch.mm(x, gemm_lowbit.dequantize(wt, buf).t(), out=out), weights)
            ref = x.double() @ weights[0].dequantize(torch.float32).double().T
            best, worst_err = None, 0.0
            for cfg in [(*c, smem) for c in (LARGE if args.large else CONFIGS) for smem in (False, True)]:
                if cfg[0] > max(16, 2 * t):
                    continue
                ms = timed(lambda wt, cfg=cfg: gluon_gemm(x, wt, out, scratch.partial, cfg, args.pair), weights)
                out.fill_(float("nan"))  # checked after its timed replays too: a race would show here
                got = gluon_gemm(x, weights[0], out, scratch.partial, cfg, args.pair).double()
                err = float(rel_error(got, ref).nan_to_num(float("inf")).max())
                worst_err = max(worst_err, err)
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            ms, cfg = best
            print(f"| {name} | {t} | {mm:.4f} | {shipped:.4f} | {dq:.4f} | {ms:.4f} | {cfg} | {worst_err:.1e} | "
                  f"{ms / shipped:.2f} |", flush=True)
        del weights, dense
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
