"""Drop-in attention processor for diffusers' WanAttention (self, cross and I2V added key/value)."""
from .. import ops
from ..reference import attention as ref

ATTENTION_MODES = ("auto", "sdpa", "reference")


class VkernWanAttnProcessor:
    """WanAttnProcessor with the QK RMSNorm + RoPE fused into one kernel pass and attention through
    vkern.ops.attention. attention: "auto" (vkern's choice per device), "sdpa" (torch SDPA, cuDNN
    first) or "reference" (exactly diffusers' ops; for debugging)."""

    def __init__(self, attention="auto", fused_qk_norm_rope=True):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention
        self.fused_qk_norm_rope = fused_qk_norm_rope and attention != "reference"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return ref.wan_attention(
            attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
            norm_rope=ops.qk_norm_rope if self.fused_qk_norm_rope else ref.qk_norm_rope,
            attend=ref.attention if self.attention == "reference" else ops.attention,
        )

    def __repr__(self):
        return f"VkernWanAttnProcessor(attention={self.attention!r}, fused_qk_norm_rope={self.fused_qk_norm_rope})"
