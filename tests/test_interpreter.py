"""gundam.kernels.interpreter: @triton.jit helper calls in Triton's interpreter without re-patching the language
each time (conftest.py installs it), same results."""
import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as triton_interpreter

from gundam.kernels import interpreter
from testutils import assert_close


@triton.jit
def _scaled(x, s):
    return x * s


@triton.jit
def _fails(x):
    return x + tl.load(x)     # a pointer plus a value of another pointer's type: an error


@triton.jit
def _rows_kernel(x_ptr, y_ptr, C, BLOCK: tl.constexpr, STEPS: tl.constexpr, FAIL: tl.constexpr):
    # per row: y = sum over STEPS of x * step, then minus the row's mean (tl.sum: a standard-library helper)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < C
    x = tl.load(x_ptr + row * C + offs, mask=ok, other=0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(STEPS):
        acc += _scaled(x, step * 1.0)
    if FAIL:
        acc = _fails(x_ptr)
    acc = acc - tl.sum(acc, axis=0) / C
    tl.store(y_ptr + row * C + offs, acc, mask=ok)


def run(x, steps, fail=False):
    y = torch.empty_like(x)
    _rows_kernel[(x.shape[0],)](x, y, x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]), STEPS=steps, FAIL=fail)
    return y


def test_helpers_patch_once_per_launch(monkeypatch):
    assert getattr(triton_interpreter.InterpretedFunction, "_gundam_fast", False), "conftest installs it"
    interpreter.install()                                  # twice: nothing changes
    calls = []
    inner = triton_interpreter._patch_lang
    monkeypatch.setattr(triton_interpreter, "_patch_lang", lambda fn: (calls.append(fn.__name__), inner(fn))[1])
    x = torch.randn(37, 23, generator=torch.Generator().manual_seed(0))
    steps = 5
    got = run(x, steps)
    acc = x * sum(range(steps))
    assert_close(got, acc - acc.mean(1, keepdim=True), 1e-5, 1e-5, "rows")
    # the launch's patch, then one for the first standard-library helper (tl.zeros: it sees
    # triton.language.core, which the kernel does not), none for tl.sum after it or for _scaled; Triton's own
    # helper calls would patch 37 rows x (1 + 5 + 1) times
    assert calls == ["_rows_kernel", "zeros"], calls
    calls.clear()
    run(x, steps)
    assert calls == ["_rows_kernel", "zeros"], calls      # each launch patches afresh


def test_helper_errors_are_still_reported():
    with pytest.raises(triton_interpreter.InterpreterError):
        run(torch.randn(3, 5), 2, fail=True)


def test_outside_the_interpreter_nothing_changes(monkeypatch):
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    before = triton_interpreter.GridExecutor.__call__, triton_interpreter.InterpretedFunction.__call__
    monkeypatch.delattr(triton_interpreter.InterpretedFunction, "_gundam_fast")
    interpreter.install()
    assert (triton_interpreter.GridExecutor.__call__, triton_interpreter.InterpretedFunction.__call__) == before
