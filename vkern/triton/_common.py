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
