"""Drop-in attention processor for diffusers' HunyuanVideo transformer (dual- and single-stream blocks): joint
attention over [video, text] tokens with the padded text masked, through vkern.ops; the video stream's per-head
RMSNorm + RoPE of q and k in one vkern.ops.qk_norm_rope pass (shared with HunyuanVideo 1.5's processor)."""
from ..reference import hunyuan_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from .attention_modes import VkernPrologueProcessor
from .prologue import kernel_rms_norm, norm_rope_spans, table_pair


class VkernHunyuanVideoAttnProcessor(VkernPrologueProcessor):
    """HunyuanVideoAttnProcessor2_0 with the attention through vkern.ops: diffusers' [B, 1, 1, N] bool mask goes to
    the kernels as a key-padding mask (SDPA takes it as a general mask, which rules out its flash backend).
    fused_qk_norm_rope: q's and k's per-head RMSNorm + RoPE as one kernel pass (else diffusers' ops); the
    projections and the text stream's norms stay diffusers' ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        attend = self.attention_step(attn, sdpa_as_diffusers, hidden_states, encoder_hidden_states)
        norm_rope = self.prologue_step(attn, fused_head_norm_rope, None, hidden_states, encoder_hidden_states)
        return ref.hunyuan_video_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                           image_rotary_emb, attend=attend, norm_rope=norm_rope)


def fused_head_norm_rope(x, norm, heads, image_rotary_emb, text_tokens):
    """x [B, S, heads * D] (a q or k projection) -> [B, S, heads, D]: `norm` (an RMSNorm over each head's D values
    with a weight) and RoPE from diffusers' (cos, sin) [S - text_tokens, D] tables (apply_rotary_emb's form) on all
    but the last text_tokens (normed only), by vkern.ops.qk_norm_rope: one pass, fp32 math, one rounding. Another
    norm (none, a bias, no weight, another class) or tables of another form run diffusers' ops (video_qkv's)."""
    S, width = x.shape[1:]
    D = width // heads
    video = S - text_tokens
    rope = image_rotary_emb
    if not ((rope is None or table_pair(rope, (video, D))) and kernel_rms_norm(norm, D)):
        y = x.unflatten(2, (heads, D))
        y = y if norm is None else norm(y)
        return y if rope is None else ref._rope_video(y, rope, text_tokens)
    tables = () if rope is None else tuple(t[None, :, None] for t in rope)  # [1, video, 1, D] views
    return norm_rope_spans(x, norm.weight, norm.eps, heads, tables, slice(None, video), slice(video, None))

