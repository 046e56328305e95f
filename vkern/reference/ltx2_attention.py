"""LTX-2 attention, the spec for vkern's processors: the same torch ops as diffusers' LTX2AudioVideoAttnProcessor and
LTX2PerturbedAttnProcessor (diffusers 0.42) on the native backend, with the attention step as a parameter. One
function for both: the plain processor is the perturbed one without a perturbation (its ops are the same, op for op).

Every attention of an LTX-2 block: video and audio self-attention, their cross-attention to the prompt (the model's
additive 0 / -10000 mask, a general SDPA mask) and the audio-to-video / video-to-audio cross-attention; RMSNorm across
heads on q and k, RoPE (interleaved or split) over the whole inner dim, with separate tables for the queries and the
keys, and an optional per-head output gate."""
import torch

from .attention import attention
from .ltx_attention import mask_and_context


def norm_rope(x, norm, heads, freqs, rope_type):
    """diffusers' q/k prologue: a projection [B, S, heads * D] through its norm (across heads), then RoPE of
    `rope_type` over the whole inner dim (freqs None: none), split into heads."""
    from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

    x = norm(x)
    if freqs is not None and rope_type == "interleaved":
        x = apply_interleaved_rotary_emb(x, freqs)
    elif freqs is not None and rope_type == "split":
        x = apply_split_rotary_emb(x, freqs)  # (diffusers applies none for another rope_type)
    return x.unflatten(2, (heads, -1))


def ltx2_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                   key_rotary_emb=None, perturbation_mask=None, all_perturbed=None, attend=attention,
                   norm_rope=norm_rope):
    """LTX2PerturbedAttnProcessor.__call__ (with perturbation_mask and all_perturbed None: LTX2AudioVideoAttnProcessor's
    result); attend(q, k, v, attention_mask) on [B, S, H, D] tensors runs the attention; norm_rope: the q/k prologue
    (norm_rope's form)."""
    attention_mask, encoder_hidden_states = mask_and_context(attn, hidden_states, encoder_hidden_states, attention_mask)
    gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None

    value = attn.to_v(encoder_hidden_states)
    if all_perturbed is None:
        all_perturbed = torch.all(perturbation_mask == 0) if perturbation_mask is not None else False
    if all_perturbed:  # spatio-temporal guidance: the values stand in for the attention
        hidden_states = value
    else:
        key_rotary_emb = key_rotary_emb if key_rotary_emb is not None else query_rotary_emb
        query = norm_rope(attn.to_q(hidden_states), attn.norm_q, attn.heads, query_rotary_emb, attn.rope_type)
        key = norm_rope(attn.to_k(encoder_hidden_states), attn.norm_k, attn.heads,
                        key_rotary_emb if query_rotary_emb is not None else None, attn.rope_type)
        value = value.unflatten(2, (attn.heads, -1))
        hidden_states = attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
        if perturbation_mask is not None:
            hidden_states = torch.lerp(value.flatten(2, 3), hidden_states, perturbation_mask)

    if gate_logits is not None:  # per-head gates, 1 at zero logits
        gates = 2.0 * torch.sigmoid(gate_logits)
        hidden_states = (hidden_states.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
    return attn.to_out[1](attn.to_out[0](hidden_states))
