"""diffusers' WanVACETransformerBlock.forward with vkern's fused Wan block glue.

A VACE block (diffusers 0.42, transformer_wan_vace.py) runs on the control hidden states: an optional input
projection (block 0: proj_in(control) + hidden_states), then WanTransformerBlock's glue line for line (the Wan 2.1
[B, 6, D] temb; the VACE model has no per-token timesteps), then an optional output projection (the hint that the
main block of the same VACE layer adds). The middle is fused_block_forward itself, so the glue exists once.
"""
from ._grad import records_autograd
from .wan_block import fused_block_forward


def fused_vace_block_forward(block, hidden_states, encoder_hidden_states, control_hidden_states, temb, rotary_emb,
                             ffn_chunk_size=None, attention_chunk_size=None):
    """WanVACETransformerBlock.forward on `block`: returns (conditioning_states, or None without proj_out,
    control_hidden_states). ffn_chunk_size, attention_chunk_size: as fused_block_forward's. The caller's tensors
    are never written. Inference only: with autograd recording, diffusers' own forward runs (the fused ops have no
    backward)."""
    if records_autograd(block, hidden_states, encoder_hidden_states, control_hidden_states, temb):
        from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock

        return WanVACETransformerBlock.forward(block, hidden_states, encoder_hidden_states, control_hidden_states,
                                               temb, rotary_emb)
    own = block.proj_in is not None
    if own:  # diffusers: proj_in(control), then + hidden_states (the same two roundings)
        control_hidden_states = block.proj_in(control_hidden_states) + hidden_states
    # The sum above is this forward's own tensor, seen by no one else: the block may write its residuals into it.
    control_hidden_states = fused_block_forward(block, control_hidden_states, encoder_hidden_states, temb, rotary_emb,
                                                ffn_chunk_size=ffn_chunk_size,
                                                attention_chunk_size=attention_chunk_size, overwrite_input=own)
    conditioning_states = block.proj_out(control_hidden_states) if block.proj_out is not None else None
    return conditioning_states, control_hidden_states
