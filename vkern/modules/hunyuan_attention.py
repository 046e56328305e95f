"""Drop-in attention processor for diffusers' HunyuanVideo transformer (dual- and single-stream blocks): joint
attention over [video, text] tokens with the padded text masked, through vkern.ops."""
from ..reference import hunyuan_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from .attention_modes import VkernProcessor


class VkernHunyuanVideoAttnProcessor(VkernProcessor):
    """HunyuanVideoAttnProcessor2_0 with the attention through vkern.ops: diffusers' [B, 1, 1, N] bool mask goes to
    the kernels as a key-padding mask (SDPA takes it as a general mask, which rules out its flash backend). The
    projections, the per-head RMSNorm and RoPE stay diffusers' ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        step = self.attention_step(attn, sdpa_as_diffusers, hidden_states, encoder_hidden_states)
        return ref.hunyuan_video_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                           image_rotary_emb, attend=step)
