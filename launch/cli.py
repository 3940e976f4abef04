"""`hybridrt` command line: argument parsing and one-line errors; each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import difflib
import os
import sys

from ipc.errors import HybridrtError


class Parser(argparse.ArgumentParser):
    """argparse with a did-you-mean for a mistyped flag (Python 3.14's `suggest_on_error`, for flags too); the
    subcommands' parsers are of this class as well. An unknown flag is reported by the subcommand it was given to
    (argparse leaves that to the top parser, which knows every subcommand's flags), and suggestions come from that
    subcommand's flags only; a positional argument typed as a flag (`--prompt`) says it is positional. No flag is
    taken by a prefix of its name (argparse's default): `cache rm --al` removed every entry as `--all`; a prefix is
    an unknown flag, with the did-you-mean."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._chosen(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _chosen(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The deepest subcommand's parser that `parsed` names (this parser when it has no subcommands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(parsed, action.dest, None) or "")
                if sub is not None:
                    return sub._chosen(parsed) if isinstance(sub, Parser) else sub
        return self

    def error(self, message: str) -> None:
        if message.startswith("unrecognized arguments:"):
            # a positional's name as a flag is a candidate too (`--prompt` for generate's PROMPT)
            positionals = {"--" + a.dest.replace("_", "-"): a.metavar or a.dest for a in self._actions
                           if not a.option_strings and not isinstance(a, argparse._SubParsersAction)}
            known = sorted(set(self._option_string_actions) | set(positionals))
            hints, notes = [], []
            for word in message.split(":", 1)[1].split():
                flag = word.split("=", 1)[0]
                close = difflib.get_close_matches(flag.lower(), known, n=1, cutoff=0.7) if flag.startswith("--") else []
                if close and close[0] in positionals:
                    name = positionals[close[0]]
                    notes.append(f"{name} is positional, without a flag: {self.prog} [options] {name}")
                elif close:
                    hints.append(f"{flag} -> {close[0]}")
            if hints:
                message += f" (did you mean: {', '.join(hints)}?)"
            if notes:
                message += f" ({'; '.join(notes)})"
        super().error(message)


def version() -> str:
    from importlib import metadata  # here: only --version needs it, and `serve` imports as little as it can first

    try:
        return metadata.version("hybridrt")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """--version, with the installed version looked up only when asked (importlib.metadata scans every installed
    distribution: tens of milliseconds that `serve` would pay before it spawns its children)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show hybridrt's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"hybridrt {version()}")
        parser.exit()


# subcommand -> its module (each has register(sub)), in the order `--help` lists them
COMMANDS = {"generate": "launch.cmd_generate", "serve": "launch.cmd_serve", "bench": "launch.cmd_bench",
            "chat": "launch.cmd_chat", "cache": "launch.cmd_cache"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given the arguments, only the subcommand they name (when they name one) is imported
    and registered: `serve` then spawns its children without first importing the bench's and the cache's modules
    (~0.1 s on the CPU machine)."""
    import importlib

    parser = Parser(
        prog="hybridrt",
        description="Low-latency batch-1 LLM inference: CUDA graphs for the static part of each step, "
                    "JIT kernels for the dynamic part, in two processes.",
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    chosen = [words[0]] if words and words[0] in COMMANDS else list(COMMANDS)
    for name in chosen:
        importlib.import_module(COMMANDS[name]).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
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
