"""Wan VAE glue: RMS norm over channels (WanRMS_norm) + SiLU in one pass, on channels-last data.

The activations run channels-last through vkern's VAE path, so a pixel's C channels are one
contiguous row: a program takes a [BLOCK_P pixels, BLOCK_C channels] tile, reads it once, reduces
each row in fp32 and writes the result once, straight into the causal conv's input buffer (the
`out` view may be the chunk slot of a [cache | chunk] buffer: only its batch stride differs).

Rounding follows diffusers' eager ops one by one (vkern/reference/wan_vae.py rms_norm_silu): the
normalized value, `* scale`, `* gamma`, `+ bias` and SiLU are each rounded to x's dtype, so the only
difference from diffusers is the summation order of the sum of squares. The kernel is memory-bound;
the extra roundings cost nothing and keep the patched VAE close to diffusers (not to fp32).
"""
import triton
import triton.language as tl

from ._common import interpreting, round_to


@triton.jit
def _step(y, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # One eager op's result: rounded to the tensor dtype, then back to fp32 for the next op.
    return round_to(y, dtype, EMULATE_RNE).to(tl.float32)


@triton.jit
def _rms_norm_silu_kernel(
    x_ptr, out_ptr, gamma_ptr, bias_ptr, P, C, stride_xb, stride_ob, scale, eps,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    EMULATE_RNE: tl.constexpr, VARIANT: tl.constexpr = "exact",
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (p < P)[:, None] & cmask[None, :]
    offs = p[:, None] * C + c[None, :]  # pixel rows are C apart (channels-last)
    x = tl.load(x_ptr + b * stride_xb + offs, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    # F.normalize(x.float(), dim=1): x / max(||x||, eps), IEEE sqrt and division as torch.
    norm = tl.maximum(tl.sqrt_rn(tl.sum(xf * xf, axis=1)), eps)
    gamma = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if VARIANT == "exact":
        y = _step(tl.div_rn(xf, norm[:, None]), dtype, EMULATE_RNE)
        y = _step(y * scale, dtype, EMULATE_RNE)
        y = _step(y * gamma, dtype, EMULATE_RNE)
        if HAS_BIAS:
            y = _step(y + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :], dtype, EMULATE_RNE)
        if SILU:
            y = tl.div_rn(y, 1.0 + tl.exp(-y))  # torch's silu: x / (1 + exp(-x)) in fp32
    else:  # "fast", for bench/vae_norm_probe.py only: one reciprocal per pixel, no intermediate roundings,
        # approximate division in the SiLU; what the exact path's divisions and roundings cost
        y = xf * (scale / norm)[:, None] * gamma
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
    tl.store(out_ptr + b * stride_ob + offs, round_to(y, dtype, EMULATE_RNE), mask=mask)


def rms_norm_silu(x, gamma, bias, scale, eps, silu, out, variant="exact"):
    """x, out [B, C, T, H, W] whose pixels are rows of C contiguous channels, uniformly C apart within
    a batch (channels-last-3d, or a time slice of it); gamma, bias [C] contiguous (bias may be None).
    variant: "exact" (what vkern runs) or "fast" (a measurement variant, see the kernel)."""
    B, C = x.shape[:2]
    P = x[0, 0].numel()
    block_c = triton.next_power_of_2(C)
    block_p = max(1, min(64, 4096 // block_c))  # ~4K elements a tile: 32 per thread at 4 warps
    grid = (triton.cdiv(P, block_p), B)
    _rms_norm_silu_kernel[grid](
        x, out, gamma, bias if bias is not None else gamma, P, C, x.stride(0), out.stride(0), scale, eps,
        BLOCK_P=block_p, BLOCK_C=block_c, HAS_BIAS=bias is not None, SILU=silu, EMULATE_RNE=interpreting(),
        VARIANT=variant, num_warps=4, enable_fp_fusion=False,
    )
    return out
