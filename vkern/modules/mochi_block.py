"""diffusers' MochiTransformerBlock.forward with vkern's fused glue.

Mochi's glue is fp32 math on bf16 tensors: MochiRMSNormZero and MochiModulatedRMSNorm each cast their input to
fp32, normalize, multiply by (1 + scale) or by tanh(gate) and round back, and the residuals are added in bf16.
diffusers writes about ten fp32 [tokens, dim] intermediates for that per stream and block. Here the same ops in
the same order, each rounded where diffusers rounds it, with the block's attention, FFN and modulation Linears
called as diffusers calls them, but:
  - RMSNorm * (1 + scale) (norm1 and norm3) is one pass (vkern.ops.layernorm_modulate(rms=True), scale only);
  - the residual x + RMSNorm(y) * tanh(gate) (norm2 and norm4 with their adds) is one pass
    (vkern.ops.rms_gate_residual): a new tensor after the attention, the FFN's written into it in place.
The text stream gets the same ops (the last block's, context_pre_only, keeps its MochiLayerNormContinuous).
diffusers' forward runs instead where the fused path would not be the same computation: with autograd recording
(the fused ops have no backward), or with hooks on the norms or norms of other types (the fused pass would skip
or misread them).
"""
import torch

from .. import ops
from ._grad import records_autograd
from ._hooks import hooked


def fused_mochi_block_forward(block, hidden_states, encoder_hidden_states, temb, encoder_attention_mask,
                              image_rotary_emb=None):
    """MochiTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, encoder_attention_mask,
    image_rotary_emb) on `block`: returns (hidden_states, encoder_hidden_states), new tensors (the caller's are
    never written)."""
    if not _fusable(block) or records_autograd(block, hidden_states, encoder_hidden_states, temb):
        from diffusers.models.transformers.transformer_mochi import MochiTransformerBlock

        return MochiTransformerBlock.forward(block, hidden_states, encoder_hidden_states, temb, encoder_attention_mask,
                                             image_rotary_emb)
    scale, gate, scale_mlp, gate_mlp = _modulation(block.norm1, temb)
    norm = _scale_norm(hidden_states, scale, block.norm1)
    if block.context_pre_only:
        e_norm = block.norm1_context(encoder_hidden_states, temb)
    else:
        e_scale, e_gate, e_scale_mlp, e_gate_mlp = _modulation(block.norm1_context, temb)
        e_norm = _scale_norm(encoder_hidden_states, e_scale, block.norm1_context)
    out, e_out = block.attn1(hidden_states=norm, encoder_hidden_states=e_norm, image_rotary_emb=image_rotary_emb,
                             attention_mask=encoder_attention_mask)
    del norm, e_norm
    x = _stream_rest(block, hidden_states, out, gate, scale_mlp, gate_mlp, "")
    del out
    if not block.context_pre_only:
        encoder_hidden_states = _stream_rest(block, encoder_hidden_states, e_out, e_gate, e_scale_mlp, e_gate_mlp,
                                             "_context")
    return x, encoder_hidden_states


def _stream_rest(block, x, attn_out, gate, scale_mlp, gate_mlp, suffix):
    """One stream after the attention: x + norm2(attn_out, tanh(gate)), then + norm4(ff(norm3(x, 1 + scale_mlp)),
    tanh(gate_mlp)), the second residual written into the first's new tensor."""
    norm2, norm3, norm4 = (getattr(block, f"norm{k}{suffix}") for k in (2, 3, 4))
    ff = getattr(block, "ff" + suffix)
    x = ops.rms_gate_residual(x, attn_out, torch.tanh(gate)[:, None], norm2.norm.eps)
    y = ff(_scale_norm(x, scale_mlp, norm3))
    return _add_normed_(x, y, torch.tanh(gate_mlp)[:, None], norm4.norm.eps)


def _add_normed_(x, y, gate, eps):
    """x + MochiModulatedRMSNorm(y, gate), into x (a tensor this forward made) when that keeps x's dtype."""
    if torch.promote_types(x.dtype, y.dtype) == x.dtype:
        return ops.rms_gate_residual_(x, y, gate, eps)
    return ops.rms_gate_residual(x, y, gate, eps)


def _scale_norm(x, scale, norm):
    """MochiRMSNormZero's and MochiModulatedRMSNorm's (RMSNorm(x.float()) * (1 + scale.float())).to(x.dtype)."""
    return ops.layernorm_modulate(x, None, scale[:, None], norm.norm.eps, rms=True)


def _modulation(norm_zero, temb):
    """MochiRMSNormZero's four chunks of linear(silu(temb)): scale_msa, gate_msa, scale_mlp, gate_mlp, each [B, D]."""
    return norm_zero.linear(norm_zero.silu(temb)).chunk(4, dim=1)


def _fusable(block):
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_mochi import MochiModulatedRMSNorm, MochiRMSNormZero

    suffixes = [""] if block.context_pre_only else ["", "_context"]
    zero = [getattr(block, "norm1" + s) for s in suffixes]
    modulated = [getattr(block, f"norm{k}{s}") for k in (2, 3, 4) for s in suffixes]
    norms = [(n, MochiRMSNormZero) for n in zero] + [(n, MochiModulatedRMSNorm) for n in modulated]
    return all(type(n) is cls and type(n.norm) is RMSNorm and n.norm.weight is None and not hooked(n)
               and not hooked(n.norm) for n, cls in norms)
