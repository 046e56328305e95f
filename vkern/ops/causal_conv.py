"""Causal 3D convolution with a feature cache (Wan VAE; replicate/first-frame padding for
HunyuanVideo, CogVideoX, Mochi, LTX). Backends: reference (vkern/reference/causal_conv.py);
vkern's CUDA kernel joins with the causal-conv issue."""
import torch

from ..reference import causal_conv as ref
from . import _backend
from ._checks import FLOATS, check_shape, check_tensor


@_backend.register("causal_conv3d")
def _causal_conv_candidates(device, dtype):
    return {"reference": None}


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
    return torch.ops.vkern.causal_conv3d(x, weight, bias, list(stride), list(padding), cache, pad_mode)


@torch.library.custom_op("vkern::causal_conv3d", mutates_args=())
def _causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                   padding: list[int], cache: torch.Tensor | None, pad_mode: str) -> torch.Tensor:
    _backend.choose("causal_conv3d", _causal_conv_candidates(x.device, x.dtype))
    return ref.causal_conv3d(x, weight, bias, stride, padding, cache, pad_mode)


@_causal_conv3d.register_fake
def _(x, weight, bias, stride, padding, cache, pad_mode):
    # Cached frames replace padding frames, so the padded length never depends on the cache.
    B, _, T, H, W = x.shape
    padded = (T + padding[0], H + 2 * padding[1], W + 2 * padding[2])
    out = [(n - k) // s + 1 for n, k, s in zip(padded, weight.shape[2:], stride)]
    return x.new_empty((B, weight.shape[0], *out))
