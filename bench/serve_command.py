"""The one command line that starts `hybridrt serve` for a benchmark or a probe: a fresh interpreter (nothing imported
in advance, as a user's start), on the given ports. Prefix reuse is off unless asked for: benchmarks send the same
prompts again, whose prefill it would skip."""

from __future__ import annotations

import sys


def serve_command(port: int, http_port: int, *args: str, quiet: bool = False,
                  prefix_reuse: bool = False) -> list[str]:
    """argv of `python -m launch.cli serve` on 127.0.0.1:`port` (native) and `http_port` (HTTP; 0: none), then
    `args` (model, device, ... flags)."""
    return [sys.executable, "-m", "launch.cli", "serve", *(["--quiet"] if quiet else []),
            *([] if prefix_reuse else ["--no-prefix-reuse"]), "--port", str(port), "--http-port", str(http_port),
            *args]
