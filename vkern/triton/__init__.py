"""@triton.jit kernels, one file per capability. Import lazily: triton is optional."""
