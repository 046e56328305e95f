"""Helpers shared by vkern's Triton kernels."""
import os

import triton
import triton.language as tl


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def bench_without_flush(kernel_call, quantiles=None, reps=5):
    """An autotuner's do_bench (triton.autotune(do_bench=...)) that times kernel_call with CUDA events and no
    L2 flush. Triton's default allocates a 256 MB flush buffer per measurement, and that lands on the peak
    memory of the call that tunes: +208 MiB on the first small Wan VAE decode (520 -> 728 MiB, run 23).
    The tuned calls read more than L2 holds anyway (see the callers' SMALL_PROBLEM)."""
    import torch

    kernel_call()  # compile and warm up
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernel_call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times = torch.tensor(times)
    if quantiles is None:
        return times.median().item()
    return [torch.quantile(times, q).item() for q in quantiles]


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
    """fp32 -> e4m3, round to nearest even, saturating at +-448, NaN kept (csrc/fp8_quant.cu's
    cvt.rn.satfinite). With EMULATE the bit pattern is built by integer arithmetic and bitcast: exact on
    the GPU and in the interpreter (whose own cast truncates and mishandles subnormals, and Triton's GPU
    cast did not match the CUDA quantizer bit for bit: run 9). Without it, the hardware cast (for hot
    loops where exactness does not matter, such as P in attention)."""
    x = tl.where(x != x, x, tl.minimum(tl.maximum(x, -448.0), 448.0))
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        a = tl.abs(x)
        # Normals keep 3 of fp32's 23 mantissa bits (ties to even); below 2^-6 the step is 2^-9, and
        # adding and removing 2^14 rounds there in fp32; 8 * 2^-9 continues as the first normal code.
        normal = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000
        code = ((normal >> 23).to(tl.int32) - 120) * 8 + ((normal >> 20) & 7).to(tl.int32)
        sub = ((a + 16384.0) - 16384.0) * 512.0
        code = tl.where(a < 0.015625, sub.to(tl.int32), code)
        code = tl.where(x != x, 0x7F, code) + ((bits >> 31).to(tl.int32) << 7)
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


@triton.jit
def round_tf32(x, EMULATE: tl.constexpr):
    """fp32 x rounded to TF32 (10 mantissa bits, to nearest, ties away from zero: PTX cvt.rna.tf32.f32, as cuDNN's
    TF32 convs round their operands; wgmma alone truncates). EMULATE (the interpreter, which has no inline PTX): the
    same on the bits, as vkern.reference.causal_conv.round_to_tf32 (NaN stays NaN)."""
    if EMULATE:
        bits = (x.to(tl.int32, bitcast=True) + 0x1000) & ~0x1FFF
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
