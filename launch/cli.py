"""`hybridrt` command line: argument parsing and one-line errors; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import difflib
import os
import sys

from ipc.errors import HybridrtError


class Parser(argparse.ArgumentParser):
    """argparse with a did-you-mean for a mistyped flag (Python 3.14's `suggest_on_error`, for flags too); the
    subcommands' parsers are of this class as well."""

    def error(self, message: str) -> None:
        if message.startswith("unrecognized arguments:"):
            known = sorted(self._all_flags())
            hints = []
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6) if flag.startswith("--") else []
                if close:
                    hints.append(f"{flag} -> {close[0]}")
            if hints:
                message += f" (did you mean: {', '.join(hints)}?)"
        super().error(message)

    def _all_flags(self) -> set[str]:
        flags = set(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags |= set(sub._option_string_actions)
        return flags


def version() -> str:
    from importlib import metadata  # here: only --version needs it, and `serve` imports as little as it can first

    try:
        return metadata.version("hybridrt")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from launch import cmd_bench, cmd_cache, cmd_chat, cmd_generate, cmd_serve

    parser = Parser(
        prog="hybridrt",
        description="Low-latency batch-1 LLM inference: CUDA graphs for the static part of each step, "
                    "JIT kernels for the dynamic part, in two processes.",
    )
    parser.add_argument("--version", action="version", version=f"hybridrt {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmd_generate.register(sub)
    cmd_serve.register(sub)
    cmd_bench.register(sub)
    cmd_chat.register(sub)
    cmd_cache.register(sub)
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
    except BrokenPipeError:  # `hybridrt generate ... | head -2`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
