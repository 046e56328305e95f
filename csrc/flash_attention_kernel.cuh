// Flash-attention forward for Hopper, written for vkern (design notes: bench/NOTES.md, "Session 8").
//
// One CTA computes 128 query rows of one (batch, head) against every key, head dim 64 or 128 (a template
// parameter: tiles are D / 64 column blocks of 64), in three warpgroups:
//   producer (warpgroup 0): one thread issues TMA copies of the Q tile once and of the K and V tiles of each
//     key block (kKeys: 128; 176 or 224 for the 16-bit wide tiles, 192 for the e4m3-P one) into a 2- or 3-stage
//     ring, and refills a stage once both consumers have released it;
//   consumers (warpgroups 1, 2): 64 query rows each. Per key block j: S = Q K_j^T (wgmma, both operands in
//     shared memory), then, while S is computed, O += P_{j-1} V_{j-1} (wgmma, P from registers); then the
//     online softmax of S_j. The 16-bit forms' two consumers take turns issuing their products (named
//     barriers), so one's softmax runs while the other's products keep the tensor cores busy (8-bit: see kTakeTurns).
// Numerics: fp32 accumulation and softmax (exp2 of scale * log2(e) * s - running max, one FFMA per score),
// P rounded to the input dtype for the PV product (as FlashAttention), out = O / l rounded once. 8-bit forms:
// Q, K in e4m3 or int8 (S exact in int32), P and V in e4m3, O promoted to fp32 per key block (kPromoteO), where
// each block's P V takes its V scale; V may come smoothed (v_offset: the offset added back to every row with an
// attended key).
// Keys past kv_len (the last block) are masked to -inf; query rows past q_len are computed on TMA's
// zero fill and never stored (TMA clips the store). Key-padding mask (optional): one bit per key, 16 bytes per
// 128-key block, read by every consumer thread with one 16-byte load issued before it waits for S (the 16-bit wide
// tiles: a 32-byte record per 176- or 224-key tile, see kBitRecords); blocks whose keys are all attended skip the
// masking.
// A query row with no attended key gets out 0 and lse -inf.
#pragma once

#include <cmath>
#include <type_traits>

#include "flash_attention.h"
#include "sm90.cuh"

namespace vkern {
namespace {

using namespace sm90;

constexpr int kBlockM = 128;                  // query rows per CTA (64 per consumer warpgroup)
constexpr int kBlockN = 128;                  // keys per scale / key-bit block (the 16-bit forms' tile)
constexpr int kHalfBytes = 128 * 128;         // 128 rows x 128 bytes: one TMA box, one swizzle span
constexpr int kThreads = 384;
constexpr int kTurnBarrier = 1;               // named barriers 1, 2: consumer 0's / 1's turn to issue products
constexpr int kStoreBarrier = 3;              // named barriers 3, 4: consumer 0's / 1's output tile written
constexpr float kLog2Of448 = 8.807354922057604f;
constexpr float kLog2Of255 = 7.994353436858858f;

#ifdef VKERN_FLASH_TRACE
// Diagnostics only (bench/flash_trace.cu defines VKERN_FLASH_TRACE; the extension never does): clock64 stamps of
// CTA (kTraceCta, head 0, batch 0)'s consumer warps (lane 0) at kTraceEvents points of key blocks kTraceFirst...
constexpr int kTraceCta = 100, kTraceFirst = 64, kTraceBlocks = 8, kTraceEvents = 6;
__device__ long long g_flash_trace[2][4][kTraceBlocks][kTraceEvents];
#endif

// Tile geometry per input format. 16-bit: Q, K, V [B, S, H, D]; a 128-row tile is D / 64 column boxes of 64
// (two "halves" at D = 128), kHalfBytes apart. 8-bit (E4M3: e4m3 Q, K; S8: int8 Q, K; D = 128 only): Q, K
// [B, S, H, D] with fp32 scales per
// (token, head) for Q and per (128-key block, head) for K, one 128-byte box per tile, and V^T [B, H, D, S_pad]
// (its tile: D rows x 128 keys, the keys contiguous, as 8-bit wgmma wants both operands K-major) with fp32
// scales per (128-key block, head), like K's.
// kKeys: keys per tile, 128, or 192 for the 8-bit forms' wide tile (see flash_fwd_kernel), or 176 for the 16-bit
// forms' wide tile (FlashAttention-3's non-causal tile; D = 128 with two stages, session 31; its key mask and D = 64
// with three stages, session 32), or 224 at D = 64 (three stages, session 33).
template <typename In, int kHeadDim, int kKeys = kBlockN>
struct Format {
  static constexpr bool kIntPV = std::is_same<In, S8PV>::value;               // int8 Q, K; u8 P, int8 V
  static constexpr bool kIntQK = std::is_same<In, S8>::value || kIntPV;       // int8 Q, K (S8: e4m3 P, V)
  static constexpr bool k8Bit = std::is_same<In, E4M3>::value || kIntQK;      // the 8-bit forms
  static_assert(!k8Bit || kHeadDim == 128, "the 8-bit kernel takes head dim 128");
  static_assert(kKeys == kBlockN || (k8Bit && !kIntPV && kKeys == 192) ||
                    (!k8Bit && (kKeys == 176 || (kKeys == 224 && kHeadDim == 64))),
                "tiles of 128 keys, 192 for the e4m3-P forms, or 176 (224 at head dim 64) for the 16-bit forms");
  static constexpr bool kPromoteO = k8Bit && kKeys == kBlockN;                 // see flash_fwd_kernel
  static constexpr bool kShiftV = k8Bit && !kPromoteO;  // tensor-core O, V's block scales folded into P
  static constexpr int kGroups = kShiftV ? kKeys / 64 : 1;         // key groups of one K and one V scale
  static constexpr int kBoxes = kHeadDim * (k8Bit ? 1 : 2) / 128;  // 128-byte column boxes of a Q or K tile
  static constexpr int kBoxCols = k8Bit ? 128 : 64;
  static constexpr int kTileBytes = kBoxes * kHalfBytes;           // Q tile (128 rows)
  static constexpr int kKTileBytes = kBoxes * kKeys * 128;         // K tile
  static constexpr int kKBoxBytes = kKeys * 128;                   // one column box of a K (16-bit: or V) tile
  // V tile (16-bit: as K's), or V^T tile: 128-key boxes of D rows (192 keys load two; the second's last 64 unused).
  static constexpr int kVTileBytes = k8Bit ? (kKeys + 127) / 128 * kHalfBytes : kKTileBytes;
  static constexpr int kOutBoxes = kHeadDim / 64;                  // the output is 16-bit
  static constexpr int kOutStageBytes = k8Bit ? kOutBoxes * kHalfBytes : 0;  // 16-bit: the Q tile is reused
  static constexpr int kSRegs = kKeys / 2;                         // S of 64 x kKeys per warpgroup, fp32
  static constexpr int kPRegs = k8Bit ? kKeys / 8 : kKeys / 4;     // P, packed
  // e4m3 P is scaled to [0, 448]; u8 P to [0, 255] * 2^-24 (pack4_u8's input: fp16 subnormal steps)
  static constexpr float kPOffset = kIntPV ? kLog2Of255 - 24.f : k8Bit ? kLog2Of448 : 0.f;
};
template <int kStages>
struct Barriers {
  uint64_t q_full;
  uint64_t k_full[kStages], k_empty[kStages], v_full[kStages], v_empty[kStages];
};
// Tail split (kSplit; session 27): a launch of t tiles on an n-SM GPU runs ceil(t / n) waves, and a last wave of
// few tiles leaves most SMs idle for a whole tile's time (wan1.3b-480p: 3072 tiles, 23 full waves and 36 tiles on
// 132 SMs, 3% of the time). The kSplit kernel takes a 1-D grid: the first n_main tiles as usual, then n_splits CTAs
// per tail tile, each over a contiguous range of its key blocks, writing O normalized (fp32) and its lse to o / lse
// (slot = CTA - n_main: 128 rows x head dim, and 128 lse); flash_split_merge_kernel combines them.
struct Split {
  int n_main = 0, n_splits = 0;
  float* o = nullptr;
  float* lse = nullptr;
};
// Q | K ring | V ring | output stage | barriers, + 1024-alignment slack.
template <typename In, int kHeadDim, int kStages, int kKeys>
constexpr int smem_bytes() {
  using F = Format<In, kHeadDim, kKeys>;
  return F::kTileBytes + (F::kKTileBytes + F::kVTileBytes) * kStages + F::kOutStageBytes +
         int(sizeof(Barriers<kStages>)) + 1024;
}

// S into s (S8: into s_int).
template <typename In, int kHeadDim, int kKeys>
__device__ __forceinline__ void issue_qk(float (&s)[kKeys / 2], uint32_t (&s_int)[kKeys / 2], SmemDesc q_rows,
                                         SmemDesc k_tile) {
  using F = Format<In, kHeadDim, kKeys>;
  constexpr int kSteps = F::kBoxes * 4;  // 32 bytes of head dim per step: k16 or k32
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    // (several boxes: 16-bit; Q's of 128 rows, K's of kKeys)
    const uint64_t a = q_rows.plus((kk / 4) * kHalfBytes + (kk % 4) * 32).bits();
    const uint64_t b = k_tile.plus((kk / 4) * F::kKBoxBytes + (kk % 4) * 32).bits();
    if constexpr (F::kIntQK && kKeys == 192)
      wgmma_m64n192k32_ss_s8(s_int, a, b);  // s_int starts at the bits of kIntBias (see the kernel)
    else if constexpr (F::kIntQK)
      wgmma_m64n128k32_ss_s8(s_int, a, b);
    else if constexpr (F::k8Bit && kKeys == 192)
      wgmma_m64n192k32_ss_e4m3(s, a, b, kk > 0);
    else if constexpr (F::k8Bit)
      wgmma_m64n128k32_ss_e4m3(s, a, b, kk > 0);
    else if constexpr (kKeys == 176)
      wgmma_m64n176k16_ss<In>(s, a, b, kk > 0);
    else if constexpr (kKeys == 224)
      wgmma_m64n224k16_ss<In>(s, a, b, kk > 0);
    else
      wgmma_m64n128k16_ss<In>(s, a, b, kk > 0);
  }
}

// overwrite (8-bit only): o = P V instead of o += P V.
template <typename In, int kHeadDim, int kKeys>
__device__ __forceinline__ void issue_pv(float (&o)[kHeadDim / 2],
                                         const uint32_t (&p)[Format<In, kHeadDim, kKeys>::kPRegs], SmemDesc v_tile,
                                         bool overwrite = false) {
  if constexpr (Format<In, kHeadDim, kKeys>::k8Bit) {
#pragma unroll
    for (int kk = 0; kk < kKeys / 32; ++kk) {  // 32 keys per step; V^T's rows are the head dim, keys contiguous
      const uint32_t a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
      wgmma_m64n128k32_rs_e4m3(o, a, v_tile.plus((kk / 4) * kHalfBytes + (kk % 4) * 32).bits(),
                               !(overwrite && kk == 0));
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {  // 16 keys per step: 2 groups of 8 rows; head-dim column boxes apart
      const uint32_t a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
      wgmma_m64nNk16_rs_bt<In, kHeadDim>(o, a, v_tile.plus(kk * 16 * 128).bits());
    }
  }
}

// The int8 P/V form: t = P V' (u8 P from registers, V' = V + 128 u8 V^T's tile).
__device__ __forceinline__ void issue_pv_int(uint32_t (&t)[64], const uint32_t (&p)[16], SmemDesc v_tile) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a[4] = {p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3]};
    wgmma_m64n128k32_rs_u8u8(t, a, v_tile.plus(kk * 32).bits(), kk > 0);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
// The same on signed ints; kTogether: its three shuffles issued at once (one shuffle latency on the chain, not two).
template <bool kTogether>
__device__ __forceinline__ int quad_max(int x) {
  if constexpr (kTogether) {
    const int a = __shfl_xor_sync(0xffffffff, x, 1), b = __shfl_xor_sync(0xffffffff, x, 2);
    const int c = __shfl_xor_sync(0xffffffff, x, 3);
    return __vimax3_s32(x, a, max(b, c));
  } else {
    x = max(x, __shfl_xor_sync(0xffffffff, x, 1));
    return max(x, __shfl_xor_sync(0xffffffff, x, 2));
  }
}
// Maximum of N signed ints as a tree of three-input maxima (VIMNMX3, sm_90's DPX): 18 instructions 4 deep for 32,
// where a chain of two-input ones takes 31.
template <int N>
__device__ __forceinline__ int max_tree(const int* v) {
  if constexpr (N == 1) {
    return v[0];
  } else if constexpr (N == 2) {
    return max(v[0], v[1]);
  } else {
    constexpr int a = (N + 2) / 3, b = (N + 1 - a) / 2;
    return __vimax3_s32(max_tree<a>(v), max_tree<b>(v + a), max_tree<N - a - b>(v + a + b));
  }
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Accumulator fragment (wgmma m64nN, fp32): register i of a thread holds row (warp * 16 + lane / 4 + 8 * r)
// with r = (i / 2) % 2, column (i / 4) * 8 + (lane % 4) * 2 + i % 2. Packed in pairs it is also the A
// fragment of the 16-bit PV product, so P never leaves registers. The 8-bit A fragment wants 4 consecutive
// K elements per register where the thread holds pairs 8 apart, so E4M3's to_p packs the keys of a 32-key
// group in the order (0, 1, 8, 9 | 16, 17, 24, 25) + 2 * (lane % 4), and V^T is stored in that key order
// (vkern.ops.v_to_e4m3): the product pairs each P with its own key's V.
// In: the input format (__nv_bfloat16, __half, E4M3 or S8); Out: the output's (= In when 16-bit).
// kPromoteO (the 8-bit forms): each block's P V product goes into a fresh accumulator t, which the consumer adds to
// O in fp32, times the block's V scale (one FFMA per element), after waiting for it together with the next block's
// S, before that softmax. Accumulated across blocks in the tensor cores instead (session 14's option, 8-13% faster),
// their fp8 accumulation keeps fewer bits than fp32: on WanAttention inputs (V with channel means, so O grows block
// by block) that doubled the error at 75600 keys (bench/NOTES.md run 55; DeepSeek-V3 promotes every 128 products
// likewise); it also could not take a V scale per block. Session 19 tried it again with V smoothed (runs 74-76):
// with each block's V scale folded into P as an exponent shift it was 3-7% faster but failed on V whose block scales
// spread (small blocks' P became e4m3 subnormals); with O rescaled to each block's V scale instead it was no faster
// than this promotion (0-4%) and less accurate at 720p (0.0120 vs 0.0092). Waiting for both products before the softmax (instead of
// keeping the PV product in flight through it, as the 16-bit forms do) keeps t, P and S from being live together:
// that schedule spilled and ran 8-14% slower (runs 55-56).
// kKeys = 192 (the 8-bit forms' wide tile, kShiftV; session 20): O accumulates in the tensor cores with the PV
// product in flight through the next softmax, as the 16-bit forms (no t: the registers that let S be 192 keys wide;
// FlashAttention-3 runs fp8 at 128 x 224). The K and V scales stay per 128 keys, so a tile has three 64-key groups,
// each with its own K scale (the softmax's multiplier) and V scale. O is kept in units of sigma, the largest V scale
// seen so far; a group's P is exp2(... + log2(v_scale / sigma)) <= 448, so each P V term carries its own V scale,
// and O is rescaled (with alpha) only when sigma grows. The row sums are taken without the shift.
// kIntPV (S8PV: int8 Q, K, P, V; 128-key tiles, promoted as kPromoteO): P is taken against the block's own row max
// m_b, so every row's largest P in the block is 255 (u8: steps of 1/255 of that max, where e4m3 keeps 3 mantissa
// bits), and the block's P V (exact in int32) enters O times exp2(m_b - running max) * v_scale. V comes offset by
// 128 (u8 codes V' = V + 128, the host flips int8 V's sign bits), so t = P V' = P V + 128 sum(P) lies in
// [0, 255 * 255 * 128] < 2^23: t starts at 0 and its bits read as an fp32 subnormal are t * 2^-149 exactly, which
// one no-ftz FFMA adds to O (no int-to-float conversion, no start values, no bias to subtract: run 80's form spent
// 64 MOVs and 64 FADDs per block there, 9-11%). O is kept in units of 2^-48 (so the factor's 2^-149 compensation
// stays below fp32's range for v_scale < 2^43 with factors up to 2^8: rescale_slack) and corr, per row, collects
// sum(P) (16 dp4a per block) times the same factors; the epilogue takes 128 corr out (O holds ~5 bits over P V
// then, not the 10 of run 79's bias).
// Row sums are of the codes (the same dp4a sums times the factors without the V scale; session 22: 64 FADDs
// fewer per block, and the weights O takes sum to 1 exactly). P is packed and S's start values written as the
// softmax ends (kPackEarly), and block j - 1's P V added to O after block j's softmax (kLateAdd): ptxas fills the
// exponentials' MUFU.EX2 gaps with them. Options measured slower with those on an H200 (run 84; kept for
// benchmarks): kExpFma of each 8 exponentials per thread on the FMA pipe (ex2_fma), kTurns (the consumers issue
// their products in turns, as the 16-bit forms).
// S8's scores: the int32 accumulator starts at the bits of kIntBias = 1.5 * 2^23 (see wgmma_m64n128k32_ss_s8), so
// s reads as kIntBias + S in fp32; the bias cancels in s - max and is taken out of the row max.
template <typename In, typename Out, int kHeadDim, int kStages, int kKeys, int kExpFma, int kTurns, bool kSplit>
__global__ void __launch_bounds__(kThreads, 1)
    flash_fwd_kernel(const __grid_constant__ CUtensorMap q_map, const __grid_constant__ CUtensorMap k_map,
                     const __grid_constant__ CUtensorMap v_map, const __grid_constant__ CUtensorMap o_map,
                     const float* __restrict__ q_scale, const float* __restrict__ k_scale,
                     const float* __restrict__ v_scale, const float* __restrict__ v_offset, float* __restrict__ lse,
                     const uint4* __restrict__ key_bits, int heads, int q_len, int kv_len_all, float scale_log2,
                     float rescale_slack, Split split) {
  using F = Format<In, kHeadDim, kKeys>;
  constexpr bool kPromoteO = F::kPromoteO, kIntPV = F::kIntPV;
  constexpr int kGroups = F::kGroups, kSRegs = F::kSRegs, kWords = (kKeys + 31) / 32;
  // The 16-bit forms' consumers issue their products in turn (named barriers); the 8-bit forms' each as soon as it
  // is ready: their products are half as long, and over runs 46-54 the two schedules measured the same within +-5%.
  constexpr bool kTakeTurns = !F::k8Bit || kTurns != 0;
  // kTurns = 2 (kIntPV): a consumer passes the turn once its products are done, not once they are issued, so the
  // two consumers' products never share the tensor cores and each one's softmax runs while the other's products do
  // (ping-pong by phase; session 23). Measured 0.5-1.5% slower than kTurns = 1 on an H200 (run 85): a
  // sub-partition's tensor core already takes the products in order (bench/flash_trace.cu, bench/NOTES.md).
  constexpr bool kPassWhenDone = kTurns == 2;
  static_assert(kTurns == 0 || kIntPV, "the 8-bit turn options are the int8 P/V form's");
  constexpr int kTileBytes = F::kTileBytes;
  constexpr float kIntBias = 12582912.f;  // 1.5 * 2^23, bits 0x4B400000
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* q_tile = smem;
  uint8_t* k_tiles = smem + kTileBytes;
  uint8_t* v_tiles = k_tiles + F::kKTileBytes * kStages;
  uint8_t* out_stage = F::k8Bit ? v_tiles + F::kVTileBytes * kStages : q_tile;
  Barriers<kStages>& bars = *reinterpret_cast<Barriers<kStages>*>(v_tiles + F::kVTileBytes * kStages +
                                                                  F::kOutStageBytes);

  static_assert(!kSplit || kKeys == kBlockN || !F::k8Bit, "the 8-bit tail split takes 128-key tiles");
  int m_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  // kSplit: part (-1: a whole tile) and first_block, the first of this CTA's key blocks; kv_len: its keys.
  int part = -1, first_block = 0, kv_len = kv_len_all;
  if constexpr (kSplit) {
    int tile = blockIdx.x;
    if (tile >= split.n_main) {
      const int slot = tile - split.n_main, all_blocks = (kv_len_all + kKeys - 1) / kKeys;
      part = slot % split.n_splits;
      tile = split.n_main + slot / split.n_splits;
      first_block = part * all_blocks / split.n_splits;
      kv_len = min(kv_len_all, (part + 1) * all_blocks / split.n_splits * kKeys) - first_block * kKeys;
    }
    const int m_blocks = (q_len + kBlockM - 1) / kBlockM;
    m_block = tile % m_blocks, head = tile / m_blocks % heads, batch = tile / m_blocks / heads;
  }
  // Broadcast from lane 0: the compiler then knows it is warp-uniform and keeps what derives from it (the Q
  // rows' wgmma descriptor) in uniform registers.
  const int warpgroup = __shfl_sync(0xffffffff, int(threadIdx.x / 128), 0);
  const int n_blocks = (kv_len + kKeys - 1) / kKeys;          // tiles
  const int n_scale_blocks = (kv_len_all + kBlockN - 1) / kBlockN;  // 128-key blocks: K and V scales, key bits

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
      for (int h = 0; h < F::kBoxes; ++h)
        tma_load_4d(q_tile + h * kHalfBytes, &q_map, &bars.q_full, h * F::kBoxCols, head, m_block * kBlockM, batch);
      for (int j = 0; j < n_blocks; ++j) {
        const int s = j % kStages;
        const uint32_t free_parity = ((j / kStages) & 1) ^ 1;  // the first round finds fresh barriers "done"
        mbar_wait(&bars.k_empty[s], free_parity);
        mbar_arrive_expect_tx(&bars.k_full[s], F::kKTileBytes);
        for (int h = 0; h < F::kBoxes; ++h)
          tma_load_4d(k_tiles + s * F::kKTileBytes + h * kKeys * 128, &k_map, &bars.k_full[s], h * F::kBoxCols,
                      head, (first_block + j) * kKeys, batch);
        mbar_wait(&bars.v_empty[s], free_parity);
        mbar_arrive_expect_tx(&bars.v_full[s], F::kVTileBytes);
        if constexpr (F::k8Bit) {
          for (int b = 0; b < F::kVTileBytes / kHalfBytes; ++b)
            tma_load_4d(v_tiles + s * F::kVTileBytes + b * kHalfBytes, &v_map, &bars.v_full[s],
                        (first_block + j) * kKeys + b * kBlockN, 0, head, batch);
        } else {
          for (int h = 0; h < F::kBoxes; ++h)
            tma_load_4d(v_tiles + s * F::kVTileBytes + h * F::kKBoxBytes, &v_map, &bars.v_full[s], h * 64, head,
                        (first_block + j) * kKeys, batch);
        }
      }
    }
    return;
  }

  regs_inc<240>();
  const int wg = warpgroup - 1;  // this consumer's rows: wg * 64 ... wg * 64 + 63 of the block
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  // (VKERN_FLASH_TRACE: loop top, ready to issue, issued, products done, softmax done, block done.)
  auto stamp = [&](int j, int event) {
#ifdef VKERN_FLASH_TRACE
    if (m_block == kTraceCta && head == 0 && batch == 0 && lane == 0 && j >= kTraceFirst &&
        j < kTraceFirst + kTraceBlocks)
      g_flash_trace[wg][warp][j - kTraceFirst][event] = clock64();
#endif
  };
  // wgmma descriptors: this consumer's Q rows (in each column box) and stage 0 of the K and V rings.
  const SmemDesc q_rows = SmemDesc::sw128(q_tile + wg * 64 * 128, 16, 1024);
  const SmemDesc k_ring = SmemDesc::sw128(k_tiles, 16, 1024);
  const SmemDesc v_ring = SmemDesc::sw128(v_tiles, F::k8Bit ? 16 : F::kKBoxBytes, 1024);
  float o[kHeadDim / 2], s[kSRegs], t[kHeadDim / 2];  // t: the promoted forms' per-block P V
  uint32_t s_int[kSRegs];                              // S8's int32 accumulator
  uint32_t t_int[kIntPV ? kHeadDim / 2 : 1] = {};      // kIntPV: the block's P V', int32 (t is unused)
  float p_factor[2] = {0.f, 0.f};  // kIntPV: exp2(block max - running max) of the last softmax's block, per row
  float p_sum[2] = {0.f, 0.f};     // kIntPV: this thread's sum of the last packed block's P codes, per row
  float corr[2] = {0.f, 0.f};      // kIntPV: sum over blocks of p_sum * the block's factor (rescaled with O)
  uint32_t p[F::kPRegs];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) o[i] = t[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // max in scaled log2 units
  // Score -> log2 units, per row: the softmax scale, times the query's scale for 8-bit (and, per block, the
  // block's K scale: softmax's key_scale).
  float row_scale[2] = {scale_log2, scale_log2};
  if constexpr (F::k8Bit) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m_block * kBlockM + wg * 64 + warp * 16 + lane / 4 + 8 * r;
      if (row < q_len) row_scale[r] *= __ldg(q_scale + (int64_t(batch) * heads + head) * q_len + row);
    }
  }

  // Tile j's key-padding bits (all set without a mask: key c of the tile is bit c % 32 of word c / 32) and its K
  // scales (8-bit; the wide tile: one per 64-key group, from its 128-key block) and V scales (the wide tile only);
  // loaded before the S wait, but for the 8-bit wide tile's bits (registers: loaded in the softmax, with a mask only).
  // The 16-bit wide tile's bits come as a 32-byte record per tile (its 176 bits, then zeros; the host repacks them):
  // loaded before the S wait, but only their AND is kept through it (words[0]: registers), and the softmax reads the
  // record again (L1) only where some key is masked.
  constexpr bool kBitRecords = !F::k8Bit && kKeys != kBlockN;
  static_assert(!kBitRecords || (kWords > 4 && kWords <= 8), "a record's words are read as two uint4s");
  struct Tile {
    uint32_t words[kKeys == kBlockN ? kWords : 1];  // kBitRecords: the AND of the tile's words
    float key_scale[kGroups], value_scale[kGroups];
  };
  const int64_t scale_row = (int64_t(batch) * heads + head) * n_scale_blocks + first_block;
  auto bit_record = [&](int j) {  // kBitRecords: tile j's record
    return key_bits + (int64_t(batch) * ((kv_len_all + kKeys - 1) / kKeys) + first_block + j) * 2;
  };
  auto record_words = [&](int j, uint32_t(&w)[kWords]) {  // kBitRecords: tile j's record, its first kWords words
    const uint4 a = __ldg(bit_record(j)), b = __ldg(bit_record(j) + 1);
    const uint32_t all[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = all[i];
  };
  auto tile_of = [&](int j) {
    Tile tile;
    if constexpr (kKeys == kBlockN) {
      const uint4 b = key_bits == nullptr ? make_uint4(~0u, ~0u, ~0u, ~0u)
                                          : __ldg(key_bits + int64_t(batch) * n_scale_blocks + first_block + j);
      tile.words[0] = b.x, tile.words[1] = b.y, tile.words[2] = b.z, tile.words[3] = b.w;
    }
    if constexpr (kBitRecords) {
      tile.words[0] = ~0u;
      if (key_bits != nullptr) {
        uint32_t w[kWords];
        record_words(j, w);
        w[kWords - 1] |= kKeys % 32 ? ~0u << (kKeys % 32) : 0u;  // the last word's bits past the keys
#pragma unroll
        for (int i = 1; i < kWords; ++i) w[0] &= w[i];
        tile.words[0] = w[0];
      }
    }
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      const int block = kGroups == 1 ? j : min((kGroups * j + g) / 2, n_scale_blocks - 1);
      tile.key_scale[g] = F::k8Bit ? __ldg(k_scale + scale_row + block) : 1.f;
      tile.value_scale[g] = F::kShiftV ? __ldg(v_scale + scale_row + block) : 1.f;
    }
    return tile;
  };
  // The promoted forms: block j's V scale, which its P V product takes as it is added to O.
  auto value_scale_of = [&](int j) { return F::kPromoteO ? __ldg(v_scale + scale_row + j) : 1.f; };
  float v_sigma = 0.f;  // kShiftV: the largest V scale so far; O is kept in its units
  float o_scale[2];     // what rescale_o multiplies O by: alpha (kShiftV: times the old sigma / the new)
  // Masks the keys past kv_len and the padded ones, updates the running max and returns P = exp2(scale * s - max)
  // (8-bit: times 448; kShiftV: times each group's v_scale / sigma) in s, its row sums (unshifted) in sum and the
  // factor alpha that rescales what was accumulated before. The multipliers (> 0) commute with the max, so they
  // scale per-group maxima, not each score.
  auto softmax = [&](int j, const Tile& tile, float (&alpha)[2], float (&sum)[2]) {
    constexpr int kGroupRegs = kSRegs / kGroups;  // register i is in group i / kGroupRegs
    float mult[2][kGroups];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int g = 0; g < kGroups; ++g) mult[r][g] = F::k8Bit ? row_scale[r] * tile.key_scale[g] : scale_log2;
    // kShiftV: each group's P shift log2(v_scale / sigma) <= 0 (at least -24, so that 2^-shift stays finite for a
    // zero scale: such a group's V codes are 0) and 2^-shift, which takes it out of the row sums.
    // (Logarithms, not divisions: an IEEE division is a call with a slow path.)
    float shift[kGroups], unshift[kGroups], sigma_ratio = 1.f;
    if constexpr (F::kShiftV) {
      float sigma = v_sigma;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) sigma = fmaxf(sigma, tile.value_scale[g]);
      const float log_sigma = sigma > 0.f ? lg2(sigma) : 0.f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        shift[g] = fmaxf(lg2(tile.value_scale[g]) - log_sigma, -24.f);  // lg2(0) = -inf
        unshift[g] = ex2(-shift[g]);
      }
      sigma_ratio = sigma > 0.f ? ex2(lg2(v_sigma) - log_sigma) : 1.f;  // 0 before the first scale
      v_sigma = sigma;
    }
    const int cols_left = kv_len - j * kKeys;
    if (cols_left < kKeys) {
#pragma unroll
      for (int i = 0; i < kSRegs; ++i)
        if ((i / 4) * 8 + (lane % 4) * 2 + i % 2 >= cols_left) s[i] = -INFINITY;
    }
    uint32_t words[kWords], all = ~0u;
    if constexpr (kKeys == kBlockN) {
#pragma unroll
      for (int w = 0; w < kWords; ++w) words[w] = tile.words[w];
    } else if (kBitRecords && tile.words[0] != ~0u) {
      record_words(j, words);
    } else if (F::k8Bit && key_bits != nullptr) {  // 8 bytes per 64-key group; the groups past the last block (all
      // past kv_len).
      const uint2* row_bits = reinterpret_cast<const uint2*>(key_bits) + int64_t(batch) * n_scale_blocks * 2;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int group = kGroups * j + g;
        const uint2 b = group < 2 * n_scale_blocks ? __ldg(row_bits + group) : make_uint2(0u, 0u);
        words[2 * g] = b.x, words[2 * g + 1] = b.y;
      }
    } else {
#pragma unroll
      for (int w = 0; w < kWords; ++w) words[w] = ~0u;
    }
#pragma unroll
    for (int w = 0; w < kWords; ++w) all &= words[w];
    if (all != ~0u) {  // the same bits in every thread: no divergence
#pragma unroll
      for (int w = 0; w < kWords; ++w) words[w] >>= (lane % 4) * 2;
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) {  // column (i / 4) * 8 + (lane % 4) * 2 + i % 2: never crosses a word
        const int c = (i / 4) * 8 + i % 2;
        if (!((words[c / 32] >> (c % 32)) & 1u)) s[i] = -INFINITY;
      }
    }
    // Row maxima as partial chains per row and group (8 deep, not 32: the first row's max is the head of the
    // softmax's serial path, and ptxas does not reassociate fmaxf). kIntPV: the scores' bits (kIntBias + S, or a
    // masked score's -inf) order as signed ints, so a row's maximum is a tree of three-input integer maxima, and the
    // quad's is taken on the bits too (the multiplier, the same in the quad's lanes, is monotone), as top; the
    // quad's shuffles issued together in the split instantiation, one after the other in the plain one, the faster
    // form for each (run 131: ptxas schedules the two loops differently; bench/NOTES.md session 34).
    constexpr int kChains = kGroups == 1 ? 4 : 1;
    float mx[2][kGroups][kChains], neg_max[2][kGroups], top[2];
    if constexpr (!kIntPV) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int g = 0; g < kGroups; ++g)
#pragma unroll
          for (int c = 0; c < kChains; ++c) mx[r][g][c] = -INFINITY;
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) {
        float& m = mx[(i / 2) % 2][i / kGroupRegs][(i / 4) % kChains];
        // S8: a chain starts at its first score (never NaN), saving an fmaxf with -inf that ptxas keeps
        const bool first = F::kIntQK && i % 2 == 0 && i % kGroupRegs < 4 * kChains;
        m = first ? s[i] : fmaxf(m, s[i]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max;
      if constexpr (kIntPV) {
        int bits[kSRegs / 2];  // row r's registers: columns (k / 2) * 8 + k % 2 (+ the lane's)
#pragma unroll
        for (int k = 0; k < kSRegs / 2; ++k) bits[k] = __float_as_int(s[(k / 2) * 4 + 2 * r + k % 2]);
        top[r] = __int_as_float(quad_max<kSplit>(max_tree<kSRegs / 2>(bits)));
        block_max = (top[r] - kIntBias) * mult[r][0];
      } else {
        float thread_max = -INFINITY;
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          const float m = kChains == 4 ? fmaxf(fmaxf(mx[r][g][0], mx[r][g][1]), fmaxf(mx[r][g][2], mx[r][g][3]))
                                       : mx[r][g][0];
          const float scaled = (m - (F::kIntQK ? kIntBias : 0.f)) * mult[r][g];
          thread_max = g == 0 ? scaled : fmaxf(thread_max, scaled);
        }
        block_max = quad_max(thread_max);
      }
      // kIntPV: the max O is kept against moves only when a block's row max passes it by more than rescale_slack
      // (log2 units, <= 8), so that O's rescale (64 FMULs) is rarely taken; P is against the block's own max anyway,
      // and its factor exp2(block max - that max) stays <= 2^8 (run 88: slack 8 +0.3-2.5%). 0: the running max.
      const float new_max = kIntPV ? (block_max > row_max[r] + rescale_slack ? block_max : row_max[r])
                                   : fmaxf(row_max[r], block_max);
      // No attended key in this row yet (only with a mask): exp2 against 0 keeps -inf scores at 0, not NaN.
      const float offset = new_max == -INFINITY ? 0.f : new_max;
      // What P is taken against: the running max, or (kIntPV, through top below) the block's own, whose factor
      // against the running max goes with the block's P V (0 for a block with no attended key in this row).
      const float p_max = offset;
      if constexpr (F::kIntPV) p_factor[r] = block_max == -INFINITY ? 0.f : ex2(block_max - offset);
      alpha[r] = ex2(row_max[r] - offset);
      o_scale[r] = F::kShiftV ? alpha[r] * sigma_ratio : alpha[r];
      row_max[r] = new_max;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const float base = F::k8Bit ? (F::kShiftV ? F::kPOffset + shift[g] : F::kPOffset) - p_max
                                    : -offset;  // (0 - x is not -x at x = 0: no fold)
        // kIntPV: kPOffset - (block max) - kIntBias mult, taken from top in one rounding (three dependent steps
        // fewer at the head of the softmax's serial path); a row with no attended key in the block as with 0.
        neg_max[r][g] = kIntPV       ? fmaf(-(top[r] == -INFINITY ? kIntBias : top[r]), mult[r][g], F::kPOffset)
                        : F::kIntQK ? fmaf(-kIntBias, mult[r][g], base)
                                    : base;
      }
    }
    // Partial sums per row: two chains (shorter, as the max), or one per group (each unshifted once).
    constexpr int kSumChains = kGroups == 1 ? 2 : kGroups;
    float part[2][kSumChains];
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < kSumChains; ++c) part[r][c] = 0.f;
#pragma unroll
    for (int i = 0; i < kSRegs; ++i) {
      const int r = (i / 2) % 2, g = i / kGroupRegs;
      const float x = fmaf(s[i], mult[r][g], neg_max[r][g]);
      s[i] = kIntPV && (i % 8) >= 8 - kExpFma ? ex2_fma(x) : ex2(x);
      if constexpr (!kIntPV) part[r][kGroups == 1 ? (i / 4) % 2 : g] += s[i];
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if constexpr (F::kShiftV) {
        sum[r] = 0.f;
#pragma unroll
        for (int g = 0; g < kGroups; ++g) sum[r] = fmaf(part[r][g], unshift[g], sum[r]);
      } else {
        sum[r] = kIntPV ? 0.f : part[r][0] + part[r][1];  // kIntPV: the codes' sums, in add_t
      }
    }
  };
  auto to_p = [&] {
    if constexpr (F::k8Bit) {
      const auto pack4 = [](float a, float b, float c, float d) {
        return F::kIntPV ? pack4_u8(a, b, c, d) : pack4_e4m3(a, b, c, d);
      };
#pragma unroll
      for (int kk = 0; kk < kKeys / 32; ++kk) {  // keys 32 kk + (0, 1, 8, 9 | 16, 17, 24, 25) + 2 (lane % 4), rows r, r + 8
        const float* g = s + 16 * kk;
        p[4 * kk] = pack4(g[0], g[1], g[4], g[5]);
        p[4 * kk + 1] = pack4(g[2], g[3], g[6], g[7]);
        p[4 * kk + 2] = pack4(g[8], g[9], g[12], g[13]);
        p[4 * kk + 3] = pack4(g[10], g[11], g[14], g[15]);
      }
      if constexpr (F::kIntPV) {  // the codes' sums per row: registers 4 kk (+ 2) hold row r, 4 kk + 1 (+ 2) row r + 8
        uint32_t sums[4] = {0u, 0u, 0u, 0u};  // two chains per row (dp4a's latency)
#pragma unroll
        for (int i = 0; i < F::kPRegs; ++i) sums[i % 4] = __dp4a(p[i], 0x01010101u, sums[i % 4]);
        p_sum[0] = float(sums[0] + sums[2]), p_sum[1] = float(sums[1] + sums[3]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kSRegs / 2; ++i) p[i] = pack2<In>(s[2 * i], s[2 * i + 1]);
    }
  };
  // The K stage of block j is free once its product is done.
  auto release_k = [&](int stage) {
    if (tid == 0) mbar_arrive(&bars.k_empty[stage]);
  };
  // Arrivals on the other consumer's turn barrier must match its syncs: consumer 1 gives consumer 0 the first
  // turn and skips its own last arrival.
  auto pass_turn = [&](int j) {
    if (kTakeTurns && !(wg == 1 && j == n_blocks - 1)) bar_arrive(kTurnBarrier + 1 - wg, 256);
  };
  auto wait_turn = [&] {
    if (kTakeTurns) bar_sync(kTurnBarrier + wg, 256);
  };

  // S's registers around an async product (S8: its int32 accumulator; the wide tile's S8 form fences only that,
  // so that s, dead there, does not hold 96 registers through the product).
  constexpr bool kFenceFloatS = !F::kIntQK || kKeys == kBlockN;
  auto fence_s = [&] {
    if constexpr (kFenceFloatS) fence_regs(s);
    if constexpr (F::kIntQK) fence_regs(s_int);
  };
  auto fence_t = [&] {
    if constexpr (kIntPV)
      fence_regs(t_int);
    else if constexpr (kPromoteO)
      fence_regs(t);
  };
  // S8: the S accumulator's start value (16-bit and E4M3 overwrite it with the first product).
  auto start_s = [&] {
    if constexpr (F::kIntQK) {
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) s_int[i] = __float_as_uint(kIntBias);
      fence_regs(s_int);
    }
  };
  // After the S wait: S8's int32 bits, read as fp32, are kIntBias + S.
  auto read_s = [&] {
    if constexpr (F::kIntQK) {
      fence_regs(s_int);
#pragma unroll
      for (int i = 0; i < kSRegs; ++i) s[i] = __uint_as_float(s_int[i]);
    }
    fence_regs(s);
  };

  if (kTakeTurns && wg == 1) bar_arrive(kTurnBarrier, 256);
  mbar_wait(&bars.q_full, 0);
  // kPackEarly (kIntPV: no product in flight through its softmax): P is packed and S's start values written as the
  // softmax ends, where the exponentials' wait on MUFU.EX2 leaves issue slots, not before the next S.
  constexpr bool kPackEarly = kIntPV;
  // kLateAdd (kIntPV): block j - 1's P V goes into O after block j's softmax in program order (the same operations
  // on O in the same order), so that ptxas places the 64 FFMAs in the exponentials' MUFU.EX2 gaps instead of ahead
  // of the row max (run 84: +5-13% in every schedule).
  constexpr bool kLateAdd = kIntPV;
  auto pack_early = [&] {
    if constexpr (kPackEarly) {
      to_p();
      start_s();
    }
  };
  float alpha[2];  // rescales O before the next PV product adds to it (O is still 0 after block 0)
  {  // block 0: S only
    float sum[2];
    const Tile tile = tile_of(0);
    mbar_wait(&bars.k_full[0], 0);
    wait_turn();
    start_s();
    wgmma_fence();
    issue_qk<In, kHeadDim, kKeys>(s, s_int, q_rows, k_ring);
    wgmma_commit();
    fence_s();
    if constexpr (!kPassWhenDone) pass_turn(0);
    wgmma_wait<0>();
    if constexpr (kPassWhenDone) pass_turn(0);
    read_s();
    release_k(0);
    softmax(0, tile, alpha, sum);
    row_sum[0] = sum[0];  // (kIntPV: 0; the codes' sums come in add_t)
    row_sum[1] = sum[1];
    pack_early();
  }
  // What the softmax of block j - 1 left, in two parts around the issue of S_j (the caller has waited for the PV
  // product of block j - 2). pack_block (before S_j: P_{j-1} is in S's registers) releases that V stage and
  // packs P_{j-1}; rescale_o (while S_j is computed: O is not its accumulator) rescales O by alpha. (Packing
  // after the softmax instead, ptxas hoisted the wait above the exponentials: P's registers are the in-flight
  // product's A operand, bench/NOTES.md session 10.)
  auto pack_block = [&](int free_stage) {  // (free_stage: the V stage to release, or -1)
    if (free_stage >= 0 && tid == 0) mbar_arrive(&bars.v_empty[free_stage]);
    if constexpr (!kPackEarly) to_p();
  };
  // (pf: the block's p_factor; kLateAdd passes the one saved before the next softmax overwrote it.)
  auto add_t = [&](float value_scale, const float (&pf)[2]) {
    if constexpr (kIntPV) {  // t's bits are P V' * 2^-149; 2^-24: P's unit in the row sums (kPOffset)
      constexpr float kUnit = 0x1p77f;  // 2^(149 - 24 - 48)
      const float factor[2] = {pf[0] * (value_scale * kUnit), pf[1] * (value_scale * kUnit)};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        corr[r] = fmaf(p_sum[r], factor[r], corr[r]);
        row_sum[r] = fmaf(p_sum[r], pf[r] * 0x1p-24f, row_sum[r]);  // P's codes, in P's unit (kPOffset)
      }
#pragma unroll
      for (int i = 0; i < kHeadDim / 2; ++i)
        o[i] = fma_subnormal(__uint_as_float(t_int[i]), factor[(i / 2) % 2], o[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kHeadDim / 2; ++i) o[i] = fmaf(t[i], value_scale, o[i]);
    }
  };
  auto rescale_o = [&] {
    fence_regs(o);
    // Late in a row the max rarely moves (alpha = 1 exactly): the warp skips the multiplies (same result).
    if (__any_sync(0xffffffff, o_scale[0] != 1.f || o_scale[1] != 1.f)) {
#pragma unroll
      for (int i = 0; i < kHeadDim / 2; ++i) o[i] *= o_scale[(i / 2) % 2];
    }
    fence_regs(o);
    if constexpr (kIntPV)
      corr[0] *= o_scale[0], corr[1] *= o_scale[1], row_sum[0] *= o_scale[0], row_sum[1] *= o_scale[1];
  };
  // O += P V, or t = P V (kPromoteO).
  auto issue_pv_block = [&](SmemDesc v_tile) {
    if constexpr (kIntPV)
      issue_pv_int(t_int, p, v_tile);
    else if constexpr (kPromoteO)
      issue_pv<In, kHeadDim, kKeys>(t, p, v_tile, true);
    else
      issue_pv<In, kHeadDim, kKeys>(o, p, v_tile);
  };
  // Ring position as counters, not j % kStages (the divisions were a chain of uniform multiplies between the loop
  // top and the first wgmma; run 92: +0.8-1.8%): st, k_parity: K_j's stage and parity; prev, v_parity: V_{j-1}'s,
  // carried from the last iteration; V_{j-2}'s stage is the one before prev.
  int st = 1 % kStages, prev = 0;
  uint32_t k_parity = 1 / kStages, v_parity = 0;
  for (int j = 1; j < n_blocks; ++j) {  // S_j = Q K_j^T and O += P_{j-1} V_{j-1} in flight together
    const int free_stage = j < 2 ? -1 : prev == 0 ? kStages - 1 : prev - 1;
    stamp(j, 0);
    const Tile tile = tile_of(j);  // in flight while the products run
    const float value_scale = kPromoteO ? value_scale_of(j - 1) : 1.f;
    // (Both checks issued back to back: run 94, +1.0-2.3% against two mbar_wait calls.)
    mbar_wait2(&bars.k_full[st], k_parity, &bars.v_full[prev], v_parity);
    wgmma_wait<0>();  // the PV product of block j - 2
    fence_regs(o);
    fence_t();
    pack_block(kPackEarly ? -1 : free_stage);  // V_{j-2}'s stage
    stamp(j, 1);
    wait_turn();
    if constexpr (!kPackEarly) start_s();
    if constexpr (kFenceFloatS) fence_regs(s);
    wgmma_fence();
    issue_qk<In, kHeadDim, kKeys>(s, s_int, q_rows, k_ring.plus(st * F::kKTileBytes));
    wgmma_commit();
    fence_s();
    // (kPackEarly: V_{j-2}'s release after the S issue, so that ptxas sets up S's descriptors before the mbarrier
    // wait, not after it: loop top -> first IGMMA 62 -> 42 static clocks; run 97: +0.4-0.6% at 720p, 0 at 480p.)
    if (kPackEarly && free_stage >= 0 && tid == 0) mbar_arrive(&bars.v_empty[free_stage]);
    if constexpr (!kPromoteO) rescale_o();
    wgmma_fence();  // O (or P) was written by ordinary instructions
    issue_pv_block(v_ring.plus(prev * F::kVTileBytes));
    wgmma_commit();
    fence_s();
    fence_regs(o);
    fence_t();
    if constexpr (!kPassWhenDone) pass_turn(j);
    stamp(j, 2);
    if constexpr (kPromoteO) {
      rescale_o();      // (O is no product's accumulator here: rescaled after the issues, out of the turn)
      wgmma_wait<0>();  // S_j and the PV product of block j - 1, which goes into O now
      stamp(j, 3);
      if constexpr (kPassWhenDone) pass_turn(j);
      fence_regs(o);
      fence_t();
      if constexpr (!kLateAdd) add_t(value_scale, p_factor);
    } else {
      wgmma_wait<1>();  // S_j; the PV product stays in flight through the softmax
    }
    const float prev_factor[2] = {p_factor[0], p_factor[1]};  // (kLateAdd: block j - 1's)
    read_s();
    release_k(st);
    float sum[2];
    softmax(j, tile, alpha, sum);
    stamp(j, 4);
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if constexpr (!kIntPV) row_sum[r] = row_sum[r] * alpha[r] + sum[r];  // (kIntPV: with O, in rescale_o)
    if constexpr (kLateAdd) add_t(value_scale, prev_factor);
    pack_early();
    stamp(j, 5);
    prev = st, v_parity = k_parity;  // K_j and V_j share stage j % kStages
    if (++st == kStages) st = 0, k_parity ^= 1u;
  }
  {  // the last block's PV product (its V stage and the one before are never refilled: not released). Its stage
     // and parity are prev's and v_parity's, recomputed: read after the loop, those made ptxas copy them at the loop
     // top (2 more instructions, +2 static clocks before the first IGMMA of the int8 P/V loop; session 28).
    const int last = (n_blocks - 1) % kStages;
    const float value_scale = kPromoteO ? value_scale_of(n_blocks - 1) : 1.f;
    mbar_wait(&bars.v_full[last], ((n_blocks - 1) / kStages) & 1);
    wgmma_wait<0>();
    fence_regs(o);
    fence_t();
    pack_block(-1);
    rescale_o();
    wgmma_fence();
    issue_pv_block(v_ring.plus(last * F::kVTileBytes));
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
    fence_t();
    if constexpr (kPromoteO) add_t(value_scale, p_factor);
  }

  // Epilogue: O / l into this consumer's output stage (16-bit: its now unused Q rows) in the swizzled layout, then
  // one TMA store.
  float inv[2], attended[2], o_corr[2];  // o_corr: kIntPV's 128 sum(P) terms in O
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    o_corr[r] = kIntPV ? quad_sum(corr[r]) * 0x1p-142f : 0.f;  // 128 * 2^-149 * factor * sum(P)
    row_sum[r] = quad_sum(row_sum[r]);
    attended[r] = row_sum[r] > 0.f ? 1.f : 0.f;
    // 0: every key masked (out 0, lse -inf). kShiftV: O is in units of sigma.
    inv[r] = row_sum[r] > 0.f ? (F::kShiftV ? v_sigma : kIntPV ? 0x1p48f : 1.f) / row_sum[r] : 0.f;
  }
  // v_offset (8-bit, may be null: fp32 [B, H, D]): this thread's columns (i / 4) * 8 + (lane % 4) * 2 + {0, 1}, one
  // fp32 pair per i / 4.
  const float2* offsets =
      F::k8Bit && v_offset != nullptr
          ? reinterpret_cast<const float2*>(v_offset + (int64_t(batch) * heads + head) * kHeadDim) + lane % 4
          : nullptr;
  uint8_t* o_rows = out_stage + wg * 64 * 128;
  // kSplit, a tail tile's part: its rows of O (fp32, unrounded) and lse go to the split workspace, slot by slot.
  const bool to_split = kSplit && part >= 0;
  const int64_t split_row = int64_t(blockIdx.x - split.n_main) * kBlockM + wg * 64;
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; i += 2) {
    const int r = (i / 2) % 2, row = warp * 16 + lane / 4 + 8 * r, col_tile = i / 4;
    const int chunk = (col_tile % 8) ^ (row % 8);
    uint8_t* dst = o_rows + (col_tile / 8) * kHalfBytes + row * 128 + chunk * 16 + (lane % 4) * 4;
    float lo = o[i] * inv[r], hi = o[i + 1] * inv[r];
    if constexpr (kIntPV) lo = (o[i] - o_corr[r]) * inv[r], hi = (o[i + 1] - o_corr[r]) * inv[r];
    if (F::k8Bit && offsets != nullptr) {
      const float2 c = __ldg(offsets + 4 * col_tile);
      lo += c.x * attended[r], hi += c.y * attended[r];
    }
    if (to_split)
      *reinterpret_cast<float2*>(split.o + (split_row + row) * kHeadDim + col_tile * 8 + (lane % 4) * 2) =
          make_float2(lo, hi);
    else
      *reinterpret_cast<uint32_t*>(dst) = pack2<Out>(lo, hi);
  }
  // The log-sum-exp of row r's scores, natural log (-inf for a row with no attended key).
  auto row_lse = [&](int r) { return (row_max[r] + log2f(row_sum[r]) - F::kPOffset) * 0.6931471805599453f; };
  if (to_split) {
    if (lane % 4 == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) split.lse[split_row + warp * 16 + lane / 4 + 8 * r] = row_lse(r);
    }
    return;
  }
  fence_async_smem();
  bar_sync(kStoreBarrier + wg, 128);
  if (tid == 0) {
    for (int h = 0; h < F::kOutBoxes; ++h)
      tma_store_4d(&o_map, o_rows + h * kHalfBytes, h * 64, head, m_block * kBlockM + wg * 64, batch);
    tma_store_commit_and_wait();
  }
  if (lse != nullptr && lane % 4 == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m_block * kBlockM + wg * 64 + warp * 16 + lane / 4 + 8 * r;
      if (row < q_len) lse[(int64_t(batch) * heads + head) * q_len + row] = row_lse(r);
    }
  }
}

// kSplit's second step: the output rows of the tail tiles, from their parts' O and lse in the split workspace
// (out = sum_p w_p O_p / sum_p w_p, w_p = exp(lse_p - max lse)). One CTA per row, one thread per column.
template <typename Out>
__global__ void flash_split_merge_kernel(Split split, Out* __restrict__ out, AttentionTensor layout,
                                         float* __restrict__ lse, int heads, int q_len) {
  const int tail_tile = blockIdx.x / kBlockM, tile_row = blockIdx.x % kBlockM, col = threadIdx.x;
  const int m_blocks = (q_len + kBlockM - 1) / kBlockM, tile = split.n_main + tail_tile;
  const int m_block = tile % m_blocks, head = tile / m_blocks % heads, batch = tile / m_blocks / heads;
  const int row = m_block * kBlockM + tile_row;
  if (row >= q_len) return;
  const int64_t first = int64_t(tail_tile) * split.n_splits * kBlockM + tile_row;  // part p: first + p * kBlockM
  float top = -INFINITY;
  for (int p = 0; p < split.n_splits; ++p) top = fmaxf(top, split.lse[first + p * kBlockM]);
  float sum = 0.f, acc = 0.f;
  if (top != -INFINITY) {
    for (int p = 0; p < split.n_splits; ++p) {
      const float w = __expf(split.lse[first + p * kBlockM] - top);
      sum += w;
      acc = fmaf(w, split.o[(first + p * kBlockM) * blockDim.x + col], acc);
    }
  }
  out[batch * layout.batch_stride + row * layout.seq_stride + head * layout.head_stride + col] =
      Out(top == -INFINITY ? 0.f : acc / sum);
  if (lse != nullptr && col == 0)
    lse[(int64_t(batch) * heads + head) * q_len + row] = top == -INFINITY ? -INFINITY : top + logf(sum);
}

}  // namespace
}  // namespace vkern
