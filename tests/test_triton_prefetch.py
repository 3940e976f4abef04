"""graph_executor.triton_prefetch: the thread leaves Triton's source hash computed for the process (so the first
kernel lookup does not pay for it), without torch having been imported for it."""

from __future__ import annotations

import subprocess
import sys


def test_the_thread_computes_triton_key_without_importing_torch():
    code = """
import sys
from graph_executor import triton_prefetch
triton_prefetch.start().join()
from triton.runtime.cache import triton_key
assert triton_key.cache_info().currsize == 1, "the hash was not computed: Triton's layout changed?"
assert "triton.experimental.gluon" in sys.modules
assert "torch" not in sys.modules, "it would wait on the main thread's import of torch"
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
