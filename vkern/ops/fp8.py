"""fp8 e4m3 quantize / dequantize / linear. Backends: cuda (csrc/fp8_quant.cu), reference."""
import torch

from ..reference import fp8 as ref
from . import _backend
from ._checks import FLOATS, check_tensor

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@_backend.register("fp8_quantize")
def _quantize_candidates(device, dtype):
    return {"cuda": _backend.cuda_ext_usable(device), "reference": None}


def fp8_quantize(x: torch.Tensor, granularity: str = "tensor"):
    """Quantize to e4m3 with a per-tensor or per-row (last dimension) fp32 scale.
    Returns (q, scale); x ~= q.float() * scale. See vkern/reference/fp8.py for the exact numerics."""
    check_tensor("x", x, dtypes=FLOATS)
    if granularity not in ref.GRANULARITIES:
        raise ValueError(f"granularity: expected one of {ref.GRANULARITIES}, got {granularity!r}")
    if granularity == "row" and x.dim() == 0:
        raise ValueError("x: granularity='row' needs at least 1 dimension, got a 0-dim tensor")
    return torch.ops.vkern.fp8_quantize(x, granularity)


@torch.library.custom_op("vkern::fp8_quantize", mutates_args=())
def _fp8_quantize(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend.choose("fp8_quantize", _quantize_candidates(x.device, x.dtype))
    if backend == "cuda":
        return _quantize_cuda(x, granularity)
    return ref.fp8_quantize(x, granularity)


@_fp8_quantize.register_fake
def _(x, granularity):
    scale_shape = () if granularity == "tensor" else (*x.shape[:-1], 1)
    return x.new_empty(x.shape, dtype=ref.E4M3), x.new_empty(scale_shape, dtype=torch.float32)


def _quantize_cuda(x, granularity):
    from .._ext import cuda_ext

    C = cuda_ext()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    q = torch.empty(x.shape, dtype=ref.E4M3, device=x.device)
    code = _DTYPE_CODE[x.dtype]
    with torch.cuda.device(x.device):
        if granularity == "tensor":
            xc = x.contiguous()
            scale = torch.empty((), dtype=torch.float32, device=x.device)
            workspace = torch.empty((), dtype=torch.int32, device=x.device)
            C.fp8_quantize_tensorwise(xc.data_ptr(), code, xc.numel(), q.data_ptr(), scale.data_ptr(),
                                      workspace.data_ptr(), stream)
        else:
            cols = x.shape[-1]
            x2 = (x if x.stride(-1) == 1 else x.contiguous()).reshape(-1, cols)
            scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
            C.fp8_quantize_rowwise(x2.data_ptr(), code, x2.shape[0], cols, x2.stride(0) if x2.shape[0] > 1 else cols,
                                   q.data_ptr(), scale.data_ptr(), stream)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    check_tensor("q", q, dtypes=(ref.E4M3,))
    check_tensor("scale", scale, dtypes=(torch.float32,), device=q.device)
    return ref.fp8_dequantize(q, scale, dtype)


def fp8_linear(x: torch.Tensor, q_weight: torch.Tensor, weight_scale: torch.Tensor, bias=None):
    """Storage-mode linear: e4m3 weight with its scale, compute in x's dtype (reference path for now)."""
    check_tensor("x", x, dtypes=FLOATS)
    check_tensor("q_weight", q_weight, dtypes=(ref.E4M3,), ndim=2, device=x.device)
    if x.shape[-1] != q_weight.shape[1]:
        raise ValueError(f"x: expected last dimension {q_weight.shape[1]} (q_weight's in_features), "
                         f"got shape {tuple(x.shape)}")
    return ref.fp8_linear(x, q_weight, weight_scale, bias)
