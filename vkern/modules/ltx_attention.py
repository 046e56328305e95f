"""Drop-in attention processor for diffusers' LTX-Video transformer (self- and cross-attention) through vkern.ops, and
the q/k norm + RoPE over the whole inner dim as one kernel pass (shared with LTX-2's processors)."""
from .. import ops
from ..reference import ltx_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from .attention_modes import VkernPrologueProcessor
from .prologue import kernel_rms_norm, table_pair


class VkernLTXVideoAttnProcessor(VkernPrologueProcessor):
    """LTXVideoAttnProcessor with the attention through vkern.ops (head dim 64: the self-attention's thousands of
    keys take vkern's CUDA kernel on Hopper under "auto"; the prompt's 128 keys take cuDNN with the model's additive
    mask, as diffusers). In the 8-bit modes the cross-attention stays 16-bit (the 8-bit kernels take no additive
    mask; a one-time warning says so). fused_qk_norm_rope: q's and k's RMSNorm (across heads) + RoPE as one kernel
    pass each (else diffusers' ops); the projections stay diffusers' ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        step = self.attention_step(attn, sdpa_as_diffusers, hidden_states, encoder_hidden_states)
        norm_rope = self.prologue_step(attn, fused_norm_rope, ref.norm_rope, hidden_states, encoder_hidden_states)
        return ref.ltx_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 attend=step, norm_rope=norm_rope)


def fused_norm_rope(x, norm, heads, freqs, diffusers_step=ref.norm_rope):
    """ref.norm_rope by one vkern.ops.qk_norm_rope pass: the RMSNorm across heads, then diffusers' apply_rotary_emb
    with (cos, sin) tables over the whole inner dim [1|B, S, heads * D] (rope_tables="per_element", a row per head),
    fp32 math, one rounding. Another norm (no weight, no eps) or tables of another shape run diffusers_step."""
    B, S, width = x.shape
    if not ((freqs is None or table_pair(freqs, {(1, S, width), (B, S, width)})) and kernel_rms_norm(norm, width)):
        return diffusers_step(x, norm, heads, freqs)
    tables = () if freqs is None else tuple(t.unflatten(2, (heads, -1)) for t in freqs)  # [1|B, S, H, D] views
    return ops.qk_norm_rope(x, norm.weight, norm.eps, heads, *tables, rope_tables="per_element")
