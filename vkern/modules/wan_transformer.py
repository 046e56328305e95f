"""diffusers' WanTransformer3DModel.forward (diffusers 0.42) with the output norm fused.

diffusers ends the step with (norm_out(x.float()) * (1 + scale) + shift).type_as(x): three fp32 tensors of
the whole sequence at once (1.5 GiB at Wan-14B 480p), which is the step's memory peak once the blocks
chunk their attention and FFN. Here that is one vkern.ops.layernorm_modulate pass, bf16 in and out, with
the same fp32 math. Everything else is diffusers' forward, calling the same submodules the same way (so
hooks on rope, blocks and proj_out, e.g. vkern's sequence parallelism, see the same calls), but for one
keyword: the hidden states handed to the blocks are this forward's own (the patch embedding's copy, then
each block's output) and never read again once passed on, so a fused block gets overwrite_input=True and
writes its first residual into them in place instead of into a new tensor (one [tokens, dim] tensor less at
every block's peak) where no hook can see them: none on the block (wan_block.may_overwrite_input) and none
holding the output of the module that made them (wan_block.output_is_private). With
autograd recording or gradient checkpointing, diffusers' own forward runs; a LoRA scale in attention_kwargs is
applied as diffusers' forward applies it (modules/_lora.py).
"""
import torch

from .. import ops
from ._grad import records_autograd
from ._lora import lora_scale
from .wan_block import may_overwrite_input, output_is_private


def fused_transformer_forward(model, hidden_states, timestep, encoder_hidden_states,
                              encoder_hidden_states_image=None, return_dict=True, attention_kwargs=None):
    if model.gradient_checkpointing or records_autograd(
            model, hidden_states, encoder_hidden_states, encoder_hidden_states_image):
        # attention_kwargs by keyword: diffusers' @apply_lora_scale reads the LoRA scale from the keywords only
        return type(model).forward(model, hidden_states, timestep, encoder_hidden_states,
                                   encoder_hidden_states_image, return_dict, attention_kwargs=attention_kwargs)
    with lora_scale(model, attention_kwargs):
        return _fused_forward(model, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image,
                              return_dict)


def _fused_forward(model, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image, return_dict):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    grid = hidden_states.shape
    rotary_emb = model.rope(hidden_states)
    hidden_states, private = embed_patches(model.patch_embedding, hidden_states)

    ts_seq_len = None
    if timestep.ndim == 2:  # Wan 2.2 TI2V: per-token timesteps
        ts_seq_len = timestep.shape[1]
        timestep = timestep.flatten()
    temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = model.condition_embedder(
        timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=ts_seq_len)
    timestep_proj = timestep_proj.unflatten(2 if ts_seq_len is not None else 1, (6, -1))
    if encoder_hidden_states_image is not None:
        encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

    for block in model.blocks:
        # hidden_states is rebound to the block's result, so this forward never reads it again. Overwritten
        # only when no one else holds it (private: no hook kept it from the module that made it) and none of
        # the block's hooks can see it; other blocks (diffusers', hooked) get diffusers' call exactly.
        overwrite = {"overwrite_input": True} if private and may_overwrite_input(block) else {}
        hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, **overwrite)
        private = output_is_private(block)

    output = output_projection(model, hidden_states, temb, grid)
    return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def embed_patches(patch_embedding, hidden_states):
    """diffusers' patch_embedding(x).flatten(2).transpose(1, 2), made contiguous; returns (it, private): private when
    it is ours to overwrite (a copy, or with one token, already contiguous, the conv's output that no hook holds)."""
    embedded = patch_embedding(hidden_states).flatten(2).transpose(1, 2)
    tokens = embedded.contiguous()
    return tokens, tokens is not embedded or output_is_private(patch_embedding)


def output_projection(model, hidden_states, temb, grid):
    """diffusers' step 5 (Wan and Wan VACE): the output norm + modulation as one vkern.ops.layernorm_modulate pass,
    proj_out, and the unpatchify back to grid = the input latents' shape [B, C, frames, height, width]."""
    batch_size, _, num_frames, height, width = grid
    p_t, p_h, p_w = model.config.patch_size
    frames, rows, cols = num_frames // p_t, height // p_h, width // p_w
    # diffusers: shift, scale = (scale_shift_table + temb).chunk(2) in fp32, [B, 1|S, D] each; the kernel
    # takes the temb chunk and the table row apart and adds them in fp32, the same sum.
    table = model.scale_shift_table.to(hidden_states.device)
    temb = temb.to(hidden_states.device)
    temb = temb[:, None] if temb.ndim == 2 else temb  # [B, 1|S, D]
    norm = model.norm_out
    hidden_states = ops.layernorm_modulate(hidden_states, temb, temb, norm.eps, getattr(norm, "weight", None),
                                           getattr(norm, "bias", None), table[0, 0], table[0, 1])
    hidden_states = model.proj_out(hidden_states)

    hidden_states = hidden_states.reshape(batch_size, frames, rows, cols, p_t, p_h, p_w, -1)
    return hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
