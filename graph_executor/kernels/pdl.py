"""Programmatic dependent launch (Hopper and later) for the decode step's kernels.

A kernel launched with it may be dispatched while the kernel before it on the stream is still running: its
programs first wait (`griddepcontrol.wait`) until that kernel has finished and its writes are visible, so no
load or store of theirs can race with it, and then let the next kernel be dispatched (`launch_dependents`).
What it removes is the gap between two kernels of a step (launch, program dispatch, the last wave's tail): a
LLaMA-2-7B decode step has ~225 such boundaries and a SmolLM2-135M step ~210 in well under a millisecond.
CUDA graph capture keeps the dependency (a programmatic edge). A kernel launched without it after one launched
with it waits for it as usual, so the two kinds mix freely in one step.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch
import triton
import triton.language as tl


def supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


Plan = TypeVar("Plan")


def with_pdl(plan: Plan) -> Plan:
    """A step's plan (a dataclass of per-projection launch configs, each with a `pdl` field; None where a
    projection takes another path) with every config launched dependently."""
    return dataclasses.replace(plan, **{f.name: dataclasses.replace(c, pdl=True)
                                        for f in dataclasses.fields(plan) if (c := getattr(plan, f.name)) is not None})


def with_early_weights(plan: Plan) -> Plan:
    """A step's plan with every config's `early` set: the GEMVs load their (first) weights before they wait for the
    kernel before them (`wait_for_prior`), so that with PDL those loads overlap that kernel's last wave. The
    weights are constant during a step, so no load can race; only what the previous kernel writes (the
    activation, the residual, the split-K scratch) is read after the wait."""
    return dataclasses.replace(plan, **{f.name: dataclasses.replace(c, early=True)
                                        for f in dataclasses.fields(plan) if (c := getattr(plan, f.name)) is not None})


def launch_options(pdl: bool) -> dict:
    """Extra launch keywords of a kernel launched with (True) or without programmatic dependent launch."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def wait_for_prior(PDL: tl.constexpr):
    """First thing in a kernel that may be launched with PDL: after this, the previous kernel's writes are visible.
    The next kernel may then be dispatched once every program has passed here. (Measured, 42nd session, H200: the
    attention's split and reduce kernels letting it be dispatched only once every program has ended were 0.2-0.8%
    slower on 7B and 8B, 0.6-1.9% on 1B, 6% on SmolLM2.)"""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
