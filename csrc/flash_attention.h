// vkern's flash-attention forward for Hopper (sm_90a): non-causal softmax(scale * Q K^T) V, 16-bit or e4m3 inputs,
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
// The 16-bit wide tiles' ring depth per (keys, head dim), 0 for a form that is not one: 176 keys, 2 stages at D 128
// (three do not fit in shared memory), 3 at D 64; 224 keys at D 64 only, 3 stages (kFlashWideKeys: the wide key
// counts). Exported to Python as vkern._C.flash_wide_stages: the launches' one source.
constexpr int kFlashWideKeys[] = {176, 224};
constexpr int flash_wide_stages(int keys, int head_dim) {
  return keys == 176 ? (head_dim == 128 ? 2 : 3) : keys == 224 && head_dim == 64 ? 3 : 0;
}

// out = softmax(scale * q k^T) v per (batch, head); q/out have q_len tokens, k/v kv_len; dtype bf16 or fp16.
// lse (may be null): fp32 [B, H, q_len] contiguous, the natural-log log-sum-exp of the scaled scores.
// key_bits (may be null): the key-padding mask, bit c % 32 of 32-bit word c / 32 set = attend key c, as
// [B, ceil(kv_len / 128) * 4] words (16-byte aligned; bits past kv_len ignored). With keys 176 or 224: one 32-byte
// record per tile instead, [B, ceil(kv_len / keys) * 8] words, tile t's key c at bit c % 32 of its word c / 32
// (words 0-5 or 0-6; the rest of the record ignored). A query row with no attended key gets out 0 and lse -inf.
// scale must be positive. stages: depth of the K/V shared-memory ring, 2 or 3. keys: the key tile, 128, 176
// (FlashAttention-3's non-causal tile) or 224 (head dim 64 only), a wide tile with flash_wide_stages(keys, head_dim).
// split_workspace (may be null; taken with 3 stages, or a wide tile's): fp32 scratch of split_workspace_bytes
// on the stream's device for the tail split: where the launch's last wave would leave more than half the SMs idle,
// its tiles' keys are split across several CTAs and merged in a second kernel (the same result up to fp32 rounding;
// the .cu's Split). SMs x 128 x (head_dim + 1) floats always suffice, flash_tail_split_floats the exact need; too
// small or null: no split.
// Returns cudaErrorInvalidValue for arguments the kernel does not take (see the .cu).
cudaError_t flash_attention_fwd(AttentionTensor q, AttentionTensor k, AttentionTensor v, AttentionTensor out,
                                float* lse, const void* key_bits, DType dtype, int batch, int heads, int q_len, int kv_len, int head_dim,
                                float scale, int stages, cudaStream_t stream, float* split_workspace = nullptr,
                                int64_t split_workspace_bytes = 0, int keys = 128);
#define VKERN_FLASH_WIDE_TILE 1  // flash_attention_fwd takes keys (bench/flash_trace.cu builds against older trees too)

// fp8 attention (head dim kFlashFp8HeadDim): q, k e4m3 (int8 with int8_qk) [B, S, H, D] with positive fp32 scales, q_scale
// [B, H, q_len] per (token, head) and k_scale [B, H, ceil(kv_len / 128)] per (128-key block, head); vt e4m3
// V^T [B, H, D, vt_len] (vt_len >= kv_len, a multiple of 16; element (b, h, d, s) at ptr + b * batch_stride +
// h * head_stride + d * seq_stride + s), its keys in the order of vkern.ops.v_to_e4m3 (within each 32-key
// group, stored column 16 u + 4 c + 2 g + b holds key 16 u + 8 g + 2 c + b) and zero past kv_len, with fp32
// scales v_scale [B, H, ceil(kv_len / 128)] per (128-key block, head), as k_scale. S = q8 k8^T * q_scale * k_scale
// (its block's), P = exp(scale * S - max) * 448 rounded to e4m3, out = sum over key blocks of (P v8) * v_scale (the
// block's) / rowsum(P) + v_offset in out_dtype (bf16 or fp16), fp32 accumulation (each block's P V added to O in fp32
// registers: kPromoteO in the .cu). v_offset (may be null; 8-byte aligned): fp32 [B, H, D], what was subtracted from
// V before its quantization (smoothing), added to every row with an attended key. lse, key_bits, stages as
// flash_attention_fwd. int8_qk: q, k are int8 instead (symmetric, scales = amax / 127; S exact in int32).
// keys: the kernel's key tile, 128 (O promoted as above) or 192 (O accumulated in the tensor cores with each 64-key
// group's V scale folded into its P; the same arithmetic otherwise: see the .cu).
// int8_pv (with int8_qk only; 128-key tiles whatever keys says): vt holds int8 codes + 128 as u8 (int8 V with its sign
// bits flipped; the same layout; scales amax / 127) and
// the P V product takes P as unsigned int8 against each 128-key block's own row max: P = round(255 * exp(scale * S -
// m_b)), out = sum over blocks of exp(m_b - max) (P v8) * v_scale / sum over blocks of exp(m_b - max) rowsum(P)
// + v_offset (the .cu: kIntPV; v_scale below 2^43, i.e. |V - v_offset| below ~1e15). exp_fma (int8_pv; else 0):
// 0 or 2 of each 8 exponentials on the FMA pipe (a cubic, relative error 1.0e-4: a code may move by 1);
// turns (int8_pv; else 0): 0 each consumer warpgroup issues its products when ready, 1 the two issue in turns, 2 in
// turns passed when a consumer's products are done (ping-pong by phase); the same result bit for bit.
// rescale_slack (int8_pv; else 0; in [0, 8]): O's reference max moves only when a block's row max passes it by more
// than this (log2 units): O's rescale is skipped more often; the same result up to fp32 rounding.
// split_workspace (may be null): as flash_attention_fwd's; which forms split: flash_tail_split_floats.
constexpr int kFlashFp8HeadDim = 128;
// The split workspace's fp32 values a launch of this shape and form takes on the current device; 0: it is not split.
// The form as the launch's arguments: stages; eight_bit false for flash_attention_fwd, true for
// flash_attention_fp8_fwd with its int8_pv, exp_fma and turns, and keys (the 16-bit forms and the int8 P/V form's
// default schedule split, with 3 stages; the 16-bit wide tiles, keys 176 or 224, with flash_wide_stages).
int64_t flash_tail_split_floats(int batch, int heads, int q_len, int kv_len, int head_dim, int stages, bool eight_bit,
                                bool int8_pv, int exp_fma, int turns, int keys = 128);
cudaError_t flash_attention_fp8_fwd(AttentionTensor q, AttentionTensor k, AttentionTensor vt, AttentionTensor out,
                                    float* lse, const void* key_bits, const float* q_scale, const float* k_scale,
                                    const float* v_scale, const float* v_offset, DType out_dtype, int batch, int heads,
                                    int q_len, int kv_len, int vt_len, int head_dim, float scale, int stages,
                                    bool int8_qk, bool int8_pv, int keys, int exp_fma, int turns,
                                    float rescale_slack, cudaStream_t stream, float* split_workspace = nullptr,
                                    int64_t split_workspace_bytes = 0);

}  // namespace vkern
