"""Probe without a GPU: compile Triton kernels for a CUDA target (sm_90, the H200, by default) on this machine with the
installed Triton's compiler and its bundled ptxas, and report per variant the registers a thread, the local-memory
stack (spills), the SASS instruction count and the most frequent opcodes. A register spill, an integer-to-float
conversion per weight or a pile of barriers shows up here before any device time is spent (the local Triton may be
newer than the card's: treat the figures as close, not exact).

    python -m bench.probes.sass_usage [--suite attention|splitk|gemm|all] [--cc 90]

Suites: `attention` (the one-query decode attention at LLaMA-2-7B's, Llama-3.2-1B's and SmolLM2's head shapes, by
split, block and warps), `splitk` (the packed int4 / int8 decode GEMVs), `gemm` (the low-bit prefill GEMM's int4
tiles: count I2F).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@dataclass(frozen=True)
class Usage:
    registers: int
    stack: int  # bytes of local memory a thread: spills
    instructions: int  # static SASS count
    opcodes: dict[str, int]


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_for(kernel, types: dict[str, str], consts: dict, num_warps: int = 4, cc: int = 90,
                maxnreg: int | None = None) -> bytes:
    """The cubin of `kernel` (a @triton.jit kernel) for compute capability cc: `types` gives each runtime argument's
    Triton type ("*fp16", "i32", ...), `consts` each constexpr's value. As a launch specializes them (a pointer
    from torch is 16-byte aligned, an integer argument that is a multiple of 16 is marked so), every pointer and
    every i32 argument is compiled as divisible by 16 (the sizes and strides of the shapes measured are): without
    it no load is vectorized and the build is not the one the card runs. A constexpr left out of `consts` takes its
    default, as a launch that does not pass it, and so does an argument that defaults to None and has no type
    here (a launch passes None as a constexpr). `maxnreg`: a register cap (ptxas spills above it), as the launch
    option of that name."""
    consts = {**{p.name: p.default for p in kernel.params if p.has_default and (
        p.is_constexpr or (p.default is None and p.name not in types))}, **consts}
    signature = {p.name: "constexpr" if p.name in consts else types[p.name] for p in kernel.params}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in consts.items()}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
             if ty.startswith("*") or ty == "i32"}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})})
    return compiled.asm["cubin"]


def usage(cubin: bytes) -> Usage:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        resources = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    reg = re.search(r"REG:(\d+)", resources)
    stack = re.search(r"STACK:(\d+)", resources)
    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    opcodes: dict[str, int] = {}
    for line in lines:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            opcodes[m.group(1)] = opcodes.get(m.group(1), 0) + 1
    return Usage(int(reg.group(1)) if reg else -1, int(stack.group(1)) if stack else -1, len(lines), opcodes)


ATTENTION_TYPES = dict(q_ptr="*fp16", k_ptr="*fp16", v_ptr="*fp16", pos_ptr="*i64", slot_ptr="*i64", acc_ptr="*fp32",
                       m_ptr="*fp32", l_ptr="*fp32", count_ptr="*i32", out_ptr="*fp16", rope_ptr="*fp32",
                       pf0="*fp32", pn0="i32", pf1="*fp32", pn1="i32", pf2="*fp32", pn2="i32", pf3="*fp32", pn3="i32",
                       stride_kh="i32", stride_kn="i32", stride_vh="i32", stride_vn="i32", stride_slot="i32",
                       stride_qkv="i32", scale="fp32", window="i32")
SPLITK_TYPES = dict(codes_ptr="*i32", scale_ptr="*fp16", offset_ptr="*fp16", a_ptr="*fp16", nw_ptr="*fp16",
                    b_ptr="*fp16", out_ptr="*fp16", part_ptr="*fp32", count_ptr="*i32", N="i32", K="i32", eps="fp32")
GEMM_TYPES = dict(x_ptr="*fp16", codes_ptr="*u8", scale_ptr="*fp16", offset_ptr="*fp16", b_ptr="*fp16",
                  out_ptr="*fp16", part_ptr="*fp32", count_ptr="*i32", M="i32", N="i32", K="i32", K_SPLIT="i32",
                  SPLIT="i32", stride_xm="i32", stride_om="i32")


def attention_variants():
    from graph_executor.kernels.decode_attention import _split_kernel

    for label, hd, heads, group in (("7B", 128, 32, 1), ("1B", 64, 32, 4), ("SmolLM2", 64, 9, 3)):
        for block in (64, 32, 16):
            for warps in (1, 2, 4):
                consts = dict(GROUP=group, HEAD_DIM=hd, SPLIT=64, BLOCK=block, NUM_SPLITS=64, NUM_HEADS=heads,
                              SLOTS=False, FUSED_REDUCE=False, ROPE=True, PDL=True, PREFETCH=0, THREADS=32 * warps)
                yield (f"attention {label} split 64 block {block} {warps}w", _split_kernel, ATTENTION_TYPES, consts,
                       warps)


def splitk_variants():
    from graph_executor.kernels.gemv_splitk import _splitk_kernel

    for int4 in (True, False):
        for block_n, block_kw, warps in ((32, 64, 4), (64, 64, 8), (32, 128, 4)):
            consts = dict(MODE=0, HAS_OFFSET=True, ZERO=0.0, HAS_BIAS=False, SPLIT=8, SPLIT_P2=8, GROUP=32,
                          BLOCK_N=block_n, BLOCK_KW=block_kw, INT4=int4, EMULATE=False, PDL=True, EARLY=False)
            yield (f"splitk {'int4' if int4 else 'int8'} {block_n}x{block_kw} {warps}w", _splitk_kernel, SPLITK_TYPES,
                   consts, warps)


def gemm_variants():
    from graph_executor.kernels.gemm_lowbit import _gemm_kernel

    for block_t in (16, 64):
        for warps in (4, 8):
            consts = dict(FORMAT=0, HAS_OFFSET=True, ZERO=0.0, GROUP=32, STEP_GROUP=32, HAS_BIAS=False,
                          ACCUMULATE=False, PRECISION="tf32", SPLITTING=True, BLOCK_N=64, BLOCK_T=block_t,
                          BLOCK_K=128)
            yield (f"gemm int4 64x{block_t}x128 {warps}w", _gemm_kernel, GEMM_TYPES, consts, warps)


def smoke_variants():
    from graph_executor.kernels.rows import _silu_mul_kernel

    yield ("silu_mul 1024", _silu_mul_kernel, dict(gu_ptr="*fp16", out_ptr="*fp16", stride_gu="i32", stride_out="i32",
                                                   K="i32"), dict(BLOCK=1024, PDL=False), 4)


SUITES = {"attention": attention_variants, "splitk": splitk_variants, "gemm": gemm_variants, "smoke": smoke_variants}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="all", choices=(*SUITES, "all"), help="smoke: one small kernel (the test's)")
    ap.add_argument("--cc", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    ap.add_argument("--top", type=int, default=6, help="opcodes listed per variant")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("sass_usage compiles kernels: unset TRITON_INTERPRET (the interpreter's kernels cannot be)")
    suites = {k: v for k, v in SUITES.items() if k != "smoke"} if args.suite == "all" else {args.suite: SUITES[args.suite]}
    print(f"Triton {triton.__version__}, compiled for sm_{args.cc} on this machine (no GPU used)")
    print("| variant | registers | stack (spills) B | SASS instructions | tensor-core ops | top opcodes |")
    print("|---|---|---|---|---|---|")
    for variants in suites.values():
        for label, kernel, types, consts, warps in variants():
            u = usage(compile_for(kernel, types, consts, warps, args.cc))
            top = ", ".join(f"{op} {n}" for op, n in sorted(u.opcodes.items(), key=lambda kv: -kv[1])[:args.top])
            mma = ", ".join(f"{op} {n}" for op, n in sorted(u.opcodes.items()) if "MMA" in op) or "-"  # HGMMA: wgmma
            print(f"| {label} | {u.registers} | {u.stack} | {u.instructions} | {mma} | {top} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
