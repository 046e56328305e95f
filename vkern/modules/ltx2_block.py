"""diffusers' LTX2VideoTransformerBlock.forward (LTX-2's audio-video block) with vkern's fused glue.

The same ops in the same order, each rounded as diffusers rounds it (the native_dtypes form of vkern.ops, as for
LTX-Video), the block's eight attentions and two FFNs called as diffusers calls them, but on both streams:
  - RMSNorm + modulate (scale_shift_table + temb) is one pass (vkern.ops.layernorm_modulate(rms=True)) reading temb
    and the table rows in place; a plain RMSNorm (norm2 without cross-attention AdaLN) is one pass too; the
    audio-to-video norm, which diffusers computes once and modulates twice (a2v, v2a), is two fused passes from the
    hidden states (the same bits: diffusers rounds the norm to the stream's dtype before modulating it);
  - each gate + residual is one pass (vkern.ops.gate_residual); the first makes the block's new tensor, the later
    ones are written into it in place;
  - the FFNs' GELU runs in place (vkern/modules/feed_forward.py).
The prompt's own modulation (cross-attention AdaLN on the text, a few hundred tokens) stays diffusers' expression.
diffusers' forward runs instead where the fused path would not be the same computation: with autograd recording, a
norm with an affine weight or a hook, or modulation inputs of another layout.
"""
from .. import ops
from ._grad import records_autograd
from ._hooks import hooked
from ._native_glue import add_, add_gated_, modulation_pairs
from .feed_forward import feed_forward_rows

_NORMS = ("norm1", "audio_norm1", "norm2", "audio_norm2", "audio_to_video_norm", "video_to_audio_norm", "norm3",
          "audio_norm3")


def fused_ltx2_block_forward(block, hidden_states, audio_hidden_states, encoder_hidden_states,
                             audio_encoder_hidden_states, temb, temb_audio, temb_ca_scale_shift,
                             temb_ca_audio_scale_shift, temb_ca_gate, temb_ca_audio_gate, temb_prompt=None,
                             temb_prompt_audio=None, video_rotary_emb=None, audio_rotary_emb=None,
                             ca_video_rotary_emb=None, ca_audio_rotary_emb=None, encoder_attention_mask=None,
                             audio_encoder_attention_mask=None, self_attention_mask=None,
                             audio_self_attention_mask=None, a2v_cross_attention_mask=None,
                             v2a_cross_attention_mask=None, use_a2v_cross_attention=True, use_v2a_cross_attention=True,
                             perturbation_mask=None, all_perturbed=None):
    """LTX2VideoTransformerBlock.forward with the same arguments; returns (hidden_states, audio_hidden_states), new
    tensors (the caller's are never written)."""
    args = (hidden_states, audio_hidden_states, encoder_hidden_states, audio_encoder_hidden_states, temb, temb_audio,
            temb_ca_scale_shift, temb_ca_audio_scale_shift, temb_ca_gate, temb_ca_audio_gate, temb_prompt,
            temb_prompt_audio, video_rotary_emb, audio_rotary_emb, ca_video_rotary_emb, ca_audio_rotary_emb,
            encoder_attention_mask, audio_encoder_attention_mask, self_attention_mask, audio_self_attention_mask,
            a2v_cross_attention_mask, v2a_cross_attention_mask, use_a2v_cross_attention, use_v2a_cross_attention,
            perturbation_mask, all_perturbed)
    video = modulation_pairs(block.scale_shift_table, temb, hidden_states)
    audio = modulation_pairs(block.audio_scale_shift_table, temb_audio, audio_hidden_states)
    video_ca = modulation_pairs(block.video_a2v_cross_attn_scale_shift_table[:4], temb_ca_scale_shift,
                                hidden_states)
    audio_ca = modulation_pairs(block.audio_a2v_cross_attn_scale_shift_table[:4], temb_ca_audio_scale_shift,
                                audio_hidden_states)
    video_gate = modulation_pairs(block.video_a2v_cross_attn_scale_shift_table[4:], temb_ca_gate, hidden_states)
    audio_gate = modulation_pairs(block.audio_a2v_cross_attn_scale_shift_table[4:], temb_ca_audio_gate,
                                  audio_hidden_states)
    if (None in (video, audio, video_ca, audio_ca, video_gate, audio_gate) or not _plain_norms(block)
            or records_autograd(block, *[a for a in args if hasattr(a, "requires_grad")])):
        from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformerBlock

        return LTX2VideoTransformerBlock.forward(block, *args)
    perturbed = {"perturbation_mask": perturbation_mask, "all_perturbed": all_perturbed} if block.perturbed_attn else {}

    # 1. Self-attention, video then audio: the first gate + residual makes each stream's new tensor.
    out = block.attn1(hidden_states=_norm(block.norm1, hidden_states, video[1], video[0]), encoder_hidden_states=None,
                      query_rotary_emb=video_rotary_emb, attention_mask=self_attention_mask, **perturbed)
    x = ops.gate_residual(hidden_states, out, *video[2], native_dtypes=True)
    out = block.audio_attn1(hidden_states=_norm(block.audio_norm1, audio_hidden_states, audio[1], audio[0]),
                            encoder_hidden_states=None, query_rotary_emb=audio_rotary_emb,
                            attention_mask=audio_self_attention_mask, **perturbed)
    a = ops.gate_residual(audio_hidden_states, out, *audio[2], native_dtypes=True)
    del out

    # 2. Cross-attention to the prompt (its own AdaLN, where the block has it: diffusers' expressions, text-sized).
    text, audio_text = encoder_hidden_states, audio_encoder_hidden_states
    if block.cross_attn_adaln:
        text, audio_text = _prompt_modulation(block, text, audio_text, temb_prompt, temb_prompt_audio, x, a)
    x = _cross_attention(block.attn2, block.norm2, x, video, block.video_cross_attn_adaln, text,
                         encoder_attention_mask)
    a = _cross_attention(block.audio_attn2, block.audio_norm2, a, audio, block.audio_cross_attn_adaln, audio_text,
                         audio_encoder_attention_mask)

    # 3. Audio-to-video and video-to-audio attention: both read the streams as they are now.
    if use_a2v_cross_attention or use_v2a_cross_attention:
        a2v_out = v2a_out = None
        if use_a2v_cross_attention:  # q: video, k/v: audio
            a2v_out = block.audio_to_video_attn(
                _norm(block.audio_to_video_norm, x, video_ca[0], video_ca[1]),
                encoder_hidden_states=_norm(block.video_to_audio_norm, a, audio_ca[0], audio_ca[1]),
                query_rotary_emb=ca_video_rotary_emb, key_rotary_emb=ca_audio_rotary_emb,
                attention_mask=a2v_cross_attention_mask)
        if use_v2a_cross_attention:  # q: audio, k/v: video (the video before the a2v residual, as in diffusers)
            v2a_out = block.video_to_audio_attn(
                _norm(block.video_to_audio_norm, a, audio_ca[2], audio_ca[3]),
                encoder_hidden_states=_norm(block.audio_to_video_norm, x, video_ca[2], video_ca[3]),
                query_rotary_emb=ca_audio_rotary_emb, key_rotary_emb=ca_video_rotary_emb,
                attention_mask=v2a_cross_attention_mask)
        if a2v_out is not None:
            x = add_gated_(x, a2v_out, *video_gate[0])
        if v2a_out is not None:
            a = add_gated_(a, v2a_out, *audio_gate[0])
        del a2v_out, v2a_out

    # 4. Feed-forward of each stream.
    x = add_gated_(x, feed_forward_rows(block.ff, _norm(block.norm3, x, video[4], video[3])), *video[5])
    a = add_gated_(a, feed_forward_rows(block.audio_ff, _norm(block.audio_norm3, a, audio[4], audio[3])), *audio[5])
    return x, a


def _norm(norm, x, scale=None, shift=None):
    """diffusers' norm(x) * (1 + scale) + shift (scale, shift: (temb chunk, table row) pairs), or norm(x): one pass."""
    if scale is None:
        return ops.layernorm_modulate(x, None, None, norm.eps, rms=True, native_dtypes=True)
    return ops.layernorm_modulate(x, shift[0], scale[0], norm.eps, shift_table=shift[1], scale_table=scale[1], rms=True,
                                  native_dtypes=True)


def _cross_attention(attn, norm, x, mods, adaln, text, mask):
    """Step 2 for one stream: norm (+ the query's AdaLN: mods 6-8), attention to the prompt, (gated) residual."""
    out = attn(_norm(norm, x, mods[7], mods[6]) if adaln else _norm(norm, x), encoder_hidden_states=text,
               query_rotary_emb=None, attention_mask=mask)
    if adaln:  # diffusers' x + (out * gate): the same two roundings as gate + residual
        return add_gated_(x, out, *mods[8])
    return add_(x, out)


def _prompt_modulation(block, text, audio_text, temb_prompt, temb_prompt_audio, x, a):
    """The prompt's AdaLN as diffusers computes it (text * (1 + scale) + shift, the prompt tables plus temb_prompt, or
    the tables alone when temb_prompt is None)."""
    batch = x.shape[0]
    results = []
    for table, temb, t, stream in ((block.prompt_scale_shift_table, temb_prompt, text, x),
                                   (block.audio_prompt_scale_shift_table, temb_prompt_audio, audio_text, a)):
        if temb is not None:
            shift, scale = block.get_mod_params(table, temb, batch)
        else:
            shift, scale = table[None, None].to(device=stream.device, dtype=stream.dtype).unbind(dim=2)
        results.append(t * (1 + scale) + shift)
    return results


def _plain_norms(block):
    return all(getattr(getattr(block, n), "weight", None) is None and getattr(getattr(block, n), "bias", None) is None
               and not hooked(getattr(block, n)) for n in _NORMS)
