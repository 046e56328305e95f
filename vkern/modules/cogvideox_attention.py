"""Drop-in attention processor for diffusers' CogVideoX transformer: joint attention over [text, video] tokens
through vkern.ops."""
from ..reference import cogvideox_attention as ref
from .attention_modes import VkernProcessor


class VkernCogVideoXAttnProcessor(VkernProcessor):
    """(Fused)CogVideoXAttnProcessor2_0 with the attention through vkern.ops (head dim 64: vkern's CUDA kernel with its
    128x224 tile from 4096 keys on Hopper under "auto"; the 8-bit CUDA kernel is head dim 128 only, so here "int8"
    and "fp8" run the Triton kernel, "int8pv" the reference). fused: the model's projections were fused
    (fuse_qkv_projections), q/k/v come from to_qkv. The projections, the per-head LayerNorm and RoPE stay diffusers'
    ops; diffusers computes them heads-first, [B, H, S, D], and vkern's ops take views of that."""

    def __init__(self, attention="auto", fused=False):
        super().__init__(attention)
        self.fused = fused

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        step = self.attention_step(attn, ref.sdpa_heads_first, hidden_states, encoder_hidden_states, heads_first=True)
        return ref.cogvideox_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                       attend=step, fused=self.fused)

    def __repr__(self):
        return f"VkernCogVideoXAttnProcessor(attention={self.attention!r}, fused={self.fused})"
