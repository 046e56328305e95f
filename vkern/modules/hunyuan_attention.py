"""Drop-in attention processor for diffusers' HunyuanVideo transformer (dual- and single-stream blocks): joint
attention over [video, text] tokens with the padded text masked, through vkern.ops; the video stream's per-head
RMSNorm + RoPE of q and k in one vkern.ops.qk_norm_rope pass (shared with HunyuanVideo 1.5's processor)."""
import torch

from .. import ops
from ..reference import hunyuan_attention as ref
from ..reference.attention import attention as sdpa_as_diffusers
from .attention_modes import VkernProcessor


class VkernHunyuanVideoAttnProcessor(VkernProcessor):
    """HunyuanVideoAttnProcessor2_0 with the attention through vkern.ops: diffusers' [B, 1, 1, N] bool mask goes to
    the kernels as a key-padding mask (SDPA takes it as a general mask, which rules out its flash backend).
    fused_qk_norm_rope: q's and k's per-head RMSNorm + RoPE as one kernel pass (else diffusers' ops); the
    projections and the text stream's norms stay diffusers' ops."""

    def __init__(self, attention="auto", fused_qk_norm_rope=True):
        super().__init__(attention)
        self.fused_qk_norm_rope = fused_qk_norm_rope

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        attend, norm_rope = sdpa_as_diffusers, None
        if self.uses_kernels(attn, hidden_states, encoder_hidden_states):
            attend = self.kernel_step()
            norm_rope = fused_head_norm_rope if self.fused_qk_norm_rope else None
        return ref.hunyuan_video_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                           image_rotary_emb, attend=attend, norm_rope=norm_rope)

    def __repr__(self):
        return f"{type(self).__name__}(attention={self.attention!r}, fused_qk_norm_rope={self.fused_qk_norm_rope})"


def fused_head_norm_rope(x, norm, heads, image_rotary_emb, text_tokens):
    """x [B, S, heads * D] (a q or k projection) -> [B, S, heads, D]: `norm` (an RMSNorm over each head's D values
    with a weight) and RoPE from diffusers' (cos, sin) [S - text_tokens, D] tables (apply_rotary_emb's form) on all
    but the last text_tokens (normed only), by vkern.ops.qk_norm_rope: one pass, fp32 math, one rounding. Another
    norm (none, a bias, no weight, another class) or tables of another form run diffusers' ops (video_qkv's)."""
    B, S, width = x.shape
    D = width // heads
    video = S - text_tokens
    rope = image_rotary_emb
    tables_fit = rope is None or (isinstance(rope, (tuple, list)) and len(rope) == 2 and
                                  all(torch.is_tensor(t) and tuple(t.shape) == (video, D) for t in rope))
    if not (tables_fit and _plain_rms_norm(norm, D)):
        y = x.unflatten(2, (heads, D))
        y = y if norm is None else norm(y)
        return y if rope is None else ref._rope_video(y, rope, text_tokens)
    out = x.new_empty((B, S, heads, D))
    tables = () if rope is None else tuple(t[None, :, None] for t in rope)  # [1, video, 1, D] views
    ops.qk_norm_rope(x[:, :video], norm.weight, norm.eps, heads, *tables, out=out[:, :video], rope_tables="per_element")
    if text_tokens:
        ops.qk_norm_rope(x[:, video:], norm.weight, norm.eps, heads, out=out[:, video:])
    return out


def _plain_rms_norm(norm, dim):
    """norm is diffusers' or torch's RMSNorm over `dim` values with a weight, no bias and a set eps: what the kernel
    computes."""
    from diffusers.models.normalization import RMSNorm

    weight = getattr(norm, "weight", None)
    return (isinstance(norm, (RMSNorm, torch.nn.RMSNorm)) and torch.is_tensor(weight) and tuple(weight.shape) == (dim,)
            and getattr(norm, "bias", None) is None and getattr(norm, "eps", None) is not None)
