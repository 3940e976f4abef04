"""Probe: the batch-1 decode step (`FusedDecoder.step` as a CUDA graph) under several decode-attention
configurations, timed in alternating rounds in one process so that the host and the card are the same for all.

    python -m bench.probes.step_variants [--models llama-2-7b,smollm2-135m] [--contexts 300,2000]
        [--variants "split=64,warps=4,fused=0;split=32,warps=1,fused=1"] [--rounds 3] [--max-context 4096]

A variant is `key=value` pairs joined by commas: split (positions per split), warps (the one-query kernel's), fused (1:
the last split program combines the splits; 0: a reduce kernel after), rope (1: RoPE and the KV append inside the
attention kernel, `FusedDecoder(fuse_rope=True)`; 0: `rope_append` before it), early (1: the GEMVs load their weights
before waiting for the kernel before them, `FusedDecoder(early_weights=True)`), earlyo (1: o_proj's GEMV alone loads
early, on top of the rest), pf (MiB of the layer's next weights the attention kernel asks L2 to hold:
`FusedDecoder(l2_prefetch_mb=)`, kernels/l2_prefetch.py), tpf (MiB of the next projection's weights each GEMV's tail
asks L2 for: `FusedDecoder(tail_prefetch_mb=)`), rk (1: the plan's split-K dense projections have their partials added
by a second kernel, `DenseSplitKConfig.reduce_kernel`; 0: by the last program's fixup), ve (1: the attention's V loads
issued with its K loads, `DecodeAttention(v_early=True)`), tile (1: a copy of the model with its packed weights stored
tile-major, `quant.tiles.tile_model`; 2: only its o_proj and down_proj; 0: row-major as loaded), dd (1: down_proj's
split-K partials added by the next layer's qkv and o_proj GEMVs instead of a reduce kernel,
`FusedDecoder(defer_down=True)`; 0: not), re (1: the residual GEMVs on gemv.py's kernels, o_proj and a GemvConfig
down_proj, read their residual rows right after the wait, `GemvConfig.residual_early`), kve (1: the attention loads its
keys and values before its PDL wait and takes the new row from registers, `DecodeAttention(kv_early=True)`; needs RoPE
inside), ep (1: the attention reads the position before its wait and an empty split returns there,
`DecodeAttention(early_position=True)`), ctx (the step's context bound, `FusedDecoder.step(context=)`: the attention
launches only the splits below it, as the graph runner's "decode_ctx<C>" graphs do; at a context not below it the
variant is left out; past the cache's length it launches programs that find no keys), ls (the attention's loop over a
split's blocks software-pipelined over this many stages, `DecodeAttention(loop_stages=)`; for splits of more than 64
positions), rows (1: the decode on the verify step's kernel, one program per KV head and split with the group's queries
as tensor-core rows, `DecodeAttention(rows_kernel=True)`; needs rope=0 and fused=0), ablate (a timing ceiling, wrong
logits: 1 leaves the attention's split combine out (no reduce kernel, no combine in the kernel), 2 leaves out the reduce
kernels of every split-K GEMV (dense, FP8 and packed), 3 both: what folding those into the next kernel could save at
most; 4 leaves out each layer's o_proj GEMV: what folding it into the attention kernel could save at most; bits add up),
and per dense projection a gemv.py config for it, `qkv=`, `o=`, `gate_up=`, `down=`, `lm_head=` as rows x K-block x
warps[x stages] (e.g. `qkv=8x1024x4`: `GemvConfig(8, 1024, 4)`; stages 3 unless given), or with an `s` first a split-K
config (`down=s32x256x8`: `DenseSplitKConfig(32, 256, 8, reduce_kernel=True)`); it replaces the plan's config for that
slot. split, warps, rope, pf, tpf, early, rk, ve, dd, re, kve, ep, ctx, ls, rows and the projections left out: the
decoder's defaults (`decode_plan.plan_for` and `options_for` the model). Prints the median of each variant's per-round
medians and its ratio to the first.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics

import torch

from bench.floors import time_gpu
from bench.probes.verify_plan import graphed
from graph_executor import fused_decoder
from graph_executor.fused_decoder import FusedDecoder
from graph_executor.kernels import decode_attention, gemv_fp8, gemv_splitk
from graph_executor.kernels.decode_attention import DecodeAttention
from graph_executor.kernels.decode_plan import plan_for
from graph_executor.kernels.gemv import GemvConfig
from graph_executor.kernels.gemv_dense_splitk import DenseSplitKConfig
from graph_executor.loading.loader import LoadConfig, load_model
from graph_executor.quant.tiles import tile_model

TILE_VARIANTS = {1: None, 2: ("o_proj", "down_proj")}  # tile= -> the slots tile_model stores tile-major
# the first: the decode attention before the fourteenth session (every split 64 on Triton's 4 warps, reduce kernel)
DEFAULT_VARIANTS = ("split=64,warps=4,fused=0;split=64,warps=2,fused=1;split=64,warps=2,fused=0;"
                    "split=32,warps=1,fused=1;split=32,warps=2,fused=1;split=64,warps=4,fused=0")


FLAGS = ("split", "warps", "fused", "rope", "early", "earlyo", "pf", "tpf", "rk", "ve", "tile", "ablate", "dd", "re",
         "kve", "ep", "ctx", "ls", "rows")
PROJECTIONS = ("qkv", "o", "gate_up", "down", "lm_head")  # keys whose value is a gemv.py config


def parse_gemv_config(text: str) -> GemvConfig | DenseSplitKConfig | None:
    """'8x1024x4' -> GemvConfig(8, 1024, 4); '8x1024x4x2' -> stages 2; 's32x256x8' -> DenseSplitKConfig(32, 256, 8,
    reduce_kernel=True) (the split-K kernels of gemv_dense_splitk.py); None if malformed, not powers of two or
    refused by the config."""
    split_k = text.startswith("s")
    parts = text.removeprefix("s").split("x")
    if not 3 <= len(parts) <= (3 if split_k else 4) or not all(p.isdigit() and int(p) > 0 for p in parts):
        return None
    n, k, w, *stages = (int(p) for p in parts)
    if any(v & (v - 1) for v in (n, k, w)):  # Triton's block shapes and warps are powers of two
        return None
    try:
        return DenseSplitKConfig(n, k, w, reduce_kernel=True) if split_k else GemvConfig(n, k, w, *stages)
    except ValueError:  # a config the kernels refuse (e.g. split-K rows below their minimum)
        return None


def parse_variant(text: str) -> dict[str, int | GemvConfig | DenseSplitKConfig]:
    """'split=32,warps=1' -> {"split": 32, "warps": 1, "fused": 1} (fused on unless said); 'qkv=8x1024x4' ->
    {"qkv": GemvConfig(8, 1024, 4), "fused": 1}; a key given twice is refused."""
    variant: dict[str, int | GemvConfig | DenseSplitKConfig] = {"fused": 1}
    for item in text.split(","):
        key, _, value = item.partition("=")
        parsed = parse_gemv_config(value) if key in PROJECTIONS else int(value) if value.isdigit() else None
        if key not in FLAGS + PROJECTIONS or parsed is None or key in variant and key != "fused":
            raise SystemExit(f"bad variant item {item!r} in {text!r} ({'=, '.join(FLAGS + PROJECTIONS)}=; a "
                             "projection's value is rows x K-block x warps[x stages], e.g. qkv=8x1024x4)")
        variant[key] = parsed
    return variant


def build(model, variant: dict[str, int | GemvConfig | DenseSplitKConfig]) -> FusedDecoder:
    def flag(key: str) -> bool | None:
        return bool(variant[key]) if key in variant else None

    plan = plan_for(model.config.hidden_size)
    plan = dataclasses.replace(plan, **{name: variant[name] for name in PROJECTIONS if name in variant})
    if variant.get("earlyo"):
        plan = dataclasses.replace(plan, o=dataclasses.replace(plan.o, early=True))
    if variant.get("re"):  # the residual GEMVs on gemv.py's kernels read their residual right after the wait
        plan = dataclasses.replace(plan, **{name: dataclasses.replace(c, residual_early=True) for name in ("o", "down")
                                            if isinstance(c := getattr(plan, name), GemvConfig)})
    if "rk" in variant:  # the split-K dense projections' partials added by a second kernel (1) or the fixup (0)
        plan = dataclasses.replace(plan, **{f.name: dataclasses.replace(c, reduce_kernel=bool(variant["rk"]))
                                            for f in dataclasses.fields(plan)
                                            if isinstance(c := getattr(plan, f.name), DenseSplitKConfig)})
    decoder = FusedDecoder(model, plan=plan, fuse_rope=flag("rope"), early_weights=flag("early"),
                           l2_prefetch_mb=variant.get("pf"), tail_prefetch_mb=variant.get("tpf"),
                           defer_down=flag("dd"))
    cfg = model.config
    decoder.attention = DecodeAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, model.max_context,
                                        model.embed_tokens.device, cfg.sliding_window, variant.get("split"),
                                        pdl=decoder.pdl, num_warps=variant.get("warps"),
                                        fused_reduce=bool(variant["fused"]) and not variant.get("ablate", 0) & 1,
                                        v_early=decoder.attention.v_early if "ve" not in variant
                                        else bool(variant["ve"]),
                                        kv_early=decoder.attention.kv_early and decode_attention.one_block_splits(
                                            variant.get("split")) if "kve" not in variant else bool(variant["kve"]),
                                        early_position=bool(variant.get("ep", 0)),
                                        loop_stages=variant.get("ls", 0), rows_kernel=bool(variant.get("rows", 0)))
    return decoder


class _NoLaunch:
    """Stands in for a Triton kernel (`kernel[grid](...)` launches nothing) while an ablation's graph is built."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def ablated(mask: int):
    """`ablate=` (module doc): the kernels it leaves out launch nothing inside this block."""
    saved = (decode_attention._reduce_kernel, gemv_fp8.launch_reduce, gemv_splitk.launch_reduce,
             fused_decoder.gemv_residual)
    if mask & 4:  # the step's only gemv_residual call is o_proj's
        fused_decoder.gemv_residual = lambda *args, **kwargs: None
    if mask & 1:
        decode_attention._reduce_kernel = _NoLaunch()
    if mask & 2:
        gemv_fp8.launch_reduce = gemv_splitk.launch_reduce = lambda *args, **kwargs: None
    try:
        yield
    finally:
        (decode_attention._reduce_kernel, gemv_fp8.launch_reduce, gemv_splitk.launch_reduce,
         fused_decoder.gemv_residual) = saved


def alternating_rounds(graphs: list[torch.cuda.CUDAGraph], outs: list[torch.Tensor], rounds: int,
                       device: torch.device) -> tuple[list[float], list[torch.Tensor]]:
    """Each graph timed once a round, `rounds` rounds (the host and card alike for all): per graph the median of its
    rounds' medians in ms, and its output (`outs`) after one more replay."""
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(rounds):
        for i, graph in enumerate(graphs):
            times[i].append(time_gpu(graph.replay, device) * 1e3)
    logits = []
    for graph, out in zip(graphs, outs):
        graph.replay()
        torch.cuda.synchronize()
        logits.append(out.clone())
    return [statistics.median(t) for t in times], logits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b,smollm2-135m", help="comma list of dummy presets")
    ap.add_argument("--contexts", default="300,2000", help="comma list of decode positions")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated variants (see the module doc)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds over the variants")
    ap.add_argument("--max-context", type=int, default=4096, help="the KV cache's positions")
    ap.add_argument("--quantize", default=None, choices=("int8", "int4", "fp8"),
                    help="round the weights to this packed format at load (as `serve --quantize`)")
    args = ap.parse_args(argv)
    variants = [(text, parse_variant(text)) for text in args.variants.split(";")]
    contexts = [int(c) for c in args.contexts.split(",")]
    device = torch.device("cuda")
    print(f"batch-1 decode step on {torch.cuda.get_device_name()}, CUDA graph replays, cache {args.max_context}, "
          f"median of {args.rounds} alternating rounds")
    print("| model | context | variant | ms/step | vs first | logits max abs diff vs first |")
    print("|---|---|---|---|---|---|")
    for preset in args.models.split(","):
        loaded = load_model(LoadConfig(model=f"dummy:{preset}", device="cuda", dtype="float16", tile_packed=False,
                                       max_context=args.max_context, progress=False, quantize=args.quantize))
        model = loaded.model
        tiled = {}  # per tile= value a copy of the model (its KV cache too) with packed slots tile-major, on first use
        token = torch.full((1,), 7, dtype=torch.int64, device=device)
        for context in contexts:
            position = torch.full((1,), context, dtype=torch.int64, device=device)
            # a variant whose ctx does not exceed this context would attend to part of it: left out here
            here = [(text, variant) for text, variant in variants if variant.get("ctx", context + 1) > context]
            graphs, outs, decoders = [], [], []  # the decoders own the buffers their graphs write: keep them
            for _, variant in here:
                if variant.get("tile") and variant["tile"] not in tiled:
                    tiled[variant["tile"]] = copy.deepcopy(model)
                    tile_model(tiled[variant["tile"]], TILE_VARIANTS[variant["tile"]])
                decoder = build(tiled[variant["tile"]] if variant.get("tile") else model, variant)
                decoders.append(decoder)
                out = torch.empty(model.config.vocab_size, dtype=torch.float32, device=device)
                with ablated(variant.get("ablate", 0)):
                    graphs.append(graphed(lambda d=decoder, o=out, c=variant.get("ctx"): d.step(token, position, o,
                                                                                                 context=c)))
                outs.append(out)
            medians, logits = alternating_rounds(graphs, outs, args.rounds, device)
            first = medians[0]
            for (text, _), ms, lg in zip(here, medians, logits):
                diff = float((lg - logits[0]).abs().max())
                print(f"| {preset} | {context} | {text} | {ms:.3f} | {ms / first:.3f} | {diff:.2e} |", flush=True)
            for text, _ in variants:
                if all(text != t for t, _ in here):
                    print(f"| {preset} | {context} | {text} | - | - | left out: ctx <= context |", flush=True)
            del graphs, decoders
        del model, loaded, tiled
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
