"""diffusers' CogVideoXBlock.forward with vkern's fused glue.

The same ops in the same order, each rounded as diffusers rounds it (CogVideoX's glue runs in the tensors' own
dtypes: vkern.ops' native_dtypes form), with the block's attention, FFN and modulation Linears called as diffusers
calls them, but:
  - LayerNorm + modulate (CogVideoXLayerNormZero's `norm(x) * (1 + scale) + shift`, video and text stream each) is
    one pass (vkern.ops.layernorm_modulate) instead of three;
  - gate + residual is one pass (vkern.ops.gate_residual): new tensors after the attention, and the FFN's gated
    residuals written into them in place, read from the FFN output's two token ranges;
  - the FFN's GELU runs in place (vkern/modules/feed_forward.py).
diffusers' forward runs instead where the fused path would not be the same computation: with autograd recording
(the fused ops have no backward), hooks on the norms (the fused pass would skip them), or norms other than
diffusers' CogVideoXLayerNormZero over an nn.LayerNorm.
"""
import torch
from torch import nn

from .. import ops
from ._grad import records_autograd
from ._hooks import hooked
from ._native_glue import add_gated_
from .feed_forward import feed_forward_rows


def fused_cogvideox_block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                                  attention_kwargs=None):
    """CogVideoXBlock.forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs) on
    `block`: returns (hidden_states, encoder_hidden_states), new tensors (the caller's are never written)."""
    if not _fusable(block) or records_autograd(block, hidden_states, encoder_hidden_states, temb):
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

        return CogVideoXBlock.forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                      attention_kwargs)
    text = encoder_hidden_states.size(1)
    shift, scale, gate, e_shift, e_scale, e_gate = _modulation(block.norm1, temb)
    norm = ops.layernorm_modulate(hidden_states, shift, scale, *_layer_norm(block.norm1), native_dtypes=True)
    e_norm = ops.layernorm_modulate(encoder_hidden_states, e_shift, e_scale, *_layer_norm(block.norm1),
                                    native_dtypes=True)
    out, e_out = block.attn1(hidden_states=norm, encoder_hidden_states=e_norm, image_rotary_emb=image_rotary_emb,
                             **(attention_kwargs or {}))
    del norm, e_norm
    x = ops.gate_residual(hidden_states, out, gate, native_dtypes=True)
    e = ops.gate_residual(encoder_hidden_states, e_out, e_gate, native_dtypes=True)
    del out, e_out

    shift, scale, gate, e_shift, e_scale, e_gate = _modulation(block.norm2, temb)
    ff = feed_forward_rows(block.ff, torch.cat([  # diffusers' FFN input: text tokens, then video
        ops.layernorm_modulate(e, e_shift, e_scale, *_layer_norm(block.norm2), native_dtypes=True),
        ops.layernorm_modulate(x, shift, scale, *_layer_norm(block.norm2), native_dtypes=True)], dim=1))
    # diffusers' x + gate * ff: the product commutes, so the same bits as y * gate
    return add_gated_(x, ff[:, text:], gate), add_gated_(e, ff[:, :text], e_gate)


def _fusable(block):
    from diffusers.models.normalization import CogVideoXLayerNormZero

    return all(type(n) is CogVideoXLayerNormZero and type(n.norm) is nn.LayerNorm and not hooked(n)
               and not hooked(n.norm) for n in (block.norm1, block.norm2))


def _modulation(norm_zero, temb):
    """CogVideoXLayerNormZero's six chunks of linear(silu(temb)), each [B, 1, D] as diffusers broadcasts them."""
    return [c[:, None, :] for c in norm_zero.linear(norm_zero.silu(temb)).chunk(6, dim=1)]


def _layer_norm(norm_zero):
    norm = norm_zero.norm
    return norm.eps, norm.weight, norm.bias
