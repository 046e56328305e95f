"""Drop-in attention processor for diffusers' LTX-Video transformer (self- and cross-attention) through vkern.ops."""
from ..reference import ltx_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from .attention_modes import VkernProcessor


class VkernLTXVideoAttnProcessor(VkernProcessor):
    """LTXVideoAttnProcessor with the attention through vkern.ops (head dim 64: the self-attention's thousands of
    keys take vkern's CUDA kernel on Hopper under "auto"; the prompt's 128 keys take cuDNN with the model's additive
    mask, as diffusers). In the 8-bit modes the cross-attention stays 16-bit (the 8-bit kernels take no additive
    mask; a one-time warning says so). The projections, norms and RoPE stay diffusers' ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        step = self.attention_step(attn, sdpa_as_diffusers, hidden_states, encoder_hidden_states)
        return ref.ltx_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 attend=step)
