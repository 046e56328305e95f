"""CogVideoX attention, the spec for vkern's processor: the same torch ops in the same order as diffusers'
CogVideoXAttnProcessor2_0 and FusedCogVideoXAttnProcessor2_0 (diffusers 0.42), with the attention step as a
parameter. The sequence is [text tokens, video tokens]; q and k are normed per head (LayerNorm) and RoPE-rotated on
the video part, in the heads-first layout [B, H, S, D] diffusers computes them in."""
import torch
import torch.nn.functional as F


def sdpa_heads_first(q, k, v, attn_mask=None):
    """The attention step as diffusers' processor calls it: SDPA on [B, H, S, D]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)


def norm_rope(x, norm, heads, image_rotary_emb, text):
    """diffusers' q/k prologue: a projection [B, S, heads * D] (the text's `text` tokens first) heads-first, [B, H, S,
    D], through its per-head norm (None: none), then RoPE on the tokens after the text (tables None: none)."""
    x = x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)
    if norm is not None:
        x = norm(x)
    if image_rotary_emb is not None:
        from diffusers.models.embeddings import apply_rotary_emb

        x[:, :, text:] = apply_rotary_emb(x[:, :, text:], image_rotary_emb)
    return x


def cogvideox_attention(attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                        attend=sdpa_heads_first, fused=False, norm_rope=norm_rope):
    """(CogVideoX|FusedCogVideoX)AttnProcessor2_0.__call__ (fused: the fused one, whose q/k/v come from to_qkv);
    attend(q, k, v, mask) on [B, H, S, D] tensors runs the attention; norm_rope: the q/k prologue (norm_rope's
    form). Returns (hidden_states, encoder_hidden_states) as diffusers does."""
    text_seq_length = encoder_hidden_states.size(1)
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    batch_size, sequence_length, _ = hidden_states.shape
    if fused:  # (diffusers' fused processor sizes the mask from the text, not the joint sequence)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

    if fused:
        qkv = attn.to_qkv(hidden_states)
        query, key, value = torch.split(qkv, qkv.shape[-1] // 3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = norm_rope(query, attn.norm_q, attn.heads, image_rotary_emb, text_seq_length)
    key = norm_rope(key, attn.norm_k, attn.heads, None if attn.is_cross_attention else image_rotary_emb,
                    text_seq_length)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

    hidden_states = attend(query, key, value, attention_mask)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    encoder_hidden_states, hidden_states = hidden_states.split(
        [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1)
    return hidden_states, encoder_hidden_states
