"""Drop-in attention processor for diffusers' Mochi transformer: joint attention over [video, text] through vkern.ops,
the padded prompt as a key-padding mask instead of diffusers' loop over the batch; the video's q/k norm + RoPE fused."""
import functools

import torch

from .. import ops
from ..reference import mochi_attention as ref
from .attention_modes import VkernPrologueProcessor
from .prologue import kernel_rms_norm, table_pair


class VkernMochiAttnProcessor(VkernPrologueProcessor):
    """MochiAttnProcessor2_0 with the attention through vkern.ops: one call over the whole batch, the video and all
    text tokens, the padding masked as keys; the text output then laid out as diffusers' is (each row's real tokens
    first, in order, the rest zero), so any mask gives diffusers' result. fused_qk_norm_rope: the video's per-head
    RMSNorm + RoPE of q and k as one kernel pass each (else diffusers' ops); the projections and the text's norms stay
    diffusers' ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        attend = ref.attend_per_row  # diffusers' step: a loop over the batch rows
        if self.uses_kernels(attn, hidden_states, encoder_hidden_states):
            attend = functools.partial(_joint, self.kernel_step(heads_first=True))
        norm_rope = self.prologue_step(attn, fused_norm_rope, ref.norm_rope, hidden_states, encoder_hidden_states)
        return ref.mochi_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                   attend=attend, norm_rope=norm_rope)


def fused_norm_rope(x, norm, heads, image_rotary_emb):
    """ref.norm_rope by one vkern.ops.qk_norm_rope pass (fp32 math, one rounding; Mochi's per-pair RoPE with its
    [S, H, D / 2] tables: rope_tables="pairs", a row per head). Another norm (none, no weight) or tables of another
    shape run diffusers' ops."""
    S, D = x.shape[1], x.shape[2] // heads
    rope = image_rotary_emb
    if not ((rope is None or table_pair(rope, (S, heads, D // 2))) and kernel_rms_norm(norm, D)):
        return ref.norm_rope(x, norm, heads, rope)
    tables = () if rope is None else tuple(t[None] for t in rope)  # [1, S, H, D / 2] views
    return ops.qk_norm_rope(x, norm.weight, norm.eps, heads, *tables, rope_tables="pairs")


def _joint(step, query, key, value, encoder_query, encoder_key, encoder_value, attention_mask):
    """attend_per_row's result from one masked call: step(q, k, v, key-padding mask) on heads-first tensors."""
    video = query.shape[2]
    real = attention_mask.bool()
    keys = torch.cat([real.new_ones(real.shape[0], video), real], dim=1)
    out = step(*(torch.cat(pair, dim=2) for pair in ((query, encoder_query), (key, encoder_key),
                                                     (value, encoder_value))), keys)
    # Text rows as diffusers lays them out: the real tokens first (a stable sort keeps their order), then zeros.
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)
    text = out[:, :, video:].gather(2, order[:, None, :, None].expand(-1, out.shape[1], -1, out.shape[3]))
    kept = torch.arange(real.shape[1], device=real.device)[None, :] < real.sum(1, keepdim=True)
    return torch.cat([out[:, :, :video], text * kept[:, None, :, None].to(text.dtype)], dim=2)
