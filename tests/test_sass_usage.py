"""bench.probes.sass_usage on this machine: a Triton kernel compiled for sm_90 with the installed Triton's compiler
and bundled ptxas, no GPU, and its registers, spills and SASS read back (in a child process: the tests run the
Triton interpreter, whose kernels cannot be compiled)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_a_kernel_compiles_for_hopper_and_reports_its_resources() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.probes.sass_usage", "--suite", "smoke", "--top", "30"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| silu_mul"))
    _, _, registers, stack, instructions, mma, opcodes, _ = row.split("|")
    assert 0 < int(registers) <= 255 and int(stack) == 0 and int(instructions) > 10
    assert mma.strip() == "-"  # an elementwise kernel: no tensor-core op
    assert "LDG" in opcodes and "STG" in opcodes  # gate and up read, the product written
    interpreted = subprocess.run([sys.executable, "-m", "bench.probes.sass_usage", "--suite", "smoke"],
                                 capture_output=True, text=True, env={**env, "TRITON_INTERPRET": "1"}, timeout=240)
    assert interpreted.returncode != 0 and "unset TRITON_INTERPRET" in interpreted.stderr
