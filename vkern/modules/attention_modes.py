"""What vkern's processors for the other model families (HunyuanVideo, CogVideoX, LTX-Video, Mochi) share: the
attention mode, the fused q/k prologue's switch, and the attention step (a diffusers processor's mask and the mode -> the vkern op that runs it) they hand to
their family's reference processor."""
import functools
import warnings

from .. import ops
from ..reference.attention import key_padding
from ._grad import records_autograd
from .wan_attention import _8BIT, _BACKEND, ATTENTION_MODES

_warned = set()


class VkernProcessor:
    """attention: one of ATTENTION_MODES, as for Wan (PatchConfig.attention)."""

    def __init__(self, attention="auto"):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention

    def uses_kernels(self, attn, *tensors):
        """False in the "reference" mode and with autograd recording (vkern's ops have no backward): then the call
        takes diffusers' own attention step."""
        return self.attention != "reference" and not records_autograd(attn, *tensors)

    def kernel_step(self, heads_first=False):
        """attend() in this mode; heads_first: the step takes and returns [B, H, S, D] (views of it go to vkern's ops
        as [B, S, H, D])."""
        step = functools.partial(attend, attention=self.attention, who=type(self).__name__)
        return functools.partial(_heads_first, step) if heads_first else step

    def attention_step(self, attn, diffusers_step, *tensors, heads_first=False):
        """The attention step for this call: kernel_step(), or diffusers_step where uses_kernels() says no."""
        return self.kernel_step(heads_first) if self.uses_kernels(attn, *tensors) else diffusers_step

    def __repr__(self):
        return f"{type(self).__name__}(attention={self.attention!r})"


class VkernPrologueProcessor(VkernProcessor):
    """A VkernProcessor whose family has a q/k prologue (norm + RoPE) the kernel fuses; fused_qk_norm_rope
    (PatchConfig's) turns that on."""

    def __init__(self, attention="auto", fused_qk_norm_rope=True):
        super().__init__(attention)
        self.fused_qk_norm_rope = fused_qk_norm_rope

    def prologue_step(self, attn, fused, diffusers_step, *tensors):
        """The q/k prologue for this call: `fused` where the kernels run and fused_qk_norm_rope is on, else
        diffusers_step."""
        return fused if self.fused_qk_norm_rope and self.uses_kernels(attn, *tensors) else diffusers_step

    def __repr__(self):
        return f"{type(self).__name__}(attention={self.attention!r}, fused_qk_norm_rope={self.fused_qk_norm_rope})"


def _heads_first(step, q, k, v, attention_mask):
    return step(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask).transpose(1, 2)


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
