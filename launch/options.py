"""Flags shared by several subcommands (model loading, sampling), and their conversion to typed configs."""

from __future__ import annotations

import argparse
from pathlib import Path

from graph_executor.loading.default_model import DEFAULT_MODEL_NAME
from graph_executor.loading.load_config import LOAD_FORMATS, TP_ALLREDUCE, LoadConfig
from graph_executor.quant.names import DEFAULT_GROUP, GROUPS, QUANTIZE_METHODS
from ipc.messages import MAX_NUM_SEQS, MAX_SPECULATIVE_TOKENS
from jit_context import DEFAULT_STEP_TIMEOUT_S
from jit_context.proposers import DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN
from jit_context.sampling_params import SamplingParams
from jit_context.speculative_config import DEFAULT_METHOD, METHODS, SpeculativeConfig
from jit_context.structured_output import StructuredOutput
from jit_context.tokenizer import check_chat_template


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL_NAME,
                   help="HF folder (config.json + *.safetensors), a .gguf file, dummy:<preset> (random weights "
                        f"in real shapes, e.g. dummy:llama-2-7b), or {DEFAULT_MODEL_NAME} (default, embedded)")
    g.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                   help="how to read --model; auto decides from the path (default: auto)")
    g.add_argument("--device", default="auto", help="auto (GPU if present), cuda or cpu (default: auto)")
    g.add_argument("--dtype", default="auto",
                   help="auto (float16 on GPU, float32 on CPU), float16, bfloat16 or float32 (default: auto)")
    g.add_argument("--max-context", type=int, default=None,
                   help="KV cache length in tokens (default: the model's, capped at 4096)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or .gguf (default: the model's own; needed for dummy models)")
    g.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                   help="a Jinja chat template, or a file holding one, used instead of the tokenizer's own "
                        "(as vLLM's --chat-template; for models without one or to change it)")
    g.add_argument("--seed-weights", type=int, default=0, help="seed of dummy random weights (default: 0)")
    # No argparse `choices`: a bad value is LoadConfig's one-line error (exit 1), checked before any process starts
    g.add_argument("--quantize", default=None, metavar="{" + ",".join(QUANTIZE_METHODS) + "}",
                   help="quantize an HF or dummy model at load (round-to-nearest, on the device): int8 (a scale "
                        "per group), int4 (scale and offset per group; embedding and lm_head in int8) or fp8 "
                        "(e4m3, a scale per row; down_proj, embedding and lm_head in int8). The GPU reads the "
                        "packed weights; the CPU dequantizes them at load (same values, no speed-up). GGUF files keep "
                        "their own quantized types")
    g.add_argument("--quantize-group", type=int, default=DEFAULT_GROUP, metavar="N",
                   help=f"weights per scale for --quantize int8/int4: one of {', '.join(map(str, GROUPS))}; "
                        f"must divide the hidden and intermediate sizes (default: {DEFAULT_GROUP})")
    g.add_argument("--dequantize", action="store_true",
                   help="GGUF: dequantize every tensor to --dtype at load instead of keeping the packed types "
                        "(Q4_0/Q4_1/Q4_K/Q5_*/Q6_K/Q8_0) packed on the GPU")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bars, load messages (the load's warnings included) or serve's request and "
                        "throughput lines on stderr; errors still print")


def add_speculative_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    # No argparse `choices` for the numbers: SpeculativeConfig's one-line error names the flag and the range.
    g.add_argument("--speculative", choices=METHODS, default=None,
                   help="propose tokens and verify several per step: ngram proposes what followed the longest "
                        "earlier repeat of the text's last tokens (prompt lookup; wins where the output quotes "
                        "the input: code edits, extraction, summaries with quotes); draft has --draft-model propose "
                        "greedily. Output is the same as without it (greedy: token for token; sampled: same "
                        f"distribution). Batch-1 only: a server with --max-num-seqs > 1 decodes plainly "
                        f"(default: {DEFAULT_METHOD}, or off with --max-num-seqs > 1)")
    g.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="--speculative draft: a small model with the same tokenizer, in any form --model takes "
                        "(HF folder, .gguf, dummy:<preset>); loaded next to the model on the same device, in its "
                        "dtype and context, with its own CUDA graphs")
    g.add_argument("--num-speculative-tokens", type=int, default=8, metavar="K",
                   help=f"the most tokens proposed per verify step, 1..{MAX_SPECULATIVE_TOKENS}; the number used "
                        "follows the recent acceptance rate, down to plain decoding (default: 8)")
    g.add_argument("--no-adaptive-k", action="store_true",
                   help="always propose --num-speculative-tokens tokens (as vLLM does) instead of following the "
                        "acceptance rate and the step costs (which may also pause speculation, e.g. with a draft "
                        "model as large as the model)")
    g.add_argument("--ngram-min", type=int, default=DEFAULT_NGRAM_MIN,
                   help=f"shortest suffix the ngram proposer matches (default: {DEFAULT_NGRAM_MIN})")
    g.add_argument("--ngram-max", type=int, default=DEFAULT_NGRAM_MAX,
                   help=f"longest suffix the ngram proposer tries first (default: {DEFAULT_NGRAM_MAX})")


def speculative_config(args: argparse.Namespace, batched: bool = False) -> SpeculativeConfig:
    """ValueError (one line naming the flag) for a bad combination. `batched`: the server holds several sequences
    (--max-num-seqs > 1), which it decodes without speculation (the default is then off)."""
    method = args.speculative or ("off" if batched else DEFAULT_METHOD)
    if batched and method != "off":
        raise ValueError(f"--speculative {method} needs --max-num-seqs 1: a server that batches requests decodes "
                         "them without speculation")
    if (method == "draft") != (args.draft_model is not None):
        raise ValueError("--speculative draft and --draft-model go together")
    try:
        return SpeculativeConfig(method, args.num_speculative_tokens, args.ngram_min, args.ngram_max,
                                 adaptive=not args.no_adaptive_k)
    except ValueError as e:
        raise ValueError(f"--speculative: {e}") from None


CPU_MAX_NUM_SEQS = 2  # `serve`'s default on the CPU (issue 14)
GPU_MAX_NUM_SEQS = 4  # and on a GPU: 4 streams cost ~1.15x one stream's per-token latency each on an H200 (bench/NOTES.md)


def add_max_num_seqs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                   help=f"requests served at once, 1..{MAX_NUM_SEQS}: N KV caches are allocated at start and the "
                        "running requests decode together, one step for all (continuous batching: a request joins "
                        "or leaves between two steps, a new prompt is prefilled in chunks of at most 256 tokens "
                        "carried by the decode steps). 1 serves one request at a time, with speculative decoding "
                        f"(default: {GPU_MAX_NUM_SEQS} on a GPU, {CPU_MAX_NUM_SEQS} on the CPU; 1 with --speculative "
                        "ngram or draft)")


def max_num_seqs(args: argparse.Namespace, gpu: bool) -> int:
    """--max-num-seqs, or its default: 1 when speculation is asked for (it is batch-1's), else the device's;
    ValueError (one line) out of range."""
    n = args.max_num_seqs
    if n is None:
        speculating = getattr(args, "speculative", None) not in (None, "off")
        n = 1 if speculating else GPU_MAX_NUM_SEQS if gpu else CPU_MAX_NUM_SEQS
    if not 1 <= n <= MAX_NUM_SEQS:
        raise ValueError(f"--max-num-seqs must be in 1..{MAX_NUM_SEQS}, got {n}")
    return n


def add_tensor_parallel_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N executor processes (Megatron-style: attention heads and the MLP by "
                        "rank, an all-reduce after o_proj and down_proj, the logits gathered), rank 0 relaying each "
                        "step to the others; each rank loads only its slices; a --draft-model runs whole on rank 0. "
                        "On GPUs one rank per GPU (from the --device one), NCCL between them, each rank's steps in "
                        "CUDA graphs with the collectives inside (MPS off unless --mps on); on the CPU gloo. "
                        "--quantize quantizes each rank's part (default: 1)")
    p.add_argument("--tp-allreduce", choices=TP_ALLREDUCE, default="nccl",
                   help="how GPU ranks sum a decode step's hidden vectors: nccl (NCCL's all-reduce), or peer (one "
                        "kernel that reads every rank's vector over NVLink through CUDA IPC, as vLLM's custom "
                        "all-reduce; larger sums stay NCCL's). Measured: see bench/NOTES.md (default: nccl)")


def tensor_parallel(args: argparse.Namespace) -> int:
    """--tensor-parallel, checked; ValueError (one line) for a bad value or a combination it does not run."""
    n = args.tensor_parallel
    if n < 1:
        raise ValueError(f"--tensor-parallel must be >= 1, got {n}")
    return n


def add_prefix_reuse_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every prompt whole. By default a prompt that starts with what the KV cache holds from "
                        "the last request (a chat's earlier turns and reply) prefills only the rest (not with a "
                        "draft model)")


def add_step_timeout_flag(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--step-timeout", type=positive_seconds, default=DEFAULT_STEP_TIMEOUT_S, metavar="S",
                   help="seconds the JIT context waits for the graph executor to answer one step before that "
                        "request fails (an executor that is alive but hung; the server stays up)"
                        f"{note} (default: {DEFAULT_STEP_TIMEOUT_S:g})")


def add_api_key_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="the --api-key of the server given with --connect (default: $HYBRIDRT_API_KEY)")


def positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value}")
    return seconds


def port_number(value: str) -> int:
    """A TCP port for argparse: 0..65535 (0: the flag's own meaning, e.g. HTTP off)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {port}")
    return port


def server_address(value: str) -> str:
    """A running server's native address for argparse (`--connect`): a ZeroMQ endpoint, as `hybridrt serve` prints
    it on its `native:` line."""
    if "://" not in value:
        hint = f" (for a TCP port: tcp://{value})" if ":" in value else ""
        raise argparse.ArgumentTypeError(f"expects the server's native address as `hybridrt serve` prints it, e.g. "
                                         f"tcp://127.0.0.1:7461 or ipc:///path/client.sock; got {value!r}{hint}")
    return value


def add_sampling_flags(p: argparse.ArgumentParser, default_temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=default_temperature,
                   help=f"0 is greedy (default: {default_temperature})")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1, off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off (default: 0)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens under min-p times the top probability (default: 0, off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens of the prompt and the reply so far (default: 1, off)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2], subtracted from the logit of each token the reply holds (default: 0, off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2], subtracted from a token's logit once per time the reply holds it "
                        "(default: 0, off)")
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit (repeatable); -100 all but bans it")
    g.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible sampling")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not included in output")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="generate at least N tokens before an end-of-sequence token or a stop string may end the "
                        "reply (default: 0)")
    s = p.add_argument_group("structured output (one of these: the reply is held to it, token by token)")
    one = s.add_mutually_exclusive_group()
    one.add_argument("--json-schema", metavar="SCHEMA",
                     help="a JSON schema (a file, or the schema's JSON text) the reply must be an instance of")
    one.add_argument("--json-object", action="store_true", help="the reply is a JSON object (any)")
    one.add_argument("--regex", metavar="REGEX", help="the reply matches this regular expression (Rust regex syntax)")
    one.add_argument("--choice", action="append", metavar="TEXT",
                     help="the reply is exactly one of these strings (repeatable)")
    one.add_argument("--grammar", metavar="GRAMMAR",
                     help="a grammar the reply must match (a file, or its text): Lark as llguidance reads it, or "
                          "llama.cpp's GBNF (rules with ::=)")


def load_config(args: argparse.Namespace, max_num_seqs: int = 1) -> LoadConfig:
    """`max_num_seqs`: the slots to allocate; when --max-num-seqs was not given, fewer that fit are taken."""
    return LoadConfig(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                      max_context=args.max_context, seed=args.seed_weights, progress=not args.quiet,
                      quantize=args.quantize, quantize_group=args.quantize_group, dequantize=args.dequantize,
                      max_num_seqs=max_num_seqs, tp_allreduce=getattr(args, "tp_allreduce", "nccl"),
                      fit_slots=max_num_seqs > 1 and getattr(args, "max_num_seqs", None) is None)


def load_argv(load: LoadConfig) -> list[str]:
    """`load` as the graph executor's command-line flags (the inverse of its parser's model flags)."""
    argv = ["--model", load.model, "--load-format", load.load_format, "--device", load.device, "--dtype",
            load.dtype, "--seed-weights", str(load.seed), "--quantize-group", str(load.quantize_group)]
    if load.max_context:
        argv += ["--max-context", str(load.max_context)]
    if load.quantize:
        argv += ["--quantize", load.quantize]
    if load.dequantize:
        argv.append("--dequantize")
    if load.max_num_seqs != 1:
        argv += ["--max-num-seqs", str(load.max_num_seqs)]
    if load.fit_slots:
        argv.append("--fit-slots")
    if load.tp_allreduce != "nccl":
        argv += ["--tp-allreduce", load.tp_allreduce]
    if not load.progress:
        argv.append("--quiet")
    return argv


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags' params; ValueError naming what is wrong (a structured output's schema, regex or grammar
    too: checked here, before any process starts)."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                           presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                           logit_bias=logit_bias(args.logit_bias), seed=args.seed, stop=tuple(args.stop),
                           ignore_eos=args.ignore_eos, min_tokens=args.min_tokens, structured=structured(args))
    if params.structured is not None:
        params.structured.checked_grammar()
    return params


def structured(args: argparse.Namespace) -> StructuredOutput | None:
    """The structured output flag given, if any; ValueError naming the flag for a file it cannot read or a schema
    that is not JSON."""
    if args.json_schema is not None:
        return StructuredOutput(json=_text_or_file("--json-schema", args.json_schema, "{"))
    if args.json_object:
        return StructuredOutput(json_object=True)
    if args.regex is not None:
        return StructuredOutput(regex=args.regex)
    if args.choice:
        return StructuredOutput(choice=tuple(args.choice))
    if args.grammar is not None:
        return StructuredOutput(grammar=_text_or_file("--grammar", args.grammar, ":"))
    return None


def _text_or_file(flag: str, value: str, marker: str) -> str:
    """A flag's text: the file it names, else the value itself when it looks like the text (holds `marker`)."""
    path = Path(value).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # text longer than a file name may be
        is_file = False
    if is_file:
        try:
            return path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{flag}: cannot read {path}: {e}") from None
    if marker not in value:
        raise ValueError(f"{flag}: {value!r} is neither a file nor the text itself")
    return value


def logit_bias(items: list[str]) -> tuple[tuple[int, float], ...]:
    """--logit-bias ID=BIAS values -> (token id, bias) pairs; ValueError naming a malformed one."""
    pairs = []
    for item in items:
        token, sep, bias = item.partition("=")
        try:
            if not sep:
                raise ValueError
            pairs.append((int(token), float(bias)))
        except ValueError:
            raise ValueError(f"--logit-bias takes ID=BIAS (e.g. 2=-100), got {item!r}") from None
    return tuple(pairs)


def chat_template(args: argparse.Namespace) -> str | None:
    """--chat-template as template text: a file's contents, or the value itself if it is a Jinja template."""
    value = args.chat_template
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template: cannot read {path}: {e}") from None
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    try:
        check_chat_template(text)
    except ValueError as e:
        raise ValueError(f"--chat-template: {e}") from None
    return text
