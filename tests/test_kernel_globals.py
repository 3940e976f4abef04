"""Every module global a @triton.jit function reads is one the Triton compiler accepts.

The CPU suite runs the kernels under the Triton interpreter, which reads any Python global; the compiler on a GPU
accepts only tl.constexpr values, other jit functions and modules. A plain `COMBINE_SPLITS = 16` read inside a
kernel passed every CPU test and failed 49 kernel tests on the H200 (fourteenth session). This catches that class
of bug here, without a card.
"""
from __future__ import annotations

import builtins
import dis
import importlib
import pkgutil
import types

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from triton.runtime.jit import KernelInterface  # noqa: E402 - after the importorskip

PACKAGES = ("graph_executor.kernels", "bench.probes")


def _python_function(kernel: KernelInterface) -> types.FunctionType:
    """The Python function under a jit, interpreted or autotuned kernel."""
    value = kernel
    while isinstance(value, KernelInterface):
        value = value.fn
    return value


def _kernels() -> list[tuple[str, types.FunctionType]]:
    found = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            module = importlib.import_module(f"{package}.{info.name}")
            for name, value in vars(module).items():
                if isinstance(value, KernelInterface):
                    fn = _python_function(value)
                    if fn.__module__ == module.__name__:  # defined here, not imported
                        found.append((f"{module.__name__}.{name}", fn))
    return found


def _global_reads(code: types.CodeType) -> set[str]:
    """Names a function's body (and the bodies nested in it) loads as globals."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_reads(const)
    return names


def _accepted(value: object) -> bool:
    """Modules, jit functions, constexpr values, and what Gluon kernels also call: constexpr functions (run at
    compile time) and the dialect's builtins (`warpgroup_mma`, ...)."""
    from triton.runtime.jit import ConstexprFunction

    return (isinstance(value, (types.ModuleType, KernelInterface, tl.constexpr, ConstexprFunction))
            or getattr(value, "__triton_builtin__", False))


KERNELS = _kernels()


def test_the_kernels_were_found():
    names = {name for name, _ in KERNELS}
    assert "graph_executor.kernels.decode_attention._combine" in names
    assert len(names) > 20


@pytest.mark.parametrize("name,fn", KERNELS, ids=[name for name, _ in KERNELS])
def test_a_kernel_reads_only_globals_the_compiler_accepts(name, fn):
    bad = []
    for global_name in sorted(_global_reads(fn.__code__)):
        if global_name in fn.__globals__:
            value = fn.__globals__[global_name]
            if not _accepted(value):
                bad.append(f"{global_name} = {value!r} ({type(value).__name__})")
        elif not hasattr(builtins, global_name):
            bad.append(f"{global_name} (undefined)")
    assert not bad, f"{name} reads globals the Triton compiler rejects (make them tl.constexpr): {bad}"
