// Flash-attention forward for Hopper, written for vkern (design notes: bench/NOTES.md, "Session 8").
//
// One CTA computes 128 query rows of one (batch, head) against every key, head dim 64 or 128 (a template
// parameter: tiles are D / 64 column blocks of 64), in three warpgroups:
//   producer (warpgroup 0): one thread issues TMA copies of the Q tile once and of the K and V tiles of each
//     128-key block into a 2- or 3-stage ring, and refills a stage once both consumers have released it;
//   consumers (warpgroups 1, 2): 64 query rows each. Per key block j: S = Q K_j^T (wgmma, both operands in
//     shared memory), then, while S is computed, O += P_{j-1} V_{j-1} (wgmma, P from registers); then the
//     online softmax of S_j. The two consumers take turns issuing their products (named barriers), so one's
//     softmax runs while the other's products keep the tensor cores busy.
// Numerics: fp32 accumulation and softmax (exp2 of scale * log2(e) * s - running max, one FFMA per score),
// P rounded to the input dtype for the PV product (as FlashAttention), out = O / l rounded once.
// Keys past kv_len (the last block) are masked to -inf; query rows past q_len are computed on TMA's
// zero fill and never stored (TMA clips the store). Key-padding mask (optional): one bit per key, 16 bytes per
// 128-key block, read by every consumer thread with one 16-byte load issued before it waits for S; blocks whose
// keys are all attended skip the masking. A query row with no attended key gets out 0 and lse -inf.
#include <cudaTypedefs.h>

#include <cmath>
#include <mutex>
#include <type_traits>

#include "flash_attention.h"
#include "sm90.cuh"

namespace vkern {
namespace {

using namespace sm90;

constexpr int kBlockM = 128;                  // query rows per CTA (64 per consumer warpgroup)
constexpr int kBlockN = 128;                  // keys per block
constexpr int kHalfBytes = 128 * 128;         // 128 rows x 64 columns (128 bytes): one TMA box, one swizzle span
// A 128-row tile of head dim D is D / 64 column blocks of 64 (two "halves" at D = 128), kHalfBytes apart.
template <int kHeadDim>
constexpr int tile_bytes() { return kHeadDim / 64 * kHalfBytes; }
template <int kHeadDim, int kStages>  // K/V ring depth; + barriers and 1024-alignment slack
constexpr int smem_bytes() { return tile_bytes<kHeadDim>() * (1 + 2 * kStages) + 128 + 1024; }
constexpr int kThreads = 384;
constexpr int kTurnBarrier = 1;               // named barriers 1, 2: consumer 0's / 1's turn to issue products
constexpr int kStoreBarrier = 3;              // named barriers 3, 4: consumer 0's / 1's output tile written

template <int kStages>
struct Barriers {
  uint64_t q_full;
  uint64_t k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages];
};

template <typename T, int kHeadDim>
__device__ __forceinline__ void issue_qk(float (&s)[64], const uint8_t* q_rows, const uint8_t* k_tile) {
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {  // 16 head-dim columns per step; 4 steps per 64-column block
    const int offset = (kk / 4) * kHalfBytes + (kk % 4) * 32;
    wgmma_m64n128k16_ss<T>(s, desc_sw128(q_rows + offset, 16, 1024), desc_sw128(k_tile + offset, 16, 1024), kk > 0);
  }
}

template <typename T, int kHeadDim>
__device__ __forceinline__ void issue_pv(float (&o)[kHeadDim / 2], const uint32_t (&p)[32], const uint8_t* v_tile) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {  // 16 keys per step: 2 groups of 8 rows; head-dim column blocks 16 KB apart
    const uint32_t a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
    wgmma_m64nNk16_rs_bt<T, kHeadDim>(o, a, desc_sw128(v_tile + kk * 16 * 128, kHalfBytes, 1024));
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Accumulator fragment (wgmma m64nN, fp32): register i of a thread holds row (warp * 16 + lane / 4 + 8 * r)
// with r = (i / 2) % 2, column (i / 4) * 8 + (lane % 4) * 2 + i % 2. Packed in pairs it is also the A
// fragment of the PV product, so P never leaves registers.
template <typename T, int kHeadDim, int kStages>
__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                     const __grid_constant__ CUtensorMap v_map, const __grid_constant__ CUtensorMap o_map,
                     float* __restrict__ lse, const uint4* __restrict__ key_bits, int heads, int q_len, int kv_len,
                     float scale_log2) {
  constexpr int kTileBytes = tile_bytes<kHeadDim>(), kColumnBlocks = kHeadDim / 64;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* q_tile = smem;
  uint8_t* k_tiles = smem + kTileBytes;
  uint8_t* v_tiles = smem + kTileBytes * (1 + kStages);
  Barriers<kStages>& bars = *reinterpret_cast<Barriers<kStages>*>(smem + kTileBytes * (1 + 2 * kStages));

  const int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int warpgroup = threadIdx.x / 128;
  const int n_blocks = (kv_len + kBlockN - 1) / kBlockN;

  if (threadIdx.x == 0) {
    mbar_init(&bars.q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&bars.k_full[s], 1);
      mbar_init(&bars.v_full[s], 1);
      mbar_init(&bars.k_empty[s], 2);  // one arrival per consumer warpgroup
      mbar_init(&bars.v_empty[s], 2);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warpgroup == 0) {  // producer
    regs_dec<24>();
    if (threadIdx.x == 0) {
      mbar_arrive_expect_tx(&bars.q_full, kTileBytes);
      for (int h = 0; h < kColumnBlocks; ++h)
        tma_load_4d(q_tile + h * kHalfBytes, &q_map, &bars.q_full, h * 64, head, m_block * kBlockM, batch);
      for (int j = 0; j < n_blocks; ++j) {
        const int s = j % kStages;
        const uint32_t free_parity = ((j / kStages) & 1) ^ 1;  // the first round finds fresh barriers "done"
        mbar_wait(&bars.k_empty[s], free_parity);
        mbar_arrive_expect_tx(&bars.k_full[s], kTileBytes);
        for (int h = 0; h < kColumnBlocks; ++h)
          tma_load_4d(k_tiles + s * kTileBytes + h * kHalfBytes, &k_map, &bars.k_full[s], h * 64, head, j * kBlockN,
                      batch);
        mbar_wait(&bars.v_empty[s], free_parity);
        mbar_arrive_expect_tx(&bars.v_full[s], kTileBytes);
        for (int h = 0; h < kColumnBlocks; ++h)
          tma_load_4d(v_tiles + s * kTileBytes + h * kHalfBytes, &v_map, &bars.v_full[s], h * 64, head, j * kBlockN,
                      batch);
      }
    }
    return;
  }

  regs_inc<240>();
  const int wg = warpgroup - 1;  // this consumer's rows: wg * 64 ... wg * 64 + 63 of the block
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const uint8_t* q_rows = q_tile + wg * 64 * 128;
  float o[kHeadDim / 2], s[64];
  uint32_t p[32];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // max in scaled log2 units

  // Block j's 128 key-padding bits (all set without a mask): key c of the block is bit c % 32 of word c / 32.
  auto key_bits_of = [&](int j) {
    return key_bits == nullptr ? make_uint4(~0u, ~0u, ~0u, ~0u) : __ldg(key_bits + int64_t(batch) * n_blocks + j);
  };
  // Masks the keys past kv_len and the padded ones, updates the running max and returns P = exp2(scale * s - max)
  // in s, its row sums in sum and the factor alpha that rescales what was accumulated before.
  auto softmax = [&](int j, uint4 bits, float (&alpha)[2], float (&sum)[2]) {
    const int cols_left = kv_len - j * kBlockN;
    if (cols_left < kBlockN) {
#pragma unroll
      for (int i = 0; i < 64; ++i)
        if ((i / 4) * 8 + (lane % 4) * 2 + i % 2 >= cols_left) s[i] = -INFINITY;
    }
    if ((bits.x & bits.y & bits.z & bits.w) != ~0u) {  // the same bits in every thread: no divergence
      const uint32_t words[4] = {bits.x >> ((lane % 4) * 2), bits.y >> ((lane % 4) * 2), bits.z >> ((lane % 4) * 2),
                                 bits.w >> ((lane % 4) * 2)};
#pragma unroll
      for (int i = 0; i < 64; ++i) {  // column (i / 4) * 8 + (lane % 4) * 2 + i % 2: never crosses a word
        const int c = (i / 4) * 8 + i % 2;
        if (!((words[c / 32] >> (c % 32)) & 1u)) s[i] = -INFINITY;
      }
    }
    float mx[2] = {-INFINITY, -INFINITY}, neg_max[2];
#pragma unroll
    for (int i = 0; i < 64; ++i) mx[(i / 2) % 2] = fmaxf(mx[(i / 2) % 2], s[i]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], quad_max(mx[r]) * scale_log2);
      // No attended key in this row yet (only with a mask): exp2 against 0 keeps -inf scores at 0, not NaN.
      const float offset = new_max == -INFINITY ? 0.f : new_max;
      alpha[r] = ex2(row_max[r] - offset);
      row_max[r] = new_max;
      neg_max[r] = -offset;
      sum[r] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      s[i] = ex2(fmaf(s[i], scale_log2, neg_max[(i / 2) % 2]));
      sum[(i / 2) % 2] += s[i];
    }
  };
  auto to_p = [&] {
#pragma unroll
    for (int i = 0; i < 32; ++i) p[i] = pack2<T>(s[2 * i], s[2 * i + 1]);
  };
  // Arrivals on the other consumer's turn barrier must match its syncs: consumer 1 gives consumer 0 the first
  // turn and skips its own last arrival.
  auto pass_turn = [&](int j) {
    if (!(wg == 1 && j == n_blocks - 1)) bar_arrive(kTurnBarrier + 1 - wg, 256);
  };

  if (wg == 1) bar_arrive(kTurnBarrier, 256);
  mbar_wait(&bars.q_full, 0);
  float alpha[2];  // rescales O before the next PV product adds to it (O is still 0 after block 0)
  {  // block 0: S only
    float sum[2];
    const uint4 bits = key_bits_of(0);
    mbar_wait(&bars.k_full[0], 0);
    bar_sync(kTurnBarrier + wg, 256);
    wgmma_fence();
    issue_qk<T, kHeadDim>(s, q_rows, k_tiles);
    wgmma_commit();
    fence_regs(s);
    pass_turn(0);
    wgmma_wait<0>();
    fence_regs(s);
    if (tid == 0) mbar_arrive(&bars.k_empty[0]);
    softmax(0, bits, alpha, sum);
    row_sum[0] = sum[0];
    row_sum[1] = sum[1];
  }
  // Finishes what the softmax of block j - 1 left: waits for the PV product of block j - 2, rescales O and packs
  // P_{j-1}. Placed before the next products are issued, not after the softmax: there ptxas hoisted the wait
  // above the exponentials to pack P early (P's registers are the in-flight product's A operand), so the
  // softmax never overlapped the PV product (SASS, bench/NOTES.md session 10).
  auto finish_block = [&](int j) {
    wgmma_wait<0>();
    fence_regs(o);
    if (j >= 2 && tid == 0) mbar_arrive(&bars.v_empty[(j - 2) % kStages]);
#pragma unroll
    for (int i = 0; i < kHeadDim / 2; ++i) o[i] *= alpha[(i / 2) % 2];
    fence_regs(o);
    to_p();
  };
  for (int j = 1; j < n_blocks; ++j) {  // S_j = Q K_j^T and O += P_{j-1} V_{j-1} in flight together
    const int st = j % kStages, prev = (j - 1) % kStages;
    const uint4 bits = key_bits_of(j);  // in flight while the products run
    mbar_wait(&bars.k_full[st], (j / kStages) & 1);
    mbar_wait(&bars.v_full[prev], ((j - 1) / kStages) & 1);
    finish_block(j);
    bar_sync(kTurnBarrier + wg, 256);
    fence_regs(s);
    wgmma_fence();
    issue_qk<T, kHeadDim>(s, q_rows, k_tiles + st * kTileBytes);
    wgmma_commit();
    issue_pv<T, kHeadDim>(o, p, v_tiles + prev * kTileBytes);
    wgmma_commit();
    fence_regs(s);
    fence_regs(o);
    pass_turn(j);
    wgmma_wait<1>();  // S_j; the PV product stays in flight through the softmax
    fence_regs(s);
    if (tid == 0) mbar_arrive(&bars.k_empty[st]);
    float sum[2];
    softmax(j, bits, alpha, sum);
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * alpha[r] + sum[r];
  }
  {  // the last block's PV product (its V stage and the one before are never refilled: not released)
    const int last = (n_blocks - 1) % kStages;
    mbar_wait(&bars.v_full[last], ((n_blocks - 1) / kStages) & 1);
    finish_block(0);
    wgmma_fence();
    issue_pv<T, kHeadDim>(o, p, v_tiles + last * kTileBytes);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
  }

  // Epilogue: O / l into this consumer's (now unused) Q rows in the swizzled layout, then one TMA store.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] = quad_sum(row_sum[r]);
    inv[r] = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;  // 0: every key masked (out 0, lse -inf)
  }
  uint8_t* o_rows = q_tile + wg * 64 * 128;
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; i += 2) {
    const int r = (i / 2) % 2, row = warp * 16 + lane / 4 + 8 * r, col_tile = i / 4;
    const int chunk = (col_tile % 8) ^ (row % 8);
    uint8_t* dst = o_rows + (col_tile / 8) * kHalfBytes + row * 128 + chunk * 16 + (lane % 4) * 4;
    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(o[i] * inv[r], o[i + 1] * inv[r]);
  }
  fence_async_smem();
  bar_sync(kStoreBarrier + wg, 128);
  if (tid == 0) {
    for (int h = 0; h < kColumnBlocks; ++h)
      tma_store_4d(&o_map, o_rows + h * kHalfBytes, h * 64, head, m_block * kBlockM + wg * 64, batch);
    tma_store_commit_and_wait();
  }
  if (lse != nullptr && lane % 4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m_block * kBlockM + wg * 64 + warp * 16 + lane / 4 + 8 * r;
      if (row < q_len)
        lse[(int64_t(batch) * heads + head) * q_len + row] = (row_max[r] + log2f(row_sum[r])) * 0.6931471805599453f;
    }
  }
}

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

// A 4-D map (head dim, heads, tokens, batch) over a [B, S, H, D] tensor, boxes of 64 columns x box_rows tokens.
bool make_map(CUtensorMap* map, const AttentionTensor& t, CUtensorMapDataType type, int batch, int len, int heads,
              int head_dim, int box_rows) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(heads), cuuint64_t(len), cuuint64_t(batch)};
  // Strides of size-1 dims are never stepped; give them a legal value (TMA wants multiples of 16 bytes).
  const int64_t head_stride = heads > 1 ? t.head_stride : 128;
  const int64_t seq_stride = len > 1 ? t.seq_stride : 128;
  const int64_t batch_stride = batch > 1 ? t.batch_stride : 128;
  const cuuint64_t strides[3] = {cuuint64_t(head_stride) * 2, cuuint64_t(seq_stride) * 2, cuuint64_t(batch_stride) * 2};
  const cuuint32_t box[4] = {64, 1, cuuint32_t(box_rows), 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  return encode(map, type, 4, t.ptr, dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

bool tma_compatible(const AttentionTensor& t) {
  return t.ptr != nullptr && reinterpret_cast<uintptr_t>(t.ptr) % 16 == 0 && t.batch_stride % 8 == 0 &&
         t.seq_stride % 8 == 0 && t.head_stride % 8 == 0 && t.batch_stride >= 0 && t.seq_stride >= 0 &&
         t.head_stride >= 0;
}

template <typename T, int kHeadDim, int kStages>
cudaError_t launch(AttentionTensor q, AttentionTensor k, AttentionTensor v, AttentionTensor out, float* lse,
                   const void* key_bits, CUtensorMapDataType type, int batch, int heads, int q_len, int kv_len, float scale,
                   cudaStream_t stream) {
  CUtensorMap maps[4];
  if (!make_map(&maps[0], q, type, batch, q_len, heads, kHeadDim, kBlockM) ||
      !make_map(&maps[1], k, type, batch, kv_len, heads, kHeadDim, kBlockN) ||
      !make_map(&maps[2], v, type, batch, kv_len, heads, kHeadDim, kBlockN) ||
      !make_map(&maps[3], out, type, batch, q_len, heads, kHeadDim, kBlockM / 2))
    return cudaErrorInvalidValue;
  constexpr int kSmemBytes = smem_bytes<kHeadDim, kStages>();
  const auto kernel = flash_fwd_kernel<T, kHeadDim, kStages>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((q_len + kBlockM - 1) / kBlockM, heads, batch);
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(maps[0], maps[1], maps[2], maps[3], lse,
                                                 static_cast<const uint4*>(key_bits), heads, q_len, kv_len,
                                                 scale * 1.4426950408889634f);
  return cudaGetLastError();
}

}  // namespace

cudaError_t flash_attention_fwd(AttentionTensor q, AttentionTensor k, AttentionTensor v, AttentionTensor out,
                                float* lse, const void* key_bits, DType dtype, int batch, int heads, int q_len, int kv_len, int head_dim,
                                float scale, int stages, cudaStream_t stream) {
  if ((head_dim != kFlashHeadDims[0] && head_dim != kFlashHeadDims[1]) || batch < 1 || heads < 1 || q_len < 1 || kv_len < 1 || batch > 65535 ||
      heads > 65535 || !(scale > 0.f) || (stages != 2 && stages != 3) || !tma_compatible(q) || !tma_compatible(k) ||
      !tma_compatible(v) || !tma_compatible(out) || reinterpret_cast<uintptr_t>(key_bits) % 16 != 0)
    return cudaErrorInvalidValue;
  const auto run = [&](auto type_tag, CUtensorMapDataType type) {
    using T = decltype(type_tag);
    const auto with_dim = [&](auto dim_tag) {
      constexpr int kDim = decltype(dim_tag)::value;
      return stages == 2 ? launch<T, kDim, 2>(q, k, v, out, lse, key_bits, type, batch, heads, q_len, kv_len, scale, stream)
                         : launch<T, kDim, 3>(q, k, v, out, lse, key_bits, type, batch, heads, q_len, kv_len, scale, stream);
    };
    return head_dim == 64 ? with_dim(std::integral_constant<int, 64>())
                          : with_dim(std::integral_constant<int, 128>());
  };
  if (dtype == DType::kBFloat16) return run(__nv_bfloat16(), CU_TENSOR_MAP_DATA_TYPE_BFLOAT16);
  if (dtype == DType::kFloat16) return run(__half(), CU_TENSOR_MAP_DATA_TYPE_FLOAT16);
  return cudaErrorInvalidValue;
}

}  // namespace vkern
