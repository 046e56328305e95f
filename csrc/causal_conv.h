// vkern's causal 3D convolution for Hopper (sm_90a): channels-last, zeros padding, stride 1, a 3 x 3 spatial
// kernel, cached frames read in place. Framework-free: raw pointers, sizes, strides and a stream.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "fp8_quant.h"  // DType

namespace vkern {

// A [B, C, T, H, W] tensor whose pixels hold C contiguous channels: element (b, c, t, h, w) at
// ptr + b * batch_stride + t * frame_stride + h * row_stride + w * pixel_stride + c. Strides in elements, multiples
// of 8. frame_stride may be negative (a cache stored newest frame first) or the distance between two frames of
// different tensors (a 2-frame cache whose frames were never copied together). pixel_stride is C except for an
// input whose pixels interleave frames (a time-upsampling conv's output: 2 frames per pixel row, 2C apart).
struct ConvTensor {
  const void* ptr;
  int64_t batch_stride, frame_stride, row_stride, pixel_stride;
};

// An RMS norm over each output pixel's channels (diffusers' WanRMS_norm: y = v / max(||v||, eps) * scale * gamma
// (+ beta)), then SiLU when silu. gamma null: no norm. Needs out_channels == block_n (one tile holds a pixel's
// channels). gamma, beta: out_channels fp32 values (gamma 8-byte aligned).
// normed.ptr null: the norm applies to the conv's output + bias + residual before the one rounding, and out holds
// the result. Else out holds conv + bias + residual (rounded) and normed (laid out as out) the norm of those rounded
// values: the next residual block's norm1 of this block's output, as a norm pass over out would give.
// tf32 (fp32 only): the norm's result stored rounded to TF32 (cvt.rna, ties away from zero), the operand a next conv
// with TF32 products reads as it is: the values stored without tf32, each rounded (rms_norm_silu(..., tf32=True)'s).
struct ConvNorm {
  const float* gamma;
  const float* beta;  // may be null
  float scale, eps;
  bool silu;
  ConvTensor normed;
  bool tf32;
};

// The output-channel tiles the kernel has (out_channels must be a multiple of one of them; 8 is for convs with
// few output channels, e.g. a VAE's RGB output padded to 8: then out_channels 8, kt 3 and the packed weight at most
// kConvNarrowWeightBytes, which the kernel keeps in shared memory whole).
constexpr int kConvBlockNs[] = {8, 96, 128};
constexpr int kConvNarrowWeightBytes = 120 * 1024;

// out [B, O, To, Ho, Wo] (pixels rows of O channels) = the causal conv of x [B, C, T, H, W] (the chunk) with
// weight_packed (vkern.ops.causal_conv.cuda_packed_weight: [O / block_n, KT, C / 32, 9, 4, block_n, 8]; in fp32
// [O / block_n, KT, C / 16, 9, 4, block_n, 4]), plus bias [O] (fp32, 8-byte aligned; may be null), plus residual
// (laid out as out; ptr may be null), then norm (see ConvNorm), in dtype, fp32 accumulation, rounded once. dtype:
// bf16 or fp16, or fp32 with TF32 products, which read the top 19 bits of each operand: x, the cache and the weight
// stored rounded to TF32 give round-to-nearest operands (cuDNN's). upsample 2: x (and the cache) nearest-upsampled
// 2x in space on the fly (the conv's input is 2H x 2W; height and width are x's own), 1: as it is.
// Time: output frame t reads padded frames t ... t + KT - 1 of [tp padding frames | x]; padded frame tp + s is
// x's frame s for s >= 0, cache frame cache_frames + s (cache: logical frames 0 ... cache_frames - 1, oldest
// first) for -n_cache <= s < 0, and zeros below. To = tp + T - KT + 1. Space: 3 x 3, padding hp rows and wp
// columns of zeros: Ho = H' + 2 hp - 2, Wo = W' + 2 wp - 2 (H' = upsample * height, W' likewise).
// C a multiple of 32 (of 16 in fp32); block_n in kConvBlockNs dividing O. persistent: as many CTAs as fit on the SMs
// at once, looping over the tiles, else one CTA per tile.
// Returns cudaErrorInvalidValue for arguments the kernel does not take.
cudaError_t causal_conv3d_fwd(ConvTensor x, ConvTensor cache, ConvTensor out, ConvTensor residual, ConvNorm norm,
                              const void* weight_packed, const float* bias, DType dtype, int batch, int channels,
                              int out_channels, int frames, int height, int width, int kt, int tp, int hp, int wp,
                              int upsample, int cache_frames, int n_cache, int block_n, bool persistent,
                              cudaStream_t stream);

}  // namespace vkern
