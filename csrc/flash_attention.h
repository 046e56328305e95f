// vkern's flash-attention forward for Hopper (sm_90a): non-causal softmax(scale * Q K^T) V, 16-bit inputs,
// head dim 64 or 128, any query and key lengths. Framework-free: raw pointers, sizes, strides and a stream.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "fp8_quant.h"  // DType

namespace vkern {

// One [B, S, H, D] tensor: element (b, s, h, d) at ptr + b * batch_stride + s * seq_stride + h * head_stride + d.
struct AttentionTensor {
  void* ptr;
  int64_t batch_stride, seq_stride, head_stride;  // in elements; multiples of 8, the head dim contiguous
};

// The head dims the kernel takes.
constexpr int kFlashHeadDims[] = {64, 128};

// out = softmax(scale * q k^T) v per (batch, head); q/out have q_len tokens, k/v kv_len; dtype bf16 or fp16.
// lse (may be null): fp32 [B, H, q_len] contiguous, the natural-log log-sum-exp of the scaled scores.
// key_bits (may be null): the key-padding mask, bit c % 32 of 32-bit word c / 32 set = attend key c, as
// [B, ceil(kv_len / 128) * 4] words (16-byte aligned; bits past kv_len ignored). A query row with no
// attended key gets out 0 and lse -inf.
// scale must be positive. stages: depth of the K/V shared-memory ring, 2 or 3.
// Returns cudaErrorInvalidValue for arguments the kernel does not take (see the .cu).
cudaError_t flash_attention_fwd(AttentionTensor q, AttentionTensor k, AttentionTensor v, AttentionTensor out,
                                float* lse, const void* key_bits, DType dtype, int batch, int heads, int q_len, int kv_len, int head_dim,
                                float scale, int stages, cudaStream_t stream);

}  // namespace vkern
