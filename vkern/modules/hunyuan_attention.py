"""Drop-in attention processor for diffusers' HunyuanVideo transformer (dual- and single-stream blocks): joint
attention over [video, text] tokens with the padded text masked, through vkern.ops."""
import functools

from .. import ops
from ..reference import hunyuan_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from ._grad import records_autograd
from .wan_attention import _8BIT, _BACKEND, ATTENTION_MODES


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
        attend = sdpa_as_diffusers  # vkern's ops have no backward: with autograd recording, diffusers' own
        if self.attention != "reference" and not records_autograd(attn, hidden_states, encoder_hidden_states):
            attend = functools.partial(_attend, attention=self.attention)
        return ref.hunyuan_video_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                           image_rotary_emb, attend=attend)

    def __repr__(self):
        return f"VkernHunyuanVideoAttnProcessor(attention={self.attention!r})"


def _attend(q, k, v, attention_mask, attention):
    """q, k, v [B, S, H, D]; attention_mask: diffusers' (None, its key-padding form, or any SDPA mask)."""
    key_padding_mask = ref.key_padding(attention_mask, q.shape[0], k.shape[1])
    general = attention_mask if key_padding_mask is None else None
    if attention in _8BIT:
        if general is not None:
            raise ValueError(f"VkernHunyuanVideoAttnProcessor: attention={attention!r} takes a key-padding mask "
                             f"(bool [B, 1, 1, keys] or [B, keys]) only, got one of shape {tuple(general.shape)} and "
                             f"dtype {general.dtype}")
        qk, pv = _8BIT[attention]
        return ops.attention_8bit(q, k, v, key_padding_mask=key_padding_mask, qk=qk, pv=pv)
    return ops.attention(q, k, v, general, key_padding_mask=key_padding_mask, backend=_BACKEND[attention])
