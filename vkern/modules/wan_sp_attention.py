"""Sequence-parallel (Ulysses) processor for Wan self-attention (attn1), built on
reference.wan_attention: projections, QK RMSNorm and RoPE run on this rank's tokens (the RoPE tables
arrive sharded like the tokens), then one packed q/k/v all-to-all gives each rank the whole sequence
for its heads, attention runs there with padded keys masked out, and one all-to-all brings the
output back to this rank's tokens for all heads before to_out.

Cross-attention (attn2) needs no processor of its own: its queries are this rank's tokens and its
keys the replicated text, so the ordinary processor is already correct.
"""
from .. import ops
from ..distributed import ulysses
from ..reference import attention as ref
from .wan_attention import VkernWanAttnProcessor


class VkernWanSPAttnProcessor(VkernWanAttnProcessor):
    """context: the SPContext of the patched model (vkern/distributed/sp_wan.py); its current()
    layout is set by the model's forward pre-hook for the forward in progress."""

    def __init__(self, context, attention="auto", fused_qk_norm_rope=True):
        super().__init__(attention, fused_qk_norm_rope)
        self.context = context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise ValueError("VkernWanSPAttnProcessor: for self-attention (attn1) only; cross-attention keeps "
                             "its ordinary processor (its keys are the replicated text)")
        if attention_mask is not None:
            # Wan never passes one to attn1; a user mask over the full sequence would need sharding too.
            raise ValueError("VkernWanSPAttnProcessor: attention_mask is not supported under sequence parallelism")
        layout = self.context.current()
        local_attend = ref.attention if self.attention == "reference" else ops.attention

        def attend(q, k, v, attn_mask=None):
            # q/k/v [B, S_local, heads, D] -> [B, S_padded, H_local, D]: one all-to-all for all three.
            # check=False: the model's pre-hook already made the ranks agree on this step's shapes.
            q, k, v = ulysses.seq_to_head_qkv(q, k, v, layout.spec, layout.group, check=False)
            out = local_attend(q, k, v, layout.key_mask)
            return ulysses.head_to_seq(out, layout.spec, layout.group, check=False)

        return ref.wan_attention(attn, hidden_states, None, None, rotary_emb,
                                 norm_rope=ops.qk_norm_rope if self.fused_qk_norm_rope else ref.qk_norm_rope,
                                 attend=attend)

    def __repr__(self):
        return (f"VkernWanSPAttnProcessor(attention={self.attention!r}, "
                f"fused_qk_norm_rope={self.fused_qk_norm_rope}, world={self.context.world})")
