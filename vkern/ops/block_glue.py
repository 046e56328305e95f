"""The DiT block's elementwise glue, fused: LayerNorm (or RMSNorm) + adaLN modulate, and gate + residual.

Backends: triton (vkern/triton/block_glue.py), reference (vkern/reference/block_glue.py, the spec:
diffusers' WanTransformerBlock expressions, and with native_dtypes=True LTXVideoTransformerBlock's).
Inference only (no autograd formulas).

gate_residual comes in two forms, like torch's add/add_: a functional op, and an in-place one
declared as mutating x (the fused block updates its own hidden states chunk by chunk through it, so
the FFN output is added without a second [tokens, dim] buffer; torch.compile functionalizes it).
rms_gate_residual(_) is Mochi's residual, x + RMSNorm(y) * gate: the same kernel with y normalized first.

For fp8 compute mode, layernorm_modulate(..., fp8=True) and gelu_tanh_fp8 return (e4m3, per-token
fp32 scale) instead of x's dtype: the per-token quantization of the following fp8 GEMMs done in the
same pass (numerics: vkern/reference/block_glue.py).
"""
import torch

from ..reference import block_glue as ref
from ..reference.fp8 import E4M3
from . import _backend
from ._checks import FLOATS, FLOATS_OR_F64, PassedChecks, check_shape, check_tensor, signature
from ._custom_op import custom_op


def _candidates(device, dtype):
    return {"triton": _backend.triton_usable(device) or (None if dtype in FLOATS else f"no {dtype} kernel"),
            "reference": None}


def _choose(op, x, *others):
    # float64 anywhere (rare): the reference, which follows diffusers' type promotion exactly; the
    # kernels compute in fp32. (A loop: a generator expression here cost more than the rest of the choice.)
    dtype = x.dtype
    for t in others:
        if t is not None and t.dtype == torch.float64:
            dtype = torch.float64
            break
    return _backend.choose(op, _candidates(x.device, dtype))


_backend.register("layernorm_modulate")(_candidates)
_backend.register("gate_residual")(_candidates)
_backend.register("gelu_tanh_fp8")(_candidates)


def _check_x(x):
    check_tensor("x", x, dtypes=FLOATS_OR_F64, ndim=3)


def _check_row(name, t, x):
    """A [D] vector (LayerNorm weight/bias, a scale_shift_table row)."""
    if t is not None:
        check_tensor(name, t, dtypes=FLOATS_OR_F64, device=x.device)
        check_shape(name, t, (x.shape[2],))


def _check_modulation(name, t, x):
    """A temb chunk [B|1, S|1, D], broadcast over x [B, S, D]."""
    check_tensor(name, t, dtypes=FLOATS_OR_F64, ndim=3, device=x.device)
    B, S, D = x.shape
    if t.shape[0] not in (1, B) or t.shape[1] not in (1, S) or t.shape[2] != D:
        raise ValueError(f"{name}: expected shape (1 or {B}, 1 or {S}, {D}) to broadcast over x {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")


_NORM_PASSED = PassedChecks()


def _check_layernorm_modulate(x, shift, scale, eps, weight, bias, shift_table, scale_table, fp8, rms, native_dtypes):
    _check_x(x)
    if shift is not None and scale is None:
        raise ValueError("shift: given without scale (pass both, scale alone, or neither)")
    if (shift_table is not None and shift is None) or (scale_table is not None and scale is None):
        raise ValueError("shift_table, scale_table: each needs its temb chunk (shift, scale)")
    if shift is not None and (shift_table is None) != (scale_table is None):
        raise ValueError("shift_table, scale_table: pass both or neither")
    if scale is not None:
        _check_modulation("scale", scale, x)
    if shift is not None:
        _check_modulation("shift", shift, x)
        if shift.shape != scale.shape:
            raise ValueError(f"shift, scale: expected the same shape, got {tuple(shift.shape)} and "
                             f"{tuple(scale.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("shift_table", shift_table), ("scale_table", scale_table)):
        _check_row(name, t, x)
    _check_eps(eps)
    if native_dtypes and shift is not None and (shift.dtype != scale.dtype or (
            shift_table is not None and shift_table.dtype != scale_table.dtype)):
        raise TypeError("shift, scale: native_dtypes=True needs them (and their tables) in one dtype, got "
                        f"{shift.dtype} / {scale.dtype}" + ("" if shift_table is None else
                                                            f" and {shift_table.dtype} / {scale_table.dtype}"))
    if rms and native_dtypes and (weight is not None or bias is not None):
        raise ValueError("weight, bias: not supported with rms=True and native_dtypes=True (diffusers' RMSNorm "
                         "rounds to the weight's dtype before applying it; only the RMSNorm without affine is fused)")
    if fp8 and x.dtype == torch.float64:
        raise TypeError("x: fp8=True needs a float32, float16 or bfloat16 x, got torch.float64")


def layernorm_modulate(x, shift, scale, eps, weight=None, bias=None, shift_table=None, scale_table=None, fp8=False,
                       rms=False, native_dtypes=False):
    """diffusers' (FP32LayerNorm(x.float()) * (1 + scale) + shift).type_as(x) on x [B, S, D].

    shift, scale: temb chunks [B|1, S|1, D] (Wan 2.1: [B, 1, D]; Wan 2.2 per-token: [B, S, D]), any
    float dtype, or both None for a plain LayerNorm (norm2), or shift None for norm(x) * (1 + scale) (Mochi's
    MochiRMSNormZero and MochiModulatedRMSNorm, with rms=True). shift_table, scale_table: the matching
    scale_shift_table rows [D], added in fp32 (diffusers' table + temb.float()), or None.
    weight, bias: the LayerNorm's affine [D] or None. Returns a contiguous tensor in x's dtype, or with
    fp8=True that tensor quantized per token as vkern.ops.fp8_quantize(result, "row") would, in the same
    pass: (e4m3 [B, S, D], fp32 scales [B, S, 1]), the input of fp8 compute-mode Linears.
    rms: RMSNorm (x * rsqrt(mean(x^2) + eps), diffusers' RMSNorm) instead of LayerNorm.
    native_dtypes: diffusers' expression in the tensors' own dtypes, each op rounded as eager PyTorch rounds
    it (LTX-Video's blocks: RMSNorm(x) * (1 + table + temb) + (table + temb), bf16 throughout); the result
    has the dtype eager PyTorch gives it. With rms, no weight or bias (diffusers' RMSNorm with an affine
    weight rounds once more; LTX-Video's has none)."""
    key = signature(x, shift, scale, eps, weight, bias, shift_table, scale_table, fp8, rms, native_dtypes)
    if key not in _NORM_PASSED:
        _check_layernorm_modulate(x, shift, scale, eps, weight, bias, shift_table, scale_table, fp8, rms,
                                  native_dtypes)
        _NORM_PASSED.add(key)
    rms, native = bool(rms), bool(native_dtypes)
    if fp8:
        return _layernorm_modulate_fp8(x, shift, scale, float(eps), weight, bias, shift_table, scale_table, rms,
                                       native)
    return _layernorm_modulate(x, shift, scale, float(eps), weight, bias, shift_table, scale_table, rms, native)


def gelu_tanh_fp8(h):
    """diffusers' tanh GELU (F.gelu(h, approximate="tanh"), in h's dtype) quantized per row in the same
    pass: (e4m3 [..., N], fp32 scales [..., 1]) = vkern.ops.fp8_quantize(F.gelu(h, "tanh"), "row") up to
    the last ulp of tanh. h: [..., N] float16/bfloat16/float32 (the FFN's up-projection output)."""
    check_tensor("h", h, dtypes=FLOATS)
    if h.dim() == 0:
        raise ValueError("h: expected shape (..., features), got a 0-dim tensor")
    return _gelu_tanh_fp8(h)


_GATE_PASSED = PassedChecks()


def _check_gate_residual(x, y, gate, gate_table):
    _check_x(x)
    check_tensor("y", y, dtypes=FLOATS_OR_F64, device=x.device)
    check_shape("y", y, tuple(x.shape))
    _check_modulation("gate", gate, x)
    _check_row("gate_table", gate_table, x)


def gate_residual(x, y, gate, gate_table=None, native_dtypes=False):
    """diffusers' (x.float() + y.float() * gate).type_as(x) on x, y [B, S, D] with gate a temb chunk
    [B|1, S|1, D] (+ its scale_shift_table row gate_table [D], added in fp32). Returns a new
    contiguous tensor in x's dtype. native_dtypes: x + y * (gate_table + gate) in their own dtypes, each op
    rounded as eager PyTorch rounds it (LTX-Video), in the dtype eager PyTorch gives it."""
    key = signature(x, y, gate, gate_table, "new", native_dtypes)  # (each form its own signature: its own checks)
    if key not in _GATE_PASSED:
        _check_gate_residual(x, y, gate, gate_table)
        _GATE_PASSED.add(key)
    return _gate_residual(x, y, gate, gate_table, bool(native_dtypes), None)


def gate_residual_(x, y, gate, gate_table=None, native_dtypes=False):
    """gate_residual written into x (any strides, e.g. a token slice of the hidden states); returns x. With
    native_dtypes the result's dtype must be x's."""
    key = signature(x, y, gate, gate_table, "in place", native_dtypes)
    if key not in _GATE_PASSED:
        _check_gate_residual(x, y, gate, gate_table)
        if native_dtypes and gate_rounding(x, y, gate, gate_table, True)[2] != x.dtype:
            raise TypeError(f"x: the result is {gate_rounding(x, y, gate, gate_table, True)[2]}, x is {x.dtype}: "
                            "it cannot be written in place (use gate_residual)")
        _GATE_PASSED.add(key)
    _gate_residual_inplace(x, y, gate, gate_table, bool(native_dtypes), None)
    return x


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")


def rms_gate_residual(x, y, gate, eps):
    """Mochi's residual, x + MochiModulatedRMSNorm(eps)(y, gate): x + (RMSNorm(y.float()) * gate).to(y.dtype), in
    eager PyTorch's dtypes (the sum in x and y's promoted dtype). x, y [B, S, D]; gate [B|1, S|1, D] (Mochi passes
    tanh(gate chunk)[:, None]). Returns a new contiguous tensor."""
    key = signature(x, y, gate, None, "rms new", eps)
    if key not in _GATE_PASSED:
        _check_gate_residual(x, y, gate, None)
        _check_eps(eps)
        _GATE_PASSED.add(key)
    return _gate_residual(x, y, gate, None, True, float(eps))


def rms_gate_residual_(x, y, gate, eps):
    """rms_gate_residual written into x; returns x. The result's dtype must be x's."""
    key = signature(x, y, gate, None, "rms in place", eps)
    if key not in _GATE_PASSED:
        _check_gate_residual(x, y, gate, None)
        _check_eps(eps)
        out_dtype = gate_rounding(x, y, gate, None, True, eps)[2]
        if out_dtype != x.dtype:
            raise TypeError(f"x: the result is {out_dtype}, x is {x.dtype}: it cannot be written in place "
                            "(use rms_gate_residual)")
        _GATE_PASSED.add(key)
    _gate_residual_inplace(x, y, gate, None, True, float(eps))
    return x


# --- the dtypes each step rounds to ----------------------------------------------------------------

def _dtype(t):
    return None if t is None else t.dtype


def _memo(rule):
    """rule(*dtypes and flags) memoized: the ops ask on every call, for a handful of dtype combinations."""
    memo = {}

    def rounding(*key):
        found = memo.get(key)
        if found is None:
            found = memo[key] = rule(*key)
        return found
    return rounding


@_memo
def _norm_rounding(x, t, table, native):
    if not native:
        return torch.float32, torch.float32, torch.float32, x
    if t is None:
        return x, x, x, x
    mod = t if table is None else torch.promote_types(table, t)
    act = torch.promote_types(x, mod)
    return x, mod, act, act


def norm_rounding(x, t, table, native):
    """(norm output, modulation, product, result) dtypes of layernorm_modulate; t: the scale chunk or None.
    Wan's form computes in fp32 and rounds once to x's dtype."""
    return _norm_rounding(x.dtype, _dtype(t), _dtype(table), bool(native))


@_memo
def _gate_rounding(x, y, gate, table, native, rms_y):
    if rms_y:
        return torch.float32, y, torch.promote_types(x, y)
    if not native:
        return torch.float32, torch.float32, x
    mod = gate if table is None else torch.promote_types(table, gate)
    prod = torch.promote_types(y, mod)
    return mod, prod, torch.promote_types(x, prod)


def gate_rounding(x, y, gate, table, native, y_rms_eps=None):
    """(modulation, product, result) dtypes of gate_residual; with y_rms_eps, rms_gate_residual's (Mochi's: the
    normalized product in fp32, rounded to y's dtype)."""
    return _gate_rounding(x.dtype, y.dtype, gate.dtype, _dtype(table), bool(native), y_rms_eps is not None)


# --- custom ops ------------------------------------------------------------------------------------

def _unit_last(t):
    # The kernels address rows with unit stride along D (16-byte vectors); anything else is copied once.
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _contiguous(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def _norm_args(x, shift, scale, weight, bias, shift_table, scale_table):
    """The kernel's operands: unit last strides, shift and scale with one stride pair, [D] rows contiguous."""
    x, shift, scale = _unit_last(x), _unit_last(shift), _unit_last(scale)
    if shift is not None and shift.stride() != scale.stride():  # the kernel indexes both with one stride pair
        shift, scale = shift.contiguous(), scale.contiguous()
    return (x, shift, scale, _contiguous(weight), _contiguous(bias), _contiguous(shift_table),
            _contiguous(scale_table))


@custom_op("vkern::layernorm_modulate", mutates_args=())
def _layernorm_modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float,
                        weight: torch.Tensor | None, bias: torch.Tensor | None, shift_table: torch.Tensor | None,
                        scale_table: torch.Tensor | None, rms: bool, native: bool) -> torch.Tensor:
    backend = _choose("layernorm_modulate", x, shift, scale, weight, bias, shift_table, scale_table)
    if backend == "reference" or x.numel() == 0:
        return ref.layernorm_modulate(x, shift, scale, eps, weight, bias, shift_table, scale_table, rms,
                                      native).contiguous()
    from ..triton.block_glue import layernorm_modulate as kernel

    rounding = norm_rounding(x, scale, scale_table, native)
    x, shift, scale, *rows = _norm_args(x, shift, scale, weight, bias, shift_table, scale_table)
    return kernel(x, shift, scale, eps, *rows, torch.empty(x.shape, dtype=rounding[3], device=x.device), rounding, rms)


@_layernorm_modulate.register_fake
def _(x, shift, scale, eps, weight, bias, shift_table, scale_table, rms, native):
    return x.new_empty(x.shape, dtype=norm_rounding(x, scale, scale_table, native)[3])


def _gate_residual_into(x, y, gate, gate_table, out, native, y_rms_eps):
    from ..triton.block_glue import gate_residual as kernel

    rounding = gate_rounding(x, y, gate, gate_table, native, y_rms_eps)
    gate_table = _contiguous(gate_table)
    return kernel(_unit_last(x), _unit_last(y), _unit_last(gate), gate_table, out, rounding, y_rms_eps)


def _gate_residual_ref(x, y, gate, gate_table, native, y_rms_eps):
    if y_rms_eps is not None:
        return ref.rms_gate_residual(x, y, gate, y_rms_eps)
    return ref.gate_residual(x, y, gate, gate_table, native)


# y_rms_eps: None for gate_residual, the eps for rms_gate_residual (Mochi's: y RMS-normalized first)
@custom_op("vkern::gate_residual", mutates_args=())
def _gate_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, gate_table: torch.Tensor | None,
                   native: bool, y_rms_eps: float | None) -> torch.Tensor:
    backend = _choose("gate_residual", x, y, gate, gate_table)
    if backend == "reference" or x.numel() == 0:
        return _gate_residual_ref(x, y, gate, gate_table, native, y_rms_eps).contiguous()
    out_dtype = gate_rounding(x, y, gate, gate_table, native, y_rms_eps)[2]
    return _gate_residual_into(x, y, gate, gate_table, torch.empty(x.shape, dtype=out_dtype, device=x.device), native,
                               y_rms_eps)


@_gate_residual.register_fake
def _(x, y, gate, gate_table, native, y_rms_eps):
    return x.new_empty(x.shape, dtype=gate_rounding(x, y, gate, gate_table, native, y_rms_eps)[2])


@custom_op("vkern::gate_residual_inplace", mutates_args=("x",))
def _gate_residual_inplace(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, gate_table: torch.Tensor | None,
                           native: bool, y_rms_eps: float | None) -> None:
    backend = _choose("gate_residual", x, y, gate, gate_table)
    if backend == "reference" or x.numel() == 0:
        x.copy_(_gate_residual_ref(x, y, gate, gate_table, native, y_rms_eps))
    elif x.stride(-1) != 1:  # rows the kernel cannot address: compute aside, then copy in
        x.copy_(_gate_residual_into(x, y, gate, gate_table, torch.empty(x.shape, dtype=x.dtype, device=x.device),
                                    native, y_rms_eps))
    else:
        _gate_residual_into(x, y, gate, gate_table, x, native, y_rms_eps)


@_gate_residual_inplace.register_fake
def _(x, y, gate, gate_table, native, y_rms_eps):
    return None


def _fp8_outputs(x):
    return (torch.empty(x.shape, dtype=E4M3, device=x.device),
            torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device))


@custom_op("vkern::layernorm_modulate_fp8", mutates_args=())
def _layernorm_modulate_fp8(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float,
                            weight: torch.Tensor | None, bias: torch.Tensor | None, shift_table: torch.Tensor | None,
                            scale_table: torch.Tensor | None, rms: bool,
                            native: bool) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _choose("layernorm_modulate", x, shift, scale, weight, bias, shift_table, scale_table)
    if backend == "reference" or x.numel() == 0:
        q, s = ref.layernorm_modulate_fp8(x, shift, scale, eps, weight, bias, shift_table, scale_table, rms, native)
        return q.contiguous(), s.contiguous()
    from ..triton.block_glue import layernorm_modulate as kernel

    rounding = norm_rounding(x, scale, scale_table, native)
    x, shift, scale, *rows = _norm_args(x, shift, scale, weight, bias, shift_table, scale_table)
    q, s = _fp8_outputs(x)
    kernel(x, shift, scale, eps, *rows, q, rounding, rms, q_scale=s)
    return q, s


@_layernorm_modulate_fp8.register_fake
def _(x, shift, scale, eps, weight, bias, shift_table, scale_table, rms, native):
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@custom_op("vkern::gelu_tanh_fp8", mutates_args=())
def _gelu_tanh_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend.choose("gelu_tanh_fp8", _candidates(h.device, h.dtype))
    if backend == "reference" or h.numel() == 0:
        q, s = ref.gelu_tanh_fp8(h)
        return q.contiguous(), s.contiguous()
    from ..triton.block_glue import gelu_tanh_fp8 as kernel

    q, s = _fp8_outputs(h)
    h2 = (h if h.stride(-1) == 1 else h.contiguous()).reshape(-1, h.shape[-1])  # a view for row-strided h
    kernel(h2, q.view(-1, h.shape[-1]), s.view(-1, 1))
    return q, s


@_gelu_tanh_fp8.register_fake
def _(h):
    return h.new_empty(h.shape, dtype=E4M3), h.new_empty((*h.shape[:-1], 1), dtype=torch.float32)
