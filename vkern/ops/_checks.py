"""Input checks shared by the ops: each error names the argument and what was expected."""
import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# The dtype codes of vkern._C (csrc/fp8_quant.h DType); its tensor-core kernels take the 16-bit ones.
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HALF = (torch.float16, torch.bfloat16)
# Accepted by ops whose reference handles float64 (kernels fall back to it with a warning).
FLOATS_OR_F64 = (*FLOATS, torch.float64)


def check_tensor(name, t, *, dtypes=None, ndim=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d).replace('torch.', '') for d in dtypes]}, "
                        f"got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like the other inputs), got {t.device}")


def check_shape(name, t, expected):
    """expected: tuple with None for any size."""
    shape = t.shape
    if shape == expected:  # the common case, without the per-dimension walk (ops check on every call)
        return
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
