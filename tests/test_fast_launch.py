"""vkern/triton/_launch.py: FastLaunch launches the kernel Triton would, with less host work.

On the GPU: after a key's first launch (through JITFunction.run), later launches with the same key skip it, and
arguments that Triton specializes differently (a pointer's 16-byte alignment, a stride's divisibility by 16, an
integer equal to 1) get their own compiled kernel: every result matches the plain launch bit for bit.
On the CPU (the interpreter) it is the plain launch.
"""
import pytest
import torch

from vkern.ops import block_glue as ops_glue
from vkern.reference import block_glue as ref
from vkern.triton import _launch
from vkern.triton import block_glue as tri


def _operands(tokens, dim, device, offset):
    """x, y [1, tokens, dim] bf16 starting `offset` elements into their buffers (offset 1: 2-byte aligned)."""
    def make():
        buf = torch.randn(tokens * dim + offset, dtype=torch.bfloat16, device=device)
        return buf[offset:].view(1, tokens, dim)
    return make(), make(), torch.randn(1, 1, dim, dtype=torch.bfloat16, device=device)


def _launch_gate_residual(launch, x, y, gate):
    """vkern.triton.block_glue.gate_residual's launch, through `launch` (FastLaunch or the plain kernel[grid])."""
    out = torch.empty_like(x)
    mod_dt, prod_dt, out_dt = (tri._TL[d] for d in ops_glue.gate_rounding(x, y, gate, None, True))
    block, warps = tri._launch_config(x.shape[2])
    launch((x.shape[1],), x, y, gate, gate, out, x.shape[1], x.stride(0), x.stride(1), y.stride(0), y.stride(1), 0, 0,
           out.stride(0), out.stride(1), 0.0, D=x.shape[2], BLOCK=block, HAS_TABLE=False,
           EMULATE_RNE=tri.interpreting(), RMS_Y=False, MOD_DT=mod_dt, PROD_DT=prod_dt, OUT_DT=out_dt,
           num_warps=warps, enable_fp_fusion=False)
    return out


def _plain(grid, *args, **kwargs):
    return tri._gate_residual_kernel[grid](*args, **kwargs)


@pytest.mark.gpu
def test_gpu_fast_launch_matches_plain_launch_across_specializations(monkeypatch):
    if not _launch._SUPPORTED:
        pytest.skip(f"FastLaunch covers triton 3.6 only (have {_launch.triton.__version__}): the plain launch runs")
    fast = _launch.FastLaunch(tri._gate_residual_kernel)
    # (tokens, dim, offset): aligned and 2-byte-aligned pointers, strides divisible by 16 or not, one token
    # (S == 1 is specialized as a constant)
    cases = [(64, 128, 0), (64, 128, 1), (3, 104, 0), (3, 104, 1), (1, 128, 0), (64, 128, 0), (3, 104, 1)]
    plain_runs = []
    real_run = type(tri._gate_residual_kernel).run
    monkeypatch.setattr(type(tri._gate_residual_kernel), "run",
                        lambda self, *a, **k: plain_runs.append(1) or real_run(self, *a, **k))
    for tokens, dim, offset in cases * 2:
        x, y, gate = _operands(tokens, dim, "cuda", offset)
        got = _launch_gate_residual(fast, x, y, gate)
        expected = _launch_gate_residual(_plain, x, y, gate)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(got, ref.gate_residual(x, y, gate, None, True), rtol=0, atol=0)
    keys = len(fast._compiled)
    assert keys == 5, "one compiled kernel per distinct specialization (the 5 distinct cases)"
    # every plain launch goes through JITFunction.run, FastLaunch's only for each key's first launch
    assert len(plain_runs) == 2 * len(cases) + keys


@pytest.mark.gpu
def test_gpu_fast_launch_leaves_launch_hooks_their_launches():
    """With a launch hook installed (profilers), every launch goes through JITFunction.run, which calls it."""
    if not _launch._SUPPORTED:
        pytest.skip("FastLaunch covers triton 3.6 only")
    fast = _launch.FastLaunch(tri._gate_residual_kernel)
    x, y, gate = _operands(8, 128, "cuda", 0)
    _launch_gate_residual(fast, x, y, gate)  # compiled and keyed
    seen = []
    hook = seen.append
    _launch.knobs.runtime.launch_enter_hook.add(hook)
    try:
        _launch_gate_residual(fast, x, y, gate)
    finally:
        _launch.knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 1
    _launch_gate_residual(fast, x, y, gate)
    assert len(seen) == 1, "no hook, no call"


def test_fast_launch_is_the_plain_launch_in_the_interpreter():
    """CPU (TRITON_INTERPRET=1): the interpreter's kernels have no parameters to plan with; it launches plainly."""
    if tri.interpreting() is False:
        pytest.skip("the interpreter is not on")
    fast = _launch.FastLaunch(tri._gate_residual_kernel)
    assert fast._plan is None
    x, y, gate = _operands(5, 64, "cpu", 1)
    torch.testing.assert_close(_launch_gate_residual(fast, x, y, gate), ref.gate_residual(x, y, gate, None, True),
                               rtol=0, atol=0)
