"""The Triton interpreter (TRITON_INTERPRET=1, the CPU runs of our kernels) without its repeated language patching.

A kernel launch patches triton.language's builtins to the interpreter's for the launch and restores them after
(`GridExecutor.__call__`). Triton 3.9 also calls `_patch_lang` at every call of a @triton.jit *device* function
inside the kernel (ours, and tl.zeros, tl.sum, tl.max: triton.language.standard's, which see triton.language.core):
each call walks the language modules again (inspect.getmembers, ~1.5 ms) for builtins to replace, and sets the
interpreter's functions for a fixed list of attributes again, in a scope it never restores. Once a module's builtins
are replaced (by the launch, or by an earlier device call, whose replacements stay), that walk replaces nothing and
the attributes get equivalent functions again. A kernel calling such helpers per tile does it thousands of times: a
third or more of some kernel tests' time on the CPU. `install()` skips a device call's patching exactly then: inside
a launch, with every builtin of every language package the function sees already replaced; anything else goes
through Triton's own `_patch_lang` as before. The kernels run the same interpreted operations either way.
"""

from __future__ import annotations

import inspect
import os

_installed = False


def install() -> None:
    """Once per process, where TRITON_INTERPRET=1 and the interpreter has the functions this relies on."""
    global _installed
    if _installed or os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original_patch = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    function = getattr(interpreter, "InterpretedFunction", None)
    if original_patch is None or executor is None or function is None:
        return
    _installed = True
    launch_call = executor.__call__
    device_call = function.__call__
    is_builtin = tl.core.is_builtin

    def a_builtin(package) -> str:
        return next(name for name, member in inspect.getmembers(package) if is_builtin(member))

    # What `_patch_lang` walks for a language module (tl or tl.core; their tensor class is one class), each package
    # by one of its builtins, named before any patching. A package's builtins are replaced all together (one walk
    # replaces every one still there) and put back all together (by the scope that replaced them), so one of them
    # tells whether the walk would replace anything.
    sentinels = {id(lang): [(pkg, a_builtin(pkg)) for pkg in (lang, lang.tensor, *((tl.math,) if lang is tl else ()))]
                 for lang in (tl, tl.core)}
    descriptor = (tl.core.tensor_descriptor_base, a_builtin(tl.core.tensor_descriptor_base))
    langs_of: dict = {}  # device function -> the language modules its globals hold
    launches = [0]  # kernel launches running now (0 or 1: a kernel cannot launch one)
    device_calls = [0]

    def replaced(package, name) -> bool:
        return not is_builtin(getattr(package, name, None))

    def nothing_to_patch(fn) -> bool:
        langs = langs_of.get(fn)
        if langs is None:
            seen = fn.__globals__.values()
            langs = langs_of[fn] = [id(v) for v in seen if inspect.ismodule(v) and v in (tl, tl.core)]
        return bool(langs) and replaced(*descriptor) and all(replaced(pkg, name) for lang in langs
                                                             for pkg, name in sentinels[lang])

    class _NothingToRestore:
        def restore(self) -> None:
            pass

    def patch_lang(fn):
        if device_calls[0] and launches[0] and nothing_to_patch(fn):
            return _NothingToRestore()
        return original_patch(fn)

    def counted(call, running: list[int]):
        """`call` with `running[0]` counting the calls in progress."""
        def wrapped(self, *args, **kwargs):
            running[0] += 1
            try:
                return call(self, *args, **kwargs)
            finally:
                running[0] -= 1
        return wrapped

    interpreter._patch_lang = patch_lang
    executor.__call__ = counted(launch_call, launches)
    function.__call__ = counted(device_call, device_calls)
