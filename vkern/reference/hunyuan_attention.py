"""HunyuanVideo attention, the spec for vkern's processor: the same torch ops in the same order as diffusers'
HunyuanVideoAttnProcessor2_0 (diffusers 0.42) on its native backend, with the attention step as a parameter.

Two forms of the same processor: the dual-stream blocks project the text with their own add_q/k/v_proj and append
it after the video; the single-stream blocks get the text appended to the hidden states up front. Either way the
sequence is [video tokens, text tokens], RoPE applies to the video part only, and diffusers' mask is
[B, 1, 1, N] bool (True = attend) over that sequence: a key-padding mask (the padded text at the end)."""
import torch

from .attention import attention, stream_qkv


def _rope(x, image_rotary_emb):
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, image_rotary_emb, sequence_dim=1)


def _rope_video(x, image_rotary_emb, text_tokens):
    """RoPE on the video tokens only (the single-stream form: the text is the last text_tokens)."""
    if not text_tokens:
        return _rope(x, image_rotary_emb)
    return torch.cat([_rope(x[:, :-text_tokens], image_rotary_emb), x[:, -text_tokens:]], dim=1)


def video_qkv(attn, hidden_states, image_rotary_emb=None, text_tokens=0, norm_rope=None):
    """The main stream's (query, key, value) [B, S, H, D] (HunyuanVideo 1.0 and 1.5): the projections, the per-head
    RMSNorm of q and k, RoPE on all but the last text_tokens (the single-stream form's appended text).
    norm_rope(projection [B, S, H * D], norm, heads, image_rotary_emb, text_tokens) -> [B, S, H, D] replaces
    diffusers' norm and RoPE ops (None: them)."""
    if norm_rope is None:
        query, key, value = stream_qkv(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v),
                                       (attn.norm_q, attn.norm_k))
        if image_rotary_emb is not None:
            query = _rope_video(query, image_rotary_emb, text_tokens)
            key = _rope_video(key, image_rotary_emb, text_tokens)
        return query, key, value
    return (norm_rope(attn.to_q(hidden_states), attn.norm_q, attn.heads, image_rotary_emb, text_tokens),
            norm_rope(attn.to_k(hidden_states), attn.norm_k, attn.heads, image_rotary_emb, text_tokens),
            attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)))


def hunyuan_video_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                            image_rotary_emb=None, attend=attention, norm_rope=None):
    """HunyuanVideoAttnProcessor2_0.__call__; attend(q, k, v, attention_mask) on [B, S, H, D] tensors runs the
    attention (default: SDPA as diffusers' native backend calls it); norm_rope: see video_qkv. Returns
    (hidden_states, encoder_hidden_states) as diffusers does: the text part split off and projected when
    encoder_hidden_states is given."""
    single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
    if single_stream:
        hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    text_tokens = encoder_hidden_states.shape[1] if single_stream else 0
    query, key, value = video_qkv(attn, hidden_states, image_rotary_emb, text_tokens, norm_rope)

    if attn.add_q_proj is not None and encoder_hidden_states is not None:
        query, key, value = append_text_stream(attn, query, key, value, encoder_hidden_states)

    hidden_states = attend(query, key, value, attention_mask).flatten(2, 3).to(query.dtype)
    return split_streams(attn, hidden_states, encoder_hidden_states)


def append_text_stream(attn, query, key, value, encoder_hidden_states):
    """The dual-stream blocks' step (HunyuanVideo 1.0 and 1.5): the text's own projections and norms, its q, k, v
    appended after the video's."""
    encoder_query, encoder_key, encoder_value = stream_qkv(attn, encoder_hidden_states,
                                                           (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                                                           (attn.norm_added_q, attn.norm_added_k))
    return (torch.cat([query, encoder_query], dim=1), torch.cat([key, encoder_key], dim=1),
            torch.cat([value, encoder_value], dim=1))


def split_streams(attn, hidden_states, encoder_hidden_states):
    """The attention output [B, S, H * D] -> (video, text), each through its output projection where the module has
    one (diffusers' last step; with no text, the output as it is)."""
    if encoder_hidden_states is not None:
        text_tokens = encoder_hidden_states.shape[1]
        hidden_states, encoder_hidden_states = hidden_states[:, :-text_tokens], hidden_states[:, -text_tokens:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states
