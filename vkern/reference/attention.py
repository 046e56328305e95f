"""Wan attention, the spec for vkern's processors: the same torch ops in the same order as
diffusers' WanAttnProcessor (diffusers 0.42), split into the pieces the kernels replace."""
import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    """torch.nn.RMSNorm over the last dimension (Wan's norm_q/norm_k normalize across all heads)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def apply_rotary_interleaved(x, freqs_cos, freqs_sin):
    """Wan's RoPE on x [B, S, H, D]: pairs (2i, 2i+1) rotated; freqs [1|B, S, 1, D] repeat-interleaved
    (diffusers keeps them in float64, so the rotation is computed in float64 and rounded once)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def qk_norm_rope(x, weight, eps, heads, freqs_cos=None, freqs_sin=None):
    """[B, S, H*D] projection output -> RMSNorm across heads -> [B, S, H, D] -> optional RoPE."""
    x = rms_norm(x, weight, eps).unflatten(2, (heads, -1))
    if freqs_cos is not None:
        x = apply_rotary_interleaved(x, freqs_cos, freqs_sin)
    return x


def attention(q, k, v, attn_mask=None):
    """Non-causal attention on [B, S, H, D] tensors, as diffusers' native backend calls SDPA."""
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.permute(0, 2, 1, 3)


def attention_math(q, k, v, attn_mask=None, dtype=torch.float64):
    """Plain softmax(QK^T/sqrt(d))V in `dtype` (the high-precision oracle for kernel tests).
    attn_mask: bool (True = attend) or additive, broadcastable to [B, H, Sq, Skv]."""
    q, k, v = (t.permute(0, 2, 1, 3).to(dtype) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(dtype)
    return (s.softmax(-1) @ v).permute(0, 2, 1, 3)


def _projections(attn, hidden_states, encoder_hidden_states):
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _added_projections(attn, image_context):
    if getattr(attn, "fused_projections", False):
        return attn.to_added_kv(image_context).chunk(2, dim=-1)
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)


def wan_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                  norm_rope=qk_norm_rope, attend=attention):
    """WanAttnProcessor.__call__ with the norm+RoPE and attention steps as parameters, so a vkern
    processor is this function with kernels plugged in (and the reference is it with none)."""
    image_context = None
    if attn.add_k_proj is not None:
        image_context_length = encoder_hidden_states.shape[1] - 512  # Wan's text length, as in diffusers
        image_context = encoder_hidden_states[:, :image_context_length]
        encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

    query, key, value = _projections(attn, hidden_states, encoder_hidden_states)
    freqs = rotary_emb if rotary_emb is not None else (None, None)
    query = norm_rope(query, attn.norm_q.weight, attn.norm_q.eps, attn.heads, *freqs)
    key = norm_rope(key, attn.norm_k.weight, attn.norm_k.eps, attn.heads, *freqs)
    value = value.unflatten(2, (attn.heads, -1))

    hidden_states_img = None
    if image_context is not None:
        key_img, value_img = _added_projections(attn, image_context)
        key_img = norm_rope(key_img, attn.norm_added_k.weight, attn.norm_added_k.eps, attn.heads)
        value_img = value_img.unflatten(2, (attn.heads, -1))
        hidden_states_img = attend(query, key_img, value_img).flatten(2, 3).type_as(query)

    hidden_states = attend(query, key, value, attention_mask).flatten(2, 3).type_as(query)
    if hidden_states_img is not None:
        hidden_states = hidden_states + hidden_states_img
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)
