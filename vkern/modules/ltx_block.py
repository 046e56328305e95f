"""diffusers' LTXVideoTransformerBlock.forward with vkern's fused glue.

The same ops in the same order, each rounded as diffusers rounds it (LTX-Video's glue runs in the tensors'
own dtypes, bf16 in a bf16 model: vkern.ops' native_dtypes form), with the block's attentions and FFN called as
diffusers calls them (whatever processor or Linear they have), but:
  - RMSNorm + modulate is one pass (vkern.ops.layernorm_modulate(rms=True)) that reads temb and the
    scale_shift_table rows in place; diffusers writes an fp32 RMSNorm intermediate, a [B, T, 6, D] table +
    temb tensor and three more elementwise results;
  - gate + residual is one pass (vkern.ops.gate_residual): a new tensor after self-attention, then the
    cross-attention's plain residual and the FFN's gated one are written into that tensor in place;
  - the FFN's GELU runs in place (vkern/modules/feed_forward.py).
diffusers' forward runs instead where the fused path would not be the same computation: with autograd
recording (the fused ops have no backward), an RMSNorm with an affine weight (LTX-Video's have none), hooks on
the norms (the fused pass would skip them), or a temb of another layout.
"""
from .. import ops
from ._grad import records_autograd
from ._hooks import hooked
from ._native_glue import add_, add_gated_, modulation_pairs
from .feed_forward import feed_forward_rows


def fused_ltx_block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                            encoder_attention_mask=None):
    """LTXVideoTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb,
    encoder_attention_mask) on `block`. temb: [B, 1, 6 * D] (one timestep per video) or [B, S, 6 * D] (one per
    token). The caller's hidden_states is never written."""
    mods = _modulation(block, hidden_states, temb)
    if mods is None or records_autograd(block, hidden_states, encoder_hidden_states, temb):
        from diffusers.models.transformers.transformer_ltx import LTXVideoTransformerBlock

        return LTXVideoTransformerBlock.forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                                encoder_attention_mask)
    shift, scale, gate, c_shift, c_scale, c_gate = mods

    norm = ops.layernorm_modulate(hidden_states, shift[0], scale[0], block.norm1.eps, shift_table=shift[1],
                                  scale_table=scale[1], rms=True, native_dtypes=True)
    out = block.attn1(hidden_states=norm, encoder_hidden_states=None, image_rotary_emb=image_rotary_emb)
    del norm
    x = ops.gate_residual(hidden_states, out, *gate, native_dtypes=True)
    del out

    out = block.attn2(x, encoder_hidden_states=encoder_hidden_states, image_rotary_emb=None,
                      attention_mask=encoder_attention_mask)
    x = add_(x, out)
    del out

    norm = ops.layernorm_modulate(x, c_shift[0], c_scale[0], block.norm2.eps, shift_table=c_shift[1],
                                  scale_table=c_scale[1], rms=True, native_dtypes=True)
    out = feed_forward_rows(block.ff, norm)
    del norm
    return add_gated_(x, out, *c_gate)


def _modulation(block, hidden_states, temb):
    """The six (temb chunk, table row) pairs, or None where the fused path does not apply (the module's docstring)."""
    if block.scale_shift_table.shape[0] != 6:
        return None
    for norm in (block.norm1, block.norm2):
        if getattr(norm, "weight", None) is not None or getattr(norm, "bias", None) is not None or hooked(norm):
            return None
    return modulation_pairs(block.scale_shift_table, temb, hidden_states)
