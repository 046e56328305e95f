"""Wan attention, the spec for vkern's processors: the same torch ops in the same order as
diffusers' WanAttnProcessor (diffusers 0.42), split into the pieces the kernels replace."""
import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    """torch.nn.RMSNorm over the last dimension (Wan's norm_q/norm_k normalize across all heads)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def apply_rotary_interleaved(x, freqs_cos, freqs_sin):
    """Wan's RoPE on x [B, S, H, D]: pairs (2i, 2i+1) rotated; freqs [1|B, S, 1, D] repeat-interleaved
    (diffusers keeps them in float64, so the rotation is computed in float64 and rounded once)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def rms_norm_heads(x, weight, eps, heads):
    """[B, S, H*D] -> RMSNorm -> [B, S, H, D]: across heads (weight [H*D] or None: Wan's norm_q/norm_k) or per head
    (weight [D] with several heads: HunyuanVideo's)."""
    if weight is not None and heads > 1 and weight.shape[-1] * heads == x.shape[-1]:
        return rms_norm(x.unflatten(2, (heads, -1)), weight, eps)
    return rms_norm(x, weight, eps).unflatten(2, (heads, -1))


def apply_rotary_per_element(x, freqs_cos, freqs_sin):
    """diffusers' apply_rotary_emb (use_real, interleaved pairs; HunyuanVideo's RoPE) on x [B, S, H, D]: out[2i] =
    x[2i] cos[2i] - x[2i+1] sin[2i], out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1], each element with its own
    table entry (Wan's form reads cos[2i] and sin[2i+1] for both; the same for repeat-interleaved tables), in fp32
    (or the tables' wider dtype), rounded once."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return (x.float() * freqs_cos + rotated.float() * freqs_sin).to(x.dtype)


def apply_rotary_pairs(x, freqs_cos, freqs_sin):
    """Mochi's RoPE on x [B, S, H, D]: pairs (2i, 2i+1) rotated by one table entry per pair, freqs [.., D / 2]
    (Mochi's are [S, H, D / 2]: per head), in fp32 (or the tables' wider dtype), each half rounded once."""
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


def apply_rotary_split(x, freqs_cos, freqs_sin):
    """LTX-2's split RoPE (diffusers' apply_split_rotary_emb) on x [B, S, H, D]: each head's halves x1 = x[..., :D/2]
    and x2 = x[..., D/2:] rotated by freqs [1|B, S, 1|H, D / 2]: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin, by
    diffusers' ops in their order (in fp32, or the tables' or x's wider dtype), rounded once."""
    halves = x.unflatten(-1, (2, -1))
    halves = halves.to(torch.promote_types(halves.dtype, torch.float32))  # (diffusers: .float())
    cos, sin = freqs_cos.unsqueeze(-2), freqs_sin.unsqueeze(-2)  # [.., 1, D / 2] against the halves [.., 2, D / 2]
    out = halves * cos
    out[..., :1, :].addcmul_(-sin, halves[..., 1:, :])
    out[..., 1:, :].addcmul_(sin, halves[..., :1, :])
    return out.flatten(-2).to(x.dtype)


# Wan's apply_rotary_interleaved, diffusers' apply_rotary_emb, Mochi's, LTX-2's split: what each form rotates with
ROPE_TABLES = ("per_pair", "per_element", "pairs", "split")
_ROTATIONS = {"per_pair": apply_rotary_interleaved, "per_element": apply_rotary_per_element,
              "pairs": apply_rotary_pairs, "split": apply_rotary_split}


def qk_norm_rope(x, weight, eps, heads, freqs_cos=None, freqs_sin=None, rope_tables="per_pair", bias=None):
    """[B, S, H*D] projection output -> RMSNorm across heads (or per head: rms_norm_heads; with a bias: torch's
    LayerNorm over each head, CogVideoX's) -> [B, S, H, D] -> optional RoPE (rope_tables: one of ROPE_TABLES)."""
    if bias is None:
        x = rms_norm_heads(x, weight, eps, heads)
    else:
        x = F.layer_norm(x.unflatten(2, (heads, -1)), (bias.shape[0],), weight, bias, eps)
    if freqs_cos is not None:
        x = _ROTATIONS[rope_tables](x, freqs_cos, freqs_sin)
    return x


def attention(q, k, v, attn_mask=None):
    """Non-causal attention on [B, S, H, D] tensors, as diffusers' native backend calls SDPA."""
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.permute(0, 2, 1, 3)


def stream_qkv(attn, x, projections, norms):
    """One token stream's (query, key, value) [B, S, H, D] as diffusers' joint-attention processors make them (Hunyuan,
    Mochi): its three projections split into attn.heads heads, then its per-head q and k norms (None: none)."""
    query, key, value = (proj(x).unflatten(2, (attn.heads, -1)) for proj in projections)
    norm_q, norm_k = norms
    return (query if norm_q is None else norm_q(query)), (key if norm_k is None else norm_k(key)), value


def key_padding(attention_mask, batch, keys):
    """A diffusers processor's attention_mask as a key-padding mask [B, keys] (bool, True = attend): a bool
    [B|1, 1, 1, keys] (HunyuanVideo's) or [B|1, keys]. None when attention_mask is None or is not one (a float mask,
    or one that differs per query or head): the caller then passes it to SDPA as a general mask."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return None
    if attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1):
        attention_mask = attention_mask[:, 0, 0]
    if attention_mask.dim() == 2 and attention_mask.shape[1] == keys and attention_mask.shape[0] in (1, batch):
        return attention_mask.expand(batch, keys)
    return None


def attention_math(q, k, v, attn_mask=None, dtype=torch.float64):
    """Plain softmax(QK^T/sqrt(d))V in `dtype` (the high-precision oracle for kernel tests).
    attn_mask: bool (True = attend) or additive, broadcastable to [B, H, Sq, Skv]."""
    q, k, v = (t.permute(0, 2, 1, 3).to(dtype) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.to(dtype)
    return (s.softmax(-1) @ v).permute(0, 2, 1, 3)


def attention_lse(q, k, v, key_padding_mask=None, scale=None, dtype=torch.float64):
    """The oracle for vkern's flash-attention kernels: softmax(scale * QK^T)V on [B, S, H, D] in `dtype`,
    with an optional key-padding mask [B, Skv] (bool, True = attend). Returns (out [B, Sq, H, D] in
    `dtype`, lse [B, H, Sq] in `dtype`, natural log of the softmax denominator). A query with no key to
    attend gets out = 0 and lse = -inf (flash-attention's convention; SDPA would give NaN)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (t.permute(0, 2, 1, 3).to(dtype) for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :].to(s.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(dtype).min))
    out = torch.nan_to_num(p @ v, nan=0.0)
    return out.permute(0, 2, 1, 3), lse


QK_FORMATS = ("int8", "e4m3")
PV_FORMATS = ("bf16", "e4m3", "int8")  # "bf16": V and P in V's own dtype (bf16 or fp16); "int8": u8 P, int8 V


KEY_BLOCK = 128  # keys per K scale in the CUDA kernel's schemes (its key block)


def quantize_per_head(x, fmt="e4m3", token_block=1, key_padding_mask=None):
    """[B, S, H, D] -> (int8 or e4m3 [B, S, H, D], fp32 scales [B, H, S]): one scale per (token, head),
    scale = amax * fp32(1/448) (e4m3, saturating RNE) or amax * fp32(1/127) (int8, RNE).
    token_block=KEY_BLOCK: quantize_per_key_block (key_padding_mask: see there)."""
    from .fp8 import INT8_INV, INT8_MAX, fp8_quantize

    if token_block != 1:
        if token_block != KEY_BLOCK:
            raise ValueError(f"token_block: 1 or {KEY_BLOCK}, got {token_block!r}")
        return quantize_per_key_block(x, key_padding_mask, fmt)
    if fmt == "e4m3":
        x8, scale = fp8_quantize(x, "row")
        return x8, scale.squeeze(-1).transpose(1, 2)
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) * INT8_INV
    return (xf * (1.0 / scale)).clamp(-INT8_MAX, INT8_MAX).round().to(torch.int8), scale.squeeze(-1).transpose(1, 2)


def quantize_per_key_block(x, key_padding_mask=None, fmt="e4m3"):
    """[B, S, H, D] -> (e4m3 or int8 [B, S, H, D], fp32 scales [B, H, ceil(S / KEY_BLOCK)]): one scale per
    (block of KEY_BLOCK consecutive tokens, head) = amax over the block's tokens and head dim * fp32(1/448),
    saturating RNE (fp8_quantize's rule over a coarser group), or (int8) * fp32(1/127), RNE, clamped to +-127.
    key_padding_mask (bool [B, S], True = attend): the amax runs over the attended tokens only (as V's scales:
    a padded key's garbage cannot coarsen its block's scale; its own codes saturate, and attention gives it
    weight 0)."""
    from .fp8 import E4M3, E4M3_MAX, INT8_INV, INT8_MAX, fp8_scale

    S = x.shape[1]
    xf = x.float()
    amax = key_block_amax(xf, key_padding_mask)
    scale = amax.clamp(min=1e-12) * INT8_INV if fmt == "int8" else fp8_scale(amax)  # [B, H, n]
    per_token = key_scales_per_token(scale, S).transpose(1, 2)[..., None]  # [B, S, H, 1]
    if fmt == "int8":
        return (xf * (1.0 / per_token)).clamp(-INT8_MAX, INT8_MAX).round().to(torch.int8), scale.contiguous()
    return (xf * (1.0 / per_token)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale.contiguous()


def value_offset(v, key_padding_mask=None):
    """V's smoothing offset: the mean of V [B, S, H, D] over the keys key_padding_mask (bool [B, S], True =
    attend) keeps, fp32 [B, H, D] (0 where none is). Any offset is exact in the math (the softmax weights of a
    row sum to 1: out = P (V - c) / l + c); the mean takes V's channel bias out of what is quantized
    (SageAttention2's smoothing of V), so e4m3 V's rounding scales with V's variation, not its bias (bench/NOTES.md
    session 19)."""
    if key_padding_mask is None:
        total, count = v.sum(1, dtype=torch.float32), v.shape[1]
    else:
        keep = key_padding_mask[:, :, None, None]
        total = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device)).sum(1, dtype=torch.float32)
        count = key_padding_mask.sum(1, dtype=torch.float32).clamp(min=1)[:, None, None]
    return total / count


def key_block_amax(x, key_padding_mask=None):
    """max |x| over each (block of KEY_BLOCK consecutive tokens, head) of [B, S, H, D] -> fp32 [B, H, ceil(S /
    KEY_BLOCK)], over the tokens key_padding_mask (bool [B, S], True = attend) keeps (0 where none is). A reduction
    per token first, so no |x| copy of x exists; NaN propagates."""
    B, S, H, _ = x.shape
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1).float()  # [B, S, H]
    if key_padding_mask is not None:
        amax = amax.masked_fill(~key_padding_mask[:, :, None], 0)
    n = -(-S // KEY_BLOCK)
    padded = amax.new_zeros((B, n * KEY_BLOCK, H))
    padded[:, :S] = amax
    return padded.unflatten(1, (n, KEY_BLOCK)).amax(2).transpose(1, 2)


def key_scales_per_token(k_scale, S):
    """K scales [B, H, S] (per token) or [B, H, ceil(S / KEY_BLOCK)] (per key block) -> [B, H, S]."""
    if k_scale.shape[-1] == S:
        return k_scale
    return k_scale.repeat_interleave(KEY_BLOCK, dim=-1)[..., :S]


def e4m3_key_order(n, device=None):
    """The key each of n V^T columns holds in vkern's e4m3 V^T layout: within each 32-key group, column
    16 u + 4 c + 2 g + b holds key 16 u + 8 g + 2 c + b (the order in which the CUDA kernel's 8-bit P fragment,
    built from the fp32 score accumulator, lists the keys; vkern/triton/attention.py e4m3_key_order)."""
    col = torch.arange(n, device=device)
    return (col & ~15) | ((col & 2) << 2) | ((col >> 1) & 6) | (col & 1)


def e4m3_v_transposed(v8, s_pad):
    """8-bit V [B, S, H, D] (e4m3 or int8: any dtype) -> V^T [B, H, D, s_pad] in e4m3_key_order (s_pad a multiple
    of 16 >= S), zeros in the columns of keys past S."""
    B, S, H, D = v8.shape
    keys = e4m3_key_order(s_pad, v8.device)
    cols = torch.nonzero(keys < S).squeeze(1)
    vt = torch.zeros((B, H, D, s_pad), dtype=v8.dtype, device=v8.device)
    vt[..., cols] = v8.permute(0, 2, 3, 1)[..., keys[cols]]
    return vt


def e4m3_v_from_transposed(vt, S):
    """Inverse of e4m3_v_transposed (any dtype): V^T [B, H, D, s_pad] -> V [B, S, H, D] (a view-free copy)."""
    keys = e4m3_key_order(vt.shape[3], vt.device)
    cols = torch.empty_like(keys)
    cols[keys] = torch.arange(vt.shape[3], device=vt.device)
    return vt[..., cols[:S]].permute(0, 3, 1, 2)


def qk_norm_rope_quantized(x, weight, eps, heads, freqs_cos=None, freqs_sin=None, fmt="e4m3", token_block=1,
                           key_padding_mask=None):
    """The fused prologue's 8-bit output: RMSNorm (rounded to x's dtype, as torch's RMSNorm; skipped when
    weight is None) and RoPE (float64 tables) as qk_norm_rope, then quantize_per_head (token_block tokens
    per scale, key_padding_mask) of the unrounded values."""
    x = rms_norm_heads(x, weight, eps, heads) if weight is not None else x.unflatten(2, (heads, -1))
    if freqs_cos is not None:
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
        x = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return quantize_per_head(x.float(), fmt, token_block, key_padding_mask)


def attention_quantized(q8, q_scale, k8, k_scale, v, v_scale=None, key_padding_mask=None, scale=None,
                        out_dtype=torch.bfloat16, v_offset=None):
    """8-bit attention in fp32 math, the schemes vkern's kernels implement: S = (Q8 K8^T) * q_scale * k_scale *
    scale (k_scale per key [B, H, Skv] or per key block [B, H, ceil(Skv / KEY_BLOCK)]), masked keys -inf; then
    P @ V by V's dtype:
    - bf16/fp16 V (v_scale None): P = exp(S - rowmax) rounded to V's dtype.
    - e4m3 V with v_scale per key block [B, H, ceil(Skv / KEY_BLOCK)] (quantize_value): P scaled to [0, 448] and
      rounded to e4m3; each key's V times its block's scale.
    - int8 V with v_scale per key block (quantize_value(..., fmt="int8")): u8 P against each key block's row max
      times int8 V, summed exactly per block (_u8_int8_pv).
    Row sums of the unrounded P in fp32 (int8 V: of the rounded, _u8_int8_pv). v_offset (fp32 [B, H, D] or None):
    what was subtracted from V before its quantization (value_offset), added to each row that attended a key.
    (The kernels take the row max block by block, online, so their P rounding differs slightly; both are held
    to the same accuracy bounds against the exact oracle.) Returns (out in out_dtype, lse fp32 [B, H, Sq]);
    a row with no key to attend gets out 0 and lse -inf."""
    from .fp8 import E4M3

    if v.dtype == torch.int8 and v_scale is None:
        raise ValueError("v: int8 V needs its per-key-block scales (v_scale)")
    D = q8.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    qf, kf = (t.float().permute(0, 2, 1, 3) for t in (q8, k8))
    k_scale = key_scales_per_token(k_scale, k8.shape[1])
    s = (qf @ kf.transpose(-1, -2)) * q_scale[..., None] * k_scale[:, :, None, :]
    s = s * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    if v.dtype == torch.int8:
        o, l = _u8_int8_pv(s, m, v, v_scale)
        p_scale = 1.0
    else:
        p_scale = 448.0 if v_scale is not None else 1.0
        p = torch.exp(s - m) * p_scale
        l = p.sum(-1, keepdim=True)
        p_lo = p.to(E4M3 if v_scale is not None else v.dtype).float()
        vf = v.float().permute(0, 2, 1, 3)
        if v_scale is not None:  # each key's V times its block's scale (the kernel: each block's P V times it)
            vf = vf * key_scales_per_token(v_scale, v.shape[1])[..., None]
        o = p_lo @ vf
    out = o / torch.where(l == 0, torch.ones_like(l), l)
    if v_offset is not None:
        out = out + torch.where(l > 0, v_offset[:, :, None, :], 0.0)
    lse = (m + torch.log(l / p_scale)).squeeze(-1)
    return out.permute(0, 2, 1, 3).to(out_dtype), lse


U8_MAX = 255.0  # P's code for exp(0) in the int8 P/V scheme (P is unsigned: 0 <= exp(s - m_b) <= 1)


def _u8_int8_pv(s, m, v8, v_scale):
    """The int8 P/V scheme's P @ V (pv="int8"): scores s fp32 [B, H, Sq, Skv] (masked keys -inf), m [B, H, Sq, 1]
    the rows' max over all keys (0 where every key is masked), v8 int8 [B, Skv, H, D] with v_scale fp32
    [B, H, ceil(Skv / KEY_BLOCK)]. Per KEY_BLOCK-key block b (blocks aligned at key 0) and query row: m_b = the row's
    max in the block; P_b = round-half-even(255 exp(s - m_b)) in 0..255 (u8); acc_b = P_b @ V8_b exactly (integers);
    O = sum_b exp(m_b - m) * v_scale_b / 255 * acc_b. Returns (O fp32 [B, H, Sq, D], l fp32 [B, H, Sq, 1] =
    sum_b exp(m_b - m) * sum(P_b) / 255: the rounded P's sum, as the kernel's, so that the weights O takes sum to 1
    exactly). A block with no attended key (m_b = -inf) adds 0.

    acc_b in fp32 is exact: each partial sum is an integer of magnitude <= 128 * 255 * 127 < 2^24 (and 255, 127
    are exact even in TF32 or bf16 operands), so no summation order or matmul precision setting changes it."""
    B, H, Sq, Skv = s.shape
    n = -(-Skv // KEY_BLOCK)
    sb = torch.nn.functional.pad(s, (0, n * KEY_BLOCK - Skv), value=float("-inf")).unflatten(-1, (n, KEY_BLOCK))
    m_b = sb.amax(-1, keepdim=True)  # [B, H, Sq, n, 1]
    m_b_safe = torch.where(torch.isinf(m_b), torch.zeros_like(m_b), m_b)  # all -inf: exp(-inf - 0) = 0
    p8 = torch.round(torch.exp(sb - m_b_safe) * U8_MAX)  # [B, H, Sq, n, KEY_BLOCK], integers 0..255
    vf = v8.float().permute(0, 2, 1, 3)  # [B, H, Skv, D]
    vf = torch.nn.functional.pad(vf, (0, 0, 0, n * KEY_BLOCK - Skv)).unflatten(2, (n, KEY_BLOCK))
    acc = p8.transpose(2, 3) @ vf  # [B, H, n, Sq, D], exact
    block_weight = torch.exp(m_b.squeeze(-1) - m) / U8_MAX  # [B, H, Sq, n]; 0 where m_b = -inf
    o = torch.einsum("bhqn,bhnqd->bhqd", block_weight * v_scale[:, :, None, :], acc)
    l = (block_weight * p8.sum(-1)).sum(-1, keepdim=True)  # the codes' sums are exact in fp32 (< 2^24)
    return o, l


def key_token_block(qk, pv="bf16"):
    """Tokens per K scale in attention_8bit: one per 128-key block for e4m3 keys and for the 8-bit-P/V schemes
    (pv "e4m3" or "int8"; issue 3's per-block scales: the CUDA kernel's forms, which multiply one K scale per
    block, not one per score); one per token for int8 keys with 16-bit P/V (the Triton kernel's int8 scheme)."""
    return KEY_BLOCK if qk == "e4m3" or pv in ("e4m3", "int8") else 1


def attention_8bit(q, k, v, key_padding_mask=None, scale=None, qk="int8", pv="bf16"):
    """8-bit attention on bf16/fp16 q, k, v [B, S, H, D]: quantize Q per (token, head) to `qk`, K per token or
    per (128-key block, head) (key_token_block), V (pv "e4m3" or "int8") smoothed (value_offset) and quantized per
    (128-key block, head) to pv's format (offset and scales from the keys key_padding_mask keeps), then
    attention_quantized (pv="int8": P in u8 against each block's row max, attention_quantized's int8 branch)."""
    v8bit = pv in ("e4m3", "int8")
    offset = value_offset(v, key_padding_mask) if v8bit else None
    v_in = quantize_value(v, key_padding_mask, offset, pv) if v8bit else (v, None)
    k_in = quantize_per_head(k, qk, key_token_block(qk, pv), key_padding_mask)
    return attention_quantized(*quantize_per_head(q, qk), *k_in, *v_in,
                               key_padding_mask=key_padding_mask, scale=scale, out_dtype=q.dtype, v_offset=offset)


def quantize_value(v, key_padding_mask=None, offset=None, fmt="e4m3"):
    """V - offset (fp32 [B, H, D], None: 0) [B, S, H, D] in `fmt` ("e4m3" or "int8") and its scales per (128-key
    block, head): quantize_per_key_block of the fp32 difference (e4m3: amax * fp32(1/448), saturating RNE; int8:
    amax * fp32(1/127), RNE clamped to +-127; the amax over the attended keys)."""
    if fmt not in ("e4m3", "int8"):
        raise ValueError(f"fmt: expected 'e4m3' or 'int8', got {fmt!r}")
    x = v.float() if offset is None else v.float() - offset[:, None]
    return quantize_per_key_block(x, key_padding_mask, fmt)


def _projections(attn, hidden_states, encoder_hidden_states):
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)


def _added_projections(attn, image_context):
    if getattr(attn, "fused_projections", False):
        return attn.to_added_kv(image_context).chunk(2, dim=-1)
    return attn.add_k_proj(image_context), attn.add_v_proj(image_context)


def wan_attention(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                  norm_rope=qk_norm_rope, attend=attention):
    """WanAttnProcessor.__call__ with the norm+RoPE and attention steps as parameters, so a vkern
    processor is this function with kernels plugged in (and the reference is it with none). norm_rope: one
    function for queries and keys, or a (query, key) pair (8-bit keys take per-block scales)."""
    context, image_context = _split_image_context(attn, encoder_hidden_states)
    query, key, value = _projections(attn, hidden_states, context)
    # Rebinding frees each projection output once its normed form exists (as diffusers' processor does).
    dtype, query = query.dtype, _norm_rope_query(attn, query, rotary_emb, norm_rope)
    kv = _key_value(attn, key, value, rotary_emb, norm_rope)
    del key, value
    image_kv = None if image_context is None else _image_key_value(attn, image_context, norm_rope)
    return _attend(attn, query, kv, image_kv, attention_mask, attend, dtype)


# Query-chunked attention (vkern.modules.wan_block with attention_chunk_size): the keys/values once, then
# the queries of each token chunk against them. The same ops as wan_attention, split at the attention.

def wan_key_value(attn, context, rotary_emb=None, norm_rope=qk_norm_rope):
    """The key/value half of wan_attention: context [B, Skv, dim] is what is attended to (the normed hidden
    states for self-attention, encoder_hidden_states for cross-attention). Returns (kv, image_kv):
    attend-ready (key, value), and the I2V image context's (key, value) or None."""
    if getattr(attn, "fused_projections", False) and not attn.is_cross_attention:
        raise ValueError("wan_key_value: fused to_qkv computes q with k and v; run the whole attention instead")
    context, image_context = _split_image_context(attn, context if attn.is_cross_attention else None, context)
    if getattr(attn, "fused_projections", False):
        key, value = attn.to_kv(context).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(context), attn.to_v(context)
    kv = _key_value(attn, key, value, rotary_emb, norm_rope)
    return kv, None if image_context is None else _image_key_value(attn, image_context, norm_rope)


def wan_attend_query(attn, hidden_states, kv, image_kv=None, rotary_emb=None, norm_rope=qk_norm_rope,
                     attend=attention):
    """The query half of wan_attention: hidden_states [B, Sq, dim] (any token slice) against wan_key_value's
    kv / image_kv; rotary_emb: the tables of these query tokens. Returns the output projection."""
    query = attn.to_q(hidden_states)
    dtype, query = query.dtype, _norm_rope_query(attn, query, rotary_emb, norm_rope)
    return _attend(attn, query, kv, image_kv, None, attend, dtype)


def _split_image_context(attn, encoder_hidden_states, self_context=None):
    """(text context, image context or None); for self-attention (encoder_hidden_states None) the
    context is self_context."""
    if encoder_hidden_states is None:
        return self_context, None
    if attn.add_k_proj is None:
        return encoder_hidden_states, None
    image_context_length = encoder_hidden_states.shape[1] - 512  # Wan's text length, as in diffusers
    return encoder_hidden_states[:, image_context_length:], encoder_hidden_states[:, :image_context_length]


def _for_keys(norm_rope):
    return norm_rope[1] if isinstance(norm_rope, tuple) else norm_rope


def _for_queries(norm_rope):
    return norm_rope[0] if isinstance(norm_rope, tuple) else norm_rope


def _key_value(attn, key, value, rotary_emb, norm_rope):
    freqs = rotary_emb if rotary_emb is not None else (None, None)
    key = _for_keys(norm_rope)(key, attn.norm_k.weight, attn.norm_k.eps, attn.heads, *freqs)
    return key, value.unflatten(2, (attn.heads, -1))


def _image_key_value(attn, image_context, norm_rope):
    key_img, value_img = _added_projections(attn, image_context)
    key_img = _for_keys(norm_rope)(key_img, attn.norm_added_k.weight, attn.norm_added_k.eps, attn.heads)
    return key_img, value_img.unflatten(2, (attn.heads, -1))


def _norm_rope_query(attn, query, rotary_emb, norm_rope):
    freqs = rotary_emb if rotary_emb is not None else (None, None)
    return _for_queries(norm_rope)(query, attn.norm_q.weight, attn.norm_q.eps, attn.heads, *freqs)


def _attend(attn, query, kv, image_kv, attention_mask, attend, dtype):
    """Attention of the normed query against kv (and image_kv), then the output projection; dtype: the
    projections' (diffusers writes type_as(query) before the output projection)."""
    hidden_states_img = None
    if image_kv is not None:
        hidden_states_img = attend(query, *image_kv).flatten(2, 3).to(dtype)
    hidden_states = attend(query, *kv, attention_mask).flatten(2, 3).to(dtype)
    if hidden_states_img is not None:
        hidden_states = hidden_states + hidden_states_img
    hidden_states = attn.to_out[0](hidden_states)
    return attn.to_out[1](hidden_states)
