"""vkern's flash-attention forward: non-causal softmax(scale * QK^T) V, bf16/fp16 or fp8, fp32 accumulation.

One program per (BLOCK_M queries, batch, head). Q stays in registers; K and V stream through shared memory
BLOCK_N keys at a time (software-pipelined loads); the softmax is online, in the log2 domain (exp2, with
scale * log2(e) folded into one multiply). Full key blocks run unmasked; only the last, partial block
pays for bounds masks, so no length needs to be a multiple of a block. A key-padding mask [B, Skv]
(True = attend) drops keys; a query with no key left gets out = 0 and lse = -inf.

8-bit modes. QK8: Q and K are int8 or e4m3 with one fp32 scale per (token, head); the Q scale joins
the softmax-scale multiply per row, the K scale multiplies each score column (int8 products sum exactly in
int32, e4m3 in fp32). V8: V is e4m3 with one scale per (128-key block, head), stored transposed [B, H, D, S_pad]:
Hopper's 8-bit tensor-core instructions need the reduction dimension contiguous in both operands, and for
P @ V that dimension is the keys. V^T's keys are stored in the order the CUDA kernel's 8-bit P fragment wants
(e4m3_key_order); this kernel reads K, the K scales and the masks in the same order, so any order works here.
P is scaled to [0, 448] (log2(448) folded into the exp2 argument) before its cast to e4m3, so small
probabilities keep normal e4m3 numbers; the row sum uses the same scaled P in fp32.
The int8 V^T of the int8 P/V scheme (pv="int8": u8 P, the CUDA kernel's) is not an input here; this file's
one-pass V quantizer (v_fp8_transposed) writes it as well as the e4m3 form.
Which combinations meet which accuracy is measured, not assumed: see bench/NOTES.md (attention, 8-bit).
"""
import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from ._common import bench_without_flush, interpreting, round_to, to_e4m3, to_int8

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
P8_OFFSET = math.log2(448.0)


@triton.jit
def e4m3_key_order(col):
    """The key that column col of an e4m3 V^T holds (vkern.ops.v_to_e4m3): within each 32-key group, column
    16 u + 4 c + 2 g + b holds key 16 u + 8 g + 2 c + b, the order in which the CUDA kernel's P fragment
    (wgmma's 8-bit A operand, built from the fp32 score accumulator) lists the keys. Halves of 16 stay put."""
    return (col & ~15) | ((col & 2) << 2) | ((col >> 1) & 6) | (col & 1)


@triton.jit
def _load_kv(k_base, v_base, nk0, nv0, Skv, Sv, stride_kn, stride_vn, stride_vd, offs_key, offs_n, offs_d,
             V8: tl.constexpr, MASK_N: tl.constexpr):
    """K[nk0 + offs_key] and V[nv0 : nv0 + BLOCK_N] as [BLOCK_N, D] tiles (V8: read from V^T [D, Sv], keys
    contiguous, in e4m3_key_order, which offs_key follows; else offs_key = offs_n). The default loop loads
    one block (nk0 = nv0), the pipelined one K a block ahead of V."""
    nk = nk0 + offs_key
    nv = nv0 + offs_n
    nk_ok = nk < Skv
    nv_ok = nv < Sv
    k_ptrs = k_base + nk[:, None] * stride_kn + offs_d[None, :]
    if V8:
        v_ptrs = v_base + offs_d[:, None] * stride_vd + nv[None, :]
    else:
        v_ptrs = v_base + nv[:, None] * stride_vn + offs_d[None, :]
    if MASK_N:
        k = tl.load(k_ptrs, mask=nk_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=nv_ok[None, :] if V8 else nv_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if V8:
        v = tl.trans(v)
    return k, v


@triton.jit
def _block_scores(q, k, UPCAST: tl.constexpr):
    """Raw scores q @ k^T (int32 for int8, else fp32). Nothing here uses the product, so an asynchronous
    wgmma issued here can stay in flight until the softmax of its block."""
    if UPCAST:  # the interpreter's low-precision tl.dot is wrong: same products in fp32
        k = k.to(tl.float32)
    return tl.dot(q, tl.trans(k))


@triton.jit
def _scale_scores(qk, row_scale, ks_base, kpm_base, n0, Skv, offs_n,
                  QK8: tl.constexpr, MASK_N: tl.constexpr, HAS_KPM: tl.constexpr, UPCAST: tl.constexpr):
    """Block n0's raw scores -> log2-domain scores (QK8's scales applied), -inf where a key is masked."""
    n = n0 + offs_n
    n_ok = n < Skv
    if QK8:
        qk = qk.to(tl.float32) * tl.load(ks_base + n, mask=n_ok, other=0.0)[None, :]
        row_scale = row_scale[:, None]
    if UPCAST:
        s = qk * row_scale
    else:  # mul.rn: never contracted into the exp2 argument's subtraction, which would keep qk live
        s = libdevice.mul_rn(qk, row_scale)
    if MASK_N or HAS_KPM:
        valid = n_ok
        if HAS_KPM:
            valid = valid & (tl.load(kpm_base + n, mask=n_ok, other=0) != 0)
        s = tl.where(valid[None, :], s, float("-inf"))
    return s


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, v, row_scale, ks_base, vs_base, kpm_base, n0, Skv, offs_n,
                QK8: tl.constexpr, V8: tl.constexpr, MASK_N: tl.constexpr, HAS_KPM: tl.constexpr,
                UPCAST: tl.constexpr, P_OFFSET: tl.constexpr, MAY_BE_EMPTY: tl.constexpr,
                SCALED: tl.constexpr):
    """Online-softmax update with block n0's raw scores qk (SCALED: already through _scale_scores), then
    acc += P @ v. MAY_BE_EMPTY: the block may hold no key at all (Skv = 0), so m is guarded as for a
    fully masked row."""
    n = n0 + offs_n
    n_ok = n < Skv
    p_dtype = v.dtype
    if UPCAST:
        v = v.to(tl.float32)
    if not SCALED:
        if QK8:  # int8 products accumulate in int32, e4m3 in fp32; the scales apply to the sums
            qk = qk.to(tl.float32) * tl.load(ks_base + n, mask=n_ok, other=0.0)[None, :]
        if MASK_N or HAS_KPM:
            valid = n_ok
            if HAS_KPM:
                valid = valid & (tl.load(kpm_base + n, mask=n_ok, other=0) != 0)
            qk = tl.where(valid[None, :], qk, float("-inf"))

    # The row scale (> 0) commutes with the max, so it multiplies BLOCK_M maxima, and joins the
    # subtraction below as one fused multiply-add per score.
    if SCALED:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * row_scale)
    m_ref = m_new
    if HAS_KPM or MAY_BE_EMPTY:  # every key so far masked: keep exp2's argument finite (-inf - -inf is NaN)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    if SCALED:
        p = tl.exp2(qk - (m_ref - P_OFFSET)[:, None])
    elif QK8:
        p = tl.exp2(qk * row_scale[:, None] - (m_ref - P_OFFSET)[:, None])
    else:
        p = tl.exp2(qk * row_scale - (m_ref - P_OFFSET)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if V8:
        p_lo = to_e4m3(p, UPCAST)
    else:
        p_lo = round_to(p, p_dtype, UPCAST)
    if UPCAST:
        p_lo = p_lo.to(tl.float32)
    if V8:  # a fresh fp8 product per key block, times its 128-key block's V scale, added in fp32: the tensor
        # cores' fp8 accumulation keeps fewer bits, and a long-running O lost them (bench/NOTES.md run 55)
        acc += tl.dot(p_lo, v) * tl.load(vs_base + n0 // 128)
    else:
        acc = tl.dot(p_lo, v, acc)
    return acc, l_i, m_new


@triton.jit
def _wgmma_wait_anchor(n0, BLOCK_M: tl.constexpr):
    """A [BLOCK_M] vector of exact zeros from a tiny (BLOCK_M x 16 x 16) product whose result is used at once,
    so Triton puts a warp_group_dot_wait {pendings=0} here (see the pipelined loop). Its A operand varies
    with n0 (finite values, times B = 0), so it is not hoisted out of the loop."""
    a = tl.full([BLOCK_M, 16], n0, tl.int32).to(tl.bfloat16)
    return tl.max(tl.dot(a, tl.zeros([16, 16], tl.bfloat16)), 1)


@triton.jit
def _attend_block(acc, l_i, m_i, q, row_scale, k_base, v_base, ks_base, vs_base, kpm_base, n0, Skv, Sv,
                  stride_kn, stride_vn, stride_vd, offs_key, offs_n, offs_d,
                  QK8: tl.constexpr, V8: tl.constexpr, MASK_N: tl.constexpr, HAS_KPM: tl.constexpr,
                  UPCAST: tl.constexpr, P_OFFSET: tl.constexpr):
    """One key block, back to back: scores, wait, softmax, P @ V (the default loop)."""
    k, v = _load_kv(k_base, v_base, n0, n0, Skv, Sv, stride_kn, stride_vn, stride_vd, offs_key, offs_n, offs_d, V8,
                    MASK_N)
    qk = _block_scores(q, k, UPCAST)
    return _softmax_pv(acc, l_i, m_i, qk, v, row_scale, ks_base, vs_base, kpm_base, n0, Skv, offs_key,
                       QK8, V8, MASK_N, HAS_KPM, UPCAST, P_OFFSET, False, False)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, qs_ptr, ks_ptr, vs_ptr, vo_ptr, kpm_ptr,
    Sq, Skv, Sv, H,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh,
    scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QK8: tl.constexpr, V8: tl.constexpr, HAS_KPM: tl.constexpr, WRITE_LSE: tl.constexpr,
    UPCAST: tl.constexpr, PIPELINE: tl.constexpr = False, ANCHOR: tl.constexpr = True,
    HAS_VOFF: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    P_OFFSET: tl.constexpr = 8.807354922057604 if V8 else 0.0  # log2(448)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # Key indices of a block's K rows, score columns and V rows (V8: V^T's order; BLOCK_N is a multiple of 32)
    offs_key = e4m3_key_order(offs_n) if V8 else offs_n
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Sq
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    if QK8:  # per-(token, head) scales, [B, H, S] contiguous
        row_scale = tl.load(qs_ptr + bh * Sq + offs_m, mask=m_ok, other=1.0) * scale_log2
    else:
        row_scale = scale_log2
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    ks_base = ks_ptr + bh * Skv
    vs_base = vs_ptr + bh * tl.cdiv(Skv, 128)  # V8: one scale per 128-key block (BLOCK_N divides 128)
    if V8:
        tl.static_assert(128 % BLOCK_N == 0)
    kpm_base = kpm_ptr + b * Skv
    n_full = (Skv // BLOCK_N) * BLOCK_N
    if PIPELINE:
        # Software-pipelined by one block (FlashAttention-3's intra-warpgroup overlap): iteration n0 turns
        # block n0 - BLOCK_N's raw scores (loop state) into scaled scores, issues block n0's QK^T
        # (asynchronous wgmma on Hopper), then runs block n0 - BLOCK_N's exp2/row sums and P @ V while that
        # product is in flight. Block 0's scores (before the loop) and the last pipelined block's softmax
        # (after it) take the bounds masks: with Skv < BLOCK_N they are the one partial block; otherwise the
        # masks are all true, and the partial block, if any, follows unpipelined as in the default loop.
        # Compiler constraints (Triton 3.6, sm_90; bench/attention_ptx.py shows the evidence):
        # - Triton's wgmma pipeliner (WGMMAPipeline.cpp, dotCanBeProperlyAsync rule 3b) leaves a dot in
        #   flight across the back edge only if every use of its loop-carried result follows a
        #   warp_group_dot_wait {pendings=0} in the loop body; otherwise it waits right after the issue.
        #   With ANCHOR, a 128x16x16 wgmma of exact zeros at the top of the body is that wait.
        # - The raw scores of block n0 - BLOCK_N are consumed (scaled) before block n0's product is issued,
        #   so both can share registers: were the old scores still live, the back edge would copy the
        #   in-flight accumulator and ptxas would serialize every wgmma (C7514).
        k, _ = _load_kv(k_base, v_base, 0, 0, Skv, Sv, stride_ks, stride_vs, stride_vd, offs_key, offs_n, offs_d, V8, True)
        qk = _block_scores(q, k, UPCAST)  # (an unused load is dead code: the compiler drops it)
        for n0 in tl.range(BLOCK_N, n_full, BLOCK_N):
            if ANCHOR:
                m_i = m_i + _wgmma_wait_anchor(n0, BLOCK_M)
            s = _scale_scores(qk, row_scale, ks_base, kpm_base, n0 - BLOCK_N, Skv, offs_key, QK8, False, HAS_KPM, UPCAST)
            k, v = _load_kv(k_base, v_base, n0, n0 - BLOCK_N, Skv, Sv, stride_ks, stride_vs, stride_vd, offs_key, offs_n, offs_d,
                            V8, False)
            qk = _block_scores(q, k, UPCAST)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, v, row_scale, ks_base, vs_base, kpm_base, n0 - BLOCK_N, Skv,
                                        offs_key,
                                        QK8, V8, False, HAS_KPM, UPCAST, P_OFFSET, False, True)
        n_last = tl.maximum(n_full - BLOCK_N, 0)
        s = _scale_scores(qk, row_scale, ks_base, kpm_base, n_last, Skv, offs_key, QK8, True, HAS_KPM, UPCAST)
        _, v = _load_kv(k_base, v_base, n_last, n_last, Skv, Sv, stride_ks, stride_vs, stride_vd, offs_key, offs_n, offs_d,
                        V8, True)
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, v, row_scale, ks_base, vs_base, kpm_base, n_last, Skv, offs_key,
                                    QK8, V8, True, HAS_KPM, UPCAST, P_OFFSET, True, True)
        if (n_full > 0) & (n_full < Skv):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, row_scale, k_base, v_base, ks_base, vs_base, kpm_base, n_full,
                                          Skv, Sv, stride_ks, stride_vs, stride_vd, offs_key, offs_n, offs_d,
                                          QK8, V8, True, HAS_KPM, UPCAST, P_OFFSET)
    else:
        for n0 in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, row_scale, k_base, v_base, ks_base, vs_base, kpm_base, n0, Skv, Sv,
                                          stride_ks, stride_vs, stride_vd, offs_key, offs_n, offs_d,
                                          QK8, V8, False, HAS_KPM, UPCAST, P_OFFSET)
        if n_full < Skv:
            acc, l_i, m_i = _attend_block(acc, l_i, m_i, q, row_scale, k_base, v_base, ks_base, vs_base, kpm_base, n_full,
                                          Skv, Sv, stride_ks, stride_vs, stride_vd, offs_key, offs_n, offs_d,
                                          QK8, V8, True, HAS_KPM, UPCAST, P_OFFSET)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (1.0 / l_safe)[:, None]
    if HAS_VOFF:  # V was quantized smoothed (V - offset): the offset back, where a key was attended
        out += tl.where(l_i > 0.0, 1.0, 0.0)[:, None] * tl.load(vo_ptr + bh * HEAD_DIM + offs_d)[None, :]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             round_to(out, o_ptr.dtype.element_ty, UPCAST), mask=m_ok[:, None])
    if WRITE_LSE:  # natural log; -inf where no key was attended
        tl.store(lse_ptr + bh * Sq + offs_m, (m_i + tl.log2(l_i) - P_OFFSET) * 0.6931471805599453, mask=m_ok)


@triton.jit
def _v_fp8_kernel(v_ptr, off_ptr, kpm_ptr, vs_ptr, vt_ptr, S, S_pad, H, n_blocks, stride_vb, stride_vs, stride_vh,
                  HEAD_DIM: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_KPM: tl.constexpr, SCALE_FLOOR: tl.constexpr,
                  INV_MAX: tl.constexpr, EMULATE: tl.constexpr, INT8: tl.constexpr = False,
                  OFFSET_BINARY: tl.constexpr = False):
    """One 128-key block of V [B, S, H, D] -> its scale (amax of V - offset over the block's attended keys and
    the head dim, at least SCALE_FLOOR, times INV_MAX: fp32(1/448) for e4m3, fp32(1/127) for INT8;
    vkern.reference.attention.quantize_value) and its 8-bit columns of V^T [B, H, D, S_pad] in e4m3_key_order
    (e4m3 saturating RNE, or INT8: RNE clamped to +-127; OFFSET_BINARY: the INT8 codes + 128 as uint8); the
    columns of keys past S get zeros (OFFSET_BINARY: 128). V is read once (the block stays in registers between the
    amax and the rounding)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_s = blk * 128 + tl.arange(0, 128)
    key = e4m3_key_order(offs_s)  # the same 128-key block as its column: the order stays within 32 keys
    offs_d = tl.arange(0, HEAD_DIM)
    real = key < S
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + key[:, None] * stride_vs + offs_d[None, :],
                mask=real[:, None], other=0.0).to(tl.float32)
    if HAS_OFFSET:
        v = tl.where(real[:, None], v - tl.load(off_ptr + bh * HEAD_DIM + offs_d)[None, :], 0.0)
    attended = real
    if HAS_KPM:
        attended = attended & (tl.load(kpm_ptr + b * S + key, mask=real, other=0) != 0)
    amax = tl.max(tl.max(tl.where(attended[:, None], tl.abs(v), 0.0), 1), 0)
    scale = tl.maximum(amax, SCALE_FLOOR) * INV_MAX
    tl.store(vs_ptr + bh * n_blocks + blk, scale)
    inv = tl.math.div_rn(scale * 0.0 + 1.0, scale)  # IEEE 1 / scale, as the reference's (Triton's / is not)
    if OFFSET_BINARY:
        v8 = (to_int8(v * inv).to(tl.int32) + 128).to(tl.uint8)
    elif INT8:
        v8 = to_int8(v * inv)
    else:
        v8 = to_e4m3(v * inv, EMULATE)
    tl.store(vt_ptr + bh * HEAD_DIM * S_pad + offs_d[:, None] * S_pad + offs_s[None, :], tl.trans(v8),
             mask=(offs_s < S_pad)[None, :])


def v_fp8_transposed(v, s_pad, offset=None, key_padding_mask=None, fmt="e4m3"):
    """v [B, S, H, D] (last dim contiguous), offset fp32 [B, H, D] contiguous or None, key_padding_mask bool
    [B, S] contiguous or None -> (8-bit V^T [B, H, D, s_pad] in `fmt`, "e4m3", "int8" or "u8" (the int8 codes +
    128 as uint8), fp32 scales [B, H, ceil(S / 128)]) of V - offset."""
    from ..reference.fp8 import E4M3_INV, INT8_INV

    dtypes = {"e4m3": torch.float8_e4m3fn, "int8": torch.int8, "u8": torch.uint8}
    if fmt not in dtypes:
        raise ValueError(f"fmt: expected 'e4m3', 'int8' or 'u8', got {fmt!r}")
    B, S, H, D = v.shape
    n_blocks = -(-S // 128)
    int8 = fmt in ("int8", "u8")
    vt = torch.empty((B, H, D, s_pad), dtype=dtypes[fmt], device=v.device)
    scale = torch.empty((B, H, n_blocks), dtype=torch.float32, device=v.device)
    kpm = vt if key_padding_mask is None else key_padding_mask.view(torch.uint8)
    _v_fp8_kernel[(n_blocks, B * H)](
        v, vt if offset is None else offset, kpm, scale, vt, S, s_pad, H, n_blocks, v.stride(0), v.stride(1),
        v.stride(2), HEAD_DIM=D, HAS_OFFSET=offset is not None, HAS_KPM=key_padding_mask is not None,
        SCALE_FLOOR=1e-12, INV_MAX=INT8_INV if int8 else E4M3_INV, EMULATE=True, INT8=int8,
        OFFSET_BINARY=fmt == "u8", num_warps=8)  # exact RNE; memory-bound, so free
    return vt, scale


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 4),
                                 (256, 64, 8, 2))]


SMALL_PROBLEM = 2**26  # scores per call (Sq * Skv * heads, per batch element) below which tuning is skipped


def _prune_small(configs, named_args, **kwargs):
    """A small call (tests, short cross-attention) takes the first config: tuning it would cost more compile
    and benchmark time than it could ever save (< ~50 us per call on an H100/H200 at these sizes)."""
    if named_args["Sq"] * named_args["Skv"] * named_args["H"] < SMALL_PROBLEM:
        return configs[:1]
    return configs


# Timed without Triton's default 256 MB L2-flush buffer, which would land on the tuning call's peak memory
# (bench_without_flush; the tuned calls read far more than L2 holds anyway).
_attention_tuned = triton.autotune(configs=_configs(),
                                   key=["HEAD_DIM", "QK8", "V8", "HAS_KPM", "Sq", "Skv", "PIPELINE"],
                                   prune_configs_by={"early_config_prune": _prune_small},
                                   do_bench=bench_without_flush)(
    _attention_kernel)


VARIANTS = ("default", "pipe")


def attention(q, k, v, out, lse=None, key_padding_mask=None, scale=None,
              q_scale=None, k_scale=None, v_scale=None, variant=None, v_offset=None):
    """Launch. q [B, Sq, H, D], k [B, Skv, H, D], last dims contiguous: bf16/fp16/fp32, or 8-bit (e4m3 or
    int8) with q_scale/k_scale fp32 [B, H, S] contiguous. v: like q's float dtype [B, Skv, H, D], or e4m3
    transposed [B, H, D, S_pad] (keys contiguous in e4m3_key_order, S_pad >= Skv, a multiple of 16) with v_scale fp32
    [B, H, ceil(Skv / 128)] contiguous, and v_offset fp32 [B, H, D] contiguous or None (what was subtracted from V
    before its quantization; added to every row that attended a key).
    out [B, Sq, H, D] (last dim contiguous); lse fp32 [B, H, Sq] contiguous or None; key_padding_mask
    bool/uint8 [B, Skv] contiguous or None. variant: the main loop, "default" (scores, softmax, P @ V back to
    back) or "pipe" (the next block's QK^T issued before this block's softmax; opt-in until measured);
    None reads VKERN_ATTENTION_VARIANT (default "default")."""
    variant = os.environ.get("VKERN_ATTENTION_VARIANT", "default") if variant is None else variant
    if variant not in VARIANTS:
        raise ValueError(f"variant (or VKERN_ATTENTION_VARIANT): expected one of {VARIANTS}, got {variant!r}")
    B, Sq, H, D = q.shape
    Skv = k.shape[1]
    qk8, v8 = q_scale is not None, v_scale is not None
    scale = D ** -0.5 if scale is None else scale
    if v8:
        svb, svs, svh, svd = v.stride(0), 1, v.stride(1), v.stride(2)
    else:
        svb, svs, svh, svd = v.stride(0), v.stride(1), v.stride(2), 1
    dummy = out  # pointer for absent optional tensors (never read: constexpr flags)
    kpm = dummy
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask

    def grid(meta):
        return (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)

    _attention_tuned[grid](
        q, k, v, out, lse if lse is not None else dummy,
        q_scale if qk8 else dummy, k_scale if qk8 else dummy, v_scale if v8 else dummy,
        v_offset if v_offset is not None else dummy, kpm,
        Sq, Skv, v.shape[3] if v8 else Skv, H,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        svb, svs, svh, svd,
        out.stride(0), out.stride(1), out.stride(2),
        scale * LOG2E,
        HEAD_DIM=D, QK8=qk8, V8=v8, HAS_KPM=key_padding_mask is not None, WRITE_LSE=lse is not None,
        UPCAST=interpreting(), PIPELINE=variant == "pipe", HAS_VOFF=v_offset is not None,
    )
    return out
