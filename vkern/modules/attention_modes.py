"""The attention step of vkern's processors for the other model families (HunyuanVideo, CogVideoX, LTX-Video): a
diffusers processor's mask and PatchConfig.attention -> the vkern op that runs it."""
import warnings

from .. import ops
from ..reference.attention import key_padding
from .wan_attention import _8BIT, _BACKEND

_warned = set()


def attend(q, k, v, attention_mask, attention, who):
    """q, k, v [B, S, H, D] (any strides); attention_mask: the processor's (None, a key-padding form, or any SDPA
    mask); attention: a PatchConfig.attention mode other than "reference"; who: the processor, for warnings. The 8-bit
    modes take no general mask (e.g. LTX-Video's additive text mask): such a call runs the exact 16-bit attention,
    with a one-time warning."""
    key_padding_mask = key_padding(attention_mask, q.shape[0], k.shape[1])
    general = attention_mask if key_padding_mask is None else None
    if attention in _8BIT and general is None:
        qk, pv = _8BIT[attention]
        return ops.attention_8bit(q, k, v, key_padding_mask=key_padding_mask, qk=qk, pv=pv)
    if attention in _8BIT and (who, attention) not in _warned:
        _warned.add((who, attention))
        warnings.warn(f"{who}: attention={attention!r} has no kernel for a general mask (here {general.dtype}, shape "
                      f"{tuple(general.shape)}; the 8-bit kernels take a bool key-padding mask): these calls run the "
                      "exact 16-bit attention", stacklevel=4)
    return ops.attention(q, k, v, general, key_padding_mask=key_padding_mask, backend=_BACKEND.get(attention, "auto"))
