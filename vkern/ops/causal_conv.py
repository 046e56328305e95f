"""Causal 3D convolution with a feature cache (Wan VAE; replicate/first-frame padding for
HunyuanVideo, CogVideoX, Mochi, LTX), and the Wan VAE's fused RMS norm + SiLU.

causal_conv3d backends, in order of preference: cudnn (CUDA, zeros padding: cache and chunk copied once
into one channels-last buffer, spatial padding done by the conv, no F.pad; replicate/first padding go to
the reference), triton (vkern/triton/causal_conv.py: implicit GEMM reading cache and chunk in place, every
pad mode, bias fused; first for the conv shapes where it measured faster than cuDNN, TRITON_FASTER in 16 bits,
TRITON_FASTER_TF32 in fp32 while torch runs cuDNN's fp32 convs in TF32; any
conv with VKERN_CAUSAL_CONV3D_BACKEND=triton; on the CPU it runs under TRITON_INTERPRET=1, only when
forced), cuda (csrc/causal_conv.cu, vkern._C on Hopper: a wgmma implicit GEMM reading cache and chunk in
place, zeros padding, stride 1, 3 x 3 spatial taps, C a multiple of 32 (16 in fp32), O a multiple of 96 or 128, or at
most 8 (an RGB output: padded to 8); bias and a residual fused; bf16/fp16, or fp32 with TF32 products where torch runs
cuDNN's fp32 convs in TF32; first where it measured fastest, CUDA_FASTER in 16 bits, CUDA_FASTER_TF32 in fp32, or
wherever it runs with VKERN_CONV_CUDA=all, never with VKERN_CONV_CUDA=0),
reference (vkern/reference/causal_conv.py; the CPU).
rms_norm_silu, residual_add_ backends: triton (vkern/triton/vae_glue.py), reference (vkern/reference/wan_vae.py).
"""
import os

import torch
import torch.nn.functional as F

from ..reference import causal_conv as ref
from ..reference import wan_vae as ref_vae
from . import _backend
from ._checks import DTYPE_CODE, FLOATS, HALF, check_shape, check_tensor
from ._custom_op import custom_op

CL = torch.channels_last_3d


# (out channels, kernel) of the stride-1 convs where the Triton kernel measured faster than cuDNN's pick
# (bf16, H200, run 21: bench/results/2026-11-22-h200-9118522-vae.jsonl, op vae-conv): 96 -> 96 at 480x832
# 2.83 vs 3.52 ms, 3 -> 96 1.85 vs 2.63 ms. cuDNN stayed faster at 192 and 384 channels (1.40x, 1.40x),
# 96 -> 3, and the 3x1x1 time-upsampling conv; unmeasured shapes keep cuDNN.
TRITON_FASTER = {(96, (3, 3, 3))}


# (in channels, out channels, kernel) of the convs where the CUDA kernel measured faster than cuDNN and Triton
# (bf16, H200, op vae-conv; run 68: bench/results/2026-12-02-h200-c4a4d23-conv-cuda.jsonl, ms vs cuDNN): 96 -> 96
# at 480x832 1.41 vs 3.25 (no bias) / 3.59, the decoder's 2D upsampling convs (1 x 3 x 3, with bias) 192 -> 96 at
# 480x832 1.07 vs 1.51 and 384 -> 192 at 240x416 1.03 vs 1.26, its RGB output conv 96 -> 3 (block_n 8) 0.97 vs 1.39.
# 192 -> 192 since session 59: the kernel as of run 196 took 1.32 ms vs cuDNN's 1.65 (no bias, H100),
# and in the loop, its epilogue glue included, it took 480p decodes 590 -> 557 ms, 720p 1448 -> 1274, 480p encodes
# 419 -> 390 (H100, run 197: bench/results/2026-12-07-h100-0d0bb3c-vae-routing-192.jsonl; run 69's H200 profile had
# cuDNN at 1.28 ms per call vs the kernel's 1.42 then). Not 384 -> 384: cuDNN 0.77 vs 0.82 ms at 120x208 (run 196).
CUDA_FASTER = {(96, 96, (3, 3, 3)), (96, 3, (3, 3, 3)), (192, 192, (3, 3, 3)), (192, 96, (1, 3, 3)),
               (384, 192, (1, 3, 3))}


# (in channels, out channels, kernel) of the stride-1 convs where the Triton kernel's TF32 products (fp32 inputs,
# torch's cuDNN convs in TF32: its default) measured faster than cuDNN's TF32 pick in channels-last (H100, ms at 480p;
# run 175, operands rounded to TF32 as cuDNN does, by the norm pass in the VAE loop: bench/results/2026-12-06-h100-
# 2705cad-vae-fp32.jsonl): 96 -> 96 4.70 vs 7.80 (5.96 rounding in the conv), 96 -> 3 2.67 vs 3.48 (3.17). Run 173
# (truncated operands, 2.6x cuDNN's error: 2026-12-06-h100-8cd2afc-vae-conv-fp32.jsonl): cuDNN faster at 192 -> 192
# (4.08 vs 4.85), the 2D upsampling convs (192 -> 96 3.38 vs 3.69, 384 -> 192), the time-upsampling conv and the
# encoder's 3 -> 96 (1.45 vs 2.45); 384 -> 384 a tie (2.28 vs 2.82 once rounded, run 174).
TRITON_FASTER_TF32 = {(96, 96, (3, 3, 3)), (96, 3, (3, 3, 3))}


# (in channels, out channels, kernel) of the fp32 convs where the CUDA kernel's TF32 products measured faster than
# cuDNN's TF32 pick in channels-last and the Triton kernel (H200, run 183, ms at 480p on inputs rounded to TF32 by
# their writer, as the VAE loop's norm pass feeds them: bench/results/2026-12-06-h200-4c190d8-vae-conv-tf32.jsonl):
# 96 -> 96 2.33 vs cuDNN 6.44 and Triton 4.76, 96 -> 3 1.44 vs 3.02 and 2.49, 192 -> 192 2.65 vs 3.91, 384 -> 384 1.34
# vs 2.00 (120x208) and 0.29 vs 0.33 (60x104). The 2D upsampling convs read the residual stream, which nothing rounds:
# with the op's rounding copies in torch bit ops they lost (192 -> 96 3.83 vs 3.22, 384 -> 192 2.71 vs 2.24); in one
# Triton pass (_tf32_copy) they won (H100, run 184: 2.39 vs 3.43, 1.96 vs 2.21; 480p decode 1022.6 vs 1078.3 ms
# without them, run 185: bench/results/2026-12-07-h100-35f6c62-vae-fp32-routing-ab.jsonl). Unmeasured shapes keep
# cuDNN.
CUDA_FASTER_TF32 = {(96, 96, (3, 3, 3)), (96, 3, (3, 3, 3)), (192, 192, (3, 3, 3)), (384, 384, (3, 3, 3)),
                    (192, 96, (1, 3, 3)), (384, 192, (1, 3, 3))}


def triton_faster(weight, stride, dtype=torch.bfloat16):
    """Whether the Triton kernel measured faster than cuDNN for this stride-1 conv: TRITON_FASTER in 16 bits,
    TRITON_FASTER_TF32 in fp32 when torch runs cuDNN's fp32 convs in TF32. With TF32 off cuDNN keeps every fp32 conv:
    the kernel's IEEE products have no tensor cores (against cuDNN's TF32 they made a whole decode 0.78x diffusers',
    H100, run 171; against cuDNN's IEEE convs unmeasured)."""
    if tuple(stride) != (1, 1, 1):
        return False
    if dtype in HALF:
        return (weight.shape[0], tuple(weight.shape[2:])) in TRITON_FASTER
    return (dtype == torch.float32 and _backend.cudnn_conv_tf32()
            and (weight.shape[1], weight.shape[0], tuple(weight.shape[2:])) in TRITON_FASTER_TF32)


def cuda_unsupported(x, weight, stride):
    """None when csrc/causal_conv.cu takes this conv (zeros padding), else why not."""
    O, C, _, kh, kw = weight.shape
    if x.dtype == torch.float32 and not _backend.cudnn_conv_tf32():
        return "fp32 with TF32 products only (torch runs cuDNN's fp32 convs in IEEE fp32: TF32 is off)"
    if x.dtype not in (*HALF, torch.float32):
        return f"no {x.dtype} kernel"
    if tuple(stride) != (1, 1, 1) or (kh, kw) != (3, 3):
        return f"stride 1 and 3 x 3 spatial taps only (got stride {tuple(stride)}, kernel {tuple(weight.shape[2:])})"
    chunk = _cuda_chunk(x.dtype)
    if C % chunk or _cuda_block_n(O) is None:
        return (f"in channels a multiple of {chunk} and out channels a multiple of 96 or 128, or at most 8 only "
                f"(got {C} -> {O})")
    kt = weight.shape[2]
    if O <= 8 and (kt != 3 or _cuda_narrow_weight_bytes(C, kt, x.dtype) > CUDA_NARROW_WEIGHT_BYTES):
        return (f"at most 8 out channels: a 3 x 3 x 3 kernel whose packed weight fits {CUDA_NARROW_WEIGHT_BYTES} "
                f"bytes of shared memory only (got {C} -> {O}, kernel {tuple(weight.shape[2:])}, {x.dtype})")
    return None


CUDA_NARROW_WEIGHT_BYTES = 120 * 1024  # csrc/causal_conv.h's kConvNarrowWeightBytes


def _cuda_narrow_weight_bytes(C, kt, dtype):
    """The packed weight of a conv with 8-wide output tiles (O <= 8 padded to 8), which the kernel keeps whole in
    shared memory."""
    return kt * C * 9 * 8 * dtype.itemsize


def _cuda_chunk(dtype):
    """The CUDA kernel's input-channel chunk: 64 bytes of channels (32 in 16 bits, 16 in fp32)."""
    return 64 // dtype.itemsize


CUDA_BLOCK_NS = (128, 96, 8)  # csrc/causal_conv.h's kConvBlockNs, widest first


def _cuda_block_n(out_channels):
    """The kernel's output-channel tile for O channels: the widest of 128 and 96 dividing O; 8 for O <= 8 (the
    weight and output padded to 8 channels); None when neither."""
    return next((n for n in CUDA_BLOCK_NS[:2] if out_channels % n == 0), 8 if out_channels <= 8 else None)


def _cuda_preferred(weight, dtype=torch.bfloat16):
    mode = os.environ.get("VKERN_CONV_CUDA", "table")
    if mode not in ("table", "all", "0"):
        raise ValueError(f"VKERN_CONV_CUDA: expected all, 0 or table, got {mode!r}")
    key = (weight.shape[1], weight.shape[0], tuple(weight.shape[2:]))
    return mode == "all" or (mode == "table" and key in (CUDA_FASTER_TF32 if dtype == torch.float32 else CUDA_FASTER))


@_backend.register("causal_conv3d")
def _causal_conv_candidates(device, dtype, prefer_triton=False, cuda="no conv given", prefer_cuda=False):
    cands = {"cudnn": None if device.type == "cuda" else f"needs a CUDA tensor (got {device.type})"}
    triton = _backend.triton_usable(device) or (None if dtype in FLOATS else f"no {dtype} kernel")
    cuda = _backend.cuda_ext_usable(device) or cuda
    if device.type == "cuda" and prefer_cuda and cuda is None:
        cands = {"cuda": None, **cands, "triton": triton, "reference": None}
    elif device.type == "cuda" and prefer_triton and triton is None:
        cands = {"triton": None, **cands, "cuda": cuda, "reference": None}
    elif device.type == "cuda":
        cands.update(triton=triton, cuda=cuda, reference=None)
    else:  # the interpreter is a test vehicle, never a default: after the reference
        cands.update(reference=None, triton=triton, cuda=cuda)
    return cands


def conv_backend(x, weight, stride):
    """The backend causal_conv3d picks for this conv of x (zeros padding): "cuda" where CUDA_FASTER (fp32:
    CUDA_FASTER_TF32; or VKERN_CONV_CUDA=all) and the kernel takes it, "triton" where TRITON_FASTER (fp32:
    TRITON_FASTER_TF32), "cudnn" (CUDA) or "reference" (CPU) otherwise, unless VKERN_CAUSAL_CONV3D_BACKEND forces
    one."""
    cuda = cuda_unsupported(x, weight, stride)
    prefer_cuda = cuda is None and _cuda_preferred(weight, x.dtype)
    return _backend.choose("causal_conv3d", _causal_conv_candidates(
        x.device, x.dtype, triton_faster(weight, stride, x.dtype), cuda, prefer_cuda))


IN_PLACE = ("triton", "cuda")  # the backends that read cached frames where they are (conv3d_in_place)


def conv3d_in_place(backend, x, weight, bias, stride, padding, cache=None, cache_reversed=False, residual=None,
                    norm=None, packed=None, normed=False, upsample=1, inputs_tf32=False, norm_tf32=False):
    """A zeros-padding causal conv on an IN_PLACE backend: x and cache [B, C, Tc, H, W] with pixel rows of
    contiguous channels, cache read where it is (cache_reversed: stored newest frame first; on cuda the cache may
    also be a list of 1-frame tensors, oldest first); see vkern/triton/causal_conv.py's causal_conv3d. residual (the
    output's shape; on cuda in the epilogue, else added after): added to the output, in fp32 (bias may then be
    fp32). norm, normed, upsample, norm_tf32 (cuda only): see causal_conv3d_cuda. packed (cuda): cuda_pack(weight), made once
    by the caller. inputs_tf32 (fp32): x and cache hold TF32-rounded values (see the Triton kernel's causal_conv3d
    and causal_conv3d_cuda). Returns a new channels-last output (normed: the output and the normed output)."""
    if backend == "cuda":
        return causal_conv3d_cuda(x, weight, bias, padding, cache, cache_reversed, residual=residual, norm=norm,
                                  packed=packed, normed=normed, upsample=upsample, inputs_tf32=inputs_tf32,
                                  norm_tf32=norm_tf32)
    if norm is not None or normed or upsample != 1 or norm_tf32:
        raise ValueError(f"norm, normed, upsample, norm_tf32: only the cuda backend fuses them (got {backend})")
    if isinstance(cache, (list, tuple)):  # frames of different tensors: the Triton kernel takes one tensor
        cache = torch.cat(cache, dim=2).contiguous(memory_format=CL) if cache else None
    from ..triton.causal_conv import causal_conv3d as triton_conv

    kwargs = dict(cache=cache, cache_reversed=cache_reversed, inputs_tf32=inputs_tf32)
    if residual is not None:
        return residual_add_(triton_conv(x, weight, None, stride, padding, **kwargs), residual, bias)
    return triton_conv(x, weight, bias, stride, padding, **kwargs)


def cuda_packed_weight(weight, block_n):
    """[O, C, kt, 3, 3] -> the CUDA kernel's [O / block_n, kt, C / chunk, 9 taps, 4, block_n, chunk / 4] (chunk: 32
    channels in 16 bits, 16 in fp32, _cuda_chunk): per output-channel tile, time tap, channel chunk and spatial tap
    one contiguous slab of chunk x block_n (its 4 16-byte groups of input channels, each block_n rows of a group:
    wgmma's unswizzled K-major core matrices)."""
    O, C, kt = weight.shape[:3]
    chunk = _cuda_chunk(weight.dtype)
    w = weight.reshape(O // block_n, block_n, C // chunk, 4, chunk // 4, kt, 3, 3)
    return w.permute(0, 5, 2, 6, 7, 3, 1, 4).contiguous().view(O // block_n, kt, C // chunk, 9, 4, block_n, chunk // 4)


def cuda_pack(weight, block_n=None):
    """The CUDA kernel's weight for a conv with this weight [O, C, kt, 3, 3]: zero output channels up to a multiple of
    block_n (default _cuda_block_n(O); O <= 8 is padded to 8), packed (cuda_packed_weight); fp32 rounded to TF32 (the
    kernel's products read TF32 operands). A permuting copy: a caller that runs the same conv many times (the VAE
    loop) makes it once and passes it as `packed`."""
    O = weight.shape[0]
    if weight.dtype == torch.float32:
        weight = ref.round_to_tf32(weight)
    block_n = block_n or _cuda_block_n(O)
    O_pad = -(-O // block_n) * block_n
    if O_pad != O:
        weight = torch.cat([weight, weight.new_zeros((O_pad - O, *weight.shape[1:]))])
    return cuda_packed_weight(weight, block_n)


def _conv_arg(t, frame_index=0, frame_sign=1):
    """(address of frame frame_index, batch stride, frame stride * frame_sign, row stride, pixel stride) of a tensor
    [B, C, T, H, W] with contiguous channels."""
    return (t.data_ptr() + frame_index * t.stride(2) * t.element_size(), t.stride(0), frame_sign * t.stride(2),
            t.stride(3), t.stride(4))


NO_TENSOR = (0, 0, 0, 0, 0)


def _frames_arg(frames, x):
    """The kernel's cache argument for cached frames given as a list of 1-frame tensors [B, C, 1, H, W], oldest first,
    each in any tensor (the VAE loop keeps its inputs' last frames where they are instead of copying them): the kernel
    reads frame f at address(frame 0) + f * frame stride, so two frames anywhere are (address of the first, their
    distance). None when the frames' batch strides differ (B > 1 frames of tensors with different frame counts)."""
    if len(frames) > 2:
        raise ValueError(f"cache: at most 2 frames as a list, got {len(frames)}")
    for f in frames:
        check_tensor("cache frame", f, dtypes=(x.dtype,), ndim=5, device=x.device)
        check_shape("cache frame", f, (x.shape[0], x.shape[1], 1, *x.shape[3:]))
        if f.stride()[3:] != x.stride()[3:] or f.stride(1) != 1:
            raise ValueError(f"cache frame: expected x's row and pixel strides {x.stride()[3:]}, got {f.stride()}")
    if x.shape[0] > 1 and len({f.stride(0) for f in frames}) > 1:
        return None
    first = frames[0]
    step = 0 if len(frames) == 1 else (frames[1].data_ptr() - first.data_ptr()) // first.element_size()
    return (first.data_ptr(), first.stride(0), step, first.stride(3), first.stride(4))


# As many CTAs as fit on the SMs at once, looping over the tiles (else one CTA per tile; run 64: 7% slower).
CUDA_PERSISTENT = True


def _pixel_grid(t):
    """True when t [B, C, T, H, W] has contiguous channels and rows of W pixels (pixel_rows, or pixels further apart:
    the CUDA kernel's input layout, e.g. a time-upsampling conv's output read as 2 frames of C channels a pixel)."""
    C, T, H, W = t.shape[1:]
    return ((C == 1 or t.stride(1) == 1) and t.stride(4) >= C and (H == 1 or t.stride(3) == W * t.stride(4))
            and (T == 1 or t.stride(2) % 8 == 0))


def _tf32_copy(t):
    """fp32 t rounded to TF32 in a new tensor: a dense t (contiguous or channels-last-3d: a cache or chunk tensor, a
    frame of one video) in one Triton pass over its storage (torch's bit operations in round_to_tf32 take about five:
    1.6 ms of a 3.9 ms 480p 96 -> 96 conv, run 183), others (e.g. a time slice of a batch) by round_to_tf32."""
    if (t.is_contiguous() or t.is_contiguous(memory_format=CL)) and _backend.triton_usable(t.device) is None:
        from ..triton.vae_glue import round_tf32_copy

        return round_tf32_copy(t)
    return ref.round_to_tf32(t)


def causal_conv3d_cuda(x, weight, bias, padding, cache=None, cache_reversed=False, persistent=None, residual=None,
                       block_n=None, norm=None, packed=None, normed=False, upsample=1, inputs_tf32=False,
                       norm_tf32=False):
    """The CUDA kernel (cuda_unsupported(...) is None assumed; x and cache with pixel rows, as conv3d_in_place; x's
    pixels may be further apart than C, see _pixel_grid): zeros padding, stride 1. cache: a tensor [B, C, Tc, H, W]
    or a list of at most 2 1-frame tensors, oldest first, wherever they are (_frames_arg). bias: O values (any float
    dtype: added in fp32). residual: a tensor of the output's shape with pixel rows, added in fp32 (one rounding of
    conv + bias + residual). norm: (gamma, beta or None, silu): then diffusers' WanRMS_norm over each output pixel's
    channels (+ SiLU when silu) of that sum, before the one rounding (fp32 math as rms_norm_silu's; O must be 96 or
    128: one tile holds a pixel's channels). normed (with norm): the output is the sum and the norm goes to a second
    output, computed from the sum as rounded (what rms_norm_silu of the output gives); returns (output, normed).
    upsample 2: the conv's input is x (and cache) nearest-upsampled 2x in space, read on the fly (no upsampled copy).
    persistent: default CUDA_PERSISTENT. block_n: the output-channel tile (default _cuda_block_n(O); a probe for
    benchmarks). packed: cuda_pack(weight, block_n), when the caller keeps it (else made here, per call). fp32: TF32
    products of operands rounded to nearest, as cuDNN's TF32 convs (the weight rounded by cuda_pack); inputs_tf32: x
    and the cache hold TF32 values already (e.g. rms_norm_silu(..., tf32=True)'s output), else rounded copies of them
    are made here. norm_tf32 (fp32, with norm): the norm's result stored rounded to TF32 as
    round_to_tf32 rounds (a next TF32 conv's operand, read as it is: rms_norm_silu(..., tf32=True)'s rounding).
    Returns a new channels-last-3d output (O <= 8: a channel slice of an 8-channel one)."""
    from .._ext import cuda_ext

    frames = list(cache) if isinstance(cache, (list, tuple)) else None
    if frames is not None and cache_reversed:
        raise ValueError("cache_reversed: only for a cache tensor (a list of frames is oldest first)")
    if x.dtype == torch.float32 and not inputs_tf32:  # the kernel's products truncate: round once here
        x = _tf32_copy(x)
        frames = None if frames is None else [_tf32_copy(f) for f in frames]
        cache = None if cache is None or frames is not None else _tf32_copy(cache)
    if frames is not None:
        cache = None if not frames else frames[0]
    if not _pixel_grid(x):
        raise ValueError(f"x: expected pixel rows of contiguous channels (pixels may be further apart than C), got "
                         f"strides {x.stride()}")
    if cache is not None and frames is None and not pixel_rows(cache):
        raise ValueError(f"cache: expected pixel rows of contiguous channels, got strides {cache.stride()}")
    if upsample not in (1, 2):
        raise ValueError(f"upsample: expected 1 or 2, got {upsample!r}")
    if normed and norm is None:
        raise ValueError("normed: needs norm")
    if norm_tf32 and (norm is None or x.dtype != torch.float32):
        raise ValueError(f"norm_tf32: needs norm and fp32 (got norm {'set' if norm else None}, {x.dtype})")
    B, C, T, H, W = x.shape
    O, _, KT = weight.shape[:3]
    tp, hp, wp = padding
    block_n = block_n or _cuda_block_n(O)
    if block_n == 8 and O > 8:
        raise ValueError(f"block_n 8: for at most 8 output channels only (got {O})")
    O_pad = -(-O // block_n) * block_n
    shape = (B, O_pad, tp + T - KT + 1, upsample * H + 2 * hp - 2, upsample * W + 2 * wp - 2)
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), ndim=5, device=x.device)
        check_shape("residual", residual, (B, O, *shape[2:]))
        if O_pad != O:
            raise ValueError(f"residual: not supported with {O} output channels (padded to {O_pad})")
        residual = residual if pixel_rows(residual) else residual.contiguous(memory_format=CL)
    norm_args = (0, 0, 1.0, 0.0, False)
    if norm is not None:
        gamma, beta, silu = norm
        if O != block_n:
            raise ValueError(f"norm: needs {O} output channels in one tile (96 or 128), got block_n {block_n}")
        gamma, beta = (None if t is None else _channel_floats(f"norm {n}", t, O, x.device)
                       for n, t in (("gamma", gamma), ("beta", beta)))
        norm_args = (gamma.data_ptr(), 0 if beta is None else beta.data_ptr(), O ** 0.5, NORM_EPS, bool(silu))
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=CL)
    second = torch.empty_like(out) if normed else None
    if out.numel() == 0:
        return (out, second) if normed else out[:, :O]
    if O_pad != O and bias is not None:  # few output channels: the padding channels (zero weights) are cut off
        bias = torch.cat([bias, bias.new_zeros(O_pad - O)])
    if frames is not None and tp:  # a longer list loses its oldest frames, as a longer cache tensor
        frames = frames[len(frames) - min(len(frames), tp):]
        c = _frames_arg(frames, x) if frames else None
        if frames and c is None:  # B > 1 frames of different tensors: one copy into a 2-frame tensor
            cache, frames = torch.cat(frames, dim=2).contiguous(memory_format=CL), None
    if frames is not None:
        n_cache = cache_frames = len(frames) if tp else 0
        c = c if n_cache else NO_TENSOR
    else:
        n_cache = 0 if cache is None or tp == 0 else min(cache.shape[2], tp)
        cache_frames = cache.shape[2] if n_cache else 0
        if n_cache:  # the kernel reads logical frame f (0 = oldest) at address(frame 0) + f * frame stride
            c = _conv_arg(cache, cache.shape[2] - 1, -1) if cache_reversed else _conv_arg(cache)
        else:
            c = NO_TENSOR
    if packed is None:
        packed = cuda_pack(weight, block_n)
    elif packed.numel() != O_pad * weight[0].numel() or packed.dtype != x.dtype or packed.device != x.device:
        raise ValueError(f"packed: expected cuda_pack(weight) ({O_pad} x {tuple(weight.shape[1:])} {x.dtype}), got "
                         f"shape {tuple(packed.shape)} {packed.dtype} on {packed.device}")
    bias = None if bias is None else _aligned8(bias.to(torch.float32).contiguous())
    cuda_ext().causal_conv3d_fwd(
        _conv_arg(x), c, _conv_arg(out), _conv_arg(residual) if residual is not None else NO_TENSOR, *norm_args,
        _conv_arg(second) if normed else NO_TENSOR, bool(norm_tf32), packed.data_ptr(), 0 if bias is None else bias.data_ptr(),
        DTYPE_CODE[x.dtype], B, C, O_pad, T, H, W, KT, tp, hp, wp, upsample, cache_frames, n_cache, block_n,
        CUDA_PERSISTENT if persistent is None else persistent,
        torch.cuda.current_stream(x.device).cuda_stream)
    if normed:  # O == block_n: no padded channels
        return out, second
    return out[:, :O] if O_pad != O else out


def _channel_floats(name, t, n, device):
    """t (n values of any shape and float dtype) as a contiguous fp32 vector on device."""
    if t.numel() != n or t.device != device:
        raise ValueError(f"{name}: expected {n} values on {device}, got shape {tuple(t.shape)} on {t.device}")
    return _aligned8(t.reshape(n).to(torch.float32).contiguous())


def _aligned8(t):
    """t, or a copy of it where its address is not a multiple of 8 bytes (the kernel reads fp32 vectors in pairs)."""
    return t if t.data_ptr() % 8 == 0 else t.clone()


def _triple(name, v, minimum):
    t = (v,) * 3 if isinstance(v, int) else tuple(v)
    if len(t) != 3 or not all(isinstance(i, int) and i >= minimum for i in t):
        raise ValueError(f"{name}: expected an int or 3 ints >= {minimum} (time, height, width), got {v!r}")
    return t


def causal_conv3d(x, weight, bias=None, stride=1, padding=0, cache=None, pad_mode="zeros"):
    """Causal conv of x [B, C, T, H, W] with weight [O, C, kt, kh, kw] and bias [O] or None.
    padding: (frames in front, rows above and below, columns left and right); for a diffusers
    WanCausalConv3d built with padding p that is (2*p, p, p). cache [B, C, Tc, H, W]: the last input
    frames of the previous chunk, standing in for the first Tc padding frames (ignored when there
    is no time padding). pad_mode: "zeros" (Wan), "replicate" (HunyuanVideo, Mochi) or "first"
    (CogVideoX, LTX); see vkern/reference/causal_conv.py for the exact rules. Returns [B, O, T', H', W']."""
    check_tensor("x", x, dtypes=FLOATS, ndim=5)
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=5, device=x.device)
    B, C, T, H, W = x.shape
    if weight.shape[1] != C:
        raise ValueError(f"x: expected {weight.shape[1]} channels (weight's in_channels), got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(x.dtype,), device=x.device)
        check_shape("bias", bias, (weight.shape[0],))
    stride = _triple("stride", stride, 1)
    padding = _triple("padding", padding, 0)
    if pad_mode not in ref.PAD_MODES:
        raise ValueError(f"pad_mode: expected one of {ref.PAD_MODES}, got {pad_mode!r}")
    if cache is not None:
        check_tensor("cache", cache, dtypes=(x.dtype,), ndim=5, device=x.device)
        check_shape("cache", cache, (B, C, None, H, W))
    padded = (T + padding[0], H + 2 * padding[1], W + 2 * padding[2])
    if any(p < k for p, k in zip(padded, weight.shape[2:])):
        raise ValueError(f"x: padded size (T, H, W) = {padded} is smaller than the kernel {tuple(weight.shape[2:])}, "
                         f"got shape {tuple(x.shape)}")
    return _causal_conv3d(x, weight, bias, list(stride), list(padding), cache, pad_mode)


@custom_op("vkern::causal_conv3d", mutates_args=())
def _causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                   padding: list[int], cache: torch.Tensor | None, pad_mode: str) -> torch.Tensor:
    backend = conv_backend(x, weight, stride) if pad_mode == "zeros" else \
        _backend.choose("causal_conv3d", _causal_conv_candidates(x.device, x.dtype, cuda="zeros padding only"))
    if backend in IN_PLACE and x.numel() and weight.numel():
        # The kernels address pixel rows of contiguous channels: one copy for other layouts.
        rows = pixel_rows if backend == "cuda" else (lambda t: t.stride(1) == 1 or t.shape[1] == 1)
        x, cache = (t if t is None or rows(t) else t.contiguous(memory_format=CL) for t in (x, cache))
        if backend == "cuda":
            return causal_conv3d_cuda(x, weight, bias, padding, cache)
        from ..triton.causal_conv import causal_conv3d as kernel

        return kernel(x, weight, bias, stride, padding, cache, pad_mode)
    if backend == "cudnn" and pad_mode == "zeros":
        return conv3d_zeros_buffered(x, weight, bias, stride, padding, cache)
    return ref.causal_conv3d(x, weight, bias, stride, padding, cache, pad_mode)


def conv3d_zeros_buffered(x, weight, bias, stride, padding, cache=None):
    """causal_conv3d with zeros padding, the cudnn backend (runs on any device): WanCausalConv3d's
    torch.cat and F.pad (two copies of the padded chunk) become one copy of cache and chunk into a
    channels-last buffer [zeros | cache | chunk]; the conv pads in space itself."""
    tp, hp, wp = padding
    if tp == 0:  # no time context: the cache is ignored, as in the reference
        return F.conv3d(x, weight, bias, stride, (0, hp, wp))
    B, C, T, H, W = x.shape
    buf = torch.empty((B, C, tp + T, H, W), dtype=x.dtype, device=x.device, memory_format=CL)
    n = 0 if cache is None else min(cache.shape[2], tp)  # a longer cache loses its oldest frames
    buf[:, :, :tp - n].zero_()
    if n:
        buf[:, :, tp - n:tp].copy_(cache[:, :, -n:])
    buf[:, :, tp:].copy_(x)
    return F.conv3d(buf, weight, bias, stride, (0, hp, wp))


@_causal_conv3d.register_fake
def _(x, weight, bias, stride, padding, cache, pad_mode):
    # Cached frames replace padding frames, so the padded length never depends on the cache.
    B, _, T, H, W = x.shape
    padded = (T + padding[0], H + 2 * padding[1], W + 2 * padding[2])
    out = [(n - k) // s + 1 for n, k, s in zip(padded, weight.shape[2:], stride)]
    return x.new_empty((B, weight.shape[0], *out))


# --- Wan RMS norm + SiLU ------------------------------------------------------------------------------

NORM_EPS = 1e-12  # WanRMS_norm's F.normalize eps


@_backend.register("rms_norm_silu")
def _norm_candidates(device, dtype):
    return {"triton": _backend.triton_usable(device) or (None if dtype in FLOATS else f"no {dtype} kernel"),
            "reference": None}


def pixel_rows(t):
    """True when the pixels of t [B, C, T, H, W] are rows of C contiguous channels, C apart within each
    batch item (channels-last-3d, or a time slice of it): the layout the kernel addresses."""
    C, T, H, W = t.shape[1:]
    want = {1: 1, 4: C, 3: W * C, 2: H * W * C}
    return all(t.size(d) == 1 or t.stride(d) == s for d, s in want.items())


def _check_channel_vector(name, t, x, dtypes=None):
    check_tensor(name, t, dtypes=dtypes or (x.dtype,), device=x.device)
    if t.numel() != x.shape[1]:
        raise ValueError(f"{name}: expected {x.shape[1]} values (x's channels), got shape {tuple(t.shape)}")


def rms_norm_silu(x, gamma, bias=None, silu=True, out=None, in_bias=None, tf32=False):
    """diffusers' WanRMS_norm (channel_first) followed by SiLU (when silu) on x [B, C, T, H, W], in one
    pass: fp32 math rounded once to x's dtype (see vkern/triton/vae_glue.py; the reference backend is
    diffusers' eager ops, rounding after each).
    gamma, bias: C values in x's dtype (a WanRMS_norm's gamma [C, 1, 1, 1] as it is). in_bias: C values
    added to x first (the bias of the conv that produced x, run without it; in fp32 before the norm,
    where diffusers rounds conv + bias to x's dtype). out: written in place when given (same shape and
    dtype as x; e.g. the chunk slot of a conv's input buffer), else a new channels-last tensor. tf32 (fp32 x
    only): the result rounded to TF32 (ref.round_to_tf32), for a conv with TF32 products that reads it next
    (the Triton conv's inputs_tf32). Returns out."""
    check_tensor("x", x, dtypes=FLOATS, ndim=5)
    if tf32 and x.dtype != torch.float32:
        raise ValueError(f"tf32: rounds fp32 values only, got x of dtype {x.dtype}")
    C = x.shape[1]
    _check_channel_vector("gamma", gamma, x)
    for name, t in (("bias", bias), ("in_bias", in_bias)):
        if t is not None:
            _check_channel_vector(name, t, x)
    if out is None:
        out = torch.empty_like(x, memory_format=CL)
    else:
        check_tensor("out", out, dtypes=(x.dtype,), ndim=5, device=x.device)
        check_shape("out", out, tuple(x.shape))
    vec = (lambda t: None if t is None else t.reshape(C))
    args = (x, vec(gamma), vec(bias), bool(silu), out, vec(in_bias), bool(tf32))
    _rms_norm_silu_(*args)  # (plain eager calls skip the dispatcher: a Wan VAE decode makes ~800 of them)
    return out


@custom_op("vkern::rms_norm_silu_", mutates_args=("out",))
def _rms_norm_silu_(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, silu: bool,
                    out: torch.Tensor, in_bias: torch.Tensor | None, tf32: bool) -> None:
    backend = _backend.choose("rms_norm_silu", _norm_candidates(x.device, x.dtype))
    if backend == "reference" or x.numel() == 0:
        if in_bias is not None:  # diffusers' order: the conv's output + bias, rounded to x's dtype
            x = x + in_bias.reshape(-1, 1, 1, 1)
        y = ref_vae.rms_norm_silu(x, gamma, bias, silu)
        out.copy_(ref.round_to_tf32(y) if tf32 else y)
        return
    from ..triton.vae_glue import rms_norm_silu as kernel

    x = x if pixel_rows(x) else x.contiguous(memory_format=CL)  # one copy for other layouts
    contig = (lambda t: None if t is None else t.contiguous())
    args = (gamma.contiguous(), contig(bias), x.shape[1] ** 0.5, NORM_EPS, silu)
    if pixel_rows(out):
        kernel(x, *args, out, contig(in_bias), tf32)
    else:
        out.copy_(kernel(x, *args, torch.empty_like(x, memory_format=CL), contig(in_bias), tf32))


@_rms_norm_silu_.register_fake
def _(x, gamma, bias, silu, out, in_bias, tf32):
    return None


@_backend.register("residual_add_")
def _add_candidates(device, dtype):
    return _norm_candidates(device, dtype)


def residual_add_(y, shortcut, bias=None):
    """y += shortcut + bias, in place, for y and shortcut [B, C, T, H, W] (a VAE residual block's conv
    output and its shortcut) and bias C values (the conv's bias, or the sum of its and the shortcut
    conv's, which were run without them; fp32 allowed so that sum is not rounded). fp32 math, one
    rounding to y's dtype, where diffusers rounds conv + bias, then + shortcut. Returns y."""
    check_tensor("y", y, dtypes=FLOATS, ndim=5)
    check_tensor("shortcut", shortcut, dtypes=(y.dtype,), ndim=5, device=y.device)
    check_shape("shortcut", shortcut, tuple(y.shape))
    if bias is not None:
        _check_channel_vector("bias", bias, y, dtypes=(y.dtype, torch.float32))
    args = (y, shortcut, None if bias is None else bias.reshape(y.shape[1]))
    _residual_add_(*args)
    return y


@custom_op("vkern::residual_add_", mutates_args=("y",))
def _residual_add_(y: torch.Tensor, shortcut: torch.Tensor, bias: torch.Tensor | None) -> None:
    backend = _backend.choose("residual_add_", _add_candidates(y.device, y.dtype))
    if backend == "reference" or y.numel() == 0 or not pixel_rows(y):
        y.copy_(ref_vae.residual_add(y, shortcut, bias))
        return
    from ..triton.vae_glue import residual_add_ as kernel

    shortcut = shortcut if pixel_rows(shortcut) else shortcut.contiguous(memory_format=CL)
    kernel(y, shortcut, None if bias is None else bias.contiguous())


@_residual_add_.register_fake
def _(y, shortcut, bias):
    return None
