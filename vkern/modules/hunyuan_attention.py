"""Drop-in attention processor for diffusers' HunyuanVideo transformer (dual- and single-stream blocks): joint
attention over [video, text] tokens with the padded text masked, through vkern.ops."""
import functools

from ..reference import hunyuan_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from ._grad import records_autograd
from .attention_modes import attend
from .wan_attention import ATTENTION_MODES


class VkernHunyuanVideoAttnProcessor:
    """HunyuanVideoAttnProcessor2_0 with the attention through vkern.ops: diffusers' [B, 1, 1, N] bool mask
    goes to the kernels as a key-padding mask (SDPA takes it as a general mask, which rules out its flash
    backend). attention: one of ATTENTION_MODES, as for Wan; the projections, the per-head RMSNorm and RoPE stay
    diffusers' ops."""

    def __init__(self, attention="auto"):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        run = sdpa_as_diffusers  # vkern's ops have no backward: with autograd recording, diffusers' own
        if self.attention != "reference" and not records_autograd(attn, hidden_states, encoder_hidden_states):
            run = functools.partial(attend, attention=self.attention, who=type(self).__name__)
        return ref.hunyuan_video_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                           image_rotary_emb, attend=run)

    def __repr__(self):
        return f"VkernHunyuanVideoAttnProcessor(attention={self.attention!r})"
