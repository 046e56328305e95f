// Flash-attention forward for Hopper: the host side (tensor maps for TMA, the tail split's plan, the launches and
// the entry points declared in flash_attention.h). The kernels, their design notes and the constants and structs
// they share with this file (Format, Split, kBlockM, ...) are in flash_attention_kernel.cuh.
#include <cudaTypedefs.h>

#include <mutex>
#include <type_traits>

#include "flash_attention.h"
#include "flash_attention_kernel.cuh"

namespace vkern {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  std::call_once(once, [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) ==
            cudaSuccess &&
        found == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  });
  return fn;
}

// A 4-D map (head dim, heads, tokens, batch) over a [B, S, H, D] tensor of elem_bytes-byte elements, boxes of
// 128 bytes of head dim x box_rows tokens, 128-byte swizzle.
bool make_map(CUtensorMap* map, const AttentionTensor& t, CUtensorMapDataType type, int elem_bytes, int batch, int len,
              int heads, int head_dim, int box_rows) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(heads), cuuint64_t(len), cuuint64_t(batch)};
  // Strides of size-1 dims are never stepped; give them a legal value (TMA wants multiples of 16 bytes).
  const int64_t head_stride = heads > 1 ? t.head_stride * elem_bytes : 128;
  const int64_t seq_stride = len > 1 ? t.seq_stride * elem_bytes : 128;
  const int64_t batch_stride = batch > 1 ? t.batch_stride * elem_bytes : 128;
  const cuuint64_t strides[3] = {cuuint64_t(head_stride), cuuint64_t(seq_stride), cuuint64_t(batch_stride)};
  const cuuint32_t box[4] = {cuuint32_t(128 / elem_bytes), 1, cuuint32_t(box_rows), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  return encode(map, type, 4, t.ptr, dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// e4m3 V^T [B, H, D, vt_len] (t.seq_stride: between head-dim rows): a 4-D map (keys, head dim, heads, batch),
// boxes of 128 keys x D rows.
bool make_vt_map(CUtensorMap* map, const AttentionTensor& t, int batch, int heads, int head_dim, int vt_len) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[4] = {cuuint64_t(vt_len), cuuint64_t(head_dim), cuuint64_t(heads), cuuint64_t(batch)};
  const cuuint64_t strides[3] = {cuuint64_t(t.seq_stride), cuuint64_t(heads > 1 ? t.head_stride : 16),
                                 cuuint64_t(batch > 1 ? t.batch_stride : 16)};
  const cuuint32_t box[4] = {kBlockN, cuuint32_t(head_dim), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, t.ptr, dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

bool tma_compatible(const AttentionTensor& t, int elem_bytes = 2) {
  const int64_t align = 16 / elem_bytes;
  return t.ptr != nullptr && reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && t.batch_stride % align == 0 &&
         t.seq_stride % align == 0 && t.head_stride % align == 0 && t.batch_stride >= 0 && t.seq_stride >= 0 &&
         t.head_stride >= 0;
}

// The 16-bit wide tiles with their ring depths (flash_wide_stages).
constexpr bool wide_form(int keys, int head_dim, int stages) {
  return stages != 0 && stages == flash_wide_stages(keys, head_dim);
}

// The launch forms that take the tail split (with 3 stages, or the 16-bit wide tiles' flash_wide_stages): the 16-bit
// kernel, and the int8 P/V form's default schedule (no FMA exponentials, no turns). The dispatch instantiates kSplit
// for these only, and flash_tail_split_floats asks for a workspace for these only: this is the one place that says
// which.
constexpr bool split_schedule(bool eight_bit, bool int8_pv, int exp_fma, int turns) {
  return !eight_bit || (int8_pv && exp_fma == 0 && turns == 0);
}

// The tail split's plan (see Split) for a launch of `tiles` tiles of n_blocks key blocks each on the current device:
// where the last wave holds at most half the SMs' tiles, each tail tile is split into as many parts as fill the SMs
// (at most 8, of at least 16 key blocks each, so that a part's prologue and epilogue stay small against its loop);
// n_splits 0: none. The workspace pointers are set by plan_split.
Split split_shape(int tiles, int n_blocks) {
  constexpr int kMaxSplits = 8, kMinBlocks = 16;
  Split split;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 2)
    return split;
  const int tail = tiles % sms;
  if (tail == 0 || tail > sms / 2) return split;
  const int n = std::min(std::min(sms / tail, kMaxSplits), n_blocks / kMinBlocks);
  if (n >= 2) split.n_main = tiles - tail, split.n_splits = n;
  return split;
}

// A split's parts (tail tiles x parts), each a CTA and a workspace slot: O (128 rows x head dim), then lse (128).
int64_t split_slots(const Split& split, int tiles) { return int64_t(tiles - split.n_main) * split.n_splits; }

// split_shape's plan into the workspace, or none (n_splits 0) where it is null or too small.
Split plan_split(int tiles, int n_blocks, int head_dim, float* workspace, int64_t workspace_bytes) {
  Split split = workspace == nullptr ? Split() : split_shape(tiles, n_blocks);
  const int64_t slots = split_slots(split, tiles);
  if (split.n_splits == 0 || slots * kBlockM * (head_dim + 1) * 4 > workspace_bytes) return Split();
  split.o = workspace;
  split.lse = workspace + slots * kBlockM * head_dim;
  return split;
}

// The kernel's tensor maps: q, k, v (16-bit: [B, S, H, D]; 8-bit: v is V^T), out; the scales 8-bit only. kSplit:
// split's plan (n_splits > 0), and out, which the merge writes.
template <typename In, typename Out, int kHeadDim, int kStages, int kKeys = kBlockN, int kExpFma = 0,
          int kTurns = 0, bool kSplit = false>
cudaError_t launch(const CUtensorMap (&maps)[4], const float* q_scale, const float* k_scale, const float* v_scale,
                   const float* v_offset, float* lse, const void* key_bits, int batch, int heads, int q_len,
                   int kv_len, float scale, float rescale_slack, cudaStream_t stream, Split split = Split(),
                   AttentionTensor out = AttentionTensor()) {
  constexpr int kSmemBytes = smem_bytes<In, kHeadDim, kStages, kKeys>();
  const auto kernel = flash_fwd_kernel<In, Out, kHeadDim, kStages, kKeys, kExpFma, kTurns, kSplit>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const int m_blocks = (q_len + kBlockM - 1) / kBlockM, tail = m_blocks * heads * batch - split.n_main;
  const dim3 grid = kSplit ? dim3(split.n_main + split_slots(split, m_blocks * heads * batch))
                           : dim3(m_blocks, heads, batch);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(maps[0], maps[1], maps[2], maps[3], q_scale, k_scale, v_scale,
                                                 v_offset, lse, static_cast<const uint4*>(key_bits), heads, q_len,
                                                 kv_len, scale * 1.4426950408889634f, rescale_slack, split);
  if constexpr (kSplit) {
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    flash_split_merge_kernel<Out><<<tail * kBlockM, kHeadDim, 0, stream>>>(split, static_cast<Out*>(out.ptr), out,
                                                                          lse, heads, q_len);
  }
  return cudaGetLastError();
}

bool common_args_ok(int batch, int heads, int q_len, int kv_len, float scale, int stages, const void* key_bits) {
  return batch >= 1 && heads >= 1 && q_len >= 1 && kv_len >= 1 && batch <= 65535 && heads <= 65535 && scale > 0.f &&
         (stages == 2 || stages == 3) && reinterpret_cast<uintptr_t>(key_bits) % 16 == 0;
}

}  // namespace

int64_t flash_tail_split_floats(int batch, int heads, int q_len, int kv_len, int head_dim, int stages, bool eight_bit,
                                bool int8_pv, int exp_fma, int turns, int keys) {
  const bool wide = !eight_bit && wide_form(keys, head_dim, stages);
  if ((stages != 3 && !wide) || (keys != kBlockN && !wide) || !split_schedule(eight_bit, int8_pv, exp_fma, turns))
    return 0;
  const int tiles = (q_len + kBlockM - 1) / kBlockM * heads * batch;
  return split_slots(split_shape(tiles, (kv_len + keys - 1) / keys), tiles) * kBlockM * (head_dim + 1);
}

cudaError_t flash_attention_fwd(AttentionTensor q, AttentionTensor k, AttentionTensor v, AttentionTensor out,
                                float* lse, const void* key_bits, DType dtype, int batch, int heads, int q_len, int kv_len, int head_dim,
                                float scale, int stages, cudaStream_t stream, float* split_workspace,
                                int64_t split_workspace_bytes, int keys) {
  const bool wide_ok = wide_form(keys, head_dim, stages);
  if ((head_dim != kFlashHeadDims[0] && head_dim != kFlashHeadDims[1]) || (keys != kBlockN && !wide_ok) ||
      !common_args_ok(batch, heads, q_len, kv_len, scale, stages, key_bits) || !tma_compatible(q) ||
      !tma_compatible(k) || !tma_compatible(v) || !tma_compatible(out))
    return cudaErrorInvalidValue;
  const auto run = [&](auto type_tag, CUtensorMapDataType type) {
    using T = decltype(type_tag);
    CUtensorMap maps[4] = {};
    if (!make_map(&maps[0], q, type, 2, batch, q_len, heads, head_dim, kBlockM) ||
        !make_map(&maps[1], k, type, 2, batch, kv_len, heads, head_dim, keys) ||
        !make_map(&maps[2], v, type, 2, batch, kv_len, heads, head_dim, keys) ||
        !make_map(&maps[3], out, type, 2, batch, q_len, heads, head_dim, kBlockM / 2))
      return cudaErrorInvalidValue;
    const auto with_dim = [&](auto dim_tag) {
      constexpr int kDim = decltype(dim_tag)::value;
      const Split split = plan_split((q_len + kBlockM - 1) / kBlockM * heads * batch, (kv_len + keys - 1) / keys,
                                     head_dim, split_workspace, split_workspace_bytes);
      // A wide tile (wide_form checked it): its ring depth from flash_wide_stages, split or not.
      const auto wide = [&](auto keys_tag) {
        constexpr int kKeys = decltype(keys_tag)::value, kStages = flash_wide_stages(kKeys, kDim);
        if (split.n_splits > 0)
          return launch<T, T, kDim, kStages, kKeys, 0, 0, true>(maps, nullptr, nullptr, nullptr, nullptr, lse,
                                                                key_bits, batch, heads, q_len, kv_len, scale, 0.f,
                                                                stream, split, out);
        return launch<T, T, kDim, kStages, kKeys>(maps, nullptr, nullptr, nullptr, nullptr, lse, key_bits, batch,
                                                  heads, q_len, kv_len, scale, 0.f, stream);
      };
      if constexpr (kDim == 64) {
        if (keys == 224) return wide(std::integral_constant<int, 224>());
      }
      if (keys == 176) return wide(std::integral_constant<int, 176>());
      static_assert(split_schedule(false, false, 0, 0), "the 16-bit forms take the tail split");
      if (stages == 3 && split.n_splits > 0)
        return launch<T, T, kDim, 3, kBlockN, 0, 0, true>(maps, nullptr, nullptr, nullptr, nullptr, lse, key_bits,
                                                          batch, heads, q_len, kv_len, scale, 0.f, stream, split, out);
      return stages == 2 ? launch<T, T, kDim, 2>(maps, nullptr, nullptr, nullptr, nullptr, lse, key_bits, batch,
                                                 heads, q_len, kv_len, scale, 0.f, stream)
                         : launch<T, T, kDim, 3>(maps, nullptr, nullptr, nullptr, nullptr, lse, key_bits, batch,
                                                 heads, q_len, kv_len, scale, 0.f, stream);
    };
    return head_dim == 64 ? with_dim(std::integral_constant<int, 64>())
                          : with_dim(std::integral_constant<int, 128>());
  };
  if (dtype == DType::kBFloat16) return run(__nv_bfloat16(), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16);
  if (dtype == DType::kFloat16) return run(__half(), CU_TENSOR_MAP_DATA_TYPE_FLOAT16);
  return cudaErrorInvalidValue;
}

cudaError_t flash_attention_fp8_fwd(AttentionTensor q, AttentionTensor k, AttentionTensor vt, AttentionTensor out,
                                    float* lse, const void* key_bits, const float* q_scale, const float* k_scale,
                                    const float* v_scale, const float* v_offset, DType out_dtype, int batch, int heads,
                                    int q_len, int kv_len, int vt_len, int head_dim, float scale, int stages,
                                    bool int8_qk, bool int8_pv, int keys, int exp_fma, int turns,
                                    float rescale_slack, cudaStream_t stream, float* split_workspace,
                                    int64_t split_workspace_bytes) {
  if (head_dim != kFlashFp8HeadDim || (int8_pv && !int8_qk) || (exp_fma != 0 && exp_fma != 2) ||
      turns < 0 || turns > 2 || (turns != 0 && !int8_pv) || !(rescale_slack >= 0.f && rescale_slack <= 8.f) ||
      (rescale_slack != 0.f && !int8_pv) ||
      !common_args_ok(batch, heads, q_len, kv_len, scale, stages, key_bits) ||
      (keys != 128 && keys != 192) || reinterpret_cast<uintptr_t>(key_bits) % 16 != 0 ||
      !tma_compatible(q, 1) || !tma_compatible(k, 1) || !tma_compatible(vt, 1) || !tma_compatible(out) ||
      vt_len < kv_len || vt_len % 16 != 0 || q_scale == nullptr || k_scale == nullptr || v_scale == nullptr ||
      reinterpret_cast<uintptr_t>(v_offset) % 8 != 0)
    return cudaErrorInvalidValue;
  const CUtensorMapDataType out_type = out_dtype == DType::kBFloat16  ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                       : out_dtype == DType::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                      : CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
  if (out_type == CU_TENSOR_MAP_DATA_TYPE_FLOAT32) return cudaErrorInvalidValue;
  // The int8 P/V form has 128-key tiles only. (The K map's box is the tile: a 192-row box into a 128-key stage
  // would overrun it and never match the barrier's byte count.)
  if (int8_pv) keys = 128;
  CUtensorMap maps[4] = {};
  if (!make_map(&maps[0], q, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, batch, q_len, heads, head_dim, kBlockM) ||
      !make_map(&maps[1], k, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, batch, kv_len, heads, head_dim, keys) ||
      !make_vt_map(&maps[2], vt, batch, heads, head_dim, vt_len) ||
      !make_map(&maps[3], out, out_type, 2, batch, q_len, heads, head_dim, kBlockM / 2))
    return cudaErrorInvalidValue;
  const auto run = [&](auto out_tag) {
    using Out = decltype(out_tag);
    const auto with = [&](auto in_tag) {
      using In = decltype(in_tag);
      const auto tile = [&](auto keys_tag, auto fma_tag, auto turns_tag) {
        constexpr int kKeys = decltype(keys_tag)::value, kFma = decltype(fma_tag)::value;
        constexpr int kTurns = decltype(turns_tag)::value;
        if constexpr (split_schedule(true, std::is_same<In, S8PV>::value, kFma, kTurns)) {
          const Split split = plan_split((q_len + kBlockM - 1) / kBlockM * heads * batch,
                                         (kv_len + kKeys - 1) / kKeys, head_dim, split_workspace,
                                         split_workspace_bytes);
          if (stages == 3 && split.n_splits > 0)
            return launch<In, Out, 128, 3, kKeys, 0, 0, true>(maps, q_scale, k_scale, v_scale, v_offset, lse,
                                                              key_bits, batch, heads, q_len, kv_len, scale,
                                                              rescale_slack, stream, split, out);
        }
        return stages == 2 ? launch<In, Out, 128, 2, kKeys, kFma, kTurns>(maps, q_scale, k_scale, v_scale, v_offset,
                                                                          lse, key_bits, batch, heads, q_len, kv_len,
                                                                          scale, rescale_slack, stream)
                           : launch<In, Out, 128, 3, kKeys, kFma, kTurns>(maps, q_scale, k_scale, v_scale, v_offset,
                                                                          lse, key_bits, batch, heads, q_len, kv_len,
                                                                          scale, rescale_slack, stream);
      };
      using K128 = std::integral_constant<int, 128>;
      using Off = std::integral_constant<int, 0>;
      const auto with_fma = [&](auto turns_tag) {
        return exp_fma == 2 ? tile(K128(), std::integral_constant<int, 2>(), turns_tag)
                            : tile(K128(), std::integral_constant<int, 0>(), turns_tag);
      };
      if constexpr (std::is_same<In, S8PV>::value)  // (keys is 128 here)
        return turns == 2   ? with_fma(std::integral_constant<int, 2>())
               : turns == 1 ? with_fma(std::integral_constant<int, 1>())
                            : with_fma(Off());
      else
        return keys == 192 ? tile(std::integral_constant<int, 192>(), std::integral_constant<int, 0>(), Off())
                           : tile(K128(), std::integral_constant<int, 0>(), Off());
    };
    return int8_pv ? with(S8PV()) : int8_qk ? with(S8()) : with(E4M3());
  };
  return out_dtype == DType::kBFloat16 ? run(__nv_bfloat16()) : run(__half());
}

}  // namespace vkern
