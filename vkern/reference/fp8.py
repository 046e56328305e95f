"""fp8 e4m3 quantization, the spec for csrc/fp8_quant.cu (bit for bit).

    amax  = max |x| over the group (the whole tensor, or each row = last dimension); NaN propagates
    scale = max(amax, 1e-12) * fp32(1 / 448)  fp32, one correctly rounded multiply
    q     = e4m3(clamp(x * (1 / scale), -448, 448))   round to nearest even, saturating
"""
import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# The scale is a multiply by this fp32 constant, not a division by 448: torch's CUDA `t / 448.0`
# multiplies by a reciprocal while its CPU path divides, so a division would not be one function.
E4M3_INV = float(torch.tensor(1.0) / torch.tensor(E4M3_MAX))
GRANULARITIES = ("tensor", "row")
INT8_MAX = 127.0
INT8_INV = float(torch.tensor(1.0) / torch.tensor(INT8_MAX))  # int8 scales: amax * fp32(1/127)


def fp8_scale(amax):
    return amax.float().clamp(min=1e-12) * E4M3_INV


def fp8_quantize(x, granularity="tensor"):
    """Returns (q, scale): q has x's shape in e4m3; scale is a 0-dim fp32 tensor ("tensor") or has
    shape x.shape[:-1] + (1,) ("row": per output channel for weights, per token for activations)."""
    xf = x.float()
    if granularity == "tensor":
        amax = xf.abs().amax()
    elif granularity == "row":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    scale = fp8_scale(amax)
    q = (xf * (1.0 / scale)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def fp8_dequantize(q, scale, dtype=torch.bfloat16):
    return (q.float() * scale).to(dtype)


def fp8_linear(x, q_weight, weight_scale, bias=None):
    """Storage mode: y = x @ dequant(W)^T + b, in x's dtype (W dequantized to x's dtype first)."""
    return F.linear(x, fp8_dequantize(q_weight, weight_scale, x.dtype), bias)


def fp8_linear_compute(x, q_weight, weight_scale, bias=None):
    """Compute mode: activations quantized per token, an e4m3 x e4m3 product accumulated in fp32,
    both scales applied to the fp32 result, bias added, one rounding to x's dtype."""
    xq, x_scale = fp8_quantize(x, "row")
    return fp8_scaled_mm(xq, x_scale, q_weight, weight_scale, bias, x.dtype)


def fp8_scaled_mm(xq, x_scale, q_weight, weight_scale, bias=None, out_dtype=torch.bfloat16):
    """The GEMM of compute mode on an activation already quantized per token (xq e4m3 [..., K], x_scale
    fp32 [..., 1], e.g. by a fused LayerNorm or GELU): (xq @ q_weight^T) accumulated in fp32, times both
    scales, plus bias, one rounding to out_dtype."""
    acc = (xq.float() @ q_weight.float().T) * x_scale * weight_scale.reshape(1, -1)
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)
