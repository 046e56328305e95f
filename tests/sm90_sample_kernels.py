"""Two kernels for tests/test_triton_sm90.py's check of the check (importable without the interpreter)."""
import triton
import triton.language as tl


@triton.jit
def _interpreter_only_kernel(x_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    for i in range(4):  # the interpreter runs Python's break; the compiler has no break
        if i == 1:
            break
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)


@triton.jit
def _fine_kernel(x_ptr, n, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)
