"""diffusers' WanTransformerBlock.forward with vkern's fused glue and a token-chunked feed-forward.

The same math in the same order (Wan 2.1 [B, 6, D] temb and Wan 2.2 per-token [B, S, 6, D] temb),
with the block's own submodules called as diffusers calls them (attn1/attn2 with whatever processor
they have, the FFN's Linear layers whatever they are: nn.Linear, Fp8Linear, LoRA), but:
  - LayerNorm + modulate and gate + residual are single fused passes (vkern.ops.layernorm_modulate,
    gate_residual), reading temb and scale_shift_table in place: no fp32 copy of the hidden states
    and no fp32 copy of temb;
  - the FFN runs over token chunks, each chunk's norm3 -> Linear -> in-place GELU -> Linear -> gate +
    residual written straight into the hidden states, so the [tokens, ffn_dim] intermediate exists
    only as one [chunk, ffn_dim] buffer (the FFN itself: vkern/modules/feed_forward.py, shared with
    ChunkedFeedForward);
  - fp8 compute mode: where every consumer of a LayerNorm's output is an fp8 compute-mode Linear (attn1's
    q/k/v projections, or its fused to_qkv, under vkern's attention processor; attn2's q projection after
    an affine norm2; the FFN's up projection),
    the LayerNorm kernel emits e4m3 + per-token scales itself (an Fp8Activation) and those layers use it
    as is: the per-token quantization pass of each consumer disappears (three for q/k/v), bit-identically.
    Likewise the FFN's GELU and the down projection's quantization are one kernel (equal to the unfused
    path up to the last ulp of tanh, see vkern/reference/block_glue.py).
By default the caller's hidden_states is never written: the first residual makes the block's new tensor,
the later ones update that tensor in place. A caller that owns its tensor and has no further use for it
may pass overwrite_input=True: the first residual is then written into hidden_states itself and the block
returns that tensor, one [tokens, dim] tensor less at the block's peak (the same bits either way). vkern's
WanTransformer3DModel forward does so where no hook can see or keep the tensor (may_overwrite_input,
output_is_private).
"""
import functools

import torch
from torch import nn

from .. import ops
from ._grad import records_autograd
from ._hooks import hooked
from .feed_forward import feed_forward_rows, ffn_takes_fp8_input
from .fp8_linear import Fp8Activation, takes_fp8_input
from .wan_attention import VkernWanAttnProcessor, rope_rows, token_rows


ALL = (slice(None), slice(None))  # every (batch, token) row


def fused_block_forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb, ffn_chunk_size=None,
                        attention_chunk_size=None, overwrite_input=False, attention_mask=None, temb_layout="wan"):
    """WanTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, rotary_emb) on `block` (a
    WanTransformerBlock or anything with its attributes). ffn_chunk_size: at most this many token rows
    per FFN chunk (None: all rows at once). attention_chunk_size: at most this many query tokens per self-
    and cross-attention chunk (None: all at once): keys and values are computed for the whole sequence
    (chunk by chunk, into one buffer each), then each query chunk's norm -> q -> attention -> output
    projection -> gate + residual, so no full-sequence q, attention output or projection output exists
    (attention whole where the processor cannot split: not vkern's, or a fused to_qkv). overwrite_input:
    False (default): hidden_states is left as it was and the result is a new tensor. True: the caller owns
    hidden_states and will not read it again, so the block may compute in it and return it (bit for bit
    the same values; done when hidden_states is contiguous, else a new tensor as with False). Inference
    only: with autograd recording, diffusers' own forward runs instead (the fused ops have no backward).
    attention_mask, temb_layout="skyreels": SkyReels-V2's block (fused_skyreels_block_forward): the mask goes to
    the self-attention (then unchunked), a per-token temb is [B, 6, S, D]."""
    if records_autograd(block, hidden_states, encoder_hidden_states, temb):
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock

        return WanTransformerBlock.forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb)
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states: expected shape (batch, tokens, dim), got {tuple(hidden_states.shape)}")
    B, S, D = hidden_states.shape
    (shift, scale, gate, c_shift, c_scale, c_gate) = _modulation(block.scale_shift_table, temb, B, S, D, temb_layout)

    # 1. Self-attention. The first residual makes x: a new tensor (the caller's hidden_states stays as it
    # was), or with overwrite, hidden_states itself.
    overwrite = overwrite_input and _writable(hidden_states)
    fp8 = _attention_takes_fp8_input(block.attn1)

    def norm1(b, s):
        norm = ops.layernorm_modulate(hidden_states[b, s], token_rows(shift[0], b, s), token_rows(scale[0], b, s),
                                      block.norm1.eps, *_affine(block.norm1), shift[1], scale[1], fp8=fp8)
        return Fp8Activation(*norm, hidden_states.dtype) if fp8 else norm

    spans = _spans(B, S, attention_chunk_size)
    processor = _chunkable_processor(block.attn1) if attention_mask is None else None
    if len(spans) == 1 or processor is None:
        # The whole attention output exists before the residual: norm1 has read every row by then.
        out = block.attn1(norm1(*ALL), None, attention_mask, rotary_emb)
        x = ops.gate_residual_(hidden_states, out, *gate) if overwrite else ops.gate_residual(hidden_states, out, *gate)
        del out
    else:  # keys/values of every token first, then queries chunk by chunk, each chunk's residual written in
        kv = processor.chunked_key_value(block.attn1, spans, norm1, rotary_emb, B, S)
        # In place is safe: the pass above has read every token's norm1 (keys and values now live only in
        # kv), and query chunk (b, s) reads only its own rows, norm1(b, s) and the residual's x[b, s],
        # before its gate_residual_ writes them; the spans are disjoint, so no chunk reads a written row.
        x = hidden_states if overwrite else hidden_states.clone(memory_format=torch.contiguous_format)
        for b, s in spans:
            out = processor.attend_query(block.attn1, norm1(b, s), _batch(kv, b), None, rope_rows(rotary_emb, b, s))
            ops.gate_residual_(x[b, s], out, token_rows(gate[0], b, s), gate[1])
            del out  # not alive while the next chunk makes its own (run 60's trace: one chunk of the peak)
        del kv

    # 2. Cross-attention. nn.Identity: diffusers' x.float().type_as(x) is x itself. x + attn_output in place:
    # diffusers' x + attn_output in x's dtype, the same single rounding.
    if not isinstance(block.norm2, nn.Identity):
        fp8 = _attention_takes_fp8_input(block.attn2, cross=True)

        def norm2(b, s):
            norm = ops.layernorm_modulate(x[b, s], None, None, block.norm2.eps, *_affine(block.norm2), fp8=fp8)
            return Fp8Activation(*norm, x.dtype) if fp8 else norm
    else:
        def norm2(b, s):
            return x[b, s]
    processor = _chunkable_processor(block.attn2)
    if len(spans) == 1 or processor is None:
        x.add_(block.attn2(norm2(*ALL), encoder_hidden_states, None, None))
    else:  # the text keys/values once, then the queries chunk by chunk
        kv, image_kv = processor.key_value(block.attn2, encoder_hidden_states)
        for b, s in spans:
            x[b, s].add_(processor.attend_query(block.attn2, norm2(b, s), _batch(kv, b), _batch(image_kv, b)))
        del kv, image_kv

    # 3. Feed-forward, chunk by chunk, each chunk's result added into its rows of x.
    fp8 = ffn_takes_fp8_input(block.ffn)
    for b, s in _spans(B, S, ffn_chunk_size):
        rows = x[b, s]
        norm = ops.layernorm_modulate(rows, token_rows(c_shift[0], b, s), token_rows(c_scale[0], b, s), block.norm3.eps,
                                      *_affine(block.norm3), c_shift[1], c_scale[1], fp8=fp8)
        if fp8:
            norm = Fp8Activation(*norm, x.dtype)
        ops.gate_residual_(rows, feed_forward_rows(block.ffn, norm), token_rows(c_gate[0], b, s), c_gate[1])
    return x


def fused_skyreels_block_forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb, attention_mask):
    """SkyReelsV2TransformerBlock.forward: Wan's block with a self-attention mask (the block-causal mask of
    diffusion forcing) and a per-token temb laid out [B, 6, S, D], fused as Wan's (no chunking)."""
    if records_autograd(block, hidden_states, encoder_hidden_states, temb):
        from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2TransformerBlock

        return SkyReelsV2TransformerBlock.forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb,
                                                  attention_mask)
    return fused_block_forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb,
                               attention_mask=attention_mask, temb_layout="skyreels")


class VkernWanBlock(nn.Module):
    """A WanTransformerBlock running fused_block_forward. It holds the block's own submodules and
    scale_shift_table (the same objects, so the same parameters and state_dict keys)."""

    def __init__(self, block, ffn_chunk_size=None, attention_chunk_size=None):
        super().__init__()
        for name in ("norm1", "attn1", "attn2", "norm2", "ffn", "norm3"):
            setattr(self, name, getattr(block, name))
        self.scale_shift_table = block.scale_shift_table
        self.ffn_chunk_size = ffn_chunk_size
        self.attention_chunk_size = attention_chunk_size

    @classmethod
    def from_diffusers(cls, block, ffn_chunk_size=None, attention_chunk_size=None):
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock

        if not isinstance(block, WanTransformerBlock):
            raise TypeError(f"block: expected a diffusers WanTransformerBlock, got {type(block).__name__}")
        if hooked(block):
            raise ValueError("block: has forward hooks (diffusers offloading/caching or user hooks) that "
                             "VkernWanBlock would drop")
        for name, value in (("ffn_chunk_size", ffn_chunk_size), ("attention_chunk_size", attention_chunk_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name}: expected a positive int or None, got {value!r}")
        return cls(block, ffn_chunk_size, attention_chunk_size)

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb, overwrite_input=False):
        """overwrite_input: see fused_block_forward (default False: hidden_states is not written)."""
        return fused_block_forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb, self.ffn_chunk_size,
                                   self.attention_chunk_size, overwrite_input=overwrite_input)

    def extra_repr(self):
        return f"ffn_chunk_size={self.ffn_chunk_size}, attention_chunk_size={self.attention_chunk_size}"


def ignores_block_inputs(hook):
    """Marks a forward (pre-)hook as one that neither keeps, reads nor replaces a block's tensors (a memory
    or timing probe), so that a block carrying it may still overwrite its input. Returns the hook."""
    hook.vkern_ignores_block_inputs = True
    return hook


def may_overwrite_input(block):
    """True when block(hidden_states, encoder_hidden_states, temb, rotary_emb, overwrite_input=True) is
    accepted and nothing but the caller can see hidden_states during the call: block runs
    fused_block_forward (a VkernWanBlock, or a block whose forward vkern.patch replaced) and carries no hook
    (bar those marked ignores_block_inputs) and no torch global module hook. Any other hook may keep,
    read back or replace the input: a forward hook gets it after the forward; diffusers' block caches
    read it back; vkern's sequence parallelism hands block 0 its shard of the whole patch-embedded tensor,
    a view of it at batch 1, which overwriting would keep alive through every later block. (Whether the
    caller's tensor is free of the module that made it: output_is_private.)"""
    forward = block.__dict__.get("forward")
    if forward is None:
        fused = isinstance(block, VkernWanBlock) and type(block).forward is VkernWanBlock.forward
    else:  # vkern.patch: functools.partial(fused_block_forward, block, ...); diffusers' hooks wrap it in another
        fused = (isinstance(forward, functools.partial) and forward.func is fused_block_forward
                 and forward.args[:1] != () and forward.args[0] is block and "overwrite_input" not in forward.keywords)
    return fused and _unmarked_hooks(block, pre=True) == 0


def output_is_private(module):
    """True when no hook can hold module's output: no forward hook (its output argument) or diffusers hook
    (e.g. FirstBlockCache keeps the first block's output to subtract it later) and no torch global forward
    hook, bar those marked ignores_block_inputs. Then the caller of module is the output's only holder."""
    return _unmarked_hooks(module, pre=False) == 0


def _unmarked_hooks(module, pre):
    """How many hooks on module (forward hooks; with pre, forward pre-hooks too), diffusers' hook registry
    and torch's global module hooks included, are not marked ignores_block_inputs."""
    from torch.nn.modules import module as torch_module

    hooks = [*module._forward_hooks.values(), *getattr(torch_module, "_global_forward_hooks", {}).values()]
    if pre:
        hooks += [*module._forward_pre_hooks.values(), *getattr(torch_module, "_global_forward_pre_hooks", {}).values()]
    return hasattr(module, "_diffusers_hook") + sum(not getattr(h, "vkern_ignores_block_inputs", False) for h in hooks)


def _writable(t):
    """t can take the block's results in place: contiguous (so no overlapping elements, and the block's
    output is contiguous as without overwrite). (An inference tensor outside inference mode is torch's
    clear error; tensor.is_inference() cannot be traced by torch.compile.)"""
    return t.is_contiguous()


def _modulation(table, temb, B, S, D, layout="wan"):
    """diffusers' (scale_shift_table + temb.float()).chunk(6) as six (temb chunk, table row) pairs of
    views, summed in fp32 inside the kernels: temb [B, 6, D] -> [B, 1, D] chunks; a per-token temb -> [B, S, D]
    chunks, laid out [B, S, 6, D] (Wan 2.2) or, with layout "skyreels", [B, 6, S, D] (diffusion forcing)."""
    per_token = (S, 6, D) if layout == "wan" else (6, S, D)
    if temb.dim() == 4 and temb.shape[0] in (1, B) and tuple(temb.shape[1:]) == per_token:
        return [(temb[:, :, k] if layout == "wan" else temb[:, k], table[0, k]) for k in range(6)]
    if temb.dim() == 3 and temb.shape[0] in (1, B) and tuple(temb.shape[1:]) == (6, D):
        return [(temb[:, k:k + 1], table[0, k]) for k in range(6)]
    raise ValueError(f"temb: expected shape ({B}, 6, {D}) or ({B}, {', '.join(map(str, per_token))}) for "
                     f"hidden_states ({B}, {S}, {D}), got {tuple(temb.shape)}")


def _affine(norm):
    return getattr(norm, "weight", None), getattr(norm, "bias", None)


def _spans(B, S, chunk):
    """(batch, token) index pairs covering [B, S]: everything at once when it fits in one chunk, else
    chunks of at most `chunk` tokens within each batch element (so a per-batch modulation stays a slice)."""
    if chunk is None or chunk >= B * S:
        return [ALL]
    return [(slice(b, b + 1), slice(s, min(s + chunk, S))) for b in range(B) for s in range(0, S, chunk)]


def _chunkable_processor(attn):
    """attn's processor if it can run query chunks (vkern's own, not a subclass with its own __call__, no
    fused to_qkv, no hooks on attn), else None."""
    processor = getattr(attn, "processor", None)
    if (not isinstance(processor, VkernWanAttnProcessor) or type(processor).__call__ is not VkernWanAttnProcessor.__call__
            or (getattr(attn, "fused_projections", False) and not attn.is_cross_attention) or hooked(attn)):
        return None
    return processor


def _batch(kv, b):
    """Batch rows b (a slice) of every tensor in a nested tuple of [B, ...] tensors (NamedTuples kept)."""
    if torch.is_tensor(kv):
        return kv[b]
    if not isinstance(kv, tuple):
        return kv  # None, a dtype
    items = [_batch(t, b) for t in kv]
    return type(kv)(*items) if hasattr(kv, "_fields") else tuple(items)


def _attention_takes_fp8_input(attn, cross=False):
    """True when every projection that attn's processor applies to hidden_states takes an Fp8Activation as
    is. vkern's processors (reference.wan_attention) pass hidden_states only to the projections: q, k, v
    (or the fused to_qkv) for self-attention; q alone for cross-attention (k, v read the text)."""
    processor = getattr(attn, "processor", None)
    # A processor may state it explicitly (accepts_fp8_hidden_states = True/False, e.g. a subclass that
    # reads hidden_states itself opts out); otherwise vkern's processors are known to, others are not.
    if not getattr(processor, "accepts_fp8_hidden_states", isinstance(processor, VkernWanAttnProcessor)) \
            or hooked(attn):
        return False
    if cross:
        return takes_fp8_input(getattr(attn, "to_q", None))
    if getattr(attn, "fused_projections", False):
        return takes_fp8_input(attn.to_qkv)
    return all(takes_fp8_input(getattr(attn, name, None)) for name in ("to_q", "to_k", "to_v"))


