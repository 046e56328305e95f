"""The attention step of vkern's processors for joint-attention models (HunyuanVideo, CogVideoX): a diffusers
processor's mask and PatchConfig.attention -> the vkern op that runs it."""
from .. import ops
from ..reference.attention import key_padding
from .wan_attention import _8BIT, _BACKEND


def attend(q, k, v, attention_mask, attention, who):
    """q, k, v [B, S, H, D] (any strides); attention_mask: the processor's (None, a key-padding form, or any SDPA
    mask); attention: a PatchConfig.attention mode other than "reference"; who: the processor, for errors."""
    key_padding_mask = key_padding(attention_mask, q.shape[0], k.shape[1])
    general = attention_mask if key_padding_mask is None else None
    if attention in _8BIT:
        if general is not None:
            raise ValueError(f"{who}: attention={attention!r} takes a key-padding mask (bool [B, 1, 1, keys] or "
                             f"[B, keys]) only, got one of shape {tuple(general.shape)} and dtype {general.dtype}")
        qk, pv = _8BIT[attention]
        return ops.attention_8bit(q, k, v, key_padding_mask=key_padding_mask, qk=qk, pv=pv)
    return ops.attention(q, k, v, general, key_padding_mask=key_padding_mask, backend=_BACKEND[attention])
