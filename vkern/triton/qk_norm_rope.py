"""Fused QK prologue: RMSNorm across heads + interleaved 3-axis RoPE + [B, S, H, D] layout, one pass.

One program per token: the row of H*D elements is read once as [pairs, 2] tiles, its mean square
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
    # [pairs, 2] tiles of consecutive elements: contiguous, so loads and stores vectorize; the
    # (even, odd) halves are split apart in registers.
    i = tl.arange(0, BLOCK)
    mask = i < HALF_ROW
    offs = 2 * i[:, None] + tl.arange(0, 2)[None, :]
    mask2 = offs < 2 * HALF_ROW
    x = tl.load(x_ptr + b * stride_xb + s * stride_xs + offs, mask=mask2, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    mean_sq = tl.sum(tl.sum(xf * xf, axis=1), axis=0) / (2 * HALF_ROW)
    r = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(w_ptr + offs, mask=mask2, other=0.0).to(tl.float32)
    # Round where torch's RMSNorm rounds: once, after the weight (fp32 math throughout).
    y = round_to(xf * r * w, dtype, EMULATE_RNE).to(tl.float32)
    if HAS_ROPE:
        j = i % HALF_D  # pair index within the head
        f_offs = b * stride_fb + s * stride_fs + (2 * j[:, None] + tl.arange(0, 2)[None, :]) * stride_fd
        cos, _ = tl.split(tl.load(cos_ptr + f_offs, mask=mask2, other=1.0).to(tl.float32))
        _, sin = tl.split(tl.load(sin_ptr + f_offs, mask=mask2, other=0.0).to(tl.float32))
        ye, yo = tl.split(y)
        y = tl.join(ye * cos - yo * sin, ye * sin + yo * cos)
    tl.store(out_ptr + row * (2 * HALF_ROW) + offs, round_to(y, dtype, EMULATE_RNE), mask=mask2)


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
