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
"""
import torch
import torch.nn.functional as F


def modulation(t, table=None):
    """diffusers' `scale_shift_table + temb.float()` for one chunk: fp32, one rounding."""
    return t.float() if table is None else table + t.float()


def layernorm_modulate(x, shift, scale, eps, weight=None, bias=None, shift_table=None, scale_table=None):
    """x [B, S, D]; shift/scale [B|1, S|1, D] or both None (plain FP32LayerNorm, as norm2);
    weight/bias [D] or None. Returns x's dtype."""
    y = F.layer_norm(x.float(), (x.shape[-1],), None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if scale is not None:
        y = y * (1 + modulation(scale, scale_table)) + modulation(shift, shift_table)
    return y.type_as(x)


def gate_residual(x, y, gate, gate_table=None):
    """x, y [B, S, D]; gate [B|1, S|1, D]. Returns (x.float() + y.float() * gate).type_as(x)."""
    return (x.float() + y.float() * modulation(gate, gate_table)).type_as(x)
