"""HunyuanVideo 1.5 attention, the spec for vkern's processor: the same torch ops in the same order as diffusers'
HunyuanVideo15AttnProcessor2_0 (diffusers 0.42) on its native backend, with the attention step as a parameter.

The sequence is [video tokens, text tokens] (the text: image, ByT5 and MLLM tokens, each row's real ones first, as
the transformer reorders them). diffusers' mask is the text's [B, text] padding mask, padded with True over the
video; it builds from that a [B, 1, S, S] bool mask (query real and key real) for every call, S^2 bytes (2.6 GB per
call at 480p x 121 frames), which leaves SDPA only its masked backends. The same result is a key-padding mask over
the keys with the padded queries' rows zeroed (SDPA gives 0 for a row with no key to attend): what vkern runs."""
import torch.nn.functional as F

from .attention import attention
from .hunyuan_attention import append_text_stream, split_streams, video_qkv


def token_mask(attention_mask, seq_len):
    """diffusers' step 1: the text mask [B, text] -> [B, S] bool over [video, text] (True = a real token). None
    stays None (no mask; diffusers' processor would raise)."""
    if attention_mask is None:
        return None
    return F.pad(attention_mask, (seq_len - attention_mask.shape[1], 0), value=True).bool()


def padded_joint_attention(query, key, value, tokens):
    """diffusers' step 2 and the attention: tokens [B, S] bool -> the [B, 1, S, S] mask built as diffusers builds it,
    SDPA as diffusers' native backend calls it."""
    if tokens is None:
        return attention(query, key, value)
    batch_size, seq_len = tokens.shape
    mask_1 = tokens.view(batch_size, 1, 1, seq_len).repeat(1, 1, seq_len, 1)
    mask_2 = mask_1.transpose(2, 3)
    return attention(query, key, value, (mask_1 & mask_2).bool())


def hunyuan_video15_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                              image_rotary_emb=None, attend=padded_joint_attention, norm_rope=None):
    """HunyuanVideo15AttnProcessor2_0.__call__; attend(q, k, v, tokens) on [B, S, H, D] tensors and the [B, S] bool
    token mask (token_mask) runs the attention, giving 0 for a padded query (default: diffusers' S x S mask and SDPA);
    norm_rope: see hunyuan_attention.video_qkv. Returns (hidden_states, encoder_hidden_states) as diffusers does."""
    query, key, value = video_qkv(attn, hidden_states, image_rotary_emb, 0, norm_rope)

    if encoder_hidden_states is not None:
        query, key, value = append_text_stream(attn, query, key, value, encoder_hidden_states)

    hidden_states = attend(query, key, value, token_mask(attention_mask, query.shape[1]))
    return split_streams(attn, hidden_states.flatten(2, 3).to(query.dtype), encoder_hidden_states)
