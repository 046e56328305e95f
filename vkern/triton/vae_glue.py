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

Conv biases: PyTorch adds a cuDNN conv's bias in an elementwise pass of its own (~100 ms of a 480p
decode, run 19 profile). vkern's loop may run a conv without its bias and hand the bias to the pass
that reads the conv's output next: `in_bias` of the norm (added in fp32 before the row reduction) or
`residual_add_` (y + shortcut + bias in fp32, one rounding).
"""
import torch
import triton
import triton.language as tl

from ._common import interpreting, round_tf32, round_to


@triton.jit
def _rms_norm_silu_kernel(
    x_ptr, out_ptr, gamma_ptr, bias_ptr, in_bias_ptr, P, C, stride_xb, stride_ob, scale, eps,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IN_BIAS: tl.constexpr,
    SILU: tl.constexpr, ROUND_TF32: tl.constexpr, EMULATE_RNE: tl.constexpr,
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
    if HAS_IN_BIAS:  # the producing conv's bias (padded channels load 0 on both sides: out of the sum)
        xf = xf + tl.load(in_bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    norm = tl.maximum(tl.sqrt_rn(tl.sum(xf * xf, axis=1)), eps)
    gamma = tl.load(gamma_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # F.normalize(x, dim=1) * C**0.5 * gamma: x / max(||x||, eps), IEEE sqrt and one IEEE division per pixel.
    y = xf * tl.div_rn(scale, norm)[:, None] * gamma
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SILU:
        y = y / (1.0 + tl.exp(-y))  # torch's silu formula; `/` is the GPU's approximate division (~2 ulp fp32)
    if ROUND_TF32:  # fp32 out, read next by a TF32 conv: rounded here as that conv would round it (once, not per tap)
        y = round_tf32(y, EMULATE_RNE)
    tl.store(out_ptr + b * stride_ob + offs, round_to(y, dtype, EMULATE_RNE), mask=mask)


def _tiles(x):
    """(P pixels per batch item, BLOCK_P, BLOCK_C, grid) for a [B, C, T, H, W] pixel-row tensor."""
    B, C = x.shape[:2]
    P = x[0, 0].numel()
    block_c = triton.next_power_of_2(C)
    block_p = max(1, min(64, 4096 // block_c))  # ~4K elements a tile: 32 per thread at 4 warps
    return P, block_p, block_c, (triton.cdiv(P, block_p), B)


def rms_norm_silu(x, gamma, bias, scale, eps, silu, out, in_bias=None, tf32=False):
    """x, out [B, C, T, H, W] whose pixels are rows of C contiguous channels, uniformly C apart within
    a batch (channels-last-3d, or a time slice of it); gamma, bias, in_bias [C] contiguous (bias and
    in_bias may be None; in_bias is added to x before the norm). tf32 (fp32 x): the output rounded to TF32
    (cvt.rna, as vkern.reference.causal_conv.round_to_tf32) for a conv with TF32 products that reads it next."""
    P, block_p, block_c, grid = _tiles(x)
    _rms_norm_silu_kernel[grid](
        x, out, gamma, bias if bias is not None else gamma, in_bias if in_bias is not None else gamma,
        P, x.shape[1], x.stride(0), out.stride(0), scale, eps,
        BLOCK_P=block_p, BLOCK_C=block_c, HAS_BIAS=bias is not None, HAS_IN_BIAS=in_bias is not None, SILU=silu,
        ROUND_TF32=tf32, EMULATE_RNE=interpreting(),
        # FMA contraction off: the configuration runs 18-19 measured (the pass is memory-bound either way).
        num_warps=4, enable_fp_fusion=False,
    )
    return out


@triton.jit
def _residual_add_kernel(
    y_ptr, s_ptr, bias_ptr, P, C, stride_yb, stride_sb,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = (p < P)[:, None] & cmask[None, :]
    offs = p[:, None] * C + c[None, :]
    y = tl.load(y_ptr + b * stride_yb + offs, mask=mask, other=0.0)
    z = y.to(tl.float32) + tl.load(s_ptr + b * stride_sb + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z = z + tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + b * stride_yb + offs, round_to(z, y.dtype, EMULATE_RNE), mask=mask)


def residual_add_(y, shortcut, bias):
    """y += shortcut + bias in fp32, rounded once, in place. y, shortcut [B, C, T, H, W] pixel-row
    tensors as for rms_norm_silu (their batch strides may differ); bias [C] contiguous (any float
    dtype; fp32 keeps a sum of two biases exact) or None."""
    P, block_p, block_c, grid = _tiles(y)
    _residual_add_kernel[grid](
        y, shortcut, bias if bias is not None else y, P, y.shape[1], y.stride(0), shortcut.stride(0),
        BLOCK_P=block_p, BLOCK_C=block_c, HAS_BIAS=bias is not None, EMULATE_RNE=interpreting(), num_warps=4,
    )
    return y


@triton.jit
def _round_tf32_copy_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    tl.store(out_ptr + i, round_tf32(tl.load(x_ptr + i, mask=mask, other=0.0), EMULATE_RNE), mask=mask)


def round_tf32_copy(x):
    """A new tensor of x's strides holding fp32 x rounded to TF32 (as vkern.reference.causal_conv.round_to_tf32), in
    one read and one write of x's storage: x must be non-overlapping and dense (so is empty_like's result, with the
    same strides: element i of one storage is element i of the other)."""
    out = torch.empty_like(x)
    block = 4096
    _round_tf32_copy_kernel[(triton.cdiv(x.numel(), block),)](
        x, out, x.numel(), BLOCK=block, EMULATE_RNE=interpreting(), num_warps=8)
    return out
