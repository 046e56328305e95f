"""Drop-in attention processors for diffusers' LTX-2 transformer (all six attentions of its audio-video blocks)
through vkern.ops: one for LTX2AudioVideoAttnProcessor, one for LTX2PerturbedAttnProcessor (spatio-temporal
guidance). Their __call__ signatures match diffusers', since LTX2Attention passes a processor only the keyword
arguments its signature names."""
import functools

from .. import ops
from ..reference import ltx2_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from .attention_modes import VkernPrologueProcessor
from .ltx_attention import fused_norm_rope
from .prologue import kernel_rms_norm, table_pair


def fused_ltx2_norm_rope(x, norm, heads, freqs, rope_type):
    """ref.norm_rope by one kernel pass: the interleaved RoPE (or none) as ltx_attention.fused_norm_rope; the split
    RoPE (LTX-2's released checkpoints) as rope_tables="split" from diffusers' (cos, sin) tables [1|B, heads, S, D / 2]
    under an RMSNorm across heads, at a power-of-two head dim D. Anything else runs diffusers' ops."""
    diffusers_step = functools.partial(ref.norm_rope, rope_type=rope_type)
    if freqs is None or rope_type == "interleaved":
        return fused_norm_rope(x, norm, heads, freqs, diffusers_step)
    B, S, width = x.shape
    D = width // heads
    if (rope_type == "split" and D & (D - 1) == 0 and kernel_rms_norm(norm, width)
            and table_pair(freqs, {(1, heads, S, D // 2), (B, heads, S, D // 2)})):
        cos, sin = (t.transpose(1, 2) for t in freqs)  # [1|B, S, heads, D / 2] views
        return ops.qk_norm_rope(x, norm.weight, norm.eps, heads, cos, sin, rope_tables="split")
    return diffusers_step(x, norm, heads, freqs)


class VkernLTX2AttnProcessor(VkernPrologueProcessor):
    """LTX2AudioVideoAttnProcessor with the attention through vkern.ops: the video self-attention (head dim 128) and
    the audio's (64) on vkern's kernels; the prompt cross-attention under the model's additive mask runs SDPA as in
    diffusers (in the 8-bit modes too: exact 16-bit, said once). fused_qk_norm_rope: q's and k's RMSNorm + RoPE
    (interleaved or split) as one kernel pass each (fused_ltx2_norm_rope). Projections and gates stay diffusers'."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None):
        step = self.attention_step(attn, sdpa_as_diffusers, hidden_states, encoder_hidden_states)
        norm_rope = self.prologue_step(attn, fused_ltx2_norm_rope, ref.norm_rope, hidden_states, encoder_hidden_states)
        return ref.ltx2_attention(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                                  key_rotary_emb, attend=step, norm_rope=norm_rope)


class VkernLTX2PerturbedAttnProcessor(VkernPrologueProcessor):
    """LTX2PerturbedAttnProcessor (perturbation_mask: 0 where a batch row's attention is replaced by its values) with
    the attention and the q/k prologue through vkern.ops, as VkernLTX2AttnProcessor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        step = self.attention_step(attn, sdpa_as_diffusers, hidden_states, encoder_hidden_states)
        norm_rope = self.prologue_step(attn, fused_ltx2_norm_rope, ref.norm_rope, hidden_states, encoder_hidden_states)
        return ref.ltx2_attention(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                                  key_rotary_emb, perturbation_mask, all_perturbed, attend=step, norm_rope=norm_rope)
