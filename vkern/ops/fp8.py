"""fp8 e4m3 quantize / dequantize / linear. Backends: cuda (csrc/fp8_quant.cu), reference."""
import torch

from ..reference import fp8 as ref
from . import _backend
from ._checks import DTYPE_CODE, FLOATS, check_tensor
from ._custom_op import custom_op



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
    return _fp8_quantize(x, granularity)


@custom_op("vkern::fp8_quantize", mutates_args=())
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
    code = DTYPE_CODE[x.dtype]
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


def _check_scale(name, scale, q):
    check_tensor(name, scale, dtypes=(torch.float32,), device=q.device)
    if scale.numel() != 1 and tuple(scale.shape) != (*q.shape[:-1], 1):
        raise ValueError(f"{name}: expected one fp32 scale or shape {(*q.shape[:-1], 1)}, got {tuple(scale.shape)}")


@_backend.register("fp8_dequantize")
def _dequantize_candidates(device, dtype):
    return {"cuda": _backend.cuda_ext_usable(device), "reference": None}


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
    """q.float() * scale rounded to `dtype` (scale: one value, or one per row of q)."""
    check_tensor("q", q, dtypes=(ref.E4M3,))
    _check_scale("scale", scale, q)
    if dtype not in FLOATS:
        raise TypeError(f"dtype: expected one of {FLOATS}, got {dtype}")
    return _fp8_dequantize(q, scale, dtype)


@custom_op("vkern::fp8_dequantize", mutates_args=())
def _fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    backend = _backend.choose("fp8_dequantize", _dequantize_candidates(q.device, dtype))
    if backend == "cuda" and q.dim() >= 1:
        from .._ext import cuda_ext

        qc, sc = q.contiguous(), scale.contiguous()
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        with torch.cuda.device(q.device):
            cuda_ext().fp8_dequantize(qc.view(torch.uint8).data_ptr(), sc.data_ptr(), sc.numel() == 1,
                                      qc.numel() // qc.shape[-1], qc.shape[-1], out.data_ptr(), DTYPE_CODE[dtype],
                                      torch.cuda.current_stream(q.device).cuda_stream)
        return out
    return ref.fp8_dequantize(q, scale, dtype)


@_fp8_dequantize.register_fake
def _(q, scale, dtype):
    return q.new_empty(q.shape, dtype=dtype)


def _check_linear(x, q_weight, weight_scale, bias):
    check_tensor("x", x, dtypes=FLOATS)
    _check_linear_weights(x, q_weight, weight_scale, bias)


def _check_linear_weights(x, q_weight, weight_scale, bias):
    check_tensor("q_weight", q_weight, dtypes=(ref.E4M3,), ndim=2, device=x.device)
    _check_scale("weight_scale", weight_scale, q_weight)
    if x.shape[-1] != q_weight.shape[1]:
        raise ValueError(f"{'xq' if x.dtype == ref.E4M3 else 'x'}: expected last dimension {q_weight.shape[1]} "
                         f"(q_weight's in_features), "
                         f"got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=FLOATS, ndim=1, device=x.device)
        if bias.shape[0] != q_weight.shape[0]:
            raise ValueError(f"bias: expected shape ({q_weight.shape[0]},), got {tuple(bias.shape)}")


def fp8_linear(x: torch.Tensor, q_weight: torch.Tensor, weight_scale: torch.Tensor, bias=None):
    """Storage mode: e4m3 weight with its scale; the weight is dequantized to x's dtype into a
    transient buffer (the caching allocator recycles it layer after layer) and multiplied by the
    framework's GEMM (cuBLAS on CUDA)."""
    _check_linear(x, q_weight, weight_scale, bias)
    return torch.nn.functional.linear(x, fp8_dequantize(q_weight, weight_scale, x.dtype), bias)


@_backend.register("fp8_linear_compute")
def _compute_candidates(device, dtype):
    if device.type != "cuda":
        return {"scaled_mm": f"needs a CUDA tensor (got {device.type})", "reference": None}
    ok = dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 9)
    return {"scaled_mm": None if ok else "needs bf16 activations on an fp8 GPU (sm_89+)", "reference": None}


def fp8_linear_compute(x: torch.Tensor, q_weight: torch.Tensor, weight_scale: torch.Tensor, bias=None,
                       fast_accum: bool = True):
    """Compute mode: x quantized per token to e4m3 (vkern's CUDA kernel), then an fp8 x fp8 GEMM on
    the tensor cores (cuBLASLt through torch._scaled_mm) with both scales, the bias and a bf16
    output. in_features and out_features must be multiples of 16 (the caller falls back otherwise).
    fast_accum: cuBLASLt's faster fp8 accumulation; on an H200 it ran 1.10-1.13x faster at Wan-14B
    shapes with the same SQNR (31.5 dB at K = 5120 and 13824: the e4m3 rounding dominates)."""
    _check_linear(x, q_weight, weight_scale, bias)
    if q_weight.shape[0] % 16 or q_weight.shape[1] % 16:
        raise ValueError(f"q_weight: fp8 compute needs both dimensions multiples of 16, got {tuple(q_weight.shape)}")
    return _fp8_linear_compute(x, q_weight, weight_scale, bias, bool(fast_accum))


@custom_op("vkern::fp8_linear_compute", mutates_args=())
def _fp8_linear_compute(x: torch.Tensor, q_weight: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:
    backend = _backend.choose("fp8_linear_compute", _compute_candidates(x.device, x.dtype))
    if backend == "reference":
        return ref.fp8_linear_compute(x, q_weight, weight_scale, bias)
    xq, x_scale = fp8_quantize(x.reshape(-1, x.shape[-1]), "row")
    return _scaled_mm(xq, x_scale, q_weight, weight_scale, bias, fast_accum, x.dtype).reshape(
        *x.shape[:-1], q_weight.shape[0])


@_fp8_linear_compute.register_fake
def _(x, q_weight, weight_scale, bias, fast_accum):
    return x.new_empty((*x.shape[:-1], q_weight.shape[0]))


def _scaled_mm(xq, x_scale, q_weight, weight_scale, bias, fast_accum, out_dtype):
    """torch._scaled_mm (cuBLASLt) on a 2-D per-token-quantized activation and the per-channel weight."""
    w_scale = weight_scale.reshape(1, -1) if weight_scale.numel() > 1 else weight_scale.reshape(1, 1).expand(1, q_weight.shape[0])
    return torch._scaled_mm(xq, q_weight.t(), scale_a=x_scale, scale_b=w_scale.contiguous(),
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def fp8_linear_prequantized(xq: torch.Tensor, x_scale: torch.Tensor, q_weight: torch.Tensor,
                            weight_scale: torch.Tensor, bias=None, fast_accum: bool = True,
                            out_dtype: torch.dtype = torch.bfloat16):
    """Compute mode on an activation that is already e4m3 with per-token scales (xq [..., K], x_scale
    fp32 [..., 1], as vkern's fused LayerNorm+modulate and GELU kernels emit it): the GEMM of
    fp8_linear_compute without its quantization pass. fp8_linear_compute(x, ...) equals this on
    fp8_quantize(x, "row") bit for bit. Returns [..., N] in out_dtype (the activation's own dtype)."""
    check_tensor("xq", xq, dtypes=(ref.E4M3,))
    if xq.dim() == 0:
        raise ValueError("xq: expected shape (..., in_features), got a 0-dim tensor")
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,), device=xq.device)
    if tuple(x_scale.shape) != (*xq.shape[:-1], 1):
        raise ValueError(f"x_scale: expected shape {(*xq.shape[:-1], 1)} (one scale per token of xq), "
                         f"got {tuple(x_scale.shape)}")
    if out_dtype not in FLOATS:
        raise TypeError(f"out_dtype: expected one of {FLOATS}, got {out_dtype}")
    _check_linear_weights(xq, q_weight, weight_scale, bias)
    if q_weight.shape[0] % 16 or q_weight.shape[1] % 16:
        raise ValueError(f"q_weight: fp8 compute needs both dimensions multiples of 16, got {tuple(q_weight.shape)}")
    return _fp8_linear_prequantized(xq, x_scale, q_weight, weight_scale, bias, bool(fast_accum), out_dtype)


@custom_op("vkern::fp8_linear_prequantized", mutates_args=())
def _fp8_linear_prequantized(xq: torch.Tensor, x_scale: torch.Tensor, q_weight: torch.Tensor,
                             weight_scale: torch.Tensor, bias: torch.Tensor | None, fast_accum: bool,
                             out_dtype: torch.dtype) -> torch.Tensor:
    backend = _backend.choose("fp8_linear_compute", _compute_candidates(xq.device, out_dtype))
    if backend == "reference":
        return ref.fp8_scaled_mm(xq, x_scale, q_weight, weight_scale, bias, out_dtype)
    K = xq.shape[-1]
    out = _scaled_mm(xq.reshape(-1, K).contiguous(), x_scale.reshape(-1, 1).contiguous(), q_weight, weight_scale,
                     bias, fast_accum, out_dtype)
    return out.reshape(*xq.shape[:-1], q_weight.shape[0])


@_fp8_linear_prequantized.register_fake
def _(xq, x_scale, q_weight, weight_scale, bias, fast_accum, out_dtype):
    return xq.new_empty((*xq.shape[:-1], q_weight.shape[0]), dtype=out_dtype)
