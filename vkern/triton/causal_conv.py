"""Causal 3D convolution with a feature cache as an implicit GEMM, on channels-last data (the Wan VAE's convs).

GEMM view: M = output pixels (b, t', h', w') flattened, N = output channels, K = taps (kt x kh x kw) x C.
A program computes a [BLOCK_M pixels, BLOCK_N out channels] tile in fp32: one flat loop over
taps x ceil(C / BLOCK_K) chunks (a single loop, so Triton's pipeliner can prefetch `num_stages` chunks
ahead across tap boundaries), each step one tl.dot of an A tile [BLOCK_M, BLOCK_K] gathered from the
input and a B tile [BLOCK_K, BLOCK_N] of the weight. Bias is added in fp32 and the tile is rounded once
to x's dtype.

A tiles: a pixel's channels are contiguous (channels-last), so each row of the A tile is one contiguous
run of BLOCK_K channels, and with C a multiple of 16 Triton can prove 16-byte alignment and issue vector
loads. Nothing is padded or concatenated in memory: per pixel and tap the row's address comes from one of
two base pointers, the chunk or the cache, by the padded time index tau = t' * st + dt in [0, tp + T):
  src = tau - tp          the chunk frame it reads (>= 0), or, below 0, a frame before the chunk:
  -n_cache <= src < 0     cache frame Tc + src (the newest n_cache = min(Tc, tp) cached frames; a longer
                          cache loses its oldest, and tp = 0 ignores the cache, as in the reference)
  src < -n_cache          a padding frame: zeros ("zeros", masked), or the oldest frame there is
                          ("replicate"/"first": src clamped to -n_cache, i.e. the oldest kept cached frame,
                          or chunk frame 0 without a cache; vkern/reference/causal_conv.py's rule).
Rows and columns outside the frame are masked to zero ("zeros", "first") or clamped to the edge
("replicate"). Masks are per pixel (constant along the channels), which keeps the loads vectorized. With
zeros padding (Wan) addresses are linear in the tap: each pixel's address is computed once, and a step adds
a scalar to it; clamping ("replicate", "first") recomputes them per tap.

B tiles: the weight is rearranged once per call into [taps x C_pad, O_pad] (C padded with zeros to a multiple
of BLOCK_K, O to one of BLOCK_N), so step i reads rows i * BLOCK_K onwards, B loads need no masks, and
padded channels contribute exact zeros.

Tiles on Hopper: BLOCK_M = 128 pixels x BLOCK_N = next power of 2 of O, 16 to 128 (O = 96 runs 128 with a
quarter masked: Triton tiles are powers of 2) x BLOCK_K = 64 or 32 channels dividing C (C = 96: 32, so no
channel is masked); Triton turns the loads into 16-byte cp.async copies and tl.dot into wgmma
(bench/triton_ptx.py). Warps (4, 8) and pipeline depth (3, 4) are tuned per layer shape and size class.
fp32: TF32 products (wgmma .tf32, BLOCK_K = 32, the weight packed K-major) when torch runs cuDNN's fp32 convs in
TF32 (its default), IEEE fp32 FMAs otherwise. Both operands are rounded to TF32 first (A tiles by cvt.rna in the
loop, or by their writer: inputs_tf32; the weight when packed), as cuDNN's are, so the error is cuDNN's (wgmma
alone truncates: 2.6x, run 173).
"""
import torch
import triton
import triton.language as tl

from ..ops._backend import cudnn_conv_tf32
from ..reference.causal_conv import round_to_tf32
from ._common import bench_without_flush, interpreting, round_tf32, round_to

PAD_CODES = {"zeros": 0, "replicate": 1, "first": 2}


@triton.jit
def _causal_conv3d_kernel(
    x_ptr, cache_ptr, w_ptr, bias_ptr, out_ptr,
    C, O, T, H, W, To, Ho, Wo, M, M_LOG2, Tc, n_cache, swk, swn,
    sxb, sxt, sxh, sxw, scb, sct, sch, scw, sob,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    TP: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, PAD_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    # N fastest: the programs sharing one A (pixel) tile run side by side and share it through L2.
    num_n = tl.cdiv(O, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n

    # Output pixel -> (b, t', h', w') once. Coordinates fit int32; addresses are int64 (a chunk of 720p video
    # has ~1.5e9 elements).
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    wo = (m % Wo).to(tl.int32)
    ho = ((m // Wo) % Ho).to(tl.int32)
    to = ((m // (Wo * Ho)) % To).to(tl.int32)
    b = (m // (Wo * Ho * To)).to(tl.int64)
    src0 = to * ST - TP  # chunk frame read by tap dt = 0 (< 0: before the chunk, see the module docstring)
    h0 = ho * SH - HP
    w0 = wo * SW - WP
    xb = x_ptr + b * sxb
    cb = cache_ptr + b * scb
    if PAD_MODE == 0:  # zeros: addresses are linear in the tap, so hoist each pixel's address at tap (0, 0, 0)
        x_pix = xb + src0.to(tl.int64) * sxt + h0.to(tl.int64) * sxh + w0.to(tl.int64) * sxw
        c_pix = cb + (Tc + src0).to(tl.int64) * sct + h0.to(tl.int64) * sch + w0.to(tl.int64) * scw
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    # The packed weight [taps * C_pad, O_pad] (strides swk, swn), C_pad = k_chunks * BLOCK_K: step i reads rows
    # i * BLOCK_K + k.
    w_tile = w_ptr + k[:, None] * swk + n[None, :] * swn

    k_chunks = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, KT * KH * KW * k_chunks):
        tap = i // k_chunks
        c0 = (i % k_chunks) * BLOCK_K
        dt = tap // (KH * KW)
        dh = (tap // KW) % KH
        dw = tap % KW
        src = src0 + dt
        h = h0 + dh
        w = w0 + dw
        if PAD_MODE == 0:
            ok = m_ok & (src >= -n_cache) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            row = tl.where(src < 0, c_pix + (dt.to(tl.int64) * sct + dh * sch + dw * scw),
                           x_pix + (dt.to(tl.int64) * sxt + dh * sxh + dw * sxw))
        else:
            src = tl.maximum(src, -n_cache)  # a padding frame repeats the oldest frame there is
            ok = m_ok
            if PAD_MODE == 1:  # replicate: the edge row/column
                h = tl.minimum(tl.maximum(h, 0), H - 1)
                w = tl.minimum(tl.maximum(w, 0), W - 1)
            else:  # first: zero rows and columns
                ok = ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            hw_x = h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
            hw_c = h.to(tl.int64) * sch + w.to(tl.int64) * scw
            row = tl.where(src < 0, cb + (Tc + src).to(tl.int64) * sct + hw_c, xb + src.to(tl.int64) * sxt + hw_x)

        c = c0 + k
        c = tl.max_contiguous(tl.multiple_of(c, BLOCK_K), BLOCK_K)  # chunk starts are multiples of BLOCK_K
        if EVEN_K:
            a = tl.load(row[:, None] + c[None, :], mask=ok[:, None], other=0.0)
        else:
            a = tl.load(row[:, None] + c[None, :], mask=ok[:, None] & (c < C)[None, :], other=0.0)
        bt = tl.load(w_tile + i * BLOCK_K * swk)  # zero-padded: no mask
        if ROUND_TF32:  # fp32 -> TF32 to nearest, as cuDNN's TF32 convs do (wgmma truncates: 2.6x the error, run 173)
            a = round_tf32(a, False)
        if UPCAST:  # the interpreter's 16-bit tl.dot is wrong: the same products in fp32
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)

    n_ok = n < O
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = round_to(acc, out_ptr.dtype.element_ty, EMULATE_RNE)
    # Output pixels are rows of O channels, O apart within a batch item (channels-last, or a time slice of it).
    o_row = out_ptr + b * sob + (m - b * (To * Ho * Wo)) * O
    tl.store(o_row[:, None] + n[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


def _configs():
    if interpreting():  # one config: the interpreter is slow, tuning it measures nothing
        return [triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in ((128, 4, 3), (128, 8, 3), (128, 4, 4), (128, 8, 4), (64, 4, 4))]


# Tuned per (channels, taps, blocks) and size class M_LOG2 (log2 of the pixel count, unused by the kernel): a
# small call must not fix the config of a large one with the same layer shape.
SMALL_PROBLEM = 2**28  # multiply-adds per call below which tuning is skipped (first config)


def _prune_small(configs, named_args, **kwargs):
    """Small calls (tests, the smallest latents) take the first config: tuning would cost more than it saves."""
    a = {**named_args, **kwargs}
    if a["M"] * a["O"] * a["C"] * a["KT"] * a["KH"] * a["KW"] < SMALL_PROBLEM:
        return configs[:1]
    return configs


_causal_conv3d_tuned = triton.autotune(
    configs=_configs(),
    key=["C", "O", "KT", "KH", "KW", "BLOCK_N", "BLOCK_K", "M_LOG2", "DOT_PRECISION", "ROUND_TF32"],
    prune_configs_by={"early_config_prune": _prune_small}, do_bench=bench_without_flush)(_causal_conv3d_kernel)


def block_sizes(C, O, dtype=torch.bfloat16):
    """(BLOCK_N, BLOCK_K): N covers O up to 128 (O = 96 -> 128, masked); K divides C where it can (no channel
    mask), at least 16 (tl.dot's minimum; C = 3 is masked), at most 32 in fp32 (a 128 x 64 fp32 A tile and its B
    tile would take 64 KB of shared memory a pipeline stage)."""
    block_n = max(16, min(128, triton.next_power_of_2(O)))
    widths = (32, 16) if dtype == torch.float32 else (64, 32, 16)
    block_k = next((k for k in widths if C % k == 0), 16 if C <= 16 else 32)
    return block_n, block_k


def packed_weight(weight, block_k, block_n, tf32=False):
    """[O, C, kt, kh, kw] -> [kt * kh * kw * C_pad, O_pad], C padded with zeros to a multiple of block_k and O
    to one of block_n (see the module docstring). fp32: the transpose of a contiguous [O_pad, taps * C_pad] (K
    contiguous): a TF32 wgmma reads both operands K-major, and with N contiguous Triton copies the B tile into
    shared memory 4 bytes at a time (bench/triton_ptx.py: 96 cp.async of 4 B a thread and stage against 24 of 16 B).
    tf32: fp32 values rounded to TF32 (10 mantissa bits, to nearest, ties away: cvt.rna), as the kernel rounds
    its A tiles."""
    O, C = weight.shape[:2]
    if tf32:
        weight = round_to_tf32(weight)
    taps = weight[0, 0].numel()
    c_pad, o_pad = triton.cdiv(C, block_k) * block_k, triton.cdiv(O, block_n) * block_n
    if weight.dtype == torch.float32:
        w = torch.zeros((o_pad, taps, c_pad), dtype=weight.dtype, device=weight.device)
        w[:O, :, :C] = weight.reshape(O, C, taps).transpose(1, 2)
        return w.reshape(o_pad, taps * c_pad).t()
    w = torch.zeros((taps, c_pad, o_pad), dtype=weight.dtype, device=weight.device)
    w[:, :C, :O] = weight.reshape(O, C, taps).permute(2, 1, 0)
    return w.reshape(taps * c_pad, o_pad)


def pixel_rows(t):
    """True when t [B, C, T, H, W]'s pixels are rows of C contiguous channels, C apart within each batch item
    (channels-last-3d, or a time slice of it)."""
    C, T, H, W = t.shape[1:]
    return all(t.size(d) == 1 or t.stride(d) == s for d, s in {1: 1, 4: C, 3: W * C, 2: H * W * C}.items())


def causal_conv3d(x, weight, bias, stride, padding, cache=None, pad_mode="zeros", out=None, cache_reversed=False,
                  inputs_tf32=False):
    """vkern.ops.causal_conv3d's contract (see vkern/reference/causal_conv.py), checked inputs assumed.
    x [B, C, T, H, W] and cache [B, C, Tc, H, W] (or None): channel stride 1 (channels-last-3d, or a time
    slice of it); weight [O, C, kt, kh, kw], bias [O] or None, in x's dtype. out: [B, O, T', H', W'] in x's
    dtype with pixel_rows(out) (e.g. a slot of the next conv's [cache | chunk] buffer), or None for a new
    channels-last-3d tensor. cache_reversed: the cache's frames are stored newest first (read as
    cache.flip(2), without a copy: the kernel walks the frames with a negative stride), so a 2-frame cache
    can be a ring whose new frame overwrites the oldest slot. inputs_tf32: x and cache hold TF32 values already
    (their writer rounded them as round_to_tf32 does), so with TF32 products the kernel feeds them to wgmma as they
    are, from shared memory, instead of rounding each A tile in registers (21% of the 96 -> 96 conv, run 174).
    Returns out."""
    B, C, T, H, W = x.shape
    O, _, KT, KH, KW = weight.shape
    st, sh, sw = stride
    tp, hp, wp = padding
    To, Ho, Wo = (tp + T - KT) // st + 1, (H + 2 * hp - KH) // sh + 1, (W + 2 * wp - KW) // sw + 1
    for name, t in (("x", x), ("cache", cache)):
        if t is not None and t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name}: expected channel stride 1 (channels-last-3d), got strides {t.stride()}")
    if out is None:
        out = torch.empty((B, O, To, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    elif out.shape != (B, O, To, Ho, Wo) or out.dtype != x.dtype or not pixel_rows(out):
        raise ValueError(f"out: expected shape {(B, O, To, Ho, Wo)}, dtype {x.dtype}, channels-last pixel rows; "
                         f"got {tuple(out.shape)}, {out.dtype}, strides {out.stride()}")
    n_cache = 0 if cache is None or tp == 0 else min(cache.shape[2], tp)
    c = cache if n_cache else x  # never read without cached frames (n_cache = 0)
    c_base, c_frame_stride = c, c.stride(2)
    if n_cache and cache_reversed:  # logical frame f (0 = oldest) is stored at Tc - 1 - f
        c_base, c_frame_stride = cache[:, :, -1:], -cache.stride(2)
    block_n, block_k = block_sizes(C, O, x.dtype)
    # TF32 products where torch's cuDNN convs run them (CUDA only: the interpreter on CPU tensors computes as torch's
    # CPU conv, IEEE)
    tf32 = x.dtype == torch.float32 and x.is_cuda and cudnn_conv_tf32()
    w = packed_weight(weight, block_k, block_n, tf32=tf32)
    M = B * To * Ho * Wo

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(O, block_n),)

    _causal_conv3d_tuned[grid](
        x, c_base, w, bias.contiguous() if bias is not None else w, out,
        C, O, T, H, W, To, Ho, Wo, M, M.bit_length(), c.shape[2], n_cache, w.stride(0), w.stride(1),
        x.stride(0), x.stride(2), x.stride(3), x.stride(4), c.stride(0), c_frame_stride, c.stride(3), c.stride(4),
        out.stride(0),
        KT=KT, KH=KH, KW=KW, ST=st, SH=sh, SW=sw, TP=tp, HP=hp, WP=wp, PAD_MODE=PAD_CODES[pad_mode],
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=C % block_k == 0,
        UPCAST=interpreting() and x.dtype != torch.float32,
        DOT_PRECISION="tf32" if x.dtype != torch.float32 or tf32 else "ieee", ROUND_TF32=tf32 and not inputs_tf32,
        EMULATE_RNE=interpreting(),
    )
    return out
