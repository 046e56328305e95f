"""Drop-in attention processor for diffusers' HunyuanVideo 1.5 transformer: joint attention over [video, text] tokens
through vkern.ops, the padded text as a key-padding mask instead of diffusers' [B, 1, S, S] mask."""
import functools

from ..reference import hunyuan15_attention as ref
from .hunyuan_attention import VkernHunyuanVideoAttnProcessor, fused_head_norm_rope


class VkernHunyuanVideo15AttnProcessor(VkernHunyuanVideoAttnProcessor):
    """HunyuanVideo15AttnProcessor2_0 with the attention through vkern.ops: no S x S mask is built (diffusers builds
    one per call); the padded text tokens are masked as keys, and their own output rows zeroed as SDPA leaves them.
    fused_qk_norm_rope: the video's per-head RMSNorm + RoPE of q and k in one pass (as HunyuanVideo's); the
    projections and the text stream's norms stay diffusers' ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        attend = ref.padded_joint_attention
        if self.uses_kernels(attn, hidden_states, encoder_hidden_states):
            text = 0 if attention_mask is None else attention_mask.shape[1]
            attend = functools.partial(_key_padded, self.kernel_step(), text)
        norm_rope = self.prologue_step(attn, fused_head_norm_rope, None, hidden_states, encoder_hidden_states)
        return ref.hunyuan_video15_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                             image_rotary_emb, attend=attend, norm_rope=norm_rope)


def _key_padded(step, text, query, key, value, tokens):
    """padded_joint_attention's result: step(q, k, v, key-padding mask), then the padded queries' rows (all among the
    last `text` tokens: the video's are real) set to 0, where diffusers' mask leaves a row no key."""
    out = step(query, key, value, tokens)
    if tokens is not None and text:
        out[:, -text:].masked_fill_(~tokens[:, -text:, None, None], 0)
    return out
