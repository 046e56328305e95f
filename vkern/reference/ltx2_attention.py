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


def _rope(x, freqs, rope_type):
    from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

    if rope_type == "interleaved":
        return apply_interleaved_rotary_emb(x, freqs)
    if rope_type == "split":
        return apply_split_rotary_emb(x, freqs)
    return x  # (diffusers applies none for another rope_type)


def ltx2_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                   key_rotary_emb=None, perturbation_mask=None, all_perturbed=None, attend=attention):
    """LTX2PerturbedAttnProcessor.__call__ (with perturbation_mask and all_perturbed None: LTX2AudioVideoAttnProcessor's
    result); attend(q, k, v, attention_mask) on [B, S, H, D] tensors runs the attention."""
    attention_mask, encoder_hidden_states = mask_and_context(attn, hidden_states, encoder_hidden_states, attention_mask)
    gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None

    value = attn.to_v(encoder_hidden_states)
    if all_perturbed is None:
        all_perturbed = torch.all(perturbation_mask == 0) if perturbation_mask is not None else False
    if all_perturbed:  # spatio-temporal guidance: the values stand in for the attention
        hidden_states = value
    else:
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(encoder_hidden_states))
        if query_rotary_emb is not None:
            query = _rope(query, query_rotary_emb, attn.rope_type)
            key = _rope(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb, attn.rope_type)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        hidden_states = attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
        if perturbation_mask is not None:
            hidden_states = torch.lerp(value.flatten(2, 3), hidden_states, perturbation_mask)

    if gate_logits is not None:  # per-head gates, 1 at zero logits
        gates = 2.0 * torch.sigmoid(gate_logits)
        hidden_states = (hidden_states.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
    return attn.to_out[1](attn.to_out[0](hidden_states))
