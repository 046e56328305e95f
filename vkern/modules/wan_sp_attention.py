"""Sequence-parallel processor for Wan self-attention (attn1), built on reference.wan_attention:
projections, QK RMSNorm and RoPE run on this rank's tokens (the RoPE tables arrive sharded like the
tokens), then the attention itself is sharded:
  Ulysses (SPConfig.ring_degree=1): one packed q/k/v all-to-all gives each rank the whole sequence
      for its heads, attention runs there (padded keys sliced off), one all-to-all brings the output
      back to this rank's tokens for all heads before to_out. SPConfig.overlap_chunks > 1 splits the
      exchanges by head groups so attention overlaps them; SPConfig.fp8_payload sends q/k/v in e4m3.
  Ulysses x ring (ring_degree > 1): the Ulysses exchange inside groups of world / ring_degree
      ranks, then ring attention (key/value blocks passed around, merged by log-sum-exp) across them.

Zero-copy Ulysses (SPConfig.zero_copy, the default, with one exchange and the native payload): the
fused QK prologue writes q and k straight into the q/k/v send buffer (vkern.ops.qk_norm_rope(out=)),
v is copied in (the one pack copy left: v is to_v's GEMM output), the attention reads the received
q/k/v in place at B = 1, and its output is the output send buffer; the only unpack copy is the
output's receive buffer -> [B, S_local, heads, D] for to_out (vkern/distributed/ulysses.py says why).
Same ops on the same values as the copying path, so the same bits. Elsewhere (overlap_chunks > 1,
fp8_payload, ring_degree > 1, zero_copy=False) the projections' tensors are packed by copying, as
ulysses_attention does; the received q/k/v are still views at B = 1.

Cross-attention (attn2) needs no processor of its own: its queries are this rank's tokens and its
keys the replicated text, so the ordinary processor is already correct.
"""
import functools

import torch

from .. import ops
from ..distributed import ring, ulysses
from ..reference import attention as ref
from .wan_attention import _8BIT, _BACKEND, VkernWanAttnProcessor


def _reference_lse(q, k, v):
    return ref.attention_lse(q, k, v, dtype=torch.float32)


def _attend_fns(mode):
    """(attend(q, k, v) -> out, attend_lse(q, k, v) -> (out, lse)) on this rank's heads for an
    attention mode. The 8-bit modes quantize Q/K/V after the exchange (attention_8bit), so the
    all-to-alls carry q/k/v in the model's dtype (or SPConfig.fp8_payload's e4m3)."""
    if mode == "reference":
        return ref.attention, _reference_lse
    if mode in _8BIT:
        qk, pv = _8BIT[mode]
        attend = functools.partial(ops.attention_8bit, qk=qk, pv=pv)
        return attend, functools.partial(attend, return_lse=True)
    return (functools.partial(ops.attention, backend=_BACKEND[mode]),
            functools.partial(ring.attention_lse, backend=_BACKEND[mode]))


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
        ctx = self.context
        layout = ctx.current()
        config = ctx.config
        local_attend, local_attend_lse = _attend_fns(self.attention)
        if (ctx.ring_degree == 1 and config.zero_copy and not config.fp8_payload
                and len(ulysses.head_chunks(layout.spec.local_heads, config.overlap_chunks)) == 1):
            return self._zero_copy_attention(attn, hidden_states, rotary_emb, layout.spec, local_attend)

        def attend(q, k, v, attn_mask=None):
            # check=False: the model's pre-hook already made the ranks agree on this step's shapes.
            if ctx.ring_degree == 1:
                return ulysses.ulysses_attention(q, k, v, layout.spec, local_attend, ctx.group,
                                                 chunks=config.overlap_chunks, fp8=config.fp8_payload, check=False)
            spec = layout.attn_spec
            if ctx.ulysses_group is not None:
                q, k, v = ulysses.seq_to_head_qkv(q, k, v, spec, ctx.ulysses_group, check=False, fp8=config.fp8_payload)
            out = ring.ring_attention(q, k, v, ctx.ring_group, layout.real_keys, local_attend_lse)
            if ctx.ulysses_group is not None:
                out = ulysses.head_to_seq(out, spec, ctx.ulysses_group, check=False)
            return out

        # The prologue never quantizes here (8-bit modes quantize after the exchange).
        norm_rope = ops.qk_norm_rope if self.fused_qk_norm_rope else ref.qk_norm_rope
        return ref.wan_attention(attn, hidden_states, None, None, rotary_emb, norm_rope=norm_rope, attend=attend)

    def _zero_copy_attention(self, attn, hidden_states, rotary_emb, spec, local_attend):
        """reference.wan_attention for self-attention, with q/k/v written into the send buffer."""
        query, key, value = ref._projections(attn, hidden_states, None)
        heads, dtype = attn.heads, value.dtype
        send = ulysses.QKVSendBuffer(spec, query.shape[0], query.shape[2] // heads, query.dtype, query.device,
                                     self.context.group)
        freqs = rotary_emb if rotary_emb is not None else (None, None)
        for i, (x, norm) in enumerate(((query, attn.norm_q), (key, attn.norm_k))):
            if self.fused_qk_norm_rope:
                ops.qk_norm_rope(x, norm.weight, norm.eps, heads, *freqs, out=send.slot(i))
            else:  # the reference ops allocate their result: copied in (timed as pack)
                send.fill(i, ref.qk_norm_rope(x, norm.weight, norm.eps, heads, *freqs))
        send.fill(2, value.unflatten(2, (heads, -1)))
        del query, key, value
        # check=False: the model's pre-hook already made the ranks agree on this step's shapes.
        hidden_states = ulysses.ulysses_attention_packed(send, local_attend, check=False)
        hidden_states = attn.to_out[0](hidden_states.flatten(2, 3).type(dtype))
        return attn.to_out[1](hidden_states)

    def __repr__(self):
        c = self.context
        return (f"VkernWanSPAttnProcessor(attention={self.attention!r}, fused_qk_norm_rope={self.fused_qk_norm_rope}, "
                f"world={c.world}, ring_degree={c.ring_degree}, overlap_chunks={c.config.overlap_chunks}, "
                f"fp8_payload={c.config.fp8_payload}, zero_copy={c.config.zero_copy})")
