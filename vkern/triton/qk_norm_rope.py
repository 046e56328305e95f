"""Fused QK prologue: RMSNorm across heads + interleaved 3-axis RoPE + [B, S, H, D] layout, one pass.

One program per token: the row of H*D elements is read once as a [heads, head_dim] tile, its mean square
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
    S, H,
    stride_xb, stride_xs,
    stride_fb, stride_fs, stride_fd,
    eps,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // S
    s = row % S
    # The token's row as a [heads, head_dim] tile: contiguous along head_dim (a constexpr), so loads
    # and stores are 16-byte vectors; the RoPE pairs are split apart in registers.
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = h < H
    if BLOCK_D != HEAD_DIM:
        mask = mask & (d < HEAD_DIM)
    offs = h * HEAD_DIM + d
    x = tl.load(x_ptr + b * stride_xb + s * stride_xs + offs, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    mean_sq = tl.sum(tl.sum(xf * xf, axis=1), axis=0) / (H * HEAD_DIM)
    r = 1.0 / tl.sqrt(mean_sq + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Round where torch's RMSNorm rounds: once, after the weight (fp32 math throughout).
    y = round_to(xf * r * w, dtype, EMULATE_RNE).to(tl.float32)
    if HAS_ROPE:
        # One table row per token, shared by all heads; diffusers uses cos[0::2] and sin[1::2].
        f = tl.arange(0, BLOCK_D)
        f_ptrs = b * stride_fb + s * stride_fs + f * stride_fd
        cos, _ = tl.split(tl.reshape(tl.load(cos_ptr + f_ptrs, mask=f < HEAD_DIM, other=1.0).to(tl.float32),
                                     (BLOCK_D // 2, 2)))
        _, sin = tl.split(tl.reshape(tl.load(sin_ptr + f_ptrs, mask=f < HEAD_DIM, other=0.0).to(tl.float32),
                                     (BLOCK_D // 2, 2)))
        ye, yo = tl.split(tl.reshape(y, (BLOCK_H, BLOCK_D // 2, 2)))
        y = tl.reshape(tl.join(ye * cos[None, :] - yo * sin[None, :], ye * sin[None, :] + yo * cos[None, :]),
                       (BLOCK_H, BLOCK_D))
    tl.store(out_ptr + row * (H * HEAD_DIM) + offs, round_to(y, dtype, EMULATE_RNE), mask=mask)


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
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim)
    _qk_norm_rope_kernel[(B * S,)](
        x, weight, freqs_cos, freqs_sin, out,
        S, heads,
        x.stride(0), x.stride(1),
        fb, fs, fd,
        eps,
        HEAD_DIM=head_dim, HAS_ROPE=has_rope, BLOCK_H=block_h, BLOCK_D=block_d,
        EMULATE_RNE=interpreting(), num_warps=max(1, min(8, block_h * block_d // 512)),
    )
    return out
