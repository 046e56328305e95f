"""Fused elementwise glue of the Wan DiT block: LayerNorm + modulate, and gate + residual (Mochi's: of the
RMS-normalized branch output).

One program per token row (B * S programs). The row of D elements is one [BLOCK] tile (BLOCK the
next power of two >= D, D a constexpr, so the mask is uniform over 8-element groups and the loads
and stores are 16-byte vectors when D and the row strides are multiples of 8): read once in its own
dtype, all math in fp32 in registers, written once in the output dtype. The modulation (temb chunk
+ scale_shift_table row) is read in place with broadcast strides (0 where it has size 1), so no
fp32 copy of the hidden states or of a per-token temb ever reaches memory.

Rounding follows diffusers' eager ops one by one (vkern/reference/block_glue.py): every fp32
product and sum is rounded separately, so the launches pass enable_fp_fusion=False (no FMA
contraction by LLVM or ptxas); the kernels are memory-bound, so FMAs would buy nothing. Where diffusers
computes in the tensors' own dtypes (native_dtypes: LTX-Video's blocks), each op's result is rounded to the
dtype eager PyTorch gives it (the *_DT constexprs), in registers; for Wan's fp32 math those are float32 and
the roundings vanish.

fp8 outputs (fp8 compute mode): LayerNorm + modulate, and the FFN's tanh GELU, can write their row as
e4m3 with one fp32 scale per token instead of bf16: the row is rounded to the activation dtype as
before, then quantized in registers exactly as csrc/fp8_quant.cu does (scale = max(amax, 1e-12) *
fp32(1/448), q = satfinite RNE e4m3 of v * (1/scale), NaN propagating), so the consuming fp8 GEMMs
need no quantization pass of their own.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..reference.fp8 import E4M3_INV
from ._common import interpreting, round_to, to_e4m3
from ._launch import fast_launchers

_launch = fast_launchers()  # kernel -> its FastLaunch (the launches of the many small calls a step makes)

_E4M3_INV = tl.constexpr(E4M3_INV)  # fp32(1/448): exact in fp32, so the constant folds to the same value
# torch's tanh GELU constants (aten GeluKernel: kBeta = sqrt(2) * 2/sqrt(pi) * 0.5 and 0.044715, as fp32)
_GELU_BETA = tl.constexpr(0.7978845608028654)
_GELU_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _store_fp8_row(q_ptr, s_ptr, v, cols, mask, EMULATE_RNE: tl.constexpr):
    """Quantize one row v (fp32 values of the activation dtype; lanes outside mask ignored) to e4m3 at
    q_ptr + cols with its fp32 scale at s_ptr: vkern's per-token quantizer (vkern/reference/fp8.py)."""
    # |v| as int32 bits: for non-negative floats integer order is float order and NaN sorts above inf,
    # so one integer max finds amax and propagates NaN (a float max would drop it), as csrc/fp8_quant.cu.
    amax = tl.max(tl.where(mask, tl.abs(v), 0.0).to(tl.int32, bitcast=True), axis=0).to(tl.float32, bitcast=True)
    scale = tl.where(amax != amax, amax, tl.maximum(amax, 1e-12) * _E4M3_INV)
    q = v * tl.div_rn(1.0, scale)
    # Integer-arithmetic RNE on the GPU too: Triton's fp32 -> e4m3 cast did not match csrc/fp8_quant.cu's
    # cvt.rn.satfinite bit for bit (GPU test, run 9); the pass is memory-bound, so the extra ops are free.
    tl.store(q_ptr + cols, to_e4m3(q, True), mask=mask)
    tl.store(s_ptr, scale)


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
def _as(v, DT: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 v rounded to DT (a no-op for float32) and widened back to fp32 for the next op."""
    return round_to(v, DT, EMULATE_RNE).to(tl.float32)


@triton.jit
def _layernorm_modulate_kernel(
    x_ptr, out_ptr, q_scale_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, shift_tab_ptr, scale_tab_ptr,
    S, stride_xb, stride_xs, stride_mb, stride_ms, eps,
    D: tl.constexpr, BLOCK: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    MODULATE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_TABLE: tl.constexpr, FP8_OUT: tl.constexpr,
    EMULATE_RNE: tl.constexpr, RMS: tl.constexpr, NORM_DT: tl.constexpr, MOD_DT: tl.constexpr, PROD_DT: tl.constexpr, ACT_DT: tl.constexpr,
):
    b, s, cols, mask = _row(S, D, BLOCK)
    x = tl.load(x_ptr + b * stride_xb + s * stride_xs + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    # Two passes over the registers (mean, then centered variance): biased variance as F.layer_norm.
    # IEEE division and square root (Triton's `/` is an approximate division on the GPU), as torch's
    # fp32 LayerNorm: only the summation order differs. The sums accumulate in fp64 and round once to
    # fp32: an fp32 tree sum's order follows the register layout Triton picks, which differed between
    # the bf16 and e4m3 variants of this kernel (their stores vectorize differently), so their rows
    # differed by an ulp in rare elements (run 12: 144 of 168M e4m3 codes); the fp64 sum of the same
    # fp32 terms rounds to the same fp32 in any order (unless within 2^-29 of a tie).
    if RMS:  # diffusers' RMSNorm: x * rsqrt(mean(x^2) + eps), no centering
        xc = xf
    else:
        mean = tl.div_rn(tl.sum(xf.to(tl.float64), axis=0).to(tl.float32), D * 1.0)
        xc = tl.where(mask, xf - mean, 0.0)
    var = tl.div_rn(tl.sum((xc * xc).to(tl.float64), axis=0).to(tl.float32), D * 1.0)
    y = xc * tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = _as(y, NORM_DT, EMULATE_RNE)  # the norm module's output (native dtypes: x's dtype)
    if MODULATE:
        # shift and scale share one stride pair (the wrapper makes them agree).
        m_offs = b * stride_mb + s * stride_ms + cols
        scale = _as(_modulation(scale_ptr, scale_tab_ptr, m_offs, cols, mask, HAS_TABLE), MOD_DT, EMULATE_RNE)
        # y * (1 + scale) + shift: three roundings, as diffusers' three ops (no shift: Mochi's two)
        y = _as(y * _as(1.0 + scale, MOD_DT, EMULATE_RNE), PROD_DT, EMULATE_RNE)
        if HAS_SHIFT:
            y = y + _as(_modulation(shift_ptr, shift_tab_ptr, m_offs, cols, mask, HAS_TABLE), MOD_DT, EMULATE_RNE)
    row = tl.program_id(0).to(tl.int64)
    y = round_to(y, ACT_DT, EMULATE_RNE)
    if FP8_OUT:  # out is e4m3: the rounded row quantized in registers, its scale to q_scale_ptr[row]
        _store_fp8_row(out_ptr + row * D, q_scale_ptr + row, y.to(tl.float32), cols, mask, EMULATE_RNE)
    else:
        tl.store(out_ptr + row * D + cols, y, mask=mask)


@triton.jit
def _one_plus_tanh(z, INTERPRET: tl.constexpr):
    if INTERPRET:  # the CPU interpreter has no libdevice: 1 + tanh(z) = 2 / (1 + e^-2z), accurate where it is small
        return 2.0 / (1.0 + tl.exp(-2.0 * z))
    else:
        return 1.0 + libdevice.tanh(z)  # CUDA's tanhf, the function PyTorch's GELU kernel calls


@triton.jit
def _gelu_tanh_fp8_kernel(h_ptr, q_ptr, s_ptr, stride_h, N: tl.constexpr, BLOCK: tl.constexpr,
                          EMULATE_RNE: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
    x = h.to(tl.float32)
    # PyTorch's GeluKernel in fp32, in its order: x^3 = x * x * x, inner = kBeta * (x + kKappa * x^3),
    # 0.5 * x * (1 + tanh(inner)); rounded to h's dtype, then quantized.
    inner = _GELU_BETA * (x + _GELU_KAPPA * (x * x * x))
    g = 0.5 * x * _one_plus_tanh(inner, INTERPRET)
    g = round_to(g, h.dtype, EMULATE_RNE).to(tl.float32)
    _store_fp8_row(q_ptr + row * N, s_ptr + row, g, cols, mask, EMULATE_RNE)


@triton.jit
def _gate_residual_kernel(
    x_ptr, y_ptr, g_ptr, g_tab_ptr, out_ptr,
    S, stride_xb, stride_xs, stride_yb, stride_ys, stride_gb, stride_gs, stride_ob, stride_os, eps,
    D: tl.constexpr, BLOCK: tl.constexpr, HAS_TABLE: tl.constexpr, EMULATE_RNE: tl.constexpr,
    RMS_Y: tl.constexpr, MOD_DT: tl.constexpr, PROD_DT: tl.constexpr, OUT_DT: tl.constexpr,
):
    b, s, cols, mask = _row(S, D, BLOCK)
    x = tl.load(x_ptr + b * stride_xb + s * stride_xs + cols, mask=mask, other=0.0)
    y = tl.load(y_ptr + b * stride_yb + s * stride_ys + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS_Y:  # Mochi's MochiModulatedRMSNorm of y in fp32 first (the fp64 sum as in the LayerNorm kernel)
        var = tl.div_rn(tl.sum((y * y).to(tl.float64), axis=0).to(tl.float32), D * 1.0)
        y = y * tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    g = _as(_modulation(g_ptr, g_tab_ptr, b * stride_gb + s * stride_gs + cols, cols, mask, HAS_TABLE), MOD_DT,
            EMULATE_RNE)
    out = x.to(tl.float32) + _as(y * g, PROD_DT, EMULATE_RNE)  # product rounded, then the sum (no FMA)
    # out may be x itself (in place): each element is read before it is written, by this program only.
    tl.store(out_ptr + b * stride_ob + s * stride_os + cols, round_to(out, OUT_DT, EMULATE_RNE), mask=mask)


def _launch_config(D):
    block = triton.next_power_of_2(D)
    # 256 threads for rows of 2K+ elements (D=5120: 32 elements = four 16-byte bf16 vectors per thread).
    return block, max(1, min(8, block // 256))


def _row_strides(t, B, S):
    """(batch, token) strides of a [B|1, S|1, D] tensor, 0 along a broadcast dimension."""
    return (t.stride(0) if t.shape[0] == B and B > 1 else 0,
            t.stride(1) if t.shape[1] == S and S > 1 else 0)


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def layernorm_modulate(x, shift, scale, eps, weight, bias, shift_table, scale_table, out, rounding, rms=False,
                       q_scale=None):
    """x [B, S, D] with unit last stride; shift/scale [B|1, S|1, D] with equal strides, or None (shift alone:
    y * (1 + scale));
    weight/bias/tables [D] contiguous or None; out a contiguous [B, S, D] in the result's dtype, or in e4m3
    with q_scale a contiguous fp32 [B, S, 1] for its per-token scales. rounding: the torch dtypes (norm
    output, modulation, product, result) each step rounds to (vkern/ops/block_glue.py decides them)."""
    B, S, D = x.shape
    block, warps = _launch_config(D)
    mb, ms = _row_strides(scale, B, S) if scale is not None else (0, 0)
    norm_dt, mod_dt, prod_dt, act_dt = (_TL[d] for d in rounding)
    _launch[_layernorm_modulate_kernel]((B * S,),
        x, out, q_scale if q_scale is not None else out, weight if weight is not None else x,
        bias if bias is not None else x,
        shift if shift is not None else x, scale if scale is not None else x,
        shift_table if shift_table is not None else x, scale_table if scale_table is not None else x,
        S, x.stride(0), x.stride(1), mb, ms, eps,
        D=D, BLOCK=block, HAS_W=weight is not None, HAS_B=bias is not None, MODULATE=scale is not None,
        HAS_SHIFT=shift is not None, HAS_TABLE=scale_table is not None, FP8_OUT=q_scale is not None,
        EMULATE_RNE=interpreting(), RMS=rms, NORM_DT=norm_dt, MOD_DT=mod_dt, PROD_DT=prod_dt, ACT_DT=act_dt,
        num_warps=warps, enable_fp_fusion=False,
    )
    return out


def gate_residual(x, y, gate, gate_table, out, rounding, y_rms_eps=None):
    """x, y, out [B, S, D] with unit last strides (out may be x); gate [B|1, S|1, D]; gate_table [D] or None.
    rounding: the torch dtypes (modulation, product, result) each step rounds to. y_rms_eps: y RMS-normalized
    in fp32 first, with this eps (Mochi)."""
    B, S, D = x.shape
    block, warps = _launch_config(D)
    mod_dt, prod_dt, out_dt = (_TL[d] for d in rounding)
    _launch[_gate_residual_kernel]((B * S,),
        x, y, gate, gate_table if gate_table is not None else gate, out,
        S, x.stride(0), x.stride(1), y.stride(0), y.stride(1), *_row_strides(gate, B, S),
        out.stride(0), out.stride(1), 0.0 if y_rms_eps is None else y_rms_eps,
        D=D, BLOCK=block, HAS_TABLE=gate_table is not None, EMULATE_RNE=interpreting(), RMS_Y=y_rms_eps is not None,
        MOD_DT=mod_dt, PROD_DT=prod_dt, OUT_DT=out_dt,
        num_warps=warps, enable_fp_fusion=False,
    )
    return out


def gelu_tanh_fp8(h, q, scale):
    """h [M, N] with unit last stride; q a contiguous e4m3 [M, N]; scale a contiguous fp32 [M, 1].
    FMA contraction stays on here (Triton's default), as nvcc compiles PyTorch's GELU kernel."""
    M, N = h.shape
    block, warps = _launch_config(N)
    _launch[_gelu_tanh_fp8_kernel]((M,), h, q, scale, h.stride(0), N=N, BLOCK=block, EMULATE_RNE=interpreting(),
                                   INTERPRET=interpreting(), num_warps=max(warps, min(16, block // 1024)))
    return q, scale
