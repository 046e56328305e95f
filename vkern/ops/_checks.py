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


class PassedChecks:
    """The argument signatures an op's checks accepted, so a call with a signature seen before skips them.

    The checks read only each tensor's shape, dtype and device and the other arguments' types and values: a
    signature holds exactly those, so a signature that passed once passes again. The block glue is called ~24
    times a block with the same few signatures, and its checks (~7 us on a dev box, ~2.5x that on the GPU
    hosts) cost more than building and looking up the key (~2 us). A call that fails its checks is never recorded.
    Measured: ~4 us less a call on an H100 host (run 152; a third of what the dev box's ratio promised).
    """

    _LIMIT = 4096  # (a process that sees ever new shapes starts over rather than growing without bound)

    def __init__(self):
        self._seen = set()

    def __contains__(self, key):
        try:
            return key is not None and key in self._seen
        except TypeError:  # an unhashable argument (a list, say): its checks run on every call
            return False

    def add(self, key):
        if key is not None:
            if len(self._seen) >= self._LIMIT:
                self._seen.clear()
            try:
                self._seen.add(key)
            except TypeError:
                pass


def signature(*args):
    """(shape, dtype, device) of each tensor, (type, value) of anything else (PassedChecks never records a key with
    an unhashable value). The type keeps 1, 1.0 and True apart (they hash alike, and the checks reject a bool eps).
    None under torch.compile (tracing runs the checks every time, as before: no set for dynamo to guard on)."""
    if torch.compiler.is_compiling():
        return None
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.shape, a.dtype, a.device))
        else:
            key.append((type(a), a))
    return tuple(key)
