"""`hybridrt` command line: argument parsing and one-line errors; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys

from ipc.errors import HybridrtError


def build_parser() -> argparse.ArgumentParser:
    from launch import cmd_bench, cmd_chat, cmd_generate, cmd_serve

    parser = argparse.ArgumentParser(
        prog="hybridrt",
        description="Low-latency batch-1 LLM inference: CUDA graphs for the static part of each step, "
                    "JIT kernels for the dynamic part, in two processes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd_generate.register(sub)
    cmd_serve.register(sub)
    cmd_bench.register(sub)
    cmd_chat.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (HybridrtError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
