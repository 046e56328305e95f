"""Drop-in attention processor for diffusers' WanAttention (self, cross and I2V added key/value)."""
import functools

from .. import ops
from ..reference import attention as ref

# mode -> how attention runs. "auto": vkern's measured choice per shape class (vkern.ops.attention);
# "bf16": vkern's flash-attention kernel; "sdpa": torch SDPA (cuDNN first); "reference": diffusers' ops;
# 8-bit (opt-in, accuracy in README/bench): "fp8" = e4m3 Q/K + e4m3 P/V, "int8" = int8 Q/K + bf16 P/V.
ATTENTION_MODES = ("auto", "bf16", "fp8", "int8", "sdpa", "reference")
_8BIT = {"fp8": ("e4m3", "e4m3"), "int8": ("int8", "bf16")}
_BACKEND = {"auto": "auto", "bf16": "triton", "sdpa": "sdpa", "reference": "reference"}


class VkernWanAttnProcessor:
    """WanAttnProcessor with the QK RMSNorm + RoPE fused into one kernel pass (which also emits the
    8-bit Q/K and scales in the 8-bit modes, so no bf16 Q/K is written) and attention through vkern.ops.
    attention: one of ATTENTION_MODES."""

    def __init__(self, attention="auto", fused_qk_norm_rope=True):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention
        self.fused_qk_norm_rope = (fused_qk_norm_rope and attention != "reference") or attention in _8BIT

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if self.attention in _8BIT:
            qk, pv = _8BIT[self.attention]
            norm_rope = functools.partial(ops.qk_norm_rope, quant=qk)
            attend = functools.partial(_attend_8bit, pv=pv)
        else:
            norm_rope = ops.qk_norm_rope if self.fused_qk_norm_rope else ref.qk_norm_rope
            attend = (ref.attention if self.attention == "reference" else
                      functools.partial(ops.attention, backend=_BACKEND[self.attention]))
        return ref.wan_attention(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                 norm_rope=norm_rope, attend=attend)

    def __repr__(self):
        return f"VkernWanAttnProcessor(attention={self.attention!r}, fused_qk_norm_rope={self.fused_qk_norm_rope})"


def _attend_8bit(query, key, value, attention_mask=None, pv="e4m3"):
    """query, key: (8-bit [B, S, H, D], scales [B, H, S]) from the fused prologue; value [B, S, H, D]."""
    if attention_mask is not None:
        raise ValueError("VkernWanAttnProcessor: the 8-bit modes take no attention_mask (Wan passes none)")
    v, v_scale = ops.v_to_e4m3(value) if pv == "e4m3" else (value, None)
    return ops.attention_prequantized(*query, *key, v, v_scale, out_dtype=value.dtype)
