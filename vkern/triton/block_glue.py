"""Fused elementwise glue of the Wan DiT block: LayerNorm + modulate, and gate + residual.

One program per token row (B * S programs). The row of D elements is one [BLOCK] tile (BLOCK the
next power of two >= D, D a constexpr, so the mask is uniform over 8-element groups and the loads
and stores are 16-byte vectors when D and the row strides are multiples of 8): read once in its own
dtype, all math in fp32 in registers, written once in the output dtype. The modulation (temb chunk
+ scale_shift_table row) is read in place with broadcast strides (0 where it has size 1), so no
fp32 copy of the hidden states or of a per-token temb ever reaches memory.

Rounding follows diffusers' eager ops one by one (vkern/reference/block_glue.py): every fp32
product and sum is rounded separately, so the launches pass enable_fp_fusion=False (no FMA
contraction by LLVM or ptxas); the kernels are memory-bound, so FMAs would buy nothing.
"""
import triton
import triton.language as tl

from ._common import interpreting, round_to


@triton.jit
def _modulation(t_ptr, tab_ptr, offs, cols, mask, HAS_TABLE: tl.constexpr):
    # diffusers: scale_shift_table + temb.float(), one fp32 rounding.
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_TABLE:
        t = tl.load(tab_ptr + cols, mask=mask, other=0.0).to(tl.float32) + t
    return t


@triton.jit
def _row(S, D: tl.constexpr, BLOCK: tl.constexpr):
    """This program's token: batch b, position s (int64 for the strides), its columns and mask."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    return (row // S).to(tl.int64), (row % S).to(tl.int64), cols, cols < D


@triton.jit
def _layernorm_modulate_kernel(
    x_ptr, out_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, shift_tab_ptr, scale_tab_ptr,
    S, stride_xb, stride_xs, stride_mb, stride_ms, eps,
    D: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    MODULATE: tl.constexpr, HAS_TABLE: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    b, s, cols, mask = _row(S, D, BLOCK)
    x = tl.load(x_ptr + b * stride_xb + s * stride_xs + cols, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)
    # Two passes over the registers (mean, then centered variance): biased variance as F.layer_norm.
    # IEEE division and square root (Triton's `/` is an approximate division on the GPU), as torch's
    # fp32 LayerNorm: only the summation order differs.
    mean = tl.div_rn(tl.sum(xf, axis=0), D * 1.0)
    xc = tl.where(mask, xf - mean, 0.0)
    var = tl.div_rn(tl.sum(xc * xc, axis=0), D * 1.0)
    y = xc * tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if MODULATE:
        # shift and scale share one stride pair (the wrapper makes them agree).
        m_offs = b * stride_mb + s * stride_ms + cols
        scale = _modulation(scale_ptr, scale_tab_ptr, m_offs, cols, mask, HAS_TABLE)
        shift = _modulation(shift_ptr, shift_tab_ptr, m_offs, cols, mask, HAS_TABLE)
        y = y * (1.0 + scale) + shift  # three fp32 roundings, as diffusers' three ops
    tl.store(out_ptr + tl.program_id(0).to(tl.int64) * D + cols, round_to(y, dtype, EMULATE_RNE), mask=mask)


@triton.jit
def _gate_residual_kernel(
    x_ptr, y_ptr, g_ptr, g_tab_ptr, out_ptr,
    S, stride_xb, stride_xs, stride_yb, stride_ys, stride_gb, stride_gs, stride_ob, stride_os,
    D: tl.constexpr, BLOCK: tl.constexpr, HAS_TABLE: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    b, s, cols, mask = _row(S, D, BLOCK)
    x = tl.load(x_ptr + b * stride_xb + s * stride_xs + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + b * stride_yb + s * stride_ys + cols, mask=mask, other=0.0).to(tl.float32)
    g = _modulation(g_ptr, g_tab_ptr, b * stride_gb + s * stride_gs + cols, cols, mask, HAS_TABLE)
    out = x.to(tl.float32) + y * g  # fp32 product rounded, then fp32 sum rounded (no FMA)
    # out may be x itself (in place): each element is read before it is written, by this program only.
    tl.store(out_ptr + b * stride_ob + s * stride_os + cols, round_to(out, x.dtype, EMULATE_RNE), mask=mask)


def _launch_config(D):
    block = triton.next_power_of_2(D)
    # 256 threads for rows of 2K+ elements (D=5120: 32 elements = four 16-byte bf16 vectors per thread).
    return block, max(1, min(8, block // 256))


def _row_strides(t, B, S):
    """(batch, token) strides of a [B|1, S|1, D] tensor, 0 along a broadcast dimension."""
    return (t.stride(0) if t.shape[0] == B and B > 1 else 0,
            t.stride(1) if t.shape[1] == S and S > 1 else 0)


def layernorm_modulate(x, shift, scale, eps, weight, bias, shift_table, scale_table, out):
    """x [B, S, D] with unit last stride; shift/scale [B|1, S|1, D] with equal strides, or None;
    weight/bias/tables [D] contiguous or None; out a contiguous [B, S, D] in x's dtype."""
    B, S, D = x.shape
    block, warps = _launch_config(D)
    mb, ms = _row_strides(scale, B, S) if scale is not None else (0, 0)
    _layernorm_modulate_kernel[(B * S,)](
        x, out, weight if weight is not None else x, bias if bias is not None else x,
        shift if shift is not None else x, scale if scale is not None else x,
        shift_table if shift_table is not None else x, scale_table if scale_table is not None else x,
        S, x.stride(0), x.stride(1), mb, ms, eps,
        D=D, BLOCK=block, HAS_W=weight is not None, HAS_B=bias is not None, MODULATE=scale is not None,
        HAS_TABLE=scale_table is not None, EMULATE_RNE=interpreting(), num_warps=warps, enable_fp_fusion=False,
    )
    return out


def gate_residual(x, y, gate, gate_table, out):
    """x, y, out [B, S, D] with unit last strides (out may be x); gate [B|1, S|1, D]; gate_table [D] or None."""
    B, S, D = x.shape
    block, warps = _launch_config(D)
    _gate_residual_kernel[(B * S,)](
        x, y, gate, gate_table if gate_table is not None else gate, out,
        S, x.stride(0), x.stride(1), y.stride(0), y.stride(1), *_row_strides(gate, B, S),
        out.stride(0), out.stride(1),
        D=D, BLOCK=block, HAS_TABLE=gate_table is not None, EMULATE_RNE=interpreting(),
        num_warps=warps, enable_fp_fusion=False,
    )
    return out
