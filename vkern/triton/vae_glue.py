"""Wan VAE glue: RMS norm over channels (WanRMS_norm) + SiLU in one pass, on channels-last data.

The activations run channels-last through vkern's VAE path, so a pixel's C channels are one
contiguous row: a program takes a [BLOCK_P pixels, BLOCK_C channels] tile, reads it once, reduces
each row in fp32 and writes the result once, straight into the causal conv's input buffer (the
`out` view may be the chunk slot of a [cache | chunk] buffer: only its batch stride differs).

Arithmetic: fp32 throughout, one reciprocal per pixel (scale / max(||x||, eps)), then x * that * gamma
(+ bias), SiLU as y / (1 + exp(-y)), and one rounding to x's dtype at the end. diffusers' eager ops round
after each of normalize, * scale, * gamma and + bias, and divide per element (IEEE); following them one by
one made this memory-bound pass compute-bound: 475-540 GB/s against a 3.2-4.1 TB/s copy of the same bytes
on an H200, vs 1.9-2.6 TB/s for this arithmetic, which is also closer to float64 (rel. L2 1.7e-3 vs 3.9e-3
for the eager roundings; bench/vae_norm_probe.py, run 18).
"""
import triton
import triton.language as tl

from ._common import interpreting, round_to


@triton.jit
def _rms_norm_silu_kernel(
    x_ptr, out_ptr, gamma_ptr, bias_ptr, P, C, stride_xb, stride_ob, scale, eps,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    EMULATE_RNE: tl.constexpr,
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
    norm = tl.maximum(tl.sqrt_rn(tl.sum(xf * xf, axis=1)), eps)
    gamma = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # F.normalize(x, dim=1) * C**0.5 * gamma: x / max(||x||, eps), IEEE sqrt and one IEEE division per pixel.
    y = xf * tl.div_rn(scale, norm)[:, None] * gamma
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))  # torch's silu formula; `/` is the GPU's approximate division (~2 ulp fp32)
    tl.store(out_ptr + b * stride_ob + offs, round_to(y, dtype, EMULATE_RNE), mask=mask)


def rms_norm_silu(x, gamma, bias, scale, eps, silu, out):
    """x, out [B, C, T, H, W] whose pixels are rows of C contiguous channels, uniformly C apart within
    a batch (channels-last-3d, or a time slice of it); gamma, bias [C] contiguous (bias may be None)."""
    B, C = x.shape[:2]
    P = x[0, 0].numel()
    block_c = triton.next_power_of_2(C)
    block_p = max(1, min(64, 4096 // block_c))  # ~4K elements a tile: 32 per thread at 4 warps
    grid = (triton.cdiv(P, block_p), B)
    _rms_norm_silu_kernel[grid](
        x, out, gamma, bias if bias is not None else gamma, P, C, x.stride(0), out.stride(0), scale, eps,
        BLOCK_P=block_p, BLOCK_C=block_c, HAS_BIAS=bias is not None, SILU=silu, EMULATE_RNE=interpreting(),
        # FMA contraction off: the configuration runs 18-19 measured (the pass is memory-bound either way).
        num_warps=4, enable_fp_fusion=False,
    )
    return out
