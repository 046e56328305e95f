"""Drop-in attention processors for diffusers' LTX-2 transformer (all six attentions of its audio-video blocks)
through vkern.ops: one for LTX2AudioVideoAttnProcessor, one for LTX2PerturbedAttnProcessor (spatio-temporal
guidance). Their __call__ signatures match diffusers', since LTX2Attention passes a processor only the keyword
arguments its signature names."""
from ..reference import ltx2_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from .attention_modes import VkernProcessor


class VkernLTX2AttnProcessor(VkernProcessor):
    """LTX2AudioVideoAttnProcessor with the attention through vkern.ops: the video self-attention (head dim 128) and
    the audio's (64) on vkern's kernels; the prompt cross-attention under the model's additive mask runs SDPA as in
    diffusers (in the 8-bit modes too: exact 16-bit, said once). Projections, norms, RoPE and gates stay diffusers'."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None):
        step = self.attention_step(attn, sdpa_as_diffusers, hidden_states, encoder_hidden_states)
        return ref.ltx2_attention(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                                  key_rotary_emb, attend=step)


class VkernLTX2PerturbedAttnProcessor(VkernProcessor):
    """LTX2PerturbedAttnProcessor (perturbation_mask: 0 where a batch row's attention is replaced by its values) with
    the attention through vkern.ops, as VkernLTX2AttnProcessor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, perturbation_mask=None, all_perturbed=None):
        step = self.attention_step(attn, sdpa_as_diffusers, hidden_states, encoder_hidden_states)
        return ref.ltx2_attention(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                                  key_rotary_emb, perturbation_mask, all_perturbed, attend=step)
