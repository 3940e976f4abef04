"""`hybridrt bench`: TTFT and per-token latency of hybridrt vs HF transformers and vs this card's floors.

Flags become a `bench.resolve.BenchOptions`; the harness (bench/) does the rest. Heavy imports wait for `run`
so that `hybridrt --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.spec import DEFAULTS, ENGINE_HELP, MPS_MODES, QUANTIZE_METHODS, SPECULATIVE_METHODS, WORKLOAD_HELP
from graph_executor.loading.load_config import TP_ALLREDUCE

_GPU, _CPU = DEFAULTS["cuda"], DEFAULTS["cpu"]


def _ints(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def _epilog() -> str:
    engines = "\n".join(f"  {name:<18} {text}" for name, text in ENGINE_HELP.items())
    workloads = "\n".join(f"  {name:<18} {text}" for name, text in WORKLOAD_HELP.items())
    return (f"engines (each runs in its own process, one after another, with its own time limit):\n{engines}\n\n"
            f"workloads:\n{workloads}\n\n"
            "Prompts are random token ids from a fixed seed, decoding is greedy and ignores EOS; dummy models "
            "have random weights in real shapes (latency does not depend on values). Writes results.json, "
            "results.md, ttft.png, context.png, decode_cdf.png (plots need matplotlib) and logs/ into --out.\n"
            "Defaults differ by device (GPU / CPU smoke run): shown as 'GPU ... / CPU ...'.")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark TTFT and per-token latency against floors and HF transformers",
                       description=__doc__.strip().splitlines()[0], epilog=_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_flags(p.add_argument_group("model and device"))
    _workload_flags(p.add_argument_group("what to run"))
    r = p.add_argument_group("running")
    r.add_argument("--out", default=None,
                   help="results folder (default: bench/results/<date>-<gpu or cpu>-<model>/)")
    r.add_argument("--mps", choices=MPS_MODES, default="auto",
                   help="CUDA MPS daemon for the hybridrt end-to-end engine (default: auto)")
    r.add_argument("--timeout", type=float, default=240.0,
                   help="seconds each engine process may take, model load and warm-up included (default: 240)")
    r.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)


def _model_flags(g) -> None:
    g.add_argument("--model", default=None,
                   help=f"dummy:<preset>, HF folder, .gguf file or smollm2-135m-instruct "
                        f"(default: GPU {_GPU.model} / CPU {_CPU.model})")
    g.add_argument("--device", default="auto", help="auto (GPU if present), cuda, cuda:N or cpu (default: auto)")
    g.add_argument("--dtype", default="auto",
                   help="auto (float16 on GPU, float32 on CPU), float16, bfloat16 or float32 (default: auto)")
    g.add_argument("--max-context", type=int, default=None,
                   help="KV cache length of every engine (default: what the workloads need, rounded up to 256)")
    g.add_argument("--tokenizer", default=None, help="tokenizer for the hybridrt engines (default: the model's; "
                                                     "none for dummy models; prompts are token ids either way)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompt ids and dummy weights (default: 0)")
    g.add_argument("--quantize", default="none", metavar="LIST",
                   help=f"weight formats of the hybridrt engines, a comma list of none (the dtype), "
                        f"{', '.join(QUANTIZE_METHODS)}: one run per format, one after another (the peers "
                        f"only with none), into <out>/<format>/, and a side-by-side formats.md; a single "
                        f"format writes into <out> itself (default: none)")
    g.add_argument("--quantize-group", type=int, default=32, metavar="N",
                   help="weights per scale for int8/int4 (default: 32)")
    g.add_argument("--dequantize", action="store_true",
                   help="a GGUF --model dequantized at load instead of kept packed on the GPU")
    g.add_argument("--speculative", default="off", metavar="LIST",
                   help=f"speculative decoding of the hybridrt engines, a comma list of "
                        f"{', '.join(SPECULATIVE_METHODS)}: one run per method (like --quantize) and a side-by-"
                        f"side speculative.md; one axis at a time (default: off)")
    g.add_argument("--num-speculative-tokens", type=int, default=8, metavar="K",
                   help="most proposals per verify step (default: 8)")
    g.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="the draft model of the --speculative draft run (same tokenizer as --model)")


def _workload_flags(w) -> None:
    w.add_argument("--engines", default=None,
                   help=f"comma list of {', '.join(ENGINE_HELP)}, or all (default: all this device runs)")
    w.add_argument("--workloads", default="all", help=f"comma list of {', '.join(WORKLOAD_HELP)}; all is every "
                                                      f"one but speculative (default: all)")
    w.add_argument("--prompt-lens", default=None, help="TTFT prompt lengths, comma list "
                   f"(default: GPU {_ints(_GPU.prompt_lens)} / CPU {_ints(_CPU.prompt_lens)})")
    w.add_argument("--repeats", type=int, default=None,
                   help=f"timed TTFT runs per prompt length (default: GPU {_GPU.repeats} / CPU {_CPU.repeats})")
    w.add_argument("--decode-tokens", type=int, default=None,
                   help=f"tokens timed by the decode workload (default: GPU {_GPU.decode_tokens} / "
                        f"CPU {_CPU.decode_tokens})")
    w.add_argument("--decode-prompt-len", type=int, default=None,
                   help=f"prompt before them (default: GPU {_GPU.decode_prompt_len} / CPU {_CPU.decode_prompt_len})")
    w.add_argument("--contexts", default=None, help="context lengths of the context workload, comma list "
                   f"(default: GPU {_ints(_GPU.contexts)} / CPU {_ints(_CPU.contexts)})")
    w.add_argument("--max-num-seqs", type=int, default=1, metavar="N",
                   help="the hybridrt engine's server holds N sequences and decodes them together (needs "
                        "--speculative off); the concurrency workload runs N streams at once (default: 1)")
    w.add_argument("--prefix-reuse", action="store_true",
                   help="the hybridrt engine's server reuses the KV cache's prefix across requests (the turns "
                        "workload; other workloads repeat prompts, which it would then skip) (default: off)")
    w.add_argument("--tensor-parallel", default="1", metavar="N[,N...]",
                   help="the server engines (hybridrt, hybridrt-http) split the model over N executor ranks (one "
                        "GPU each on a GPU; the in-process engine and the peers run only at 1); a comma list runs once "
                        "per value (like --quantize) into <out>/tp-N/ with a side-by-side tensor_parallel.md: decode "
                        "P50 against the floor and against the first value, TTFT per prompt length (default: 1)")
    w.add_argument("--tp-allreduce", choices=TP_ALLREDUCE, default="nccl",
                   help="the server engines' ranks sum a decode step's hidden vectors with NCCL or with one kernel "
                        "over peer memory (as serve's --tp-allreduce) (default: nccl)")
    w.add_argument("--spec-tokens", type=int, default=128,
                   help="most tokens per prompt of the speculative workload (default: 128)")
    w.add_argument("--context-steps", type=int, default=None,
                   help=f"decode steps timed at each context (default: GPU {_GPU.context_steps} / "
                        f"CPU {_CPU.context_steps})")


def options(args: argparse.Namespace):
    from bench.resolve import BenchOptions

    return BenchOptions(
        model=args.model, device=args.device, dtype=args.dtype, engines=args.engines, workloads=args.workloads,
        prompt_lens=args.prompt_lens, decode_tokens=args.decode_tokens, decode_prompt_len=args.decode_prompt_len,
        contexts=args.contexts, context_steps=args.context_steps, repeats=args.repeats,
        max_context=args.max_context, seed=args.seed, timeout_s=args.timeout, mps=args.mps,
        tokenizer=args.tokenizer, quantize_group=args.quantize_group, dequantize=args.dequantize,
        num_speculative_tokens=args.num_speculative_tokens, spec_tokens=args.spec_tokens,
        draft_model=args.draft_model, max_num_seqs=args.max_num_seqs,
        tensor_parallel=rank_counts(args.tensor_parallel)[0], tp_allreduce=args.tp_allreduce,
        prefix_reuse=args.prefix_reuse)


def _names(text: str, known: tuple[str, ...], flag: str) -> list[str]:
    """A flag's comma list, in the order given, duplicates dropped; ValueError naming the flag otherwise."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names or any(n not in known for n in names):
        raise ValueError(f"{flag} takes a comma list of {', '.join(known)}, got {text!r}")
    return names


def rank_counts(text: str) -> list[int]:
    """`--tensor-parallel`'s comma list -> [1, 2, ...] in the order given, duplicates dropped."""
    values = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not values or not all(v.isdigit() and int(v) >= 1 for v in values):
        raise ValueError(f"--tensor-parallel takes a comma list of rank counts >= 1, got {text!r}")
    return [int(v) for v in values]


def formats(text: str) -> list[str | None]:
    """`--quantize`'s comma list -> [None (the dtype), "int8", ...] in the order given, duplicates dropped."""
    return [None if n == "none" else n for n in _names(text, ("none", *QUANTIZE_METHODS), "--quantize")]


def run(args: argparse.Namespace) -> int:
    """One run, or one per value of the flag given as a list (--quantize or --speculative) into <out>/<value>/
    with a side-by-side table; every spec is resolved (bad input fails here) before any process starts."""
    from dataclasses import replace

    from bench.harness import run_bench
    from bench.report import formats_table, markdown, speculative_table, tensor_parallel_table
    from bench.resolve import default_out_dir, resolve_spec

    methods = formats(args.quantize)
    spec_methods = _names(args.speculative, SPECULATIVE_METHODS, "--speculative")
    ranks = rank_counts(args.tensor_parallel)
    if sum(len(axis) > 1 for axis in (methods, spec_methods, ranks)) > 1:
        raise ValueError("--quantize, --speculative and --tensor-parallel: give a list to one of them at a time")
    base = options(args)
    if len(ranks) > 1:  # the peers and the in-process engine run with one rank only
        opts = [replace(base, quantize=methods[0], speculative=spec_methods[0], tensor_parallel=n,
                        peers=methods[0] is None and n == 1) for n in ranks]
        labels, side_by_side, table_name = [f"tp-{n}" for n in ranks], tensor_parallel_table, "tensor_parallel.md"
    elif len(spec_methods) > 1:  # the peers run with the first method only, and only in the dtype
        q = methods[0]
        opts = [replace(base, quantize=q, speculative=m, peers=q is None and i == 0) for i, m in enumerate(spec_methods)]
        labels, side_by_side, table_name = spec_methods, speculative_table, "speculative.md"
    else:  # the peers run only with the dtype
        opts = [replace(base, quantize=q, peers=q is None, speculative=spec_methods[0]) for q in methods]
        labels, side_by_side, table_name = methods, formats_table, "formats.md"
    specs = [resolve_spec(o) for o in opts]
    out = Path(args.out) if args.out else default_out_dir(specs[0])

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    if len(specs) == 1:
        print(markdown(run_bench(specs[0], out, log)))
        print(f"results: {out}")
        return 0
    runs = {}
    for label, spec in zip(labels, specs):
        runs[label or spec.dtype] = run_bench(spec, out / (label or spec.dtype), log)
    table = side_by_side(runs)
    (out / table_name).write_text(table + "\n")
    print(table)
    print(f"results: {out}")
    return 0
