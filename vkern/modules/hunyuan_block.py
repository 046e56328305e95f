"""diffusers' HunyuanVideo blocks with vkern's fused glue: the dual-stream HunyuanVideoTransformerBlock (HunyuanVideo
1.0, FramePack) and HunyuanVideo15TransformerBlock (1.5), whose forwards are the same code, and the single-stream
HunyuanVideoSingleTransformerBlock.

The same ops in the same order, each rounded as diffusers rounds it (the glue runs in the tensors' own dtypes:
vkern.ops' native_dtypes form), the blocks' attention, Linears and FFNs called as diffusers calls them, but:
  - AdaLayerNormZero's (and AdaLayerNormZeroSingle's, and norm2's) LayerNorm + modulate is one pass
    (vkern.ops.layernorm_modulate) instead of three, on each stream;
  - each gate + residual is one pass (vkern.ops.gate_residual); the dual-stream block's FFN residuals are written
    into the tensors its attention residuals made.
diffusers' forward runs instead where the fused path would not be the same computation: with autograd recording,
norms other than diffusers' AdaLayerNormZero(Single) over an nn.LayerNorm (or with an embedding of their own), or
hooks on them. The image-conditioned token-replace blocks are other classes and stay diffusers'.
"""
import torch
from torch import nn

from .. import ops
from ._grad import records_autograd
from ._hooks import hooked
from ._native_glue import add_gated_
from .feed_forward import feed_forward_rows


def fused_dual_stream_block_forward(block, hidden_states, encoder_hidden_states, temb, attention_mask=None,
                                    freqs_cis=None, *args, **kwargs):
    """HunyuanVideoTransformerBlock.forward (and HunyuanVideo15TransformerBlock's, the same code) on `block`: returns
    (hidden_states, encoder_hidden_states), new tensors (the caller's are never written)."""
    if not _fusable(block.norm1, block.norm1_context, block.norm2, block.norm2_context) or records_autograd(
            block, hidden_states, encoder_hidden_states, temb):
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, attention_mask, freqs_cis,
                                   *args, **kwargs)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _modulation(block.norm1, temb)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = _modulation(block.norm1_context, temb)
    out, c_out = block.attn(hidden_states=_norm(block.norm1.norm, hidden_states, shift, scale),
                            encoder_hidden_states=_norm(block.norm1_context.norm, encoder_hidden_states, c_shift,
                                                        c_scale),
                            attention_mask=attention_mask, image_rotary_emb=freqs_cis)
    x = ops.gate_residual(hidden_states, out, gate, native_dtypes=True)
    c = ops.gate_residual(encoder_hidden_states, c_out, c_gate, native_dtypes=True)
    del out, c_out
    # diffusers' x + gate * ff: the product commutes, so the same bits as ff * gate
    x = add_gated_(x, feed_forward_rows(block.ff, _norm(block.norm2, x, shift_mlp, scale_mlp)), gate_mlp)
    c = add_gated_(c, feed_forward_rows(block.ff_context, _norm(block.norm2_context, c, c_shift_mlp, c_scale_mlp)),
                   c_gate_mlp)
    return x, c


def fused_single_stream_block_forward(block, hidden_states, encoder_hidden_states, temb, attention_mask=None,
                                      image_rotary_emb=None, *args, **kwargs):
    """HunyuanVideoSingleTransformerBlock.forward on `block`: returns (hidden_states, encoder_hidden_states), views of
    one new tensor as diffusers returns them."""
    if not _fusable(block.norm) or records_autograd(block, hidden_states, encoder_hidden_states, temb):
        return type(block).forward(block, hidden_states, encoder_hidden_states, temb, attention_mask,
                                   image_rotary_emb, *args, **kwargs)
    text = encoder_hidden_states.shape[1]
    residual = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    shift, scale, gate = _modulation(block.norm, temb)
    norm = _norm(block.norm.norm, residual, shift, scale)
    mlp = block.act_mlp(block.proj_mlp(norm))
    out, c_out = block.attn(hidden_states=norm[:, :-text], encoder_hidden_states=norm[:, -text:],
                            attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
    del norm
    out = block.proj_out(torch.cat([torch.cat([out, c_out], dim=1), mlp], dim=2))
    del c_out, mlp
    # diffusers' gate * proj_out(...) + residual: the same two roundings as residual + out * gate (into the
    # concatenation, which is this call's own tensor)
    x = add_gated_(residual, out, gate)
    return x[:, :-text], x[:, -text:]


def _fusable(*norms):
    from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

    def plain(norm):  # an nn.LayerNorm (any affine: the kernel applies it as torch's LayerNorm does), no hooks
        return type(norm) is nn.LayerNorm and not hooked(norm)

    return all((type(n) is AdaLayerNormZeroSingle or (type(n) is AdaLayerNormZero and n.emb is None))
               and plain(n.norm) and not hooked(n) if type(n) is not nn.LayerNorm else plain(n) for n in norms)


def _modulation(ada_norm, temb):
    """AdaLayerNormZero(Single)'s chunks of linear(silu(temb)), each [B, 1, D] as diffusers broadcasts them."""
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    chunks = 3 if type(ada_norm) is AdaLayerNormZeroSingle else 6
    return [c[:, None, :] for c in ada_norm.linear(ada_norm.silu(temb)).chunk(chunks, dim=1)]


def _norm(norm, x, shift, scale):
    """diffusers' norm(x) * (1 + scale) + shift, norm an nn.LayerNorm: one pass."""
    return ops.layernorm_modulate(x, shift, scale, norm.eps, norm.weight, norm.bias, native_dtypes=True)
