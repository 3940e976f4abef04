"""`hybridrt cache ls|rm`: what the conversion cache holds (graph_executor/loading/cache.py) and removing it."""

from __future__ import annotations

import argparse
import time

from graph_executor.loading import cache


def register(sub) -> None:
    p = sub.add_parser("cache", help="list or remove converted models in the conversion cache",
                       description="The conversion cache holds what hybridrt derives from a model file once per "
                                   "machine (the default model's safetensors copy, GGUF tokenizers), keyed by the "
                                   "file's content, and Triton's compiled kernels. Its dir is $HYBRIDRT_CACHE_DIR, "
                                   "else $XDG_CACHE_HOME/hybridrt, else ~/.cache/hybridrt; its size cap "
                                   "$HYBRIDRT_CACHE_MAX_GB (default %g; least recently used entries go first)."
                                   % cache.DEFAULT_MAX_GB)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list the entries, most recently used first",
                            description="List the cache's entries: name, size, last use, state, source file.")
    ls.set_defaults(run=run_ls)
    rm = actions.add_parser("rm", help="remove entries (by name or name prefix) or --all",
                            description="Remove entries by name (as `hybridrt cache ls` prints it) or name prefix; "
                                        "the next load of their model converts again.")
    rm.add_argument("names", nargs="*", metavar="NAME", help="entry names or prefixes (e.g. smollm2-135m-instruct)")
    rm.add_argument("--all", action="store_true", help="remove every entry (and Triton's kernel cache)")
    rm.set_defaults(run=run_rm)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_ls(args: argparse.Namespace) -> int:
    entries = cache.entries()
    print(f"cache dir: {cache.cache_root()} ({_size(sum(e.bytes for e in entries))} in {len(entries)} entries, "
          f"cap {_size(cache.max_bytes())})")
    if entries:
        width = max(len(e.folder.name) for e in entries)
        print(f"{'NAME':<{width}}  {'SIZE':>10}  {'LAST USED':<16}  {'STATE':<8}  SOURCE")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"{e.folder.name:<{width}}  {_size(e.bytes):>10}  {used:<16}  {e.status:<8}  {e.source}")
    kernels = cache.triton_bytes()
    if kernels:
        print(f"Triton's compiled kernels: {_size(kernels)} in {cache.cache_root() / 'triton'}")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    if not args.names and not args.all:
        raise ValueError("name the entries to remove (see `hybridrt cache ls`), or pass --all")
    if args.names and args.all:
        raise ValueError("give entry names or --all, not both")
    entries = cache.entries()
    chosen = entries if args.all else [e for e in entries if any(e.folder.name.startswith(n) for n in args.names)]
    unmatched = [n for n in args.names if not any(e.folder.name.startswith(n) for e in entries)]
    if unmatched:
        raise ValueError(f"no cache entry named {', '.join(unmatched)} (see `hybridrt cache ls`)")
    for e in chosen:
        cache.remove(e)
        print(f"removed {e.folder.name} ({_size(e.bytes)})")
    if args.all:
        removed = cache.remove_triton()
        if removed:
            print(f"removed Triton's kernel cache ({_size(removed)})")
    return 0
