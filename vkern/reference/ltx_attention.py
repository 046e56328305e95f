"""LTX-Video attention, the spec for vkern's processor: the same torch ops in the same order as diffusers'
LTXVideoAttnProcessor (diffusers 0.42) on its native backend, with the attention step as a parameter. Self-attention
(attn1: RMSNorm across heads on q and k, RoPE over the whole inner dim) and cross-attention to the prompt (attn2: the
model turns the prompt's mask into an additive bias, [B, 1, N] of 0 / -10000, a general SDPA mask)."""
from .attention import attention


def norm_rope(x, norm, heads, freqs):
    """diffusers' q/k prologue: a projection [B, S, heads * D] through its norm (across heads), then RoPE over the
    whole inner dim (apply_rotary_emb; freqs None: none), split into heads."""
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

    x = norm(x)
    return (x if freqs is None else apply_rotary_emb(x, freqs)).unflatten(2, (heads, -1))


def ltx_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                  attend=attention, norm_rope=norm_rope):
    """LTXVideoAttnProcessor.__call__; attend(q, k, v, attention_mask) on [B, S, H, D] tensors runs the attention;
    norm_rope: the q/k prologue (norm_rope's form)."""
    attention_mask, encoder_hidden_states = mask_and_context(attn, hidden_states, encoder_hidden_states, attention_mask)

    query = norm_rope(attn.to_q(hidden_states), attn.norm_q, attn.heads, image_rotary_emb)
    key = norm_rope(attn.to_k(encoder_hidden_states), attn.norm_k, attn.heads, image_rotary_emb)
    value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))

    hidden_states = attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
    return attn.to_out[1](attn.to_out[0](hidden_states))


def mask_and_context(attn, hidden_states, encoder_hidden_states, attention_mask):
    """The LTX processors' first step (LTX-Video, LTX-2): the mask repeated per head as [B, heads, 1|Sq, Skv] (None
    stays None), and the keys' source (the hidden states themselves for self-attention)."""
    batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    return attention_mask, (hidden_states if encoder_hidden_states is None else encoder_hidden_states)
