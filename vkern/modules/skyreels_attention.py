"""Drop-in attention processor for diffusers' SkyReels-V2 transformer: Wan's (VkernWanAttnProcessor), plus its
block-causal attention without the mask.

With num_frame_per_block > 1 (diffusion forcing's causal blocks) the model hands every self-attention a [1, 1, S, S]
bool mask: frame block i's tokens attend to the keys of blocks 0..i. That is the same as attending block i's queries
to the key prefix up to its own end, so here each block is one unmasked call on vkern's kernels (exact: a masked key
adds exactly 0 to SDPA's softmax), about half the work of the full square, instead of SDPA with an S x S mask (its
masked backends). The mask is recognized by its value (one comparison per mask tensor, cached while it is
unchanged, or per call for an inference tensor); any other mask runs as before."""
import functools
import weakref

import torch

from ..reference import attention as ref
from ._grad import records_autograd
from .wan_attention import VkernWanAttnProcessor

_last = (None, None, None)  # (weak reference to the last mask looked at, its version, its blocks)


class VkernSkyReelsV2AttnProcessor(VkernWanAttnProcessor):
    """VkernWanAttnProcessor (attention mode, fused QK-norm + RoPE) with SkyReels-V2's block-causal mask run as one
    unmasked call per frame block (in the 8-bit modes too: the exact 16-bit attention, which they run for any mask)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        blocks = None
        if attention_mask is not None and self.attention != "reference" and not torch.compiler.is_compiling():
            blocks = block_causal_blocks(attention_mask)
        if blocks is None or records_autograd(attn, hidden_states, encoder_hidden_states):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        norm_rope, attend = self._steps(exact=True)
        return ref.wan_attention(attn, hidden_states, encoder_hidden_states, None, rotary_emb, norm_rope=norm_rope,
                                 attend=functools.partial(attend_key_prefixes, attend, blocks))


def attend_key_prefixes(attend, blocks, query, key, value, attention_mask=None):
    """Block-causal attention on [B, S, H, D] tensors: for each (start, end) of `blocks`, queries start:end attend to
    keys 0:end, by attend(q, k, v) unmasked; the blocks' outputs concatenated."""
    return torch.cat([attend(query[:, start:end], key[:, :end], value[:, :end]) for start, end in blocks], dim=1)


def block_causal_blocks(mask):
    """[(start, end), ...] of the frame blocks when `mask` is SkyReels-V2's block-causal mask (bool [1, 1, S, S],
    True where query block >= key block, blocks of equal size), else None. Reads the mask once per tensor and
    version (the model passes the same mask to every block of a step); under torch.inference_mode (no version
    counter) at every call."""
    global _last
    ref_, version, blocks = _last
    current = _version(mask)
    if current is not None and ref_ is not None and ref_() is mask and version == current:
        return blocks
    blocks = None
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[:2] == (1, 1) and mask.shape[2] == mask.shape[3]:
        size, tokens = int(mask[0, 0, 0].sum()), mask.shape[-1]
        if 0 < size < tokens and tokens % size == 0:
            block = torch.arange(tokens, device=mask.device) // size
            if torch.equal(mask[0, 0], block[None, :] <= block[:, None]):
                blocks = [(start, start + size) for start in range(0, tokens, size)]
    _last = (weakref.ref(mask), current, blocks)
    return blocks


def _version(tensor):
    """tensor's in-place version counter; None for an inference tensor (it has none: its mask is read every call)."""
    try:
        return tensor._version
    except RuntimeError:
        return None
