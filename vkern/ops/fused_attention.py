"""Attention ops: the fused QK prologue (RMSNorm across heads + RoPE, optionally 8-bit out) and non-causal
attention, exact (bf16/fp16) or 8-bit.

qk_norm_rope backends:   triton (vkern/triton/qk_norm_rope.py), reference.
attention backends:      cuda (vkern's Hopper flash-attention, csrc/flash_attention.cu: sm_90, head dims 64 and
                         128, key-padding mask), triton (vkern's flash-attention, vkern/triton/attention.py), sdpa (torch SDPA,
                         cuDNN first), flash_attn (flash-attn's package when installed: flash_attn_backend.py),
                         reference. On CUDA the order comes from measurement (ATTENTION_PREFERENCE).
attention_8bit backends: cuda (head dim 128 on Hopper, K scales per 128-key block, O promoted to fp32 per key
block: e4m3 or int8 Q, K with e4m3 P/V (pv="e4m3"), and int8 Q, K with u8 P and int8 V (pv="int8") where the build
has that form), triton (16-bit or e4m3 V), reference (fp32 emulation of the same quantization, every scheme).
8-bit V (v_to_8bit): smoothed (V - value_offset), one scale per (128-key block, head), transposed [B, H, D, S_pad]
in the CUDA kernel's P-fragment key order, e4m3 or int8.
"""
import os

import torch
import torch.nn.functional as F

from ..reference import attention as ref
from . import _backend, flash_attn_backend
from ._checks import DTYPE_CODE, FLOATS, FLOATS_OR_F64, HALF, check_shape, check_tensor
from ._custom_op import custom_op

HEAD_DIMS = (64, 128)  # the Triton kernel's head dims; others fall back to SDPA / the reference
QUANT_FORMATS = (None, "e4m3", "int8")
_DTYPE_OF = {"e4m3": torch.float8_e4m3fn, "int8": torch.int8}
PV_FORMATS = ref.PV_FORMATS  # attention_8bit's pv: "bf16" (P and V in V's dtype), "e4m3", "int8" (u8 P, int8 V)
V_FORMATS = ("e4m3", "int8", "u8")  # v_to_8bit's formats ("u8": int8 codes + 128, the int8/int8 CUDA kernel's V)
_V_DTYPE_OF = {"e4m3": torch.float8_e4m3fn, "int8": torch.int8, "u8": torch.uint8}
_PV_OF_V = {"e4m3": "e4m3", "int8": "int8", "u8": "int8"}  # the pv scheme a V format is for
# Measured on an H200 (bench/results/*.jsonl, bench/NOTES.md "Run 8", "Run 33", "Run 36"): the fastest exact
# backend per head dim. D=128: the CUDA kernel 587-611 TFLOP/s vs cuDNN 552-567 vs the Triton kernel 481-488
# (wan1.3b-480p, wan14b-480p, wan14b-720p, hunyuan-720p); D=64: the CUDA kernel 410 vs cuDNN 387 vs Triton 376
# (ltx-512p), 445 vs 406 vs 448 (cogvideox-5b). The others stay available (backend= or the env var).
# flash-attn, when installed, goes last: it was not measured here (the H200 machine has no flash-attn), and its FA2
# kernels, measured inside SDPA ("fa2" rows: 344-361 TFLOP/s at the D=128 self-attention shapes), trail all three.
ATTENTION_PREFERENCE = {64: ("cuda", "sdpa", "triton", "flash_attn"), 128: ("cuda", "sdpa", "triton", "flash_attn")}
ATTENTION_BACKENDS = ("auto", "vkern", "cuda", "triton", "sdpa", "flash_attn", "reference")
# Fewer keys: each CTA's fixed costs (Q load, pipeline fill, epilogue) weigh more in the CUDA kernel than in
# cuDNN; below CUDA_MIN_KEYS[head dim] keys cuDNN goes first (bench/flash_check.py --crossover). D=128 (runs
# 34-36, 40 heads x 32760 queries): 0.93-1.01x cuDNN from 512 to 16384 keys, 1.06-1.09x at 32760 (bench rows;
# the committed crossover files, runs 38 and 41: 0.93-1.01x and 0.95-1.03x): the switch lay between 16384 and 32760.
# Run 118 (session 31's kernel, do_bench, two passes; bench/results/*-17887ff-flash-check-crossover-wide.txt): the
# 176-key tile 0.96-1.09x at 2048-4096 keys, 1.04-1.06x at 8192-16384, 0.98-1.04x at 24576, 1.18-1.20x at 32760
# (the 128 tile 0.99-1.09x, 1.01-1.08x, 0.95-0.98x, 1.12-1.14x): from 16384 keys, as decided before that run. Run
# 119 (session 32, the 176-key tile, two passes at 4096-16384 keys in steps of 2048;
# bench/results/*-3b44379-flash-check-crossover-8192.txt): 0.99 / 1.01x at 4096, 1.03-1.07x from 6144 to 16384: from
# 8192 keys (the smallest count >= 1.02x in those two passes and run 118's two, the rule set before run 119). D=64
# (run 36, 32 heads x 7392 queries): 0.71x at 128 keys, 0.86x at 512, 0.94x at 2048, 1.07x at 7392, 1.12x at 17776:
# the switch lies between 2048 and 7392.
CUDA_MIN_KEYS = {64: 4096, 128: 8192}


@_backend.register("qk_norm_rope")
def _norm_rope_candidates(device, dtype):
    kernel = _backend.triton_usable(device) or (None if dtype in FLOATS else f"no {dtype} kernel")
    return {"triton": kernel, "reference": None}


def qk_norm_rope(x, weight, eps, heads, freqs_cos=None, freqs_sin=None, quant=None, out=None, token_block=1,
                 key_padding_mask=None, rope_tables="per_pair", norm="rms", bias=None):
    """RMSNorm over the last dimension of x [B, S, H*D] (Wan's norm across heads) with `weight` [H*D] (None:
    no norm), or over each head's D values with `weight` [D] (HunyuanVideo's and Mochi's per-head norm), then
    optional interleaved RoPE from diffusers' tables freqs_cos/freqs_sin, by rope_tables:
    "per_pair" (Wan's form; tables [1|B, S, 1, D]: pair i reads cos[2i] and sin[2i+1]);
    "per_element" (diffusers' apply_rotary_emb, HunyuanVideo's and LTX's; [1|B, S, 1|H, D]: each element its own
    entry; for repeat-interleaved tables it agrees with "per_pair");
    "pairs" (Mochi's; [1|B, S, 1|H, D / 2]: pair i reads cos[i] and sin[i]);
    "split" (LTX-2's, diffusers' apply_split_rotary_emb; [1|B, S, 1|H, D / 2]: the halves' pair (x[i], x[i + D / 2])
    reads cos[i] and sin[i]; D a power of two).
    A table dimension of H gives each head its own row (LTX's tables span the whole inner dim); the last three forms
    for the 16-bit output only. norm="layer" (16-bit output only): a LayerNorm over each head's D values with weight
    [D] and bias [D] (CogVideoX's norm_q/norm_k) instead of the RMSNorm; fp32 math, one rounding, as torch's.
    Returns a contiguous [B, S, H, D] tensor in x's dtype; with quant="e4m3" or "int8" a pair
    (8-bit [B, S, H, D], fp32 scales [B, H, S]), one scale per (token, head), for attention_8bit.
    token_block=128 (keys): one scale per (128-token block, head) instead, scales [B, H, ceil(S / 128)], the
    form the CUDA 8-bit kernel takes; key_padding_mask (bool [B, S], True = attend,
    only here): the padded tokens do not enter their block's scale (see k_to_8bit).

    out (quant=None only): write the result into this tensor instead, and return it. Either [B, S, H, D]
    or head groups [B, S, G, P, D] with G * P >= H: head h goes to out[:, :, h // P, h % P] and the
    slots past H are zero-filled (so a head-sharded, head-padded all-to-all send buffer is written in
    one pass; see vkern.distributed.ulysses.QKVSendBuffer). Any strides with the last dim contiguous,
    x's dtype and device; it must not overlap x. The values are exactly those of the call without out."""
    if quant not in QUANT_FORMATS:
        raise ValueError(f"quant: expected one of {QUANT_FORMATS}, got {quant!r}")
    if rope_tables not in ref.ROPE_TABLES:
        raise ValueError(f"rope_tables: expected one of {ref.ROPE_TABLES}, got {rope_tables!r}")
    if rope_tables != "per_pair" and quant is not None:
        raise ValueError(f"rope_tables: {rope_tables!r} only for the 16-bit output (quant=None)")
    if norm not in ("rms", "layer"):
        raise ValueError(f"norm: expected 'rms' or 'layer', got {norm!r}")
    if (norm == "layer") != (bias is not None):
        raise ValueError("bias: the LayerNorm's (norm='layer'), and only then")
    if norm == "layer" and quant is not None:
        raise ValueError("norm: 'layer' only for the 16-bit output (quant=None)")
    if out is not None and quant is not None:
        raise ValueError("out: only for the unquantized output (quant=None); the 8-bit output allocates its own")
    if token_block != 1 and (quant is None or token_block != ref.KEY_BLOCK):
        raise ValueError(f"token_block: 1, or {ref.KEY_BLOCK} with an 8-bit quant; got {token_block!r} with {quant!r}")
    if key_padding_mask is not None and token_block == 1:
        raise ValueError(f"key_padding_mask: only with token_block={ref.KEY_BLOCK} (per-token scales ignore padding)")
    check_tensor("x", x, dtypes=FLOATS_OR_F64, ndim=3)
    B, S, row = x.shape
    if not isinstance(heads, int) or heads <= 0 or row % heads:
        raise ValueError(f"heads: expected a positive divisor of x's last dimension {row}, got {heads!r}")
    head_dim = row // heads
    if head_dim % 2:
        raise ValueError(f"x: head dimension {head_dim} (= {row} / heads) must be even for RoPE pairs")
    if weight is not None:
        check_tensor("weight", weight, dtypes=FLOATS_OR_F64, device=x.device)
        if weight.dim() != 1 or weight.shape[0] not in (row, head_dim):
            raise ValueError(f"weight: expected shape ({row},) (across heads) or ({head_dim},) (per head), got "
                             f"{tuple(weight.shape)}")
    if norm == "layer":
        for name, t in (("weight", weight), ("bias", bias)):
            if t is None or tuple(t.shape) != (head_dim,):
                raise ValueError(f"{name}: norm='layer' takes a LayerNorm over each head: expected shape "
                                 f"({head_dim},), got {None if t is None else tuple(t.shape)}")
        check_tensor("bias", bias, dtypes=FLOATS_OR_F64, device=x.device)
    if (freqs_cos is None) != (freqs_sin is None):
        raise ValueError("freqs_cos, freqs_sin: pass both or neither")
    if freqs_cos is not None:
        if rope_tables == "split" and head_dim & (head_dim - 1):  # the kernel rotates halves of a power-of-two tile
            raise ValueError(f"rope_tables: 'split' needs a power-of-two head dimension, got {head_dim} "
                             f"(= {row} / heads)")
        for name, f in (("freqs_cos", freqs_cos), ("freqs_sin", freqs_sin)):
            check_tensor(name, f, dtypes=FLOATS_OR_F64, ndim=4, device=x.device)
            width = head_dim // 2 if rope_tables in ("pairs", "split") else head_dim
            per_head = (1,) if rope_tables == "per_pair" else (1, heads)
            if f.shape[0] not in (1, B) or f.shape[1] != S or f.shape[2] not in per_head or f.shape[3] != width:
                raise ValueError(f"{name}: expected shape (1 or {B}, {S}, {' or '.join(map(str, per_head))}, {width}) "
                                 f"for rope_tables={rope_tables!r}, got {tuple(f.shape)}")
        if freqs_cos.stride() != freqs_sin.stride():
            freqs_cos, freqs_sin = freqs_cos.contiguous(), freqs_sin.contiguous()
    if out is not None:
        _check_norm_rope_out(out, x, heads, head_dim)
        _qk_norm_rope_out(x, weight, float(eps), heads, freqs_cos, freqs_sin, out, rope_tables, bias)
        return out
    if quant is None:
        return _qk_norm_rope(x, weight, float(eps), heads, freqs_cos, freqs_sin, rope_tables, bias)
    if x.dtype == torch.float64:
        raise TypeError("x: 8-bit output needs a bf16, fp16 or fp32 input, got float64")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), device=x.device)
        check_shape("key_padding_mask", key_padding_mask, (B, S))
    return _qk_norm_rope_quantized(x, weight, float(eps), heads, freqs_cos, freqs_sin, quant, token_block,
                                   key_padding_mask)


def k_to_8bit(k, fmt, key_padding_mask=None):
    """K [B, S, H, D] -> (8-bit K [B, S, H, D], fp32 scales [B, H, ceil(S / 128)]): one scale per (block of 128
    consecutive keys, head), the K form the CUDA 8-bit kernel takes (issue 3's per-block scales: it applies one
    scale per key block instead of one per score). fmt "e4m3": scale = amax over the block's keys and head dim *
    fp32(1/448), saturating RNE; "int8": amax * fp32(1/127), RNE (the fp8 mode's keys). key_padding_mask: bool
    [B, S], True = attend; the amax runs over the attended keys only (a padded key's garbage cannot coarsen its
    block's scale; its own codes saturate and attention gives it weight 0). Pass the mask that
    attention_prequantized will get. (The fused prologue emits the same form: qk_norm_rope(..., quant=fmt,
    token_block=128).)"""
    check_tensor("k", k, dtypes=FLOATS, ndim=4)
    if fmt not in ("e4m3", "int8"):
        raise ValueError(f"fmt: expected 'e4m3' or 'int8', got {fmt!r}")
    return qk_norm_rope(_heads_flat(k), None, 0.0, k.shape[2], quant=fmt, token_block=ref.KEY_BLOCK,
                        key_padding_mask=key_padding_mask)


def k_to_e4m3(k, key_padding_mask=None):
    """k_to_8bit(k, "e4m3", key_padding_mask): e4m3 K with one scale per (128-key block, head)."""
    return k_to_8bit(k, "e4m3", key_padding_mask)


def _heads_flat(x):
    """[B, S, H, D] -> [B, S, H * D] for the prologue: a view when each token's heads are contiguous, else a copy."""
    return x.flatten(2) if x.stride(-1) == 1 and x.stride(2) == x.shape[3] else x.reshape(*x.shape[:2], -1)


@custom_op("vkern::qk_norm_rope", mutates_args=())
def _qk_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, heads: int,
                  freqs_cos: torch.Tensor | None, freqs_sin: torch.Tensor | None,
                  rope_tables: str = "per_pair", bias: torch.Tensor | None = None) -> torch.Tensor:
    backend = _backend.choose("qk_norm_rope", _norm_rope_candidates(x.device, x.dtype))
    if backend == "triton":
        from ..triton.qk_norm_rope import qk_norm_rope as kernel

        x = x if x.stride(-1) == 1 else x.contiguous()
        out = torch.empty((*x.shape[:2], heads, x.shape[2] // heads), dtype=x.dtype, device=x.device)
        return kernel(x, weight, eps, heads, freqs_cos, freqs_sin, out, rope_tables=rope_tables, bias=bias)
    return ref.qk_norm_rope(x, weight, eps, heads, freqs_cos, freqs_sin, rope_tables, bias).contiguous()


@_qk_norm_rope.register_fake
def _(x, weight, eps, heads, freqs_cos, freqs_sin, rope_tables="per_pair", bias=None):
    return x.new_empty((*x.shape[:2], heads, x.shape[2] // heads))


def _check_norm_rope_out(out, x, heads, head_dim):
    check_tensor("out", out, dtypes=(x.dtype,), ndim=(4, 5), device=x.device)
    B, S = x.shape[:2]
    if out.dim() == 4:
        check_shape("out", out, (B, S, heads, head_dim))
    else:
        check_shape("out", out, (B, S, None, None, head_dim))
        if out.shape[2] * out.shape[3] < heads:
            raise ValueError(f"out: head groups [B, S, G, P, D] need G * P >= heads={heads}, got {tuple(out.shape)}")
    if out.stride(-1) != 1:
        raise ValueError(f"out: the last (head) dimension must be contiguous, got strides {out.stride()}")


def _write_heads(out, y):
    """out [B, S, H, D] or head groups [B, S, G, P, D] <- y [B, S, H, D]; group slots past H get zeros."""
    if out.dim() == 4:
        out.copy_(y)
        return
    P, H = out.shape[3], y.shape[2]
    for g in range(out.shape[2]):
        n = min(max(H - g * P, 0), P)
        if n:
            out[:, :, g, :n].copy_(y[:, :, g * P:g * P + n])
        if n < P:
            out[:, :, g, n:].zero_()


@custom_op("vkern::qk_norm_rope_out", mutates_args=("out",))
def _qk_norm_rope_out(x: torch.Tensor, weight: torch.Tensor | None, eps: float, heads: int,
                      freqs_cos: torch.Tensor | None, freqs_sin: torch.Tensor | None, out: torch.Tensor,
                      rope_tables: str = "per_pair", bias: torch.Tensor | None = None) -> None:
    backend = _backend.choose("qk_norm_rope", _norm_rope_candidates(x.device, x.dtype))
    if backend == "triton":
        from ..triton.qk_norm_rope import qk_norm_rope as kernel

        kernel(x if x.stride(-1) == 1 else x.contiguous(), weight, eps, heads, freqs_cos, freqs_sin, out,
               rope_tables=rope_tables, bias=bias)
        if out.dim() == 5 and out.shape[2] * out.shape[3] > heads:  # the kernel writes real heads only
            P = out.shape[3]
            if heads % P:
                out[:, :, heads // P, heads % P:].zero_()
            out[:, :, -(-heads // P):].zero_()
        return
    _write_heads(out, ref.qk_norm_rope(x, weight, eps, heads, freqs_cos, freqs_sin, rope_tables, bias))


@_qk_norm_rope_out.register_fake
def _(x, weight, eps, heads, freqs_cos, freqs_sin, out, rope_tables="per_pair", bias=None):
    return None


@custom_op("vkern::qk_norm_rope_quantized", mutates_args=())
def _qk_norm_rope_quantized(x: torch.Tensor, weight: torch.Tensor | None, eps: float, heads: int,
                            freqs_cos: torch.Tensor | None, freqs_sin: torch.Tensor | None,
                            quant: str, token_block: int,
                            key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend.choose("qk_norm_rope", _norm_rope_candidates(x.device, x.dtype))
    if backend == "triton":
        from ..triton.qk_norm_rope import qk_norm_rope as kernel

        x = x if x.stride(-1) == 1 else x.contiguous()
        B, S, row = x.shape
        out = torch.empty((B, S, heads, row // heads), dtype=_DTYPE_OF[quant], device=x.device)
        scale = torch.empty((B, heads, -(-S // token_block)), dtype=torch.float32, device=x.device)
        kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
        kernel(x, weight, eps, heads, freqs_cos, freqs_sin, out, scale, token_block, kpm)
        return out, scale
    x8, scale = ref.qk_norm_rope_quantized(x, weight, eps, heads, freqs_cos, freqs_sin, quant, token_block,
                                           key_padding_mask)
    return x8.contiguous(), scale.contiguous()


@_qk_norm_rope_quantized.register_fake
def _(x, weight, eps, heads, freqs_cos, freqs_sin, quant, token_block, key_padding_mask):
    shape = (*x.shape[:2], heads, x.shape[2] // heads)
    return (x.new_empty(shape, dtype=_DTYPE_OF[quant]),
            x.new_empty((shape[0], heads, -(-shape[1] // token_block)), dtype=torch.float32))


def _kernel_reason(device, dtype, head_dim, v_head_dim):
    """None if vkern's attention kernel can take the call, else why not."""
    usable = _backend.triton_usable(device)
    if usable:
        return usable
    if device.type == "cuda" and dtype == torch.float32:
        return "float32 (its tensor-core products would be TF32; SDPA keeps fp32 accuracy)"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} (the kernel takes {HEAD_DIMS})"
    if v_head_dim != head_dim:
        return f"v's head dim {v_head_dim} differs from q's {head_dim}"
    return None if dtype in FLOATS else f"no {dtype} kernel"


def _hopper_ext_reason(device, entry):
    """None if vkern._C's `entry` (an sm_90a kernel) can run on `device`, else why not."""
    usable = _backend.cuda_ext_usable(device)
    if usable:
        return usable
    from .._ext import cuda_ext

    if not hasattr(cuda_ext(), entry):
        return f"vkern._C was built without {entry}"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return f"needs a Hopper GPU (sm_90), got sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    return None


def _cuda_kernel_reason(device, dtype, head_dim, v_head_dim, attn_mask):
    """None if the CUDA (sm_90a, wgmma) kernel, csrc/flash_attention.cu, can take the call, else why not."""
    usable = _hopper_ext_reason(device, "flash_attention_fwd")
    if usable:
        return usable
    from .._ext import cuda_ext

    if head_dim not in cuda_ext().flash_head_dims or v_head_dim != head_dim:
        return f"head dim {head_dim} (the CUDA kernel takes {cuda_ext().flash_head_dims})"
    if dtype not in HALF:
        return f"no {dtype} kernel"
    return "a general attn_mask (the CUDA kernel takes key_padding_mask)" if attn_mask else None


@_backend.register("attention")
def _attention_candidates(device, dtype, head_dim=128, v_head_dim=None, attn_mask=False, return_lse=False,
                          key_padding_mask=False, kv_len=None):
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    kernel = _kernel_reason(device, dtype, head_dim, v_head_dim)
    if kernel is None and attn_mask:
        kernel = "a general attn_mask (the kernel takes key_padding_mask)"
    cuda = _cuda_kernel_reason(device, dtype, head_dim, v_head_dim, attn_mask)
    sdpa = (f"needs a CUDA tensor (got {device.type})" if device.type != "cuda" else
            f"no {dtype} kernel" if dtype not in FLOATS else
            "return_lse (SDPA does not return it)" if return_lse else None)
    flash_attn = flash_attn_backend.reason(device, dtype, head_dim, v_head_dim, attn_mask or key_padding_mask, kv_len)
    order = (ATTENTION_PREFERENCE.get(head_dim, ("sdpa", "flash_attn", "triton", "cuda")) if device.type == "cuda" else
             ("reference", "triton", "sdpa", "cuda", "flash_attn"))
    if kv_len is not None and kv_len < CUDA_MIN_KEYS.get(head_dim, 0) and order[0] == "cuda":
        order = ("sdpa", "cuda") + tuple(n for n in order if n not in ("sdpa", "cuda"))
    reasons = {"triton": kernel, "sdpa": sdpa, "cuda": cuda, "flash_attn": flash_attn, "reference": None}
    return {**{name: reasons[name] for name in order}, "reference": None}


def _check_attention_inputs(q, k, v, key_padding_mask, scale, dtypes):
    check_tensor("q", q, dtypes=dtypes, ndim=4)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, dtypes=(q.dtype,), ndim=4, device=q.device)
    B, Sq, H, D = q.shape
    check_shape("k", k, (B, None, H, D))
    check_shape("v", v, (B, k.shape[1], H, None))
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), device=q.device)
        check_shape("key_padding_mask", key_padding_mask, (B, k.shape[1]))
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")


def attention(q, k, v, attn_mask=None, *, key_padding_mask=None, scale=None, return_lse=False, backend="auto"):
    """Non-causal softmax(scale * QK^T) V on [B, S, H, D] tensors (the layout diffusers' processors use;
    any strides). k and v may have another length than q (cross-attention, joint attention).
    attn_mask: bool (True = attend) or additive, broadcastable to [B, H, Sq, Skv] (SDPA semantics; vkern's
    kernel does not take it). key_padding_mask: bool [B, Skv], True = attend. scale: default 1/sqrt(D).
    Returns out [B, Sq, H, D] in q's dtype, or (out, lse) with return_lse: lse fp32 [B, H, Sq], the
    natural-log log-sum-exp of the scaled scores. A query with no key to attend gets out 0 and lse -inf.
    backend: "auto" (measured choice, or VKERN_ATTENTION_BACKEND), or one to prefer: "vkern" (vkern's own kernels:
    the CUDA one where it can take the call, else the Triton one), "cuda", "triton", "sdpa", "flash_attn" (flash-attn's
    package, when installed; unmasked calls) or "reference". A preferred backend runs when it can take the call, else
    the auto choice, with a one-time warning on CUDA tensors (on the CPU only the reference runs, unless
    TRITON_INTERPRET=1 lets the Triton kernel run, and that needs no warning)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend: expected one of {ATTENTION_BACKENDS}, got {backend!r}")
    _check_attention_inputs(q, k, v, key_padding_mask, scale, FLOATS_OR_F64)
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, dtypes=(torch.bool, q.dtype), device=q.device)
        if key_padding_mask is not None:
            raise ValueError("attn_mask, key_padding_mask: pass one or the other")
        if return_lse:
            raise ValueError("attn_mask, return_lse: the log-sum-exp comes with key_padding_mask (or no mask) only")
    out, lse = _attention(q, k, v, attn_mask, key_padding_mask, None if scale is None else float(scale),
                          bool(return_lse), backend)
    return (out, lse) if return_lse else out


@custom_op("vkern::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               key_padding_mask: torch.Tensor | None, scale: float | None,
               return_lse: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, Sq, H, D = q.shape
    candidates = _attention_candidates(q.device, q.dtype, D, v.shape[3], attn_mask is not None, return_lse,
                                       key_padding_mask is not None, k.shape[1])
    if backend != "auto" and not _backend.forced_backend("attention"):  # the caller's preference first
        # "vkern": the CUDA kernel where it can run, else the Triton one (no warning for that step)
        preferred = backend if backend != "vkern" else "cuda" if candidates["cuda"] is None else "triton"
        candidates = {preferred: candidates[preferred], **candidates}
    backend = _backend.choose("attention", candidates)
    no_lse = q.new_empty((0,), dtype=torch.float32)
    if backend in ("cuda", "triton", "flash_attn") and scale is not None and scale <= 0:
        q, scale = (-q, -scale) if scale < 0 else (torch.zeros_like(q), 1.0)  # kernels fold a positive scale
    if backend == "flash_attn":
        out, lse = flash_attn_backend.attention(q, k, v, scale, return_lse)
        return out, lse if return_lse else no_lse
    if backend == "cuda":
        out, lse = _cuda_attention(q, k, v, scale, return_lse, key_padding_mask)
        return out, lse if return_lse else no_lse
    if backend == "triton":
        from ..triton.attention import attention as kernel

        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out = torch.empty((B, Sq, H, v.shape[3]), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device) if return_lse else None
        kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
        kernel(q, k, v, out, lse, kpm, scale)
        return out, lse if return_lse else no_lse
    if backend == "sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mask = attn_mask if key_padding_mask is None else key_padding_mask[:, None, None, :]
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
        with sdpa_kernel(order, set_priority=True):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)
        if key_padding_mask is not None:  # SDPA gives NaN where a query has no key; the convention is 0
            out = out.masked_fill(~key_padding_mask.any(1)[:, None, None, None], 0)
        return out.contiguous(), no_lse
    if key_padding_mask is None and not return_lse and scale is None:
        return ref.attention(q, k, v, attn_mask).contiguous(), no_lse  # exactly diffusers' ops
    if attn_mask is not None:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, scale=scale).transpose(1, 2)
        return out.contiguous(), no_lse
    math = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = ref.attention_lse(q, k, v, key_padding_mask, scale, dtype=math)
    return out.to(q.dtype).contiguous(), lse.float() if return_lse else no_lse


def _tma_ready(t):
    """The CUDA kernel reads through TMA: 16-byte aligned base, head dim contiguous, other strides 16-byte
    multiples (a zero stride, e.g. k expanded over the batch, is copied)."""
    per_16_bytes = 16 // t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and
            all(st > 0 and st % per_16_bytes == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1))


def _env_int(name, default, allowed):
    """The integer setting `name` from the environment (default when unset); a clear error outside `allowed`."""
    value = os.environ.get(name, str(default))
    if value not in tuple(str(a) for a in allowed):
        raise ValueError(f"{name}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
    return int(value)


# The CUDA kernel's K/V ring depth with 128-key tiles (2 or 3; VKERN_FLASH_STAGES overrides, for benchmarks; the
# 176-key tile's is fixed per head dim: _flash_stages_for). Run 34: 3 stages 689 vs 641 TFLOP/s at wan1.3b-480p, 636 vs 631 at wan14b-720p.
FLASH_STAGES = 3


def _flash_stages():
    return _env_int("VKERN_FLASH_STAGES", FLASH_STAGES, (2, 3))


# The CUDA 16-bit kernel's key tile: 128 (three K/V stages), or a wide one from FLASH_WIDE_MIN_KEYS[head dim] keys,
# where auto takes the CUDA kernel: FLASH_WIDE_KEYS[head dim]. Head dim 128: 176 (FlashAttention-3's non-causal tile:
# two stages, as three do not fit in shared memory; its own tail split; session 31; with a key-padding mask since
# session 32). Run 115 (H200, queued TFLOP/s, 128 -> 176 tile) wan1.3b-480p 641-646 -> 661-665, wan14b-480p 631-632 ->
# 632-637, wan14b-720p 632-637 -> 646-648, hunyuan-720p 632-634 -> 649-650; at 512 keys (wan14b-480p-cross) 489-493 ->
# 480-483, so the 128 tile stays below. Head dim 64: 224 (three stages; session 33). Run 122: ltx-512p 436 -> 453-454,
# cogvideox-5b 441-446 -> 458-460 with 176; run 127, 176 -> 224: ltx-512p 452.7 / 452.6 -> 483.7 / 474.0, cogvideox-5b
# 433.7 / 443.6 -> 465.2 / 469.8. VKERN_FLASH_KEYS (128, 176, or 224 at head dim 64) forces one.
FLASH_WIDE_MIN_KEYS = CUDA_MIN_KEYS
FLASH_WIDE_KEYS = {64: 224, 128: 176}


def _flash_keys(head_dim, kv_len):
    forced = _env_int("VKERN_FLASH_KEYS", 0, (0, 128, 176, 224))  # (0: unset, the rule above)
    if forced == 224 and head_dim != 64:
        raise ValueError(f"VKERN_FLASH_KEYS=224: the 224-key tile is head dim 64's; head dim {head_dim} takes 128 or "
                         "176")
    wide = head_dim in FLASH_WIDE_MIN_KEYS and kv_len >= FLASH_WIDE_MIN_KEYS[head_dim]
    return forced or (FLASH_WIDE_KEYS[head_dim] if wide else 128)


def _flash_stages_for(keys, head_dim):
    """The K/V ring depth a launch with this key tile takes (the wide tiles: the extension's, per (keys, head dim):
    176 keys 2 at 128, where three do not fit in shared memory, 3 at 64; 224 keys at 64 only, 3;
    vkern._C.flash_wide_stages)."""
    if keys == 128:
        return _flash_stages()
    from .._ext import cuda_ext

    return cuda_ext().flash_wide_stages.get((keys, head_dim), 0)


# The last 16-bit CUDA attention launch's key tile (what tests and benchmark rows read).
last_flash_keys = 0


# The CUDA 8-bit kernel's key tile: 128 (each block's P V promoted to fp32 O with its V scale) or 192 (O in the
# tensor cores, each 64-key group's V scale folded into its P; session 20). VKERN_FLASH_FP8_KEYS overrides.
FLASH_FP8_KEYS = 128


def _flash_fp8_keys():
    return _env_int("VKERN_FLASH_FP8_KEYS", FLASH_FP8_KEYS, (128, 192))


# The int8 P/V kernel's schedule options (session 22; kernel alone at the four bench shapes, with each block's P V
# added to O after the next softmax, as the kernel now always does; run 84): all exponentials on MUFU.EX2, the
# consumers' products each when ready: 814-891 TFLOP/s; 2 of each 8 exponentials on the FMA pipe 786-852; in turns
# (as the 16-bit forms) 796-865; both 821-855. (Before that reordering, run 82, both had won: 794-842 against 754-810.)
# VKERN_FLASH_EXP_FMA (0 or 2) and VKERN_FLASH_FP8_TURNS (0, 1, or 2: in turns passed when a consumer's products are
# done, session 23: 806-860, 2-3% below the default in run 85) override, for benchmarks.
FLASH_EXP_FMA = 0
FLASH_FP8_TURNS = 0


def _flash_exp_fma():
    return _env_int("VKERN_FLASH_EXP_FMA", FLASH_EXP_FMA, (0, 2))


def _flash_fp8_turns():
    return _env_int("VKERN_FLASH_FP8_TURNS", FLASH_FP8_TURNS, (0, 1, 2))


# The int8 P/V kernel's rescale slack (session 24; log2 units, 0-8): the max O is kept against moves only when a
# block's row max passes it by more than this, so O's rescale (64 multiplies per thread) is rarely taken; P is against
# each block's own max either way, so the result is slack 0's up to fp32 rounding. Run 88 (kernel alone, TFLOP/s at
# wan1.3b-480p / wan14b-480p / wan14b-720p / hunyuan-720p): slack 8 824 / 864 / 877 / 877, slack 0 805 / 843 / 875 /
# 872. VKERN_FLASH_RESCALE_SLACK overrides, for benchmarks.
FLASH_RESCALE_SLACK = 8


def _flash_rescale_slack():
    return _env_int("VKERN_FLASH_RESCALE_SLACK", FLASH_RESCALE_SLACK, range(9))


# The CUDA kernel's tail split (session 27; csrc/flash_attention.cu, Split; the 16-bit forms and the int8 P/V form's
# default schedule): where the launch's last wave would leave more than half the SMs idle (wan1.3b-480p: 36 tiles on
# 132 SMs after 23 full waves), the last tiles' keys are split across the idle SMs and the parts merged in fp32 (the
# same result up to fp32 rounding). Runs 98-99, int8 P/V kernel alone at wan1.3b-480p: +2.3 to +3.1% (915 vs
# 888-894 TFLOP/s); at wan14b-720p (a tail of 12 tiles) +0.1%. VKERN_FLASH_TAIL_SPLIT=0 turns it off, for benchmarks.
FLASH_TAIL_SPLIT = 1


def _flash_tail_split():
    return _env_int("VKERN_FLASH_TAIL_SPLIT", FLASH_TAIL_SPLIT, (0, 1))


# The last CUDA attention launch's split workspace, in fp32 values (0: that launch was not split): what benchmark
# rows and tests read to know whether a call took the split.
last_tail_split_floats = 0


def _split_workspace(ext, device, batch, heads, q_len, kv_len, head_dim, eight_bit=False, int8_pv=False, exp_fma=0,
                     turns=0, stages=None, keys=128):
    """The fp32 scratch the kernel's tail split takes for this launch (shape and form, as the launch's arguments:
    the extension decides which forms split), or None where it is not split (or VKERN_FLASH_TAIL_SPLIT=0)."""
    global last_tail_split_floats
    floats = 0
    if _flash_tail_split():
        with torch.cuda.device(device):  # (the plan counts the SMs of the current device)
            floats = ext.flash_tail_split_floats(batch, heads, q_len, kv_len, head_dim,
                                                 _flash_stages() if stages is None else stages, eight_bit,
                                                 int8_pv, exp_fma, turns, keys)
    last_tail_split_floats = floats
    return torch.empty(floats, dtype=torch.float32, device=device) if floats else None


def key_padding_bits(key_padding_mask, keys=128):
    """The CUDA kernel's form of a key-padding mask with `keys`-key tiles: bool [B, Skv] -> uint8 [B, tiles *
    record], a record of ceil(keys / 128) * 16 bytes per tile (128: 16, the mask's bits in order; the 16-bit wide
    tile's 176: 32), bit c % 8 of its byte c / 8 set = attend the tile's key c (so, read as little-endian 32-bit
    words, bit c % 32 of word c / 32, as csrc/flash_attention.h describes); the keys past Skv and a record's bits
    past its tile are zero."""
    B, S = key_padding_mask.shape
    tiles, record = -(-S // keys), -(-keys // 128) * 128
    flat = key_padding_mask.new_zeros((B, tiles * keys), dtype=torch.int32)
    flat[:, :S] = key_padding_mask
    padded = F.pad(flat.view(B, tiles, keys), (0, record - keys))
    weights = 2 ** torch.arange(8, dtype=torch.int32, device=padded.device)  # made on the device: no host copy
    return (padded.view(B, -1, 8) * weights).sum(-1).to(torch.uint8)


def _cuda_attention(q, k, v, scale, return_lse, key_padding_mask=None):
    from .._ext import cuda_ext

    q, k, v = (t if _tma_ready(t) else t.contiguous() for t in (q, k, v))
    B, Sq, H, D = q.shape
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device) if return_lse else None
    global last_flash_keys
    keys = last_flash_keys = _flash_keys(D, k.shape[1])
    bits = None if key_padding_mask is None else key_padding_bits(key_padding_mask, keys)
    stages = _flash_stages_for(keys, D)
    split = _split_workspace(cuda_ext(), q.device, B, H, Sq, k.shape[1], D, stages=stages, keys=keys)
    with torch.cuda.device(q.device):
        cuda_ext().flash_attention_fwd(
            *((t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)) for t in (q, k, v, out)),
            0 if lse is None else lse.data_ptr(), 0 if bits is None else bits.data_ptr(), DTYPE_CODE[q.dtype], B,
            H, Sq, k.shape[1], D,
            D ** -0.5 if scale is None else scale, stages, torch.cuda.current_stream(q.device).cuda_stream,
            0 if split is None else split.data_ptr(), 0 if split is None else split.numel() * 4, keys)
    return out, lse


def _cuda_attention_fp8(q8, q_scale, k8, k_scale, vt, v_scale, v_offset, key_padding_mask, scale, return_lse,
                        out_dtype):
    from .._ext import cuda_ext

    q8, k8 = (t if _tma_ready(t) else t.contiguous() for t in (q8, k8))
    vt = vt if _tma_ready(vt) and vt.shape[3] % 16 == 0 else _pad_last(vt, 16)
    int8_pv = vt.dtype in (torch.int8, torch.uint8)
    if vt.dtype == torch.int8:  # the kernel multiplies u8 P by u8 V + 128 (v_to_8bit's "u8": no pass here) and takes
        vt = torch.bitwise_xor(vt.view(torch.uint8), 0x80)  # 128 sum(P) out itself
    B, Sq, H, D = q8.shape
    Skv = k8.shape[1]
    out = torch.empty((B, Sq, H, D), dtype=out_dtype, device=q8.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q8.device) if return_lse else None
    bits = None if key_padding_mask is None else key_padding_bits(key_padding_mask)
    exp_fma, turns = (_flash_exp_fma(), _flash_fp8_turns()) if int8_pv else (0, 0)
    split = _split_workspace(cuda_ext(), q8.device, B, H, Sq, Skv, D, True, int8_pv, exp_fma, turns)
    with torch.cuda.device(q8.device):
        cuda_ext().flash_attention_fp8_fwd(
            *((t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)) for t in (q8, k8)),
            (vt.data_ptr(), vt.stride(0), vt.stride(2), vt.stride(1)),  # V^T: (batch, head-dim row, head) strides
            (out.data_ptr(), out.stride(0), out.stride(1), out.stride(2)),
            0 if lse is None else lse.data_ptr(), 0 if bits is None else bits.data_ptr(), q_scale.data_ptr(),
            k_scale.data_ptr(), v_scale.data_ptr(), 0 if v_offset is None else v_offset.data_ptr(),
            DTYPE_CODE[out_dtype], B, H, Sq, Skv, vt.shape[3], D, D ** -0.5 if scale is None else scale,
            _flash_stages(), q8.dtype == torch.int8, int8_pv, _flash_fp8_keys(), exp_fma, turns,
            float(_flash_rescale_slack()) if int8_pv else 0.0,
            torch.cuda.current_stream(q8.device).cuda_stream, 0 if split is None else split.data_ptr(),
            0 if split is None else split.numel() * 4)
    return out, lse


def _pad_last(t, multiple):
    """A contiguous copy of t with its last dim zero-padded to a multiple of `multiple`."""
    n = -(-t.shape[-1] // multiple) * multiple
    padded = t.new_zeros((*t.shape[:-1], n))
    padded[..., :t.shape[-1]] = t
    return padded


@_attention.register_fake
def _(q, k, v, attn_mask, key_padding_mask, scale, return_lse, backend):
    B, Sq, H, _ = q.shape
    return q.new_empty((B, Sq, H, v.shape[3])), q.new_empty((B, H, Sq) if return_lse else (0,), dtype=torch.float32)


def _cuda_fp8_reason(device, dtype, head_dim, qk_dtype, v_dtype=torch.float8_e4m3fn, k_block=True):
    """None if the CUDA kernel's 8-bit forms (csrc/flash_attention.cu) can take an attention_8bit call, else why not.
    v_dtype: V's dtype: e4m3 (e4m3 P/V, with e4m3 or int8 Q/K), int8 (u8 P with int8 V, int8 Q/K only, where the
    build advertises it: vkern._C.flash_fp8_int8_pv) or a 16-bit dtype (no CUDA form). k_block: the K scales are per
    128-key block (k_to_8bit), not per key."""
    usable = _hopper_ext_reason(device, "flash_attention_fp8_fwd")
    if usable:
        return usable
    from .._ext import cuda_ext

    if head_dim != cuda_ext().flash_fp8_head_dim:
        return f"head dim {head_dim} (the CUDA fp8 kernel takes {cuda_ext().flash_fp8_head_dim})"
    if qk_dtype not in (torch.float8_e4m3fn, torch.int8) or v_dtype not in (torch.float8_e4m3fn, torch.int8):
        return ("the CUDA fp8 kernel takes e4m3 or int8 Q and K with e4m3 V (pv='e4m3'), or int8 Q, K and V "
                "(pv='int8')")
    if v_dtype == torch.int8:
        if qk_dtype != torch.int8:
            return "the CUDA fp8 kernel takes int8 P/V (pv='int8') with int8 Q/K only"
        if not getattr(cuda_ext(), "flash_fp8_int8_pv", False):
            return "this build of vkern._C has no int8 P/V form"
    if not k_block:
        return "per-key K scales (the CUDA fp8 kernel takes one per 128-key block: vkern.ops.k_to_8bit)"
    return None if dtype in HALF else f"no {dtype} output"


def _triton_fp8_reason(device, dtype, head_dim, v_dtype):
    """None if the Triton kernel can take an attention_8bit call with V in v_dtype, else why not."""
    usable = _kernel_reason(device, dtype, head_dim, head_dim)
    if usable is None and v_dtype == torch.int8:
        return "the Triton kernel takes e4m3 or 16-bit V"
    return usable


@_backend.register("attention_8bit")
def _attention_8bit_candidates(device, dtype, head_dim=128, qk_dtype=torch.float8_e4m3fn, v_dtype=torch.float8_e4m3fn,
                               k_block=True):
    """v_dtype: V's dtype as attention_prequantized gets it (e4m3 or int8 V^T, or bf16/fp16 V)."""
    return {"cuda": _cuda_fp8_reason(device, dtype, head_dim, qk_dtype, v_dtype, k_block),
            "triton": _triton_fp8_reason(device, dtype, head_dim, v_dtype), "reference": None}


def value_offset(v, key_padding_mask=None):
    """V's smoothing offset for v_to_8bit and attention_prequantized: the mean of V [B, S, H, D] over the keys
    key_padding_mask (bool [B, S], True = attend) keeps, fp32 [B, H, D] (vkern.reference.attention.value_offset).
    Any offset is exact in the math; the mean takes V's channel bias out of what is quantized to 8 bits. A span of V
    may take the offset of another (the chunked Wan block takes its first span's)."""
    check_tensor("v", v, dtypes=FLOATS, ndim=4)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), device=v.device)
        check_shape("key_padding_mask", key_padding_mask, (v.shape[0], v.shape[1]))
    return _value_offset(v, key_padding_mask)


# An op of its own so that torch.compile keeps its reduction order: a compiled graph then quantizes V - offset to
# the same codes as eager (any offset is exact in the math, not in the bits).
@custom_op("vkern::value_offset", mutates_args=())
def _value_offset(v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    return ref.value_offset(v, key_padding_mask)


@_value_offset.register_fake
def _(v, key_padding_mask):
    return v.new_empty((v.shape[0], v.shape[2], v.shape[3]), dtype=torch.float32)


def v_to_8bit(v, fmt, key_padding_mask=None, offset=None):
    """V [B, S, H, D] -> (8-bit (V - offset)^T [B, H, D, S_pad] in `fmt` (keys contiguous, S_pad = S rounded up to
    16, the keys of each 32-key group in the order of vkern.reference.attention.e4m3_key_order: the CUDA kernel's P
    fragment order; zero codes past S), fp32 scales [B, H, ceil(S / 128)]): one scale per (128-key block, head) =
    amax over the block's tokens and head dim * fp32(1/448) with saturating round-to-nearest-even codes (fmt "e4m3",
    for pv="e4m3"), or * fp32(1/127) with round-to-nearest-even codes clamped to +-127 (fmt "int8", for pv="int8";
    fmt "u8": the same codes + 128 as uint8, the form the int8/int8 CUDA kernel reads, so that it takes V without a
    conversion pass per call; attention_8bit and the Wan processor quantize to it) (reference.quantize_value). Per
    block, not per channel over all the keys, so V can be quantized a span of whole blocks at a time (the chunked Wan
    block never holds the whole bf16 V); e4m3 is a float format, so the coarser group costs no accuracy
    (bench/NOTES.md session 15). One pass over V (vkern/triton/attention.py _v_fp8_kernel) on GPUs.
    offset: fp32 [B, H, D] (value_offset; None: 0), subtracted before the quantization; give the same to
    attention_prequantized as v_offset.
    key_padding_mask: bool [B, S], True = attend; when given, the amax runs over the attended tokens only
    (a padded key's V, possibly huge garbage, cannot coarsen the scale; its own values saturate at the format's
    largest code and attention gives them weight 0). Pass the mask that attention_prequantized will get."""
    if fmt not in V_FORMATS:
        raise ValueError(f"fmt: expected 'e4m3', 'int8' or 'u8', got {fmt!r}")
    check_tensor("v", v, dtypes=FLOATS, ndim=4)
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), device=v.device)
        check_shape("key_padding_mask", key_padding_mask, (v.shape[0], v.shape[1]))
    if offset is not None:
        check_tensor("offset", offset, dtypes=(torch.float32,), device=v.device)
        check_shape("offset", offset, (v.shape[0], v.shape[2], v.shape[3]))
    return _v_to_8bit(v, key_padding_mask, offset, fmt)


def v_to_e4m3(v, key_padding_mask=None, offset=None):
    """v_to_8bit(v, "e4m3", key_padding_mask, offset): e4m3 (V - offset)^T with one scale per (128-key block, head),
    the V of pv="e4m3"."""
    return v_to_8bit(v, "e4m3", key_padding_mask, offset)


@custom_op("vkern::v_to_8bit", mutates_args=())
def _v_to_8bit(v: torch.Tensor, key_padding_mask: torch.Tensor | None, offset: torch.Tensor | None,
               fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, H, D = v.shape
    s_pad = -(-S // 16) * 16
    # The quantizer is one Triton kernel for both formats: it runs wherever the e4m3 attention forms' kernels do.
    backend = _backend.choose("attention_8bit", _attention_8bit_candidates(v.device, v.dtype, D))
    if backend in ("cuda", "triton"):  # the CUDA attention kernel takes the Triton quantizer's output
        from ..triton.attention import v_fp8_transposed

        return v_fp8_transposed(v if v.stride(-1) == 1 else v.contiguous(), s_pad,
                                None if offset is None else offset.contiguous(),
                                None if key_padding_mask is None else key_padding_mask.contiguous(), fmt)
    v8, scale = ref.quantize_value(v, key_padding_mask, offset, _PV_OF_V[fmt])
    vt = ref.e4m3_v_transposed(v8, s_pad)
    return (_offset_binary(vt) if fmt == "u8" else vt), scale


def _offset_binary(v8):
    """int8 codes <-> the same codes + 128 as uint8 (v_to_8bit's "u8"): the sign bit flipped, either way."""
    flipped = torch.bitwise_xor(v8.view(torch.uint8), 0x80)
    return flipped if v8.dtype == torch.int8 else flipped.view(torch.int8)


@_v_to_8bit.register_fake
def _(v, key_padding_mask, offset, fmt):
    B, S, H, D = v.shape
    return (v.new_empty((B, H, D, -(-S // 16) * 16), dtype=_V_DTYPE_OF[fmt]),
            v.new_empty((B, H, -(-S // ref.KEY_BLOCK)), dtype=torch.float32))


def attention_8bit(q, k, v, *, key_padding_mask=None, scale=None, return_lse=False, qk="int8", pv="bf16"):
    """8-bit attention (opt-in) on bf16/fp16 q, k, v [B, S, H, D] (float32: quantized the same way, computed by
    the reference emulation, as the prequantized op does for a float32 output): Q quantized per (token, head) to `qk`
    ("int8" or "e4m3"), K per (128-key block, head) (k_to_8bit) for e4m3 keys or an 8-bit pv, else per (token,
    head). pv: "bf16" keeps V and P in V's dtype; "e4m3" smooths V (value_offset), quantizes it per (128-key block,
    head) to e4m3 (v_to_8bit) and P to e4m3 for the P @ V product; "int8" smooths V and quantizes it per (128-key
    block, head) to int8, with P in u8 (0..255) against each 128-key block's row max and each block's P @ V summed
    exactly (vkern.reference.attention.attention_quantized; about half pv="e4m3"'s error; the CUDA kernel takes
    |V - mean| up to ~1e15, csrc/flash_attention.h). The CUDA kernel (Hopper,
    D = 128) runs the pv="e4m3" schemes and int8/int8 (qk="int8", pv="int8"), Triton int8/bf16, e4m3/bf16 and the
    pv="e4m3" schemes elsewhere; the reference runs every scheme (qk="e4m3" with pv="int8" only there). fp32
    accumulation and softmax. Accuracy per scheme: bench/NOTES.md. key_padding_mask: bool [B, Skv], True = attend;
    masked keys get weight 0 and do not enter V's (8-bit pv) or 8-bit K's block scales. Returns out in q's dtype
    (and lse as attention())."""
    _check_attention_inputs(q, k, v, key_padding_mask, scale, FLOATS)
    if qk not in ("int8", "e4m3") or pv not in PV_FORMATS:
        raise ValueError(f"qk, pv: expected qk in ('int8', 'e4m3') and pv in {PV_FORMATS}, got {qk!r}, {pv!r}")
    B, Sq, H, _ = q.shape
    if k.shape[1] == 0:  # no key to attend: out 0 and lse -inf, as attention() (no scales to compute)
        out = q.new_zeros((B, Sq, H, v.shape[3]))
        return (out, q.new_full((B, H, Sq), -torch.inf, dtype=torch.float32)) if return_lse else out
    q8, qs = qk_norm_rope(_heads_flat(q), None, 0.0, H, quant=qk)
    k8, ks = (k_to_8bit(k, qk, key_padding_mask) if ref.key_token_block(qk, pv) > 1
              else qk_norm_rope(_heads_flat(k), None, 0.0, H, quant=qk))
    v8bit = pv in ("e4m3", "int8")
    offset = value_offset(v, key_padding_mask) if v8bit else None
    fmt = "u8" if pv == "int8" else pv  # (the CUDA kernel's own V form)
    vq, vs = v_to_8bit(v, fmt, key_padding_mask, offset) if v8bit else (v, None)
    return attention_prequantized(q8, qs, k8, ks, vq, vs, key_padding_mask=key_padding_mask, scale=scale,
                                  return_lse=return_lse, out_dtype=q.dtype, v_offset=offset)


def attention_prequantized(q8, q_scale, k8, k_scale, v, v_scale=None, *, key_padding_mask=None, scale=None,
                           return_lse=False, out_dtype=torch.bfloat16, v_offset=None):
    """attention_8bit on inputs already quantized (by qk_norm_rope(..., quant=...), k_to_8bit and v_to_8bit,
    given the same key_padding_mask as here, so padded keys do not enter the scales): q8/k8 int8 or e4m3
    [B, S, H, D] with positive scales fp32 q_scale [B, H, Sq] (per token) and k_scale [B, H, Skv] (per key)
    or [B, H, ceil(Skv / 128)] (per 128-key block: the form the CUDA kernel takes; per-key scales run on
    Triton); v bf16/fp16 [B, Skv, H, D] (v_scale None; float32 runs the reference), or 8-bit V^T [B, H, D, S_pad] with v_scale fp32
    [B, H, ceil(Skv / 128)] (per 128-key block: v_to_8bit): e4m3 (e4m3 P/V, pv="e4m3") or int8 (u8 P with int8 V,
    pv="int8"; or uint8, v_to_8bit's "u8": the same codes + 128; the scheme follows V's dtype), with v_offset fp32
    [B, H, D] the offset v_to_8bit subtracted (None: none)."""
    if scale is not None and not scale > 0:
        raise ValueError(f"scale: the 8-bit kernel needs a positive softmax scale, got {scale}")
    check_tensor("q8", q8, dtypes=tuple(_DTYPE_OF.values()), ndim=4)
    check_tensor("k8", k8, dtypes=(q8.dtype,), ndim=4, device=q8.device)
    B, Sq, H, D = q8.shape
    check_shape("k8", k8, (B, None, H, D))
    Skv = k8.shape[1]
    for name, t in (("q_scale", q_scale), ("k_scale", k_scale)):
        check_tensor(name, t, dtypes=(torch.float32,), device=q8.device)
    check_shape("q_scale", q_scale, (B, H, Sq))
    if tuple(k_scale.shape) != (B, H, -(-Skv // ref.KEY_BLOCK)):
        check_shape("k_scale", k_scale, (B, H, Skv))
    if v_scale is None:
        if v.dtype in tuple(_V_DTYPE_OF.values()):
            raise ValueError(f"v_scale: 8-bit V ({v.dtype}) needs its per-key-block scales (v_to_8bit's), got None")
        check_tensor("v", v, dtypes=FLOATS, device=q8.device)  # (float32: the reference; the kernels take 16-bit)
        check_shape("v", v, (B, Skv, H, D))
    else:
        check_tensor("v", v, dtypes=tuple(_V_DTYPE_OF.values()), device=q8.device)
        check_shape("v", v, (B, H, D, None))
        if v.shape[3] < Skv:
            raise ValueError(f"v: 8-bit V^T needs at least {Skv} key columns, got {v.shape[3]}")
        check_tensor("v_scale", v_scale, dtypes=(torch.float32,), device=q8.device)
        check_shape("v_scale", v_scale, (B, H, -(-Skv // ref.KEY_BLOCK)))
    if v_offset is not None:
        if v_scale is None:
            raise ValueError("v_offset: only for 8-bit V (e4m3 or int8, v_to_8bit's offset); a 16-bit V is not "
                             "smoothed")
        check_tensor("v_offset", v_offset, dtypes=(torch.float32,), device=q8.device)
        check_shape("v_offset", v_offset, (B, H, D))
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,), device=q8.device)
        check_shape("key_padding_mask", key_padding_mask, (B, Skv))
    out, lse = _attention_prequantized(
        q8, q_scale.contiguous(), k8, k_scale.contiguous(), v, None if v_scale is None else v_scale.contiguous(),
        None if v_offset is None else v_offset.contiguous(), key_padding_mask, None if scale is None else float(scale),
        bool(return_lse), out_dtype)
    return (out, lse) if return_lse else out


@custom_op("vkern::attention_prequantized", mutates_args=())
def _attention_prequantized(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                            v: torch.Tensor, v_scale: torch.Tensor | None, v_offset: torch.Tensor | None,
                            key_padding_mask: torch.Tensor | None, scale: float | None, return_lse: bool,
                            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    B, Sq, H, D = q8.shape
    Skv = k8.shape[1]
    k_block = k_scale.shape[2] == -(-Skv // ref.KEY_BLOCK)
    v_kind = torch.int8 if v.dtype == torch.uint8 else v.dtype  # ("u8" V: the int8 scheme's, offset)
    backend = _backend.choose("attention_8bit", _attention_8bit_candidates(q8.device, out_dtype, D, q8.dtype, v_kind,
                                                                           k_block))
    no_lse = q8.new_empty((0,), dtype=torch.float32)
    if backend == "cuda":
        out, lse = _cuda_attention_fp8(q8, q_scale, k8, k_scale, v, v_scale, v_offset, key_padding_mask, scale,
                                       return_lse, out_dtype)
        return out, lse if return_lse else no_lse
    if backend == "triton":
        from ..triton.attention import attention as kernel

        q8, k8 = (t if t.stride(-1) == 1 else t.contiguous() for t in (q8, k8))
        v = v if v.stride(-1) == 1 else v.contiguous()
        out = torch.empty((B, Sq, H, D), dtype=out_dtype, device=q8.device)
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q8.device) if return_lse else None
        kpm = None if key_padding_mask is None else key_padding_mask.contiguous()
        k_scale = ref.key_scales_per_token(k_scale, Skv).contiguous()  # the Triton kernel reads one per key
        kernel(q8, k8, v, out, lse, kpm, scale, q_scale, k_scale, v_scale, v_offset=v_offset)
        return out, lse if return_lse else no_lse
    if v_scale is not None:  # 8-bit V^T (e4m3 or int8; "u8" back to int8) -> V [B, Skv, H, D]
        v = ref.e4m3_v_from_transposed(_offset_binary(v) if v.dtype == torch.uint8 else v, k8.shape[1])
    out, lse = ref.attention_quantized(q8, q_scale, k8, k_scale, v, v_scale, key_padding_mask, scale, out_dtype,
                                       v_offset)
    return out.contiguous(), lse if return_lse else no_lse


@_attention_prequantized.register_fake
def _(q8, q_scale, k8, k_scale, v, v_scale, v_offset, key_padding_mask, scale, return_lse, out_dtype):
    B, Sq, H, D = q8.shape
    return (q8.new_empty((B, Sq, H, D), dtype=out_dtype),
            q8.new_empty((B, H, Sq) if return_lse else (0,), dtype=torch.float32))
