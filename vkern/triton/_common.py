"""Helpers shared by vkern's Triton kernels."""
import os

import triton
import triton.language as tl


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """Cast fp32 x to `dtype`. The Triton 3.6 CPU interpreter truncates fp32 -> bf16 instead of
    rounding to nearest even (as the GPU does); with EMULATE_RNE (set when interpreting) the
    rounding is done on the bits first so both agree with torch exactly."""
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def to_e4m3(x, EMULATE: tl.constexpr):
    """fp32 -> e4m3 (round to nearest even, saturating at +-448, as the GPU's cvt.rn.satfinite does).
    The Triton 3.6 interpreter's conversion is wrong (ties, overflow, subnormals), so when EMULATE
    the e4m3 bit pattern is built here and bitcast."""
    x = tl.clamp(x, -448.0, 448.0)
    if EMULATE:
        a = tl.abs(x)
        bits = a.to(tl.uint32, bitcast=True)
        # Normal numbers: keep 3 of fp32's 23 mantissa bits, ties to even.
        rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
        normal = (((rounded >> 23) & 0xFF) - 120) << 3 | ((rounded >> 20) & 7)
        # Subnormals (below 2^-6): multiples of 2^-9; 8 * 2^-9 continues as the first normal code.
        r = a * 512.0
        f = tl.floor(r)
        d = r - f
        odd = (f.to(tl.int32) & 1) == 1
        sub = (f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)).to(tl.uint32)
        code = tl.where(a < 0.015625, sub, normal) | ((x.to(tl.uint32, bitcast=True) >> 24) & 0x80)
        return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def to_int8(x):
    """fp32 (already divided by its scale) -> int8, round to nearest even, saturating at +-127. Written out
    (floor and a tie rule) so the GPU and the interpreter round alike."""
    x = tl.clamp(x, -127.0, 127.0)
    f = tl.floor(x)
    d = x - f
    odd = (f.to(tl.int32) & 1) == 1
    return (f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)).to(tl.int8)
