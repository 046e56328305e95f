"""Drop-in attention processor for diffusers' LTX-Video transformer (self- and cross-attention) through vkern.ops."""
import functools

from ..reference import ltx_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from ._grad import records_autograd
from .attention_modes import attend
from .wan_attention import ATTENTION_MODES


class VkernLTXVideoAttnProcessor:
    """LTXVideoAttnProcessor with the attention through vkern.ops (head dim 64: the self-attention's thousands of
    keys take vkern's CUDA kernel on Hopper under "auto"; the prompt's 128 keys take cuDNN with the model's additive
    mask, as diffusers). attention: one of ATTENTION_MODES, as for Wan (the 8-bit kernels take no additive mask, so
    in those modes the cross-attention stays 16-bit, with a one-time warning). The projections, norms and RoPE stay
    diffusers' ops."""

    def __init__(self, attention="auto"):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        run = sdpa_as_diffusers  # vkern's ops have no backward: with autograd recording, diffusers' own
        if self.attention != "reference" and not records_autograd(attn, hidden_states, encoder_hidden_states):
            run = functools.partial(attend, attention=self.attention, who=type(self).__name__)
        return ref.ltx_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                 attend=run)

    def __repr__(self):
        return f"VkernLTXVideoAttnProcessor(attention={self.attention!r})"
