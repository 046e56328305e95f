"""Drop-in attention processor for diffusers' WanAttention (self, cross and I2V added key/value)."""
import functools
import warnings
from typing import NamedTuple

import torch

from .. import ops
from ._grad import records_autograd
from ..reference import attention as ref
from ..reference.attention import KEY_BLOCK

# mode -> how attention runs. "auto": vkern's measured choice per shape class (vkern.ops.attention);
# "bf16": vkern's own exact kernels always (the CUDA one where it can take the call, else the Triton one; auto takes
# cuDNN where it measured faster); "sdpa": torch SDPA (cuDNN first); "reference": diffusers' ops;
# 8-bit (opt-in, accuracy in README/bench): "fp8" = int8 Q/K + e4m3 P/V (the CUDA kernel on Hopper: int8 Q/K are
# as fast as e4m3 there and remove the larger half of the error, bench/NOTES.md runs 55-56), "int8pv" = int8 Q/K +
# u8 P / int8 V (the CUDA kernel on Hopper: about half fp8's error, bench/NOTES.md session 21), "int8" = int8 Q/K +
# bf16 P/V (Triton).
ATTENTION_MODES = ("auto", "bf16", "fp8", "int8pv", "int8", "sdpa", "reference")
_8BIT = {"fp8": ("int8", "e4m3"), "int8pv": ("int8", "int8"), "int8": ("int8", "bf16")}
_8BIT_V = ("e4m3", "int8")  # the schemes whose V is quantized (per 128-key block, smoothed)
_BACKEND = {"auto": "auto", "bf16": "vkern", "sdpa": "sdpa", "reference": "reference"}
_warned_masked = set()  # the 8-bit modes that said their masked calls run exact attention


class VkernWanAttnProcessor:
    """WanAttnProcessor with the QK RMSNorm + RoPE fused into one kernel pass (which also emits the
    8-bit Q/K and scales in the 8-bit modes, so no bf16 Q/K is written) and attention through vkern.ops.
    attention: one of ATTENTION_MODES."""

    def __init__(self, attention="auto", fused_qk_norm_rope=True):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: expected one of {ATTENTION_MODES}, got {attention!r}")
        self.attention = attention
        self.fused_qk_norm_rope = (fused_qk_norm_rope and attention != "reference") or attention in _8BIT

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if records_autograd(attn, hidden_states, encoder_hidden_states):  # vkern's ops have no backward: diffusers'
            return ref.wan_attention(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        norm_rope, attend = self._steps(exact=attention_mask is not None)
        return ref.wan_attention(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                 norm_rope=norm_rope, attend=attend)

    # Query-chunked attention (vkern.modules.wan_block, PatchConfig.attention_chunk_size): the same steps
    # as __call__, split so keys/values exist once for the whole sequence while queries go chunk by chunk.

    def key_value(self, attn, context, rotary_emb=None):
        """Attend-ready (kv, image_kv) of `context` (encoder_hidden_states for cross-attention)."""
        (key, value), image_kv = ref.wan_key_value(attn, context, rotary_emb, norm_rope=self._steps()[0])
        return (key, self._quantize_value(value)), image_kv

    def chunked_key_value(self, attn, spans, rows, rotary_emb, batch, tokens):
        """Self-attention keys/values of all `tokens`, computed span by span (spans: (batch, token) index
        pairs covering [batch, tokens]; rows(b, s): the normed hidden states of a span, as attn's
        projections take them) into one buffer each, so no projection of the whole sequence exists. In the 8-bit
        modes each span's K and V are quantized before they are stored (their scales are per 128-key block, and
        the spans start on block bounds), so only the 8-bit K and V of the whole sequence exist; V is smoothed by
        the offset of its batch row's first span."""
        buffers = form = None
        offsets = {}  # batch row -> the V offset of its first span
        norm_rope, block = self._steps()[0], self._key_block()
        if block > 1 and any((s.start or 0) % block for _, s in spans):
            spans = _aligned_spans(spans, batch, tokens, block)  # per-block scales: spans on block bounds
        for b, s in spans:
            (key, value), _ = ref.wan_key_value(attn, rows(b, s), rope_rows(rotary_emb, b, s), norm_rope=norm_rope)
            kv = (key, self._quantize_value(value, offsets.get(b.start)))
            if isinstance(kv[1], QuantizedValue):
                offsets.setdefault(b.start, kv[1].offset)
            del key, value  # the bf16 V of a quantized span goes now
            leaves = _leaves(kv, tokens, block)
            if buffers is None:
                form = _form(kv)
                buffers = [t.new_empty(tuple(batch if i == 0 else length if i == dim else n for i, n in enumerate(t.shape)))
                           for t, dim, _, length in leaves]
            _store(leaves, buffers, b, s.start or 0)
            del kv, leaves  # a span's K and V are not alive while the next span makes its own (run 60's trace)
        return _rebuild(form, buffers)

    def attend_query(self, attn, hidden_states, kv, image_kv=None, rotary_emb=None):
        """The output projection of hidden_states' queries (any token slice; rotary_emb: their tables)
        against key_value's or chunked_key_value's kv / image_kv (same batch)."""
        norm_rope, attend = self._steps()
        return ref.wan_attend_query(attn, hidden_states, kv, image_kv, rotary_emb, norm_rope, attend)

    def _steps(self, exact=False):
        """(norm_rope, attend) for this mode. exact: the call has an attention mask (Wan passes none; SkyReels-V2's
        block-causal one), which the 8-bit kernels do not take: those calls run the exact 16-bit attention, said
        once per mode."""
        if self.attention in _8BIT and exact:
            if self.attention not in _warned_masked:
                _warned_masked.add(self.attention)
                warnings.warn(f"VkernWanAttnProcessor: attention={self.attention!r} has no kernel for an attention "
                              "mask: the masked calls run the exact 16-bit attention", stacklevel=4)
            return ops.qk_norm_rope, functools.partial(ops.attention, backend="auto")
        if self.attention in _8BIT:
            qk, pv = _8BIT[self.attention]
            norm_rope_q = functools.partial(ops.qk_norm_rope, quant=qk)
            norm_rope_k = functools.partial(ops.qk_norm_rope, quant=qk, token_block=self._key_block())
            return (norm_rope_q, norm_rope_k), functools.partial(_attend_8bit, pv=pv)
        norm_rope = ops.qk_norm_rope if self.fused_qk_norm_rope else ref.qk_norm_rope
        attend = (ref.attention if self.attention == "reference" else
                  functools.partial(ops.attention, backend=_BACKEND[self.attention]))
        return norm_rope, attend

    def _key_block(self):
        """Tokens per K scale: per 128-key block for the schemes the CUDA 8-bit kernel takes, else 1."""
        return ref.key_token_block(*_8BIT[self.attention]) if self.attention in _8BIT else 1

    def _quantize_value(self, value, offset=None):
        """fp8 / int8pv modes: V (or a span of whole 128-key blocks of it) in the kernel's 8-bit form, smoothed by
        `offset` (None: V's own mean), else as it is."""
        if self.attention in _8BIT and _8BIT[self.attention][1] in _8BIT_V:
            return quantize_value(value, offset, _8BIT[self.attention][1])
        return value

    def __repr__(self):
        return f"VkernWanAttnProcessor(attention={self.attention!r}, fused_qk_norm_rope={self.fused_qk_norm_rope})"


class QuantizedValue(NamedTuple):
    """V already in the kernel's 8-bit form (ops.v_to_8bit of V - offset) and the dtype of the attention output."""
    data: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    dtype: torch.dtype


def quantize_value(value, offset=None, fmt="e4m3"):
    """value [B, S, H, D] -> QuantizedValue for pv `fmt` ("e4m3", or "int8": stored as v_to_8bit's "u8", the
    codes + 128 the CUDA kernel reads without a conversion per call), smoothed by offset (fp32 [B, H, D]; None:
    ops.value_offset(value))."""
    offset = ops.value_offset(value) if offset is None else offset
    return QuantizedValue(*ops.v_to_8bit(value, "u8" if fmt == "int8" else fmt, offset=offset), offset, value.dtype)


def _attend_8bit(query, key, value, attention_mask=None, pv="e4m3"):
    """query, key: (8-bit [B, S, H, D], scales) from the fused prologue (per token [B, H, S]; keys of the 8-bit-P/V
    scheme per 128-key block [B, H, ceil(S / 128)]); value [B, S, H, D] or a QuantizedValue."""
    if attention_mask is not None:
        raise ValueError("_attend_8bit: the 8-bit kernels take no attention_mask (VkernWanAttnProcessor routes masked "
                         "calls to the exact attention)")
    if not isinstance(value, QuantizedValue) and pv in _8BIT_V:
        value = quantize_value(value, fmt=pv)
    if isinstance(value, QuantizedValue):
        return ops.attention_prequantized(*query, *key, value.data, value.scale, out_dtype=value.dtype,
                                          v_offset=value.offset)
    return ops.attention_prequantized(*query, *key, value, None, out_dtype=value.dtype)


def _aligned_spans(spans, batch, tokens, block):
    """Per-batch token spans like `spans` (their longest length rounded up to a multiple of `block`), each
    starting on a block boundary."""
    size = -(-max((s.stop if s.stop is not None else tokens) - (s.start or 0) for _, s in spans) // block) * block
    return [(slice(b, b + 1), slice(t, min(t + size, tokens))) for b in range(batch) for t in range(0, tokens, size)]


def _leaves(kv, tokens, key_block):
    """(tensor, token dim, tokens per index, that dim's length for all `tokens`) of each tensor in a (key, value)
    pair of a span: [B, S, H, D] data, 8-bit key scales [B, H, S / key_block], 8-bit V^T [B, H, D, S padded to 16],
    its scales [B, H, S / 128] and its offset [B, H, D] (QuantizedValue; token dim None: stored whole)."""
    key, value = kv
    leaves = [(key[0], 1, 1, tokens), (key[1], 2, key_block, -(-tokens // key_block))] if isinstance(key, tuple) \
        else [(key, 1, 1, tokens)]
    if isinstance(value, QuantizedValue):
        return leaves + [(value.data, 3, 1, -(-tokens // 16) * 16), (value.scale, 2, KEY_BLOCK, -(-tokens // KEY_BLOCK)),
                         (value.offset, None, 1, None)]
    return leaves + [(value, 1, 1, tokens)]


def _store(leaves, buffers, b, start):
    """Copies a span's _leaves (its tokens from `start`, batch rows b) into the whole sequence's buffers."""
    for (t, dim, per, _), buffer in zip(leaves, buffers):
        (buffer[b] if dim is None else buffer[b].narrow(dim, start // per, t.shape[dim])).copy_(t)


def _form(kv):
    """What _rebuild needs of a (key, value) pair: whether the key is (8-bit data, scales), and the dtype of a
    QuantizedValue's attention output (None: the value is a tensor)."""
    key, value = kv
    return isinstance(key, tuple), value.dtype if isinstance(value, QuantizedValue) else None


def _rebuild(form, buffers):
    """The (key, value) pair of _form's shape from the whole sequence's buffers, in _leaves' order."""
    quantized_key, value_dtype = form
    n = 2 if quantized_key else 1
    key = tuple(buffers[:n]) if quantized_key else buffers[0]
    value = QuantizedValue(*buffers[n:], value_dtype) if value_dtype is not None else buffers[n]
    return key, value


def token_rows(t, b, s):
    """The rows of a [B|1, S|1, ...] tensor broadcast over hidden states [B, S, ...] (a temb chunk, a RoPE
    table) that go with hidden-state rows [b, s]."""
    return t[b if t.shape[0] != 1 else slice(None), s if t.shape[1] != 1 else slice(None)]


def rope_rows(rotary_emb, b, s):
    """diffusers' RoPE tables (cos, sin) [1|B, S, 1, D] of hidden-state rows [b, s] (None stays None)."""
    return None if rotary_emb is None else tuple(token_rows(f, b, s) for f in rotary_emb)
