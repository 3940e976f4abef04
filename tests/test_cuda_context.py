"""ipc.cuda_context: which --device values name a GPU, argv reading before argparse, and (on a GPU) that the context
made through the driver is the primary context torch then uses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ipc.cuda_context import argv_value, device_ordinal, start


@pytest.mark.parametrize("device, ordinal", [("auto", 0), ("cuda", 0), ("cuda:0", 0), ("cuda:3", 3), ("cpu", None),
                                             ("cuda:x", None), ("mps", None), ("", None)])
def test_device_ordinal(device, ordinal):
    assert device_ordinal(device) == ordinal


def test_argv_value_reads_both_forms_and_the_last_wins():
    assert argv_value(["--model", "m", "--device", "cuda:1"], "--device", "auto") == "cuda:1"
    assert argv_value(["--device=cpu"], "--device", "auto") == "cpu"
    assert argv_value(["--device", "cpu", "--device=cuda"], "--device", "auto") == "cuda"
    assert argv_value(["--model", "m"], "--device", "auto") == "auto"
    assert argv_value(["--device"], "--device", "auto") == "auto"  # no value: argparse will say so
    assert argv_value(["--devices", "x"], "--device", "auto") == "auto"


def test_cpu_starts_nothing():
    assert start("cpu") is None


@pytest.mark.cuda
def test_the_driver_made_context_is_the_one_torch_uses():
    """In a fresh process: the thread retains device 0's primary context before torch is imported; torch's first
    tensor then lives in that context (the current context after torch's init is the primary one)."""
    code = """
import ctypes
from ipc import cuda_context
cuda_context.start("cuda").join()
driver = ctypes.CDLL("libcuda.so.1")
flags, active = ctypes.c_uint(), ctypes.c_int()
assert driver.cuDevicePrimaryCtxGetState(0, ctypes.byref(flags), ctypes.byref(active)) == 0 and active.value == 1
primary = ctypes.c_void_p()
assert driver.cuDevicePrimaryCtxRetain(ctypes.byref(primary), 0) == 0
import torch
x = torch.ones(4, device="cuda") * 2
current = ctypes.c_void_p()
assert driver.cuCtxGetCurrent(ctypes.byref(current)) == 0
assert current.value == primary.value, (current.value, primary.value)
assert x.sum().item() == 8
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
