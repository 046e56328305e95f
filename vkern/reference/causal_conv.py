"""Causal 3D convolution with a feature cache, the spec for vkern's causal-conv kernels.

Time only looks back: the input is padded in front (never behind) by `padding[0]` frames, and a
cache holds the last input frames of the previous chunk so a video can be convolved chunk by chunk.
Three padding rules, each matching the diffusers module it comes from (diffusers 0.42):

  "zeros"      WanCausalConv3d: cached frames first, the rest of the time padding zeros, spatial
               padding zeros. Wan's conv(padding=p) pads 2*p frames: pass padding=(2*p, p, p).
  "replicate"  F.pad(mode="replicate") on all three axes (HunyuanVideoCausalConv3d; CogVideoX's and
               Mochi's CogVideoXCausalConv3d with pad_mode="replicate"): the first frame repeated in
               time, the edge rows and columns repeated in space.
  "first"      CogVideoXCausalConv3d's default (its VAEs pass pad_mode="first") and LTX-Video's
               causal conv: the first frame repeated in time, zeros in space.

round_to_tf32: how cuDNN's TF32 convs (torch's default for fp32) round their operands.
"""
import torch
import torch.nn.functional as F

PAD_MODES = ("zeros", "replicate", "first")


def causal_conv3d(x, weight, bias, stride, padding, cache=None, pad_mode="zeros"):
    """x [B, C, T, H, W]; weight [O, C, kt, kh, kw]; bias [O] or None; stride (st, sh, sw);
    padding (time frames in front, rows above and below, columns left and right); cache
    [B, C, Tc, H, W] or None: the last input frames of the previous chunk. Returns [B, O, T', H', W'].

    Wan's rules, kept for every mode: a conv without time padding ignores the cache (its kernel
    does not reach back), and cached frames stand in for padding frames, so a cache longer than the
    padding loses its oldest frames (what F.pad's negative padding does in WanCausalConv3d). With
    "replicate"/"first", padding still needed after the cache repeats the oldest cached frame."""
    time_pad, h_pad, w_pad = padding
    if cache is not None and time_pad > 0:
        x = torch.cat([cache.to(x.device), x], dim=2)
        time_pad -= cache.shape[2]
        if time_pad < 0:
            x = x[:, :, -time_pad:]
            time_pad = 0
    pads = (w_pad, w_pad, h_pad, h_pad, time_pad, 0)
    if pad_mode == "zeros":
        x = F.pad(x, pads)
    elif pad_mode == "replicate":
        x = F.pad(x, pads, mode="replicate")
    elif pad_mode == "first":
        if time_pad > 0:
            x = torch.cat([x[:, :, :1]] * time_pad + [x], dim=2)
        x = F.pad(x, (w_pad, w_pad, h_pad, h_pad))
    else:
        raise ValueError(f"pad_mode: expected one of {PAD_MODES}, got {pad_mode!r}")
    return F.conv3d(x, weight, bias, stride)


def next_cache(x, cache=None, frames=2):
    """The cache for the next chunk: the last `frames` input frames seen so far (this chunk's, topped
    up from the old cache when the chunk is shorter, as Wan's blocks do it)."""
    new = x[:, :, -frames:]
    if new.shape[2] < frames and cache is not None:
        new = torch.cat([cache[:, :, -(frames - new.shape[2]):].to(new.device), new], dim=2)
    return new.clone()  # a copy, so the chunk's activation can be freed


def round_to_tf32(t):
    """fp32 t rounded to TF32 (PTX cvt.rna.tf32.f32: 13 low mantissa bits dropped, to nearest, ties away from zero;
    on the sign-magnitude bits that is adding half of the dropped unit, then masking). NaN stays NaN. A dense t keeps
    its strides (channels-last stays channels-last)."""
    bits = (t.view(torch.int32) + 0x1000) & ~0x1FFF
    return torch.where(t.isnan(), t, bits.view(torch.float32))
