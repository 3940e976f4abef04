"""Triton's per-process start-up work, done in a thread while the executor imports torch (no torch here).

At the first kernel lookup of a process Triton hashes its own sources and libtriton (`triton_key`, ~0.4 s on the
H200 host) and imports its gluon package (~0.13 s): both used to land inside the first graph's warm-up, on the path
to ready. File reads and hashing release the GIL, so a thread started before `import torch` (3.5-4 s there) hides
them; the results are cached for the process.
"""

from __future__ import annotations

import threading


def _run() -> None:
    try:
        from triton.runtime.cache import triton_key

        triton_key()
        import triton.experimental.gluon  # noqa: F401 - the first compile lookup imports it
    except Exception:  # noqa: BLE001 - no Triton or another layout: the first kernel pays for it, as before
        pass


def start() -> threading.Thread:
    thread = threading.Thread(target=_run, name="triton-key", daemon=True)
    thread.start()
    return thread
