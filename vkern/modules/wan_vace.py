"""diffusers' WanVACETransformerBlock.forward with vkern's fused Wan block glue, and WanVACETransformer3DModel.forward
with each VACE hint made where it is used and the output norm fused.

A VACE block (diffusers 0.42, transformer_wan_vace.py) runs on the control hidden states: an optional input
projection (block 0: proj_in(control) + hidden_states), then WanTransformerBlock's glue line for line (the Wan 2.1
[B, 6, D] temb; the VACE model has no per-token timesteps), then an optional output projection (the hint that the
main block of the same VACE layer adds). The middle is fused_block_forward itself, so the glue exists once.
"""
import torch

from ._grad import records_autograd
from ._lora import lora_scale
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


def fused_vace_transformer_forward(model, hidden_states, timestep, encoder_hidden_states,
                                   encoder_hidden_states_image=None, control_hidden_states=None,
                                   control_hidden_states_scale=None, return_dict=True, attention_kwargs=None):
    """WanVACETransformer3DModel.forward (diffusers 0.42) with each VACE hint made when it is used, and the output norm
    fused (wan_transformer.output_projection).

    diffusers runs every VACE block first and keeps all their hints (one [B, tokens, dim] tensor per VACE layer: 8 at
    14B, 15 at 1.3B; 2.7 GB at 14B 480p) through the main blocks. A VACE block reads only the patch-embedded input and
    the previous VACE block's control states, so here VACE block j runs just before the main block whose output takes
    hint j: two tensors live (the input, the control states) instead of all the hints, and the same values, since each
    block gets the same inputs. With autograd recording or gradient checkpointing, diffusers' own forward runs; a LoRA
    scale in attention_kwargs is applied as diffusers' forward applies it (modules/_lora.py)."""
    if model.gradient_checkpointing or records_autograd(
            model, hidden_states, encoder_hidden_states, encoder_hidden_states_image, control_hidden_states):
        # attention_kwargs by keyword: diffusers' @apply_lora_scale reads the LoRA scale from the keywords only
        return type(model).forward(model, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                   control_hidden_states, control_hidden_states_scale, return_dict,
                                   attention_kwargs=attention_kwargs)
    with lora_scale(model, attention_kwargs):
        return _fused_vace_forward(model, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                                   control_hidden_states, control_hidden_states_scale, return_dict)


def _fused_vace_forward(model, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                        control_hidden_states, control_hidden_states_scale, return_dict):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    from .wan_block import may_overwrite_input, output_is_private
    from .wan_transformer import embed_patches, output_projection

    layers = model.config.vace_layers
    if control_hidden_states_scale is None:
        control_hidden_states_scale = control_hidden_states.new_ones(len(layers))
    scales = torch.unbind(control_hidden_states_scale)
    if len(scales) != len(layers):
        raise ValueError(f"Length of `control_hidden_states_scale` {len(scales)} should be equal to {len(layers)}.")

    grid = hidden_states.shape
    rotary_emb = model.rope(hidden_states)
    hidden_states, private = embed_patches(model.patch_embedding, hidden_states)
    control = model.vace_patch_embedding(control_hidden_states).flatten(2).transpose(1, 2)
    padding = control.new_zeros(grid[0], hidden_states.size(1) - control.size(1), control.size(2))
    control = torch.cat([control, padding], dim=1)
    del padding

    temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = model.condition_embedder(
        timestep, encoder_hidden_states, encoder_hidden_states_image)
    timestep_proj = timestep_proj.unflatten(1, (6, -1))
    if encoder_hidden_states_image is not None:
        encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

    embedded = hidden_states  # every VACE block's input: kept until the last hint is made
    hints = zip(model.vace_blocks, scales)  # hint j: VACE block j, at the j-th main block listed in vace_layers
    pending = sum(i in layers for i in range(len(model.blocks)))
    for i, block in enumerate(model.blocks):
        # As wan_transformer.fused_transformer_forward, but the embedded input is not ours to overwrite while a VACE
        # block still reads it.
        overwrite = private and (hidden_states is not embedded or not pending) and may_overwrite_input(block)
        hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb,
                              **({"overwrite_input": True} if overwrite else {}))
        private = output_is_private(block)
        if i in layers:
            vace_block, scale = next(hints)
            hint, control = vace_block(embedded, encoder_hidden_states, control, timestep_proj, rotary_emb)
            pending -= 1
            hidden_states = hidden_states + hint.to(hidden_states.device) * scale
            private = True  # (a new tensor, no module's output)
            del hint
            if not pending:
                embedded = control = None  # (freed: no VACE block reads them any more)
    output = output_projection(model, hidden_states, temb, grid)
    return Transformer2DModelOutput(sample=output) if return_dict else (output,)
