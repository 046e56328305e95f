"""Fused QK prologue: RMSNorm across heads + interleaved 3-axis RoPE + [B, S, H, D] layout, one pass.

One program per token: the row of H*D elements is read once as (even, odd) pairs, its mean square
reduced in fp32, normalized and weighted in fp32 and rounded once to the input dtype (as torch's
RMSNorm does), rotated in fp32 with the cos/sin read straight from diffusers' float64
tables, and written once. No fp32 intermediate touches memory.
"""
import triton
import triton.language as tl

from ._common import interpreting, round_to


@triton.jit
def _qk_norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    S, HALF_D, HALF_ROW,
    stride_xb, stride_xs,
    stride_fb, stride_fs, stride_fd,
    eps,
    HAS_ROPE: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // S
    s = row % S
    i = tl.arange(0, BLOCK)  # pair index within the row: elements 2i and 2i+1
    mask = i < HALF_ROW
    x_row = x_ptr + b * stride_xb + s * stride_xs
    x_even = tl.load(x_row + 2 * i, mask=mask, other=0.0)
    x_odd = tl.load(x_row + 2 * i + 1, mask=mask, other=0.0)
    dtype = x_even.dtype
    xe = x_even.to(tl.float32)
    xo = x_odd.to(tl.float32)
    mean_sq = (tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / (2 * HALF_ROW)
    r = 1.0 / tl.sqrt(mean_sq + eps)
    w_even = tl.load(w_ptr + 2 * i, mask=mask, other=0.0).to(tl.float32)
    w_odd = tl.load(w_ptr + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    # Round where torch's RMSNorm rounds: once, after the weight (fp32 math throughout).
    ye = round_to(xe * r * w_even, dtype, EMULATE_RNE).to(tl.float32)
    yo = round_to(xo * r * w_odd, dtype, EMULATE_RNE).to(tl.float32)
    if HAS_ROPE:
        j = i % HALF_D  # pair index within the head
        f_row = b * stride_fb + s * stride_fs
        cos = tl.load(cos_ptr + f_row + (2 * j) * stride_fd, mask=mask, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + f_row + (2 * j + 1) * stride_fd, mask=mask, other=0.0).to(tl.float32)
        ye, yo = ye * cos - yo * sin, ye * sin + yo * cos
    out_row = out_ptr + row * (2 * HALF_ROW)
    tl.store(out_row + 2 * i, round_to(ye, dtype, EMULATE_RNE), mask=mask)
    tl.store(out_row + 2 * i + 1, round_to(yo, dtype, EMULATE_RNE), mask=mask)


def qk_norm_rope(x, weight, eps, heads, freqs_cos, freqs_sin, out):
    """x [B, S, H*D] (last dim contiguous), weight [H*D], freqs [1|B, S, 1, D] or None; out [B, S, H, D]
    contiguous."""
    B, S, row = x.shape
    head_dim = row // heads
    has_rope = freqs_cos is not None
    if has_rope:
        fb = freqs_cos.stride(0) if freqs_cos.shape[0] > 1 else 0
        fs, fd = freqs_cos.stride(1), freqs_cos.stride(3)
        assert freqs_sin.stride() == freqs_cos.stride()
    else:
        freqs_cos = freqs_sin = x  # never read
        fb = fs = fd = 0
    block = triton.next_power_of_2(row // 2)
    _qk_norm_rope_kernel[(B * S,)](
        x, weight, freqs_cos, freqs_sin, out,
        S, head_dim // 2, row // 2,
        x.stride(0), x.stride(1),
        fb, fs, fd,
        eps,
        HAS_ROPE=has_rope, BLOCK=block, EMULATE_RNE=interpreting(), num_warps=max(1, min(8, block // 256)),
    )
    return out
