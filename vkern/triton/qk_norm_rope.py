"""Fused QK prologue: RMSNorm across heads (Wan, LTX; PER_HEAD: over each head, HunyuanVideo, Mochi; LAYER_NORM: a
LayerNorm over each head, CogVideoX) + RoPE (ROPE_FORM: interleaved by Wan's 3-axis tables, diffusers' apply_rotary_emb
or Mochi's per-pair tables, or LTX-2's split halves; tables shared by the heads or per head) + [B, S, H, D] layout, one
pass, emitting bf16 (the input dtype) or, for 8-bit attention, e4m3 or int8 with one fp32 scale per (token, head).

One program per token: the row of H*D elements is read once as a [heads, head_dim] tile, its mean square
reduced in fp32, normalized and weighted in fp32 and rounded once to the input dtype (as torch's
RMSNorm does), rotated in fp32 with the cos/sin read straight from diffusers' float64
tables, and written once. In 8-bit modes the rotated fp32 values are quantized directly (no bf16 rounding
in between): scale = amax over the head's D values * fp32(1/448) (e4m3, as vkern/reference/fp8.py) or
* fp32(1/127) (int8, round to nearest even).
With NORM off the same kernel only (optionally rotates and) quantizes. No fp32 intermediate touches memory.
Keys for the CUDA attention kernel (e4m3 or int8) take one scale per (128-token block, head) instead: a second
kernel with one program per token block (_qk_norm_rope_block_kernel), the same arithmetic.
"""
import torch
import triton
import triton.language as tl

from ..reference.attention import KEY_BLOCK
from ..reference.fp8 import E4M3_INV, INT8_INV  # fp32(1/448), fp32(1/127): exactly the reference's scales
from ._common import interpreting, round_to, to_e4m3, to_int8
from ._launch import fast_launchers

_launch = fast_launchers()  # kernel -> its FastLaunch (the launches of the many small calls a step makes)

ROPE_FORMS = ("per_pair", "per_element", "pairs", "split")  # the kernel's ROPE_FORM codes


@triton.jit
def _rotate(y, cos, sin, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Interleaved RoPE of fp32 rows y [ROWS, BLOCK_D]: pairs (2i, 2i+1) rotated by cos/sin [1|ROWS, BLOCK_D/2]."""
    ye, yo = tl.split(tl.reshape(y, (ROWS, BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(ye * cos - yo * sin, ye * sin + yo * cos), (ROWS, BLOCK_D))


@triton.jit
def _rotate_per_element(y, cos, sin, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """diffusers' apply_rotary_emb on fp32 rows y [ROWS, BLOCK_D]: out[2i] = y[2i] cos[2i] - y[2i+1] sin[2i],
    out[2i+1] = y[2i+1] cos[2i+1] + y[2i] sin[2i+1]; cos/sin [1|ROWS, BLOCK_D] (one token's row for every head, or
    a row per head)."""
    ye, yo = tl.split(tl.reshape(y, (ROWS, BLOCK_D // 2, 2)))
    ce, co = tl.split(tl.reshape(cos, (cos.shape[0], BLOCK_D // 2, 2)))
    se, so = tl.split(tl.reshape(sin, (sin.shape[0], BLOCK_D // 2, 2)))
    return tl.reshape(tl.join(ye * ce - yo * se, yo * co + ye * so), (ROWS, BLOCK_D))


@triton.jit
def _rotate_halves(y, cos, sin, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """diffusers' apply_split_rotary_emb (LTX-2) on fp32 rows y [ROWS, BLOCK_D]: the halves y1 = y[:, :BLOCK_D/2] and
    y2 = y[:, BLOCK_D/2:] become y1 cos - y2 sin and y2 cos + y1 sin; cos/sin [1|ROWS, BLOCK_D/2]. Halves of the tile,
    so BLOCK_D must be the head dim."""
    y1, y2 = tl.split(tl.permute(tl.reshape(y, (ROWS, 2, BLOCK_D // 2)), (0, 2, 1)))
    return tl.reshape(tl.permute(tl.join(y1 * cos - y2 * sin, y2 * cos + y1 * sin), (0, 2, 1)), (ROWS, BLOCK_D))


@triton.jit
def _load_tables(cos_ptr, sin_ptr, base, stride_fh, stride_fd, H, VALID: tl.constexpr, WIDTH: tl.constexpr,
                 PER_HEAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """One token's cos/sin table entries as fp32 [1, WIDTH] (shared by the heads) or [BLOCK_H, WIDTH] (PER_HEAD: a
    row per head, stride_fh apart); entries past VALID (or heads past H) read as cos 1, sin 0."""
    f = tl.arange(0, WIDTH)[None, :]
    mask = f < VALID
    ptrs = base + f * stride_fd
    if PER_HEAD:
        h = tl.arange(0, BLOCK_H)[:, None]
        ptrs = ptrs + h * stride_fh
        mask = mask & (h < H)
    cos = tl.load(cos_ptr + ptrs, mask=mask, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _qk_norm_rope_kernel(
    x_ptr, w_ptr, b_ptr, cos_ptr, sin_ptr, out_ptr, scale_ptr,
    S, H,
    stride_xb, stride_xs,
    stride_fb, stride_fs, stride_fh, stride_fd,
    stride_ob, stride_os, stride_og, stride_oh, heads_per_group,
    eps, q_inv,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, NORM: tl.constexpr, PER_HEAD: tl.constexpr, QUANT: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_RNE: tl.constexpr, ROPE_FORM: tl.constexpr,
    TABLE_PER_HEAD: tl.constexpr, LAYER_NORM: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // S
    s = row % S
    # The token's row as a [heads, head_dim] tile: contiguous along head_dim (a constexpr), so loads
    # and stores are 16-byte vectors; the RoPE pairs are split apart in registers.
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = h < H
    if BLOCK_D != HEAD_DIM:
        mask = mask & (d < HEAD_DIM)
    offs = h * HEAD_DIM + d
    x = tl.load(x_ptr + b * stride_xb + s * stride_xs + offs, mask=mask, other=0.0)
    dtype = x.dtype
    # Every load is issued here, before the norm's cross-warp reduction: loads written after it wait for its
    # barrier, and the program would pay two memory latencies instead of one (LTX's per-head tables are 4x x's bytes).
    if NORM and (LAYER_NORM or PER_HEAD):  # one weight [HEAD_DIM] for all heads (LayerNorm: and a bias)
        w = tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
        if LAYER_NORM:
            bias = tl.load(b_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
    elif NORM:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    table_base = b * stride_fb + s * stride_fs
    if HAS_ROPE and ROPE_FORM == 1:  # diffusers' apply_rotary_emb (HunyuanVideo, LTX): every element its own entry
        cos, sin = _load_tables(cos_ptr, sin_ptr, table_base, stride_fh, stride_fd, H, HEAD_DIM, BLOCK_D,
                                TABLE_PER_HEAD, BLOCK_H)
    elif HAS_ROPE and ROPE_FORM >= 2:  # Mochi's: one entry per pair; LTX-2's split: per pair (x[i], x[i + D/2])
        cos, sin = _load_tables(cos_ptr, sin_ptr, table_base, stride_fh, stride_fd, H, HEAD_DIM // 2, BLOCK_D // 2,
                                TABLE_PER_HEAD, BLOCK_H)
    elif HAS_ROPE:
        # One table row per token, shared by all heads; diffusers uses cos[0::2] and sin[1::2].
        f = tl.arange(0, BLOCK_D)
        f_ptrs = table_base + f * stride_fd
        cos_row = tl.load(cos_ptr + f_ptrs, mask=f < HEAD_DIM, other=1.0).to(tl.float32)
        sin_row = tl.load(sin_ptr + f_ptrs, mask=f < HEAD_DIM, other=0.0).to(tl.float32)
        cos, _ = tl.split(tl.reshape(cos_row, (BLOCK_D // 2, 2)))
        _, sin = tl.split(tl.reshape(sin_row, (BLOCK_D // 2, 2)))
        cos, sin = cos[None, :], sin[None, :]
    y = x.to(tl.float32)
    if NORM and LAYER_NORM:  # per head: LayerNorm with a weight and a bias [HEAD_DIM] (CogVideoX), fp32 math
        centered = y - (tl.sum(y, axis=1) / HEAD_DIM)[:, None]
        if BLOCK_D != HEAD_DIM:
            centered = tl.where(d < HEAD_DIM, centered, 0.0)
        r = (1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / HEAD_DIM + eps))[:, None]
        y = round_to(centered * r * w + bias, dtype, EMULATE_RNE).to(tl.float32)  # (one rounding, as torch's)
    elif NORM:
        if PER_HEAD:  # each head's own mean square
            r = (1.0 / tl.sqrt(tl.sum(y * y, axis=1) / HEAD_DIM + eps))[:, None]
        else:
            mean_sq = tl.sum(tl.sum(y * y, axis=1), axis=0) / (H * HEAD_DIM)
            r = 1.0 / tl.sqrt(mean_sq + eps)
        # Round where torch's RMSNorm rounds: once, after the weight (fp32 math throughout).
        y = round_to(y * r * w, dtype, EMULATE_RNE).to(tl.float32)
    if HAS_ROPE and ROPE_FORM == 1:
        y = _rotate_per_element(y, cos, sin, BLOCK_H, BLOCK_D)
    elif HAS_ROPE and ROPE_FORM == 3:
        y = _rotate_halves(y, cos, sin, BLOCK_H, BLOCK_D)
    elif HAS_ROPE:
        y = _rotate(y, cos, sin, BLOCK_H, BLOCK_D)
    if QUANT != 0:  # 1: e4m3, 2: int8
        scale = tl.maximum(tl.max(tl.abs(y), axis=1), 1e-12) * q_inv  # [BLOCK_H]
        y = y * tl.math.div_rn(tl.full([BLOCK_H], 1.0, tl.float32), scale)[:, None]
        # e4m3 by integer arithmetic on the GPU too: exact RNE like csrc/fp8_quant.cu (Triton's own fp32 ->
        # e4m3 cast may round twice); the pass is memory-bound, so the extra integer ops are free.
        y8 = to_e4m3(y, True) if QUANT == 1 else to_int8(y)
        tl.store(out_ptr + row * (H * HEAD_DIM) + offs, y8, mask=mask)
        # scales [B, H, S]: the attention kernel reads a block of consecutive tokens of one head
        tl.store(scale_ptr + (b * H + tl.arange(0, BLOCK_H)) * S + s, scale, mask=tl.arange(0, BLOCK_H) < H)
    else:
        # Any output strides (last dim contiguous): head h goes to group h // heads_per_group, slot
        # h % heads_per_group, so one pass can write straight into a head-sharded send buffer.
        o_offs = (h // heads_per_group) * stride_og + (h % heads_per_group) * stride_oh + d
        o_base = out_ptr + b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os
        tl.store(o_base + o_offs, round_to(y, dtype, EMULATE_RNE), mask=mask)


@triton.jit
def _qk_norm_rope_block_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, scale_ptr, kpm_ptr,
    S, H, n_blocks,
    stride_xb, stride_xs,
    stride_fb, stride_fs, stride_fd,
    eps, q_inv,
    HEAD_DIM: tl.constexpr, HAS_ROPE: tl.constexpr, NORM: tl.constexpr, PER_HEAD: tl.constexpr, HAS_KPM: tl.constexpr,
    QUANT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """The same values as _qk_norm_rope_kernel, quantized (QUANT 1: e4m3, 2: int8) with one scale per (BLOCK_S-token block,
    head): one program per block of one batch row, which first sums the tokens' squares over all heads (the
    norm spans them), then normalizes, rotates and quantizes head by head (the second read of x mostly hits
    L2). HAS_KPM: tokens the key-padding mask drops do not enter the amax (their codes saturate)."""
    pid = tl.program_id(0)
    b = pid // n_blocks
    blk = pid % n_blocks
    t = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    mask = (t < S)[:, None] & (d < HEAD_DIM)[None, :]
    counted = mask
    if HAS_KPM:
        counted = counted & (tl.load(kpm_ptr + b * S + t, mask=t < S, other=0) != 0)[:, None]
    x_rows = x_ptr + b.to(tl.int64) * stride_xb + t[:, None].to(tl.int64) * stride_xs + d[None, :]
    if NORM and not PER_HEAD:
        sum_sq = tl.zeros([BLOCK_S], tl.float32)
        for h in range(H):
            xh = tl.load(x_rows + h * HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
            sum_sq += tl.sum(xh * xh, axis=1)
        r = 1.0 / tl.sqrt(sum_sq / (H * HEAD_DIM) + eps)
    if HAS_ROPE:
        f_ptrs = b * stride_fb + t[:, None] * stride_fs + d[None, :] * stride_fd
        cos, _ = tl.split(tl.reshape(tl.load(cos_ptr + f_ptrs, mask=mask, other=1.0).to(tl.float32),
                                     (BLOCK_S, BLOCK_D // 2, 2)))
        _, sin = tl.split(tl.reshape(tl.load(sin_ptr + f_ptrs, mask=mask, other=0.0).to(tl.float32),
                                     (BLOCK_S, BLOCK_D // 2, 2)))
    out_rows = out_ptr + (b * S + t[:, None]).to(tl.int64) * (H * HEAD_DIM) + d[None, :]
    for h in range(H):
        x = tl.load(x_rows + h * HEAD_DIM, mask=mask, other=0.0)
        y = x.to(tl.float32)
        if NORM and PER_HEAD:  # this head's own mean square, the one weight [HEAD_DIM]
            rh = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / HEAD_DIM + eps)
            w = tl.load(w_ptr + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
            y = round_to(y * rh[:, None] * w[None, :], x.dtype, EMULATE_RNE).to(tl.float32)
        elif NORM:
            w = tl.load(w_ptr + h * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0).to(tl.float32)
            y = round_to(y * r[:, None] * w[None, :], x.dtype, EMULATE_RNE).to(tl.float32)
        if HAS_ROPE:
            y = _rotate(y, cos, sin, BLOCK_S, BLOCK_D)
        amax = tl.max(tl.max(tl.where(counted, tl.abs(y), 0.0), axis=1), axis=0)
        scale = tl.maximum(amax, 1e-12) * q_inv
        y = y * tl.math.div_rn(tl.full([1, 1], 1.0, tl.float32), scale)
        y8 = to_e4m3(y, True) if QUANT == 1 else to_int8(y)
        tl.store(out_rows + h * HEAD_DIM, y8, mask=mask)
        tl.store(scale_ptr + (b * H + h) * n_blocks + blk, scale)


def qk_norm_rope(x, weight, eps, heads, freqs_cos, freqs_sin, out, scale=None, token_block=1, key_padding_mask=None,
                 rope_tables="per_pair", bias=None):
    """x [B, S, H*D] (last dim contiguous), weight [H*D] (norm across heads), [D] (per head) or None (no norm),
    freqs [1|B, S, 1|H, W] or None (see rope_tables);
    out in x's dtype: [B, S, H, D], or [B, S, G, P, D] with G * P >= H (head h -> out[:, :, h // P, h % P];
    slots past H are not written), any strides with the last dim contiguous; or out e4m3/int8
    [B, S, H, D] contiguous with scale fp32 [B, H, S] contiguous; or (token_block = KEY_BLOCK) out
    e4m3/int8 [B, S, H, D] contiguous with scale fp32 [B, H, ceil(S / KEY_BLOCK)] contiguous, one per block, the
    amax over the tokens key_padding_mask (bool [B, S] contiguous, or None) keeps. rope_tables (ROPE_FORMS): "per_pair"
    (Wan's form: W = D, shared by the heads), or, for the 16-bit output only, "per_element" (diffusers'
    apply_rotary_emb: W = D), "pairs" (Mochi's: W = D / 2) or "split" (LTX-2's halves: W = D / 2, D a power of two),
    shared by the heads or one row per head. bias [D] (with weight [D], the 16-bit output only): a LayerNorm over each
    head instead of the RMSNorm."""
    B, S, row = x.shape
    head_dim = row // heads
    has_rope = freqs_cos is not None
    if has_rope:
        fb = freqs_cos.stride(0) if freqs_cos.shape[0] > 1 else 0
        fh = freqs_cos.stride(2) if freqs_cos.shape[2] > 1 else 0
        fs, fd = freqs_cos.stride(1), freqs_cos.stride(3)
        assert freqs_sin.stride() == freqs_cos.stride()
    else:
        freqs_cos = freqs_sin = x  # never read
        fb = fs = fh = fd = 0
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim)
    per_head = weight is not None and heads > 1 and weight.numel() == head_dim
    assert rope_tables != "split" or block_d == head_dim  # (_rotate_halves halves the tile)
    assert (rope_tables == "per_pair" and fh == 0 and bias is None) or scale is None
    assert bias is None or (weight is not None and weight.numel() == bias.numel() == head_dim)
    if token_block != 1:
        assert token_block == KEY_BLOCK and out.dtype in (torch.float8_e4m3fn, torch.int8) and scale is not None
        n_blocks = triton.cdiv(S, KEY_BLOCK)
        int8 = out.dtype == torch.int8
        _launch[_qk_norm_rope_block_kernel]((B * n_blocks,),
            x, x if weight is None else weight, freqs_cos, freqs_sin, out, scale,
            x if key_padding_mask is None else key_padding_mask.view(torch.uint8),
            S, heads, n_blocks,
            x.stride(0), x.stride(1),
            fb, fs, fd,
            eps, INT8_INV if int8 else E4M3_INV,
            HEAD_DIM=head_dim, HAS_ROPE=has_rope, NORM=weight is not None, PER_HEAD=per_head,
            HAS_KPM=key_padding_mask is not None,
            QUANT=2 if int8 else 1, BLOCK_S=KEY_BLOCK, BLOCK_D=block_d,
            EMULATE_RNE=interpreting(), num_warps=8,
        )
        return out
    quant = 0 if scale is None else 1 if out.dtype == torch.float8_e4m3fn else 2
    if out.dim() == 5:
        sob, sos, sog, soh = out.stride()[:4]
        per_group = out.shape[3]
    else:
        (sob, sos, soh), sog, per_group = out.stride()[:3], 0, heads
    _launch[_qk_norm_rope_kernel]((B * S,),
        x, x if weight is None else weight, x if bias is None else bias, freqs_cos, freqs_sin, out,
        out if scale is None else scale,
        S, heads,
        x.stride(0), x.stride(1),
        fb, fs, fh, fd,
        sob, sos, sog, soh, per_group,
        eps, INT8_INV if quant == 2 else E4M3_INV,
        HEAD_DIM=head_dim, HAS_ROPE=has_rope, NORM=weight is not None, PER_HEAD=per_head, QUANT=quant,
        BLOCK_H=block_h, BLOCK_D=block_d,
        EMULATE_RNE=interpreting(), ROPE_FORM=ROPE_FORMS.index(rope_tables), TABLE_PER_HEAD=fh != 0,
        LAYER_NORM=bias is not None,
        num_warps=max(1, min(8, block_h * block_d // 512)),
    )
    return out
