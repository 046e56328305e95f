"""Mochi attention, the spec for vkern's processor: the same torch ops in the same order as diffusers'
MochiAttnProcessor2_0 (diffusers 0.42), with the attention step as a parameter. Joint attention over [video, text]
with the text projected by its own add_q/k/v_proj; diffusers attends one batch row at a time over the video and that
row's real prompt tokens (gathered to the front, the rest of the text output zero)."""
import torch
import torch.nn.functional as F

from .attention import apply_rotary_pairs, stream_qkv


def attend_per_row(query, key, value, encoder_query, encoder_key, encoder_value, attention_mask):
    """diffusers' attention step: heads-first [B, H, S, D] video and text q/k/v, the prompt mask [B, T]; per batch row,
    SDPA over the video and the row's real text tokens, its output padded with zeros to S + T."""
    total_length = query.size(2) + encoder_query.size(2)
    attn_outputs = []
    for idx in range(query.shape[0]):
        valid = torch.nonzero(attention_mask[idx][None, :].flatten(), as_tuple=False).flatten()
        valid_query = torch.cat([query[idx: idx + 1], encoder_query[idx: idx + 1, :, valid, :]], dim=2)
        valid_key = torch.cat([key[idx: idx + 1], encoder_key[idx: idx + 1, :, valid, :]], dim=2)
        valid_value = torch.cat([value[idx: idx + 1], encoder_value[idx: idx + 1, :, valid, :]], dim=2)
        attn_output = F.scaled_dot_product_attention(valid_query, valid_key, valid_value, dropout_p=0.0,
                                                     is_causal=False)
        attn_outputs.append(F.pad(attn_output, (0, 0, 0, total_length - attn_output.size(2))))
    return torch.cat(attn_outputs, dim=0)


def norm_rope(x, norm, heads, image_rotary_emb):
    """diffusers' video q/k prologue: a projection [B, S, heads * D] split into heads, its per-head norm (None: none),
    then RoPE with [S, H, D / 2] tables (None: none)."""
    x = x.unflatten(2, (heads, -1))
    x = x if norm is None else norm(x)
    return x if image_rotary_emb is None else apply_rotary_pairs(x, *image_rotary_emb)


def mochi_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None,
                    attend=attend_per_row, norm_rope=norm_rope):
    """MochiAttnProcessor2_0.__call__; attend(query, key, value, encoder_query, encoder_key, encoder_value,
    attention_mask) on heads-first tensors returns the joint output [B, H, S + T, D] (attend_per_row's form);
    norm_rope: the video q/k prologue (norm_rope's form). Returns (hidden_states, encoder_hidden_states) as diffusers
    does."""
    query, key = (norm_rope(proj(hidden_states), norm, attn.heads, image_rotary_emb)
                  for proj, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)))
    value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    encoder_query, encoder_key, encoder_value = stream_qkv(attn, encoder_hidden_states,
                                                           (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                                                           (attn.norm_added_q, attn.norm_added_k))

    streams = [t.transpose(1, 2) for t in (query, key, value, encoder_query, encoder_key, encoder_value)]
    sequence_length, encoder_sequence_length = query.size(1), encoder_query.size(1)
    hidden_states = attend(*streams, attention_mask).transpose(1, 2).flatten(2, 3)
    hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
        (sequence_length, encoder_sequence_length), dim=1)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if hasattr(attn, "to_add_out"):
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states
