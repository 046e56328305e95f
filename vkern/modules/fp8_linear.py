"""Fp8Linear: a drop-in for nn.Linear that stores its weight in fp8 e4m3 with per-output-channel fp32
scales (half the bytes of bf16) and computes in one of two modes:

    storage   dequantize to the activation dtype in a transient buffer, then the bf16 GEMM (cuBLAS)
    compute   quantize activations per token, fp8 x fp8 GEMM on the tensor cores (sm_89+, bf16 only)

State-dict keys are the Linear's (`weight` now e4m3) plus `weight_scale`, so a patched model's
state dict is a pre-quantized checkpoint that loads into another patched model.

Pre-quantized input: in compute mode the layer also accepts an Fp8Activation (e4m3 data + per-token
scales, made by a fused producer such as the Wan block's LayerNorm+modulate kernel) in place of the
tensor and skips its own quantization pass; the result is bit-identical to passing the activation
in its own dtype. The producer decides to emit one only when every consumer takes it
(takes_fp8_input); any other module given one fails loudly (it is not a Tensor).
"""
import warnings
from typing import NamedTuple

import torch
from torch import nn

from .. import ops
from ._hooks import hooked

MODES = ("storage", "compute")
_warned = set()


class Fp8Activation(NamedTuple):
    """An activation quantized per token: data e4m3 [..., K], scale fp32 [..., 1] (data.float() * scale
    ~= the activation), dtype: the activation's own dtype, which the consuming layer outputs. As
    ops.fp8_quantize(x, "row") returns it, or a fused kernel (ops.layernorm_modulate(..., fp8=True),
    ops.block_glue.gelu_tanh_fp8)."""
    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self):
        return self.data.shape

    @property
    def device(self):
        return self.data.device

    def dequantize(self):
        return ops.fp8_dequantize(self.data, self.scale, self.dtype)


class Fp8Linear(nn.Module):
    def __init__(self, q_weight, weight_scale, bias=None, mode="storage", fast_accum=True, param_dtype=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.mode = mode
        self.fast_accum = fast_accum
        # False: fused producers keep handing this layer activations in their own dtype (for A/B
        # measurements of the fused quantization; numerically the same either way).
        self.accept_prequantized = True
        self.out_features, self.in_features = q_weight.shape
        self.register_buffer("weight", q_weight)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = bias  # the original Linear's Parameter (shared, not copied)
        # The dtype a bf16/fp32 weight of this layer would have now: the original's, then whatever model.to(dtype)
        # casts since (undo gives the original weight back in it).
        self.param_dtype = param_dtype or (bias.dtype if bias is not None else torch.float32)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear, mode="storage", name="linear", fast_accum=True):
        """Quantize linear's weight (vkern's CUDA kernel when it is on a GPU). NaN/Inf in the weight
        is an error: it would poison every output of that layer."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"{name}: expected a torch.nn.Linear, got {type(linear).__name__}")
        q, scale = ops.fp8_quantize(linear.weight, "row")
        bad = ~torch.isfinite(scale.squeeze(1))
        if bad.any():
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(f"{name}: weight has NaN or Inf values (output channels {rows}...); refusing to quantize")
        return cls(q, scale, linear.bias, mode, fast_accum, param_dtype=linear.weight.dtype)

    @property
    def accepts_fp8_input(self):
        """True when forward takes an Fp8Activation without dequantizing it (compute mode, dimensions
        that the fp8 GEMM supports)."""
        return (self.accept_prequantized and self.mode == "compute" and self.in_features % 16 == 0
                and self.out_features % 16 == 0)

    def forward(self, x):
        if isinstance(x, Fp8Activation):
            if self.accepts_fp8_input:
                return ops.fp8.fp8_linear_prequantized(x.data, x.scale, self.weight, self.weight_scale, self.bias,
                                                       self.fast_accum, x.dtype)
            x = x.dequantize()  # correct, not fast: producers check accepts_fp8_input first
        if self.mode == "compute":
            if self.in_features % 16 == 0 and self.out_features % 16 == 0:
                # torch._scaled_mm on an fp8 GPU with bf16 activations; otherwise the op's reference
                # emulates the same numerics (slow, for CPU tests and odd dtypes).
                return ops.fp8_linear_compute(x, self.weight, self.weight_scale, self.bias, self.fast_accum)
            _note_fallback(self)
        return ops.fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not re-type the e4m3 weight or its fp32 scales: only device moves
        # apply to them (the bias follows the model like any parameter).
        weight, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.param_dtype, device=weight.device))
        self.weight, self.weight_scale = weight.to(probe.device), scale.to(probe.device)
        self.param_dtype = probe.dtype
        return self

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"mode={self.mode!r}, weight=float8_e4m3fn per-channel"


def _note_fallback(layer):
    key = (layer.in_features, layer.out_features)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"vkern Fp8Linear: fp8 compute needs in/out features that are multiples of 16 (got "
                      f"{layer.in_features}x{layer.out_features}); these layers use the storage-mode path", stacklevel=3)


def takes_fp8_input(module):
    """True when `module` can be called with an Fp8Activation and uses it as is: an Fp8Linear in
    compute mode with supported dimensions and no hooks that would see the activation."""
    return (type(module) is Fp8Linear and module.accepts_fp8_input
            and not hooked(module))
