"""Sequence-parallel processor for Wan self-attention (attn1), built on reference.wan_attention:
projections, QK RMSNorm and RoPE run on this rank's tokens (the RoPE tables arrive sharded like the
tokens), then the attention itself is sharded:
  Ulysses (SPConfig.ring_degree=1): one packed q/k/v all-to-all gives each rank the whole sequence
      for its heads, attention runs there (padded keys sliced off), one all-to-all brings the output
      back to this rank's tokens for all heads before to_out. SPConfig.overlap_chunks > 1 splits the
      exchanges by head groups so attention overlaps them; SPConfig.fp8_payload sends q/k/v in e4m3.
  Ulysses x ring (ring_degree > 1): the Ulysses exchange inside groups of world / ring_degree
      ranks, then ring attention (key/value blocks passed around, merged by log-sum-exp) across them.

Zero-copy Ulysses (SPConfig.zero_copy, the default, with one exchange per tensor group and the native
payload): nothing is packed or unpacked by copying, and two of the three exchanges overlap compute.
  - SPConfig.qkv_exchange="kv-first" (the default): k and v are projected first, into a send buffer of
    their own whose exchange starts at once, so it is on the wire while q is projected and normed; then
    q's exchange ("v-first": v alone first, then q and k; "one": one packed q/k/v exchange after all
    three projections). to_v's GEMM writes straight into the send buffer (one GEMM per destination
    rank's head columns, QKVSendBuffer.linear);
  - the fused QK prologue writes q and k straight into the q/k send buffer (vkern.ops.qk_norm_rope(out=));
  - the attention reads the received q/k/v in place at B = 1, and its output is the output send buffer;
  - to_out is split by input columns (heads): y = sum_j rows_j @ W[:, heads_j].T + bias over the rank
    blocks of the output (ulysses.HeadBlocks), this rank's own heads first, while the other ranks'
    blocks are on the wire; their blocks are read inside the receive buffer (no unpack copy).
The same products as the copying path, grouped differently (column blocks of to_v, row blocks of
to_out summed in the output dtype), so not the same bits: tests hold it to the SP tolerances.
Where to_v or to_out is not a plain nn.Linear (Fp8Linear, LoRA, hooks) it is applied whole and copied
in (v) or fed the gathered output (to_out); with a fused to_qkv, q/k/v share one buffer. Elsewhere
(overlap_chunks > 1, fp8_payload, ring_degree > 1, zero_copy=False) the projections' tensors are packed
by copying, as ulysses_attention does; the received q/k/v are still views at B = 1.

Cross-attention (attn2) needs no processor of its own: its queries are this rank's tokens and its
keys the replicated text, so the ordinary processor is already correct.
"""
import functools

import torch
from torch import nn

from .. import ops
from ..distributed import ring, ulysses
from ..reference import attention as ref
from ._hooks import hooked
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
            return self._zero_copy_attention(attn, hidden_states, rotary_emb, layout.spec, local_attend, config.qkv_exchange)

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

    def _zero_copy_attention(self, attn, hidden_states, rotary_emb, spec, local_attend, qkv_exchange):
        """reference.wan_attention for self-attention, with q/k/v written into the send buffers and
        to_out split by heads (see the module docstring)."""
        if getattr(attn, "fused_projections", False):  # to_qkv: one GEMM, so one q/k/v buffer
            query, key, value = ref._projections(attn, hidden_states, None)
            send = self._send_buffer(attn, spec, value.shape[0], value.dtype, value.device, 3)
            self._write(attn, send, 0, "q", query, rotary_emb)
            self._write(attn, send, 1, "k", key, rotary_emb)
            self._write(attn, send, 2, "v", value, rotary_emb)
            del query, key, value
            sends = [send]
        else:
            # Buffers in the order they are written; each but the last starts its exchange at once, so
            # it is on the wire while the next one's projections and prologue run.
            B, dtype, device = hidden_states.shape[0], hidden_states.dtype, hidden_states.device
            sends = []
            for names in _EXCHANGES[qkv_exchange]:
                send = self._send_buffer(attn, spec, B, dtype, device, len(names))
                for slot, name in enumerate(names):
                    projection = getattr(attn, f"to_{name}")
                    if name == "v" and _plain_linear(projection) and torch.is_tensor(hidden_states):
                        send.linear(slot, hidden_states, projection.weight, projection.bias)  # no copy
                    else:
                        self._write(attn, send, slot, name, projection(hidden_states), rotary_emb)
                sends.append((names, send if len(sends) == len(_EXCHANGES[qkv_exchange]) - 1 else send.start()))
            sends = [send for _, send in sorted(sends, key=lambda item: "qkv".index(item[0][0]))]  # q, k, v order
        del send
        # check=False: the model's pre-hook already made the ranks agree on this step's shapes.
        blocks = ulysses.ulysses_attention_packed(sends, local_attend, check=False, head_blocks=True)
        del sends
        to_out = attn.to_out[0]
        if _plain_linear(to_out):
            hidden_states = _head_split_linear(to_out, blocks)
        else:
            hidden_states = to_out(blocks.gather().flatten(2, 3))
        return attn.to_out[1](hidden_states)

    def _send_buffer(self, attn, spec, batch, dtype, device, n):
        return ulysses.QKVSendBuffer(spec, batch, attn.inner_dim // attn.heads, dtype, device, self.context.group, n=n)

    def _write(self, attn, send, slot, name, x, rotary_emb):
        """x, the output of to_q/to_k/to_v, into the slot: q and k through the QK prologue (written in
        place by the fused one), v copied in (timed as pack)."""
        if name == "v":
            send.fill(slot, x.unflatten(2, (attn.heads, -1)))
            return
        norm = attn.norm_q if name == "q" else attn.norm_k
        freqs = rotary_emb if rotary_emb is not None else (None, None)
        if self.fused_qk_norm_rope:
            ops.qk_norm_rope(x, norm.weight, norm.eps, attn.heads, *freqs, out=send.slot(slot))
        else:  # the reference ops allocate their result: copied in (timed as pack)
            send.fill(slot, ref.qk_norm_rope(x, norm.weight, norm.eps, attn.heads, *freqs))

    def __repr__(self):
        c = self.context
        return (f"VkernWanSPAttnProcessor(attention={self.attention!r}, fused_qk_norm_rope={self.fused_qk_norm_rope}, "
                f"world={c.world}, ring_degree={c.ring_degree}, overlap_chunks={c.config.overlap_chunks}, "
                f"fp8_payload={c.config.fp8_payload}, zero_copy={c.config.zero_copy}, qkv_exchange={c.config.qkv_exchange!r})")


_EXCHANGES = {  # SPConfig.qkv_exchange: the send buffers in the order they are written and sent, each
    "kv-first": (("k", "v"), ("q",)),  # with its tensors in q, k, v slot order
    "v-first": (("v",), ("q", "k")),
    "one": (("q", "k", "v"),),
}


def _plain_linear(m):
    """An nn.Linear itself (not Fp8Linear, LoRA or a subclass with its own forward, no hooks): the
    processor may apply its weight and bias in blocks."""
    return type(m) is nn.Linear and not hooked(m)


def _head_split_linear(linear, blocks):
    """linear (to_out) on the attention output arriving as HeadBlocks: y = sum over rank blocks of
    rows_j @ W[:, heads_j].T (+ bias), this rank's own heads first, while the other ranks' blocks are
    still on the wire. The same products as to_out on the gathered rows, summed per block (in the
    output dtype between blocks), and no unpack copy."""
    weight, D = linear.weight, blocks.D
    (lo, hi), rows = blocks.local()
    if linear.bias is not None:
        y = torch.addmm(linear.bias, rows, weight[:, lo * D:hi * D].T)
    else:
        y = rows @ weight[:, lo * D:hi * D].T
    del rows
    for (lo, hi), rows in blocks.remote():
        y.addmm_(rows, weight[:, lo * D:hi * D].T)
    return y.view(blocks.B, -1, weight.shape[0])
