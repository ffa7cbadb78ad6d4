"""Triton's interpreter (TRITON_INTERPRET=1, kernels on a CPU), without its cost per @triton.jit helper call.

The interpreter runs every program of a launch in Python, with triton.language patched to numpy once per
launch. A call of a @triton.jit helper inside the kernel patches triton.language again: it walks every
builtin of the language modules (inspect.getmembers), about 1.3 ms a call whatever the helper does. The
kernels here call helpers in their inner loops (loads, RoPE, the online softmax step), so the re-patching is
most of a program's time. `install()` makes a helper call made during a launch skip the re-patch when every
language module the helper sees (the same module objects) has been patched in this launch, by the launch or
by an earlier helper call (Triton's patches of a helper call are never undone): the helper runs the same code
on the same patched language. Outside a launch, and for the first helper of a launch that sees another module,
Triton's own call runs. Nothing changes when the interpreter is off, or on a Triton whose interpreter lacks
these functions.
"""
import inspect

import triton
import triton.language as tl


def _language_modules(fn, cache={}):
    """The triton.language modules a jit function's globals hold, as ids: what _patch_lang patches. Keyed by the
    globals' size too: rewriting a function adds the interpreter's globals to its module's."""
    key = (id(fn.__globals__), len(fn.__globals__))
    if key not in cache:
        cache[key] = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
    return cache[key]


def install():
    """Idempotent; a no-op unless Triton's interpreter is on."""
    if not triton.knobs.runtime.interpret:
        return
    from triton.runtime import interpreter
    grid = getattr(interpreter, "GridExecutor", None)
    helper = getattr(interpreter, "InterpretedFunction", None)
    if grid is None or helper is None or not hasattr(interpreter, "_patch_lang") or hasattr(helper, "_gundam_fast"):
        return
    launch_call, helper_call = grid.__call__, helper.__call__
    running = []    # per running launch (innermost last): the language modules patched for it so far

    def launch(self, *args, **kwargs):
        running.append(set(_language_modules(self.fn)))
        try:
            return launch_call(self, *args, **kwargs)
        finally:
            running.pop()

    def call(self, *args, **kwargs):
        if not running:
            return helper_call(self, *args, **kwargs)
        langs = _language_modules(self.fn)
        if not langs <= running[-1]:
            # Triton's call patches them (triton.language.core for tl.sum and the other standard-library helpers),
            # and nothing undoes that before the launch ends
            running[-1] |= langs
            return helper_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:   # as Triton's own helper call reports an error
            raise interpreter.InterpreterError(repr(e)) from e

    grid.__call__, helper.__call__ = launch, call
    helper._gundam_fast = True
