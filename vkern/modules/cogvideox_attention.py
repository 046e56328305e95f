"""Drop-in attention processor for diffusers' CogVideoX transformer: joint attention over [text, video] tokens
through vkern.ops, the q/k LayerNorm + RoPE fused."""
from ..reference import cogvideox_attention as ref
from .attention_modes import VkernPrologueProcessor
from .prologue import kernel_layer_norm, norm_rope_spans, table_pair


class VkernCogVideoXAttnProcessor(VkernPrologueProcessor):
    """(Fused)CogVideoXAttnProcessor2_0 with the attention through vkern.ops (head dim 64: vkern's CUDA kernel with its
    128x224 tile from 4096 keys on Hopper under "auto"; the 8-bit CUDA kernel is head dim 128 only, so here "int8"
    and "fp8" run the Triton kernel, "int8pv" the reference). fused: the model's projections were fused
    (fuse_qkv_projections), q/k/v come from to_qkv. fused_qk_norm_rope: q's and k's per-head LayerNorm + RoPE (on the
    video tokens) as one kernel pass each (else diffusers' ops, heads-first [B, H, S, D], whose views vkern's ops
    take); the projections stay diffusers' ops."""

    def __init__(self, attention="auto", fused=False, fused_qk_norm_rope=True):
        super().__init__(attention, fused_qk_norm_rope)
        self.fused = fused

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        step = self.attention_step(attn, ref.sdpa_heads_first, hidden_states, encoder_hidden_states, heads_first=True)
        norm_rope = self.prologue_step(attn, fused_norm_rope, ref.norm_rope, hidden_states, encoder_hidden_states)
        return ref.cogvideox_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                       attend=step, fused=self.fused, norm_rope=norm_rope)

    def __repr__(self):
        return (f"VkernCogVideoXAttnProcessor(attention={self.attention!r}, fused={self.fused}, "
                f"fused_qk_norm_rope={self.fused_qk_norm_rope})")


def fused_norm_rope(x, norm, heads, image_rotary_emb, text):
    """ref.norm_rope by vkern.ops.qk_norm_rope: the per-head LayerNorm of the text tokens, and of the video tokens
    with diffusers' apply_rotary_emb from (cos, sin) [video, D] tables, one pass each into one [B, S, H, D] buffer
    (fp32 math, one rounding), returned heads-first as a view. Another norm or tables of another shape run diffusers'
    ops."""
    S, width = x.shape[1:]
    D = width // heads
    rope = image_rotary_emb
    if not ((rope is None or table_pair(rope, (S - text, D))) and kernel_layer_norm(norm, D)):
        return ref.norm_rope(x, norm, heads, rope, text)
    tables = () if rope is None else tuple(t[None, :, None] for t in rope)  # [1, video, 1, D] views
    return norm_rope_spans(x, norm.weight, norm.eps, heads, tables, slice(text, None), slice(None, text),
                           norm="layer", bias=norm.bias).transpose(1, 2)
