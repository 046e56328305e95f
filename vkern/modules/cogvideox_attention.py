"""Drop-in attention processor for diffusers' CogVideoX transformer: joint attention over [text, video] tokens
through vkern.ops."""
import functools

from ..reference import cogvideox_attention as ref
from ._grad import records_autograd
from .attention_modes import attend
from .wan_attention import ATTENTION_MODES


class VkernCogVideoXAttnProcessor:
    """(Fused)CogVideoXAttnProcessor2_0 with the attention through vkern.ops (head dim 64: vkern's CUDA kernel with
    its 128x224 tile from 4096 keys on Hopper under "auto"). attention: one of ATTENTION_MODES, as for Wan (the
    8-bit CUDA kernel is head dim 128 only, so at CogVideoX's 64 "int8" and "fp8" run the Triton kernel, "int8pv"
    the reference); fused: the model's projections were fused (fuse_qkv_projections), q/k/v come from to_qkv. The
    projections, the per-head LayerNorm and RoPE stay diffusers' ops."""

    def __init__(self, attention="auto", fused=False):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        self.attention, self.fused = attention, fused

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        run = ref.sdpa_heads_first  # vkern's ops have no backward: with autograd recording, diffusers' own
        if self.attention != "reference" and not records_autograd(attn, hidden_states, encoder_hidden_states):
            run = functools.partial(_attend_heads_first, attention=self.attention, who=type(self).__name__)
        return ref.cogvideox_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                       attend=run, fused=self.fused)

    def __repr__(self):
        return f"VkernCogVideoXAttnProcessor(attention={self.attention!r}, fused={self.fused})"


def _attend_heads_first(q, k, v, attention_mask, attention, who):
    """attend() on [B, H, S, D] tensors, as views (vkern's ops take the [B, S, H, D] view of heads-first storage)."""
    return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask, attention, who).transpose(1, 2)
