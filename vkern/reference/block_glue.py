"""The elementwise glue of diffusers' WanTransformerBlock.forward, the spec for vkern's fused kernels.

diffusers 0.42 computes, with x the bf16 (or fp16/fp32) hidden states and the modulation
    mod = scale_shift_table + temb.float()           fp32, one rounding (table is fp32 or bf16)
    norm:     (FP32LayerNorm(x.float()) * (1 + scale) + shift).type_as(x)
              F.layer_norm in fp32 (affine weight/bias for norm2, none for norm1/norm3), then
              1 + scale, *, + each rounded in fp32, then one rounding to x's dtype
    residual: (x.float() + y * gate).type_as(x)      (attention; y in x's dtype, gate fp32 -> y * gate
              promotes y to fp32)
              (x.float() + y.float() * gate).type_as(x)   (feed-forward) -- the same fp32 ops
              in the same order: one fp32 rounding for the product, one for the sum, one to x's dtype.

Here the modulation is taken apart: `shift`, `scale`, `gate` are the temb chunks (any float dtype,
[B|1, S|1, D]) and the optional `*_table` is the matching [D] row of scale_shift_table, added in fp32
exactly as diffusers adds them. That lets the kernels read temb in place, so Wan 2.2's per-token
[B, S, 6, D] temb is never copied to fp32 (diffusers makes two fp32 copies of it per block).

native=True is the other form of the same glue, diffusers' LTXVideoTransformerBlock.forward: its ops in
the tensors' own dtypes, each rounded to its operands' promoted dtype as eager PyTorch does,
    norm:     RMSNorm(x) * (1 + scale) + shift, with RMSNorm (no affine) (x * rsqrt(mean(x.float()^2) + eps))
              .to(x.dtype) and scale = table + temb chunk (bf16 + bf16 -> bf16)
    residual: x + y * gate
(rms=False with native: torch's LayerNorm in x's dtype, then the same modulation).
Mochi's glue (MochiTransformerBlock) is the fp32 form with rms and no shift, `(RMSNorm(x.float()) * (1 + scale))
.to(x.dtype)`, and its own residual, rms_gate_residual: `x + (RMSNorm(y.float()) * tanh(gate)).to(y.dtype)`.

fp8 outputs (for Linears in fp8 compute mode, vkern/modules/fp8_linear.py): the fused kernels may
emit their result as e4m3 with one fp32 scale per token instead of x's dtype. The value quantized is
the one the unfused path feeds the quantizer: the result rounded to x's dtype first, then vkern's
per-token quantizer (vkern/reference/fp8.py). So the fused LayerNorm kernel equals, bit for bit, its own
unfused bf16 output quantized by vkern's quantizer: turning the fusion on changes no bit of the model's
output (the GELU kernel's tanh may differ from PyTorch's in the last ulp, so there rarely one bf16
value, hence one e4m3 code or one row's scale, differs). Quantizing the fp32 value before the rounding
would save one rounding, but then the fusion would change results and could not be tested exactly.
"""
import torch
import torch.nn.functional as F

from . import fp8


def modulation(t, table=None, native=False):
    """diffusers' `scale_shift_table + temb.float()` for one chunk: fp32, one rounding; native: Wan's
    `table + temb` in their own dtypes (LTX-Video)."""
    if native:
        return t if table is None else table + t
    return t.float() if table is None else table + t.float()


def _rms_norm(x, eps):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # fp32 (x promotes)


def layernorm_modulate(x, shift, scale, eps, weight=None, bias=None, shift_table=None, scale_table=None, rms=False,
                       native=False):
    """x [B, S, D]; shift/scale [B|1, S|1, D] or both None (plain FP32LayerNorm, as norm2) or shift None (no shift:
    Mochi's MochiRMSNormZero, `norm(x.float()) * (1 + scale.float())`, with rms);
    weight/bias [D] or None. Returns x's dtype (native: the dtype eager PyTorch gives the expression).
    rms: RMSNorm (no centering; diffusers' RMSNorm) instead of LayerNorm."""
    if native:
        if rms:  # diffusers' RMSNorm without elementwise_affine (the op refuses a weight here)
            y = _rms_norm(x, eps).to(x.dtype)
        else:
            y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        if scale is not None:
            y = y * (1 + modulation(scale, scale_table, True))
            y = y if shift is None else y + modulation(shift, shift_table, True)
        return y
    if rms:
        y = _rms_norm(x.float(), eps)
        y = y if weight is None else y * weight.float()
        y = y if bias is None else y + bias.float()
    else:
        y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + modulation(scale, scale_table))
        y = y if shift is None else y + modulation(shift, shift_table)
    return y.type_as(x)


def gate_residual(x, y, gate, gate_table=None, native=False):
    """x, y [B, S, D]; gate [B|1, S|1, D]. Returns (x.float() + y.float() * gate).type_as(x); native: x + y * gate
    in their own dtypes (LTX-Video's `hidden_states + attn_hidden_states * gate_msa`)."""
    if native:
        return x + y * modulation(gate, gate_table, True)
    return (x.float() + y.float() * modulation(gate, gate_table)).type_as(x)


def rms_gate_residual(x, y, gate, eps):
    """Mochi's residual: x + MochiModulatedRMSNorm(eps)(y, gate), i.e. x + (RMSNorm(y.float()) * gate).to(y.dtype),
    the sum in eager PyTorch's dtype (diffusers' MochiTransformerBlock: `hidden_states + self.norm2(attn_hidden_states,
    torch.tanh(gate_msa).unsqueeze(1))`)."""
    return x + (_rms_norm(y.float(), eps) * gate).to(y.dtype)


def layernorm_modulate_fp8(x, shift, scale, eps, weight=None, bias=None, shift_table=None, scale_table=None, rms=False,
                           native=False):
    """layernorm_modulate's result (in its dtype) quantized per token: (e4m3 [B, S, D], fp32 [B, S, 1])."""
    return fp8.fp8_quantize(layernorm_modulate(x, shift, scale, eps, weight, bias, shift_table, scale_table, rms,
                                               native), "row")


def gelu_tanh_fp8(h):
    """diffusers' tanh GELU in h's dtype (F.gelu(h, approximate="tanh"): fp32 math, one rounding), quantized
    per row: (e4m3 [..., N], fp32 [..., 1]). The input of the FFN's down projection in fp8 compute mode."""
    return fp8.fp8_quantize(F.gelu(h, approximate="tanh"), "row")
