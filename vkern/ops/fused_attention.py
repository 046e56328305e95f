"""Attention ops: the fused QK prologue (RMSNorm across heads + RoPE) and non-causal attention.

qk_norm_rope backends: triton (vkern/triton/qk_norm_rope.py), reference.
attention backends:    sdpa (torch SDPA, cuDNN preferred on CUDA), reference (SDPA as diffusers calls it).
vkern's own flash-attention kernel joins as a backend with the fused-attention issue.
"""
import torch
import torch.nn.functional as F

from ..reference import attention as ref
from . import _backend
from ._checks import FLOATS, FLOATS_OR_F64, check_shape, check_tensor


@_backend.register("qk_norm_rope")
def _norm_rope_candidates(device, dtype):
    kernel = _backend.triton_usable(device) or (None if dtype in FLOATS else f"no {dtype} kernel")
    return {"triton": kernel, "reference": None}


def qk_norm_rope(x, weight, eps, heads, freqs_cos=None, freqs_sin=None):
    """RMSNorm over the last dimension of x [B, S, H*D] (Wan's norm across heads) with `weight`,
    then optional interleaved RoPE from diffusers' tables freqs_cos/freqs_sin [1|B, S, 1, D].
    Returns a contiguous [B, S, H, D] tensor in x's dtype."""
    check_tensor("x", x, dtypes=FLOATS_OR_F64, ndim=3)
    B, S, row = x.shape
    if not isinstance(heads, int) or heads <= 0 or row % heads:
        raise ValueError(f"heads: expected a positive divisor of x's last dimension {row}, got {heads!r}")
    head_dim = row // heads
    if head_dim % 2:
        raise ValueError(f"x: head dimension {head_dim} (= {row} / heads) must be even for RoPE pairs")
    check_tensor("weight", weight, dtypes=FLOATS_OR_F64, device=x.device)
    check_shape("weight", weight, (row,))
    if (freqs_cos is None) != (freqs_sin is None):
        raise ValueError("freqs_cos, freqs_sin: pass both or neither")
    if freqs_cos is not None:
        for name, f in (("freqs_cos", freqs_cos), ("freqs_sin", freqs_sin)):
            check_tensor(name, f, dtypes=FLOATS_OR_F64, ndim=4, device=x.device)
            if f.shape[0] not in (1, B) or tuple(f.shape[1:]) != (S, 1, head_dim):
                raise ValueError(f"{name}: expected shape (1 or {B}, {S}, 1, {head_dim}), got {tuple(f.shape)}")
        if freqs_cos.stride() != freqs_sin.stride():
            freqs_cos, freqs_sin = freqs_cos.contiguous(), freqs_sin.contiguous()
    return torch.ops.vkern.qk_norm_rope(x, weight, float(eps), heads, freqs_cos, freqs_sin)


@torch.library.custom_op("vkern::qk_norm_rope", mutates_args=())
def _qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, heads: int,
                  freqs_cos: torch.Tensor | None, freqs_sin: torch.Tensor | None) -> torch.Tensor:
    backend = _backend.choose("qk_norm_rope", _norm_rope_candidates(x.device, x.dtype))
    if backend == "triton":
        from ..triton.qk_norm_rope import qk_norm_rope as kernel

        x = x if x.stride(-1) == 1 else x.contiguous()
        out = torch.empty((*x.shape[:2], heads, x.shape[2] // heads), dtype=x.dtype, device=x.device)
        return kernel(x, weight, eps, heads, freqs_cos, freqs_sin, out)
    return ref.qk_norm_rope(x, weight, eps, heads, freqs_cos, freqs_sin).contiguous()


@_qk_norm_rope.register_fake
def _(x, weight, eps, heads, freqs_cos, freqs_sin):
    return x.new_empty((*x.shape[:2], heads, x.shape[2] // heads))


@_backend.register("attention")
def _attention_candidates(device, dtype):
    return {"sdpa": None if device.type == "cuda" and dtype in FLOATS else
            f"needs a CUDA tensor (got {device.type})" if device.type != "cuda" else f"no {dtype} kernel",
            "reference": None}


def attention(q, k, v, attn_mask=None):
    """Non-causal softmax attention on [B, S, H, D] tensors (the layout diffusers' processors use).
    k and v may have another length than q (cross-attention). attn_mask: bool (True = attend) or
    additive, broadcastable to [B, H, Sq, Skv]. Returns [B, Sq, H, D]."""
    check_tensor("q", q, dtypes=FLOATS_OR_F64, ndim=4)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=(q.dtype,), ndim=4, device=q.device)
    B, Sq, H, D = q.shape
    check_shape("k", k, (B, None, H, D))
    check_shape("v", v, (B, k.shape[1], H, None))
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, dtypes=(torch.bool, q.dtype), device=q.device)
    return torch.ops.vkern.attention(q, k, v, attn_mask)


@torch.library.custom_op("vkern::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    backend = _backend.choose("attention", _attention_candidates(q.device, q.dtype))
    if backend == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        with sdpa_kernel(order, set_priority=True):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask).transpose(1, 2).contiguous()
    return ref.attention(q, k, v, attn_mask).contiguous()


@_attention.register_fake
def _(q, k, v, attn_mask):
    return q.new_empty((*q.shape[:3], v.shape[3]))
