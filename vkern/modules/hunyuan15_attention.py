"""Drop-in attention processor for diffusers' HunyuanVideo 1.5 transformer: joint attention over [video, text] tokens
through vkern.ops, the padded text as a key-padding mask instead of diffusers' [B, 1, S, S] mask."""
import functools

from ..reference import hunyuan15_attention as ref
from .attention_modes import VkernProcessor


class VkernHunyuanVideo15AttnProcessor(VkernProcessor):
    """HunyuanVideo15AttnProcessor2_0 with the attention through vkern.ops: no S x S mask is built (diffusers builds
    one per call); the padded text tokens are masked as keys, and their own output rows zeroed as SDPA leaves them.
    The projections, the per-head RMSNorm and RoPE stay diffusers' ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        attend = ref.padded_joint_attention
        if self.uses_kernels(attn, hidden_states, encoder_hidden_states):
            text = 0 if attention_mask is None else attention_mask.shape[1]
            attend = functools.partial(_key_padded, self.kernel_step(), text)
        return ref.hunyuan_video15_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                             image_rotary_emb, attend=attend)


def _key_padded(step, text, query, key, value, tokens):
    """padded_joint_attention's result: step(q, k, v, key-padding mask), then the padded queries' rows (all among the
    last `text` tokens: the video's are real) set to 0, where diffusers' mask leaves a row no key."""
    out = step(query, key, value, tokens)
    if tokens is not None and text:
        out[:, -text:].masked_fill_(~tokens[:, -text:, None, None], 0)
    return out
