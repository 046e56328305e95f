// Causal 3D convolution for Hopper, written for vkern (design notes: bench/NOTES.md, "Session 16").
//
// Implicit GEMM on channels-last data: M = output pixels, N = output channels, K = taps x input channels.
// A tile is 4 output rows x 64 output columns of one output frame (256 pixels) x block_n (8, 96 or 128) output
// channels; persistent CTAs (as many as fit on the SMs at once) loop over tiles (or one CTA per tile), in three
// warpgroups:
//   producer (warpgroup 0): warps 1-3 copy the input halo of the tile (6 rows x 66 columns of one 64-byte channel
//     chunk of one input frame) into a ring of shared-memory slots with 16-byte cp.async (zero-filled outside the
//     frame: the spatial padding), one slot per (time tap, channel chunk); lane 0 of warp 0 bulk-copies the packed
//     weight slab [chunk x block_n] of each of the 9 spatial taps into a second ring.
//   consumers (warpgroups 1, 2): 2 output rows each, as two 64-row wgmma products (m64 x block_n x 32 bytes of
//     channels) per tap and half chunk. A tap's A operand is the halo shifted by (dh, dw): the halo is stored
//     unswizzled as [row][16-byte channel group][column][group], so the 64 pixels of an output row at tap (dh, dw)
//     are 64 consecutive 16-byte rows starting at column dw, a valid wgmma core-matrix layout at any start
//     (K-major, lbo = one channel group, sbo = 8 pixels). Each input pixel is read from L2 once per (time tap,
//     channel chunk) instead of once per tap.
// Types: bf16/fp16 (a group is 8 channels, a chunk 32, a k-step k16), or fp32 with TF32 products (a group 4
// channels, a chunk 16, a k-step k8: the same bytes, so the same layout, rings and descriptors).
// Time: output frame t reads padded frames t ... t + KT - 1; a padded frame is a frame of x, of the cache (read in
// place, any frame stride) or zeros (its taps are skipped: no copy, no product). Bias (fp32) and a residual (a
// residual block's shortcut, optional) are added in fp32 and each output is rounded once.
// Narrow (block_n 8: an RGB output, bound by L2 bandwidth, run 190): a tile is kNarrowFrames consecutive output
// frames of the spatial tile. Each input frame's halo is fetched once for all of them (kNarrowFrames + 2 fetches
// instead of 3 kNarrowFrames), and one product of N = 8 x (time taps that reach a tile frame) adds its taps into
// every output frame that reads it: the packed weight's time taps are the product's N blocks (sbo = the time-tap
// stride), so each halo row is read from shared memory once per input frame, not once per output frame. The whole
// packed weight stays in shared memory (loaded once per CTA: no slab ring); 3 x 3 x 3 kernels only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <utility>

#include "causal_conv.h"
#include "sm90.cuh"

namespace vkern {
namespace {

using namespace sm90;

constexpr int kRows = 4, kCols = 64;                    // output tile: rows x columns of one frame
constexpr int kHaloRows = kRows + 2, kHaloCols = kCols + 2;
constexpr int kChunkBytes = 64;                         // input channels per halo slot: 4 groups of 16 bytes
constexpr int kGroups = kChunkBytes / 16;
template <typename T>
constexpr int chunk_of() { return kChunkBytes / int(sizeof(T)); }  // 32 16-bit channels, 16 fp32 ones
template <typename T>
constexpr int group_of() { return 16 / int(sizeof(T)); }
constexpr int kHaloBytes = kHaloRows * kGroups * kHaloCols * 16;  // 25344
constexpr int kHaloStages = 3;
constexpr int kNarrowFrames = 4, kNarrowKT = 3, kNarrowMaxHaloStages = 8;
constexpr int kSmemPerCta = 227 * 1024;  // Hopper's most dynamic shared memory per CTA
template <int kBlockN>
constexpr bool narrow() { return kBlockN == 8; }
template <int kBlockN>
constexpr int frames_per_tile() { return narrow<kBlockN>() ? kNarrowFrames : 1; }
// Narrow: as many halo slots as fit beside the weight, up to 8 (run 192 timed 4 slots and 7 / 5 (bf16 / fp32) the
// same: the deeper ring neither helps nor costs; the fetches are not latency-bound).
template <int kBlockN>
int halo_stages(int weight_bytes) {
  if (!narrow<kBlockN>()) return kHaloStages;
  const int fit = (kSmemPerCta - weight_bytes - (2 * kNarrowMaxHaloStages + 1) * 8) / kHaloBytes;
  return fit < kNarrowMaxHaloStages ? fit : kNarrowMaxHaloStages;
}
constexpr int kTaps = 9;                                // 3 x 3 spatial taps
constexpr int kThreads = 384;
constexpr int kHaloThreads = 96;                        // warps 1-3
constexpr int kConsumerWarps = 8;

template <int kBlockN>
constexpr int slab_bytes() { return kChunkBytes * kBlockN; }
constexpr int kWeightStages = 2 * kTaps;             // two halo slots' weight slabs
// Halo ring | weight-slab ring (narrow: the whole packed weight, weight_bytes) | barriers.
template <int kBlockN>
int smem_bytes(int weight_bytes) {
  const int stages = halo_stages<kBlockN>(weight_bytes);
  if (narrow<kBlockN>()) return stages * kHaloBytes + weight_bytes + (2 * stages + 1) * 8;
  return stages * kHaloBytes + kWeightStages * slab_bytes<kBlockN>() + (2 * stages + 2 * kWeightStages) * 8;
}
// f(std::integral_constant<int, i>()) for i = 0 ... N - 1: a loop whose index is a constant expression.
template <typename F, int... I>
__device__ __forceinline__ void static_for_(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>()), ...);
}
template <int N, typename F>
__device__ __forceinline__ void static_for(F&& f) { static_for_(f, std::make_integer_sequence<int, N>()); }

template <typename T>
struct ConvParams {
  const T* x;
  const T* cache;
  T* out;
  const T* weight;  // packed, see causal_conv.h
  const float* bias;
  const T* res;     // residual, laid out as out (may be null)
  ConvNorm norm;    // the RMS norm + SiLU of the epilogue (norm.gamma null: none)
  T* normed;        // the epilogue norm's separate output (may be null: see ConvNorm)
  int64_t xb, xf, xr, cb, cf, ob, of, orow, rb, rf, rr, nb, nf, nr;
  int C, O, H, W, Ti, To, Ho, Wo, KT, tp, hp, wp, cache_frames, n_cache;  // Ti: x's frames
  int xp;           // x's (and the cache's) pixel stride
  int up;           // log2 of the on-the-fly nearest upsampling (0 or 1); H, W: the upsampled input's size
  int tiles_w, tiles_h, n_tiles, tiles_t, tiles;  // tiles_t: output frame groups of frames_per_tile
  int weight_bytes;  // narrow: the packed weight's (shared memory holds it whole); else 0
  int halo_stages;   // narrow: the halo ring's slots (halo_stages())
};

// One output tile: output channel tile fastest, then columns, rows, frames (t: the first of frames_per_tile),
// batch.
struct Tile {
  int nt, w0, h0, t, b;
  template <typename T>
  __device__ Tile(int idx, const ConvParams<T>& p, int frames) {
    nt = idx % p.n_tiles;
    idx /= p.n_tiles;
    w0 = (idx % p.tiles_w) * kCols;
    idx /= p.tiles_w;
    h0 = (idx % p.tiles_h) * kRows;
    idx /= p.tiles_h;
    t = (idx % p.tiles_t) * frames;
    b = idx / p.tiles_t;
  }
};

// Persistent: CTA i takes tiles i, i + gridDim.x, ... (neighbouring CTAs take neighbouring tiles, whose halos
// overlap in L2), so the producers load the next tile while the consumers store the last one.
// A consumer leaves one tap's products (one wgmma group) in flight while it issues the next. Run 65 measured the
// alternatives slower at 96 -> 96: two in flight 469 vs 481 TFLOP/s; the halo producers fencing (waiting for
// their own copies) instead of the consumers, 454.

// A ring position: slot and phase (the barrier parity of this lap), advanced without a division.
struct Ring {
  int slot = 0;
  uint32_t phase = 0;
  __device__ void next(int slots) {
    if (++slot == slots) slot = 0, phase ^= 1;
  }
};
static_assert(kWeightStages == 2 * kTaps, "stage s uses weight slots kTaps * (s & 1) + tap");

// acc += A[64 x 32 bytes of channels] B[32 bytes of channels x N]: k16 in 16 bits; in fp32 k8 TF32 products, which
// read each operand's top 19 bits (truncation: the caller stores TF32-rounded values to get cuDNN's rounding).
template <typename T, int N>
__device__ __forceinline__ void conv_mma(float (&acc)[N / 2], uint64_t a, uint64_t b) {
  if constexpr (sizeof(T) == 4) wgmma_m64nNk8_ss_acc_tf32<N>(acc, a, b);
  else wgmma_m64nNk16_ss_acc<T, N>(acc, a, b);
}
// One spatial tap's products for a consumer's 2 output rows, 32 bytes of channels at a time: A = the halo slot
// (a_slot: at the consumer's first row) shifted by the tap, B = the tap's weight slab (N = kBlockN output channels,
// or, narrow, N / kBlockN time taps of them side by side).
template <typename T, int kBlockN, int N>
__device__ __forceinline__ void tap_products(float (&acc)[2][N / 2], SmemDesc a_slot, SmemDesc b_stage, int tap) {
  const int dh = tap / 3, dw = tap % 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const SmemDesc a = a_slot.plus((((r + dh) * kGroups + 2 * kk) * kHaloCols + dw) * 16);
      const SmemDesc b = b_stage.plus((tap * 4 * kBlockN + kk * 2 * kBlockN) * 16);
      conv_mma<T, N>(acc[r], a.bits(), b.bits());
    }
  }
}
// Two channels of an output-shaped tensor (8-byte aligned pairs in fp32, 4-byte in 16 bits) in fp32, and back.
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
template <typename T>
__device__ __forceinline__ float2 load2(const T* p) { return unpack2<T>(*reinterpret_cast<const uint32_t*>(p)); }
__device__ __forceinline__ void store2(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
template <typename T>
__device__ __forceinline__ void store2(T* p, float a, float b) { *reinterpret_cast<uint32_t*>(p) = pack2<T>(a, b); }
// fp32 rounded to TF32 as cuDNN rounds its operands (cvt.rna.tf32.f32: to nearest, ties away from zero, the low 13
// bits zero; NaN stays NaN), on the bits as vkern.reference.causal_conv.round_to_tf32: half the dropped unit added to
// the magnitude, then masked. (Not the cvt itself: inline asm on the accumulators made ptxas serialize every wgmma of
// the fp32 forms, C7514: run 186's fp32 480p encode ~80 ms slower.)
__device__ __forceinline__ float round_tf32(float a) {
  return a != a ? a : __uint_as_float((__float_as_uint(a) + 0x1000u) & ~0x1FFFu);
}
// a, b as store2 stores them in T (fp32: as they are).
template <typename T>
__device__ __forceinline__ void round2(float& a, float& b) {
  if constexpr (sizeof(T) == 2) {
    const float2 r = unpack2<T>(pack2<T>(a, b));
    a = r.x, b = r.y;
  }
}

template <typename T, int kBlockN>
__global__ void __launch_bounds__(kThreads, 1) causal_conv3d_kernel(const __grid_constant__ ConvParams<T> p) {
  constexpr int kF = frames_per_tile<kBlockN>();
  const int stages = narrow<kBlockN>() ? p.halo_stages : kHaloStages;  // (a constant in the wide forms)
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* halo = smem;
  unsigned char* slabs = smem + stages * kHaloBytes;  // narrow: the whole packed weight
  uint64_t* bars = reinterpret_cast<uint64_t*>(
      slabs + (narrow<kBlockN>() ? p.weight_bytes : kWeightStages * slab_bytes<kBlockN>()));
  uint64_t* halo_full = bars;
  uint64_t* halo_empty = halo_full + stages;
  uint64_t* slab_full = halo_empty + stages;  // narrow: one, the whole weight's
  uint64_t* slab_empty = slab_full + kWeightStages;
  const int chunks = p.C / chunk_of<T>();

  // Broadcast from lane 0 so the compiler knows the warp index is warp-uniform: the consumers' descriptors then
  // live in uniform registers (no per-wgmma register -> uniform moves).
  const int warp = __shfl_sync(0xffffffffu, int(threadIdx.x / 32), 0), lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) {
      mbar_init(&halo_full[i], kHaloThreads);
      mbar_init(&halo_empty[i], kConsumerWarps);
    }
    if constexpr (narrow<kBlockN>()) {
      mbar_init(&slab_full[0], 1);
    } else {
      for (int i = 0; i < kWeightStages; ++i) {
        mbar_init(&slab_full[i], 1);
        mbar_init(&slab_empty[i], kConsumerWarps);
      }
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warp >= 1 && warp <= 3) {  // ---------------------------------------------------------- halo producer
    // A thread copies channel group tid % kGroups of halo columns tid / kGroups + kColsPerPass * j (j < 3, while
    // inside the halo) in every halo row: its shared-memory offsets and its rows' and columns' offsets in a frame
    // are fixed per thread and per tile, so a copy costs one address add per stage. With upsampling, halo pixel
    // (h, w) of the 2H x 2W input is x's pixel (h / 2, w / 2).
    constexpr int kColsPerPass = kHaloThreads / kGroups, kColSlots = (kHaloCols + kColsPerPass - 1) / kColsPerPass;
    static_assert(kHaloThreads % kGroups == 0, "a thread's channel group must be fixed");
    const int tid = threadIdx.x - 32, g = tid % kGroups;
    const int row_elems = int(p.xr);  // a frame is < 2^31 elements (host check)
    Ring ring;
    for (int idx = blockIdx.x; idx < p.tiles; idx += gridDim.x) {
      const Tile tile(idx, p, kF);
      uint32_t cols_in = 0, rows_in = 0;  // bit j / bit r: halo column slot j / halo row r inside the frame
      int col_off[kColSlots];
#pragma unroll
      for (int j = 0; j < kColSlots; ++j) {
        const int ww = tid / kGroups + kColsPerPass * j, w = tile.w0 - p.wp + ww;
        cols_in |= uint32_t(ww < kHaloCols && unsigned(w) < unsigned(p.W)) << j;
        col_off[j] = (w >> p.up) * p.xp + g * group_of<T>();
      }
      int row_off[kHaloRows];
#pragma unroll
      for (int r = 0; r < kHaloRows; ++r) {
        const int h = tile.h0 - p.hp + r;
        rows_in |= uint32_t(unsigned(h) < unsigned(p.H)) << r;
        row_off[r] = (h >> p.up) * row_elems;
      }
      // The padded frames the tile's output frames read, in order: t ... t + kF + KT - 2. Frames before the cache
      // are zeros (no copy); frames past x's end are read only by output frames past the call's last.
      for (int u = 0; u < kF + p.KT - 1; ++u) {
        const int src = tile.t + u - p.tp;  // < 0: a frame before the chunk
        if (src < -p.n_cache || src >= p.Ti) continue;
        const T* frame = src >= 0 ? p.x + tile.b * p.xb + src * p.xf
                                  : p.cache + tile.b * p.cb + (p.cache_frames + src) * p.cf;
        for (int cc = 0; cc < chunks; ++cc) {
          mbar_wait(&halo_empty[ring.slot], ring.phase ^ 1);
          const uint32_t dst0 = smem_u32(halo + ring.slot * kHaloBytes) + (g * kHaloCols + tid / kGroups) * 16;
          const T* chunk = frame + cc * chunk_of<T>();
#pragma unroll
          for (int r = 0; r < kHaloRows; ++r) {
#pragma unroll
            for (int j = 0; j < kColSlots; ++j) {
              if (j == kColSlots - 1 && tid / kGroups + kColsPerPass * j >= kHaloCols) break;  // past the halo
              const bool ok = (rows_in >> r) & (cols_in >> j) & 1;
              cp_async_16(dst0 + (r * kGroups * kHaloCols + kColsPerPass * j) * 16,
                          ok ? chunk + row_off[r] + col_off[j] : p.x, ok);
            }
          }
          cp_async_arrive(&halo_full[ring.slot]);
          ring.next(stages);
        }
      }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");  // no exit with copies in flight
  } else if (warp == 0) {  // ----------------------------------------------------------- weight producer
    if constexpr (narrow<kBlockN>()) {  // the whole packed weight, once
      if (lane == 0) {
        constexpr int kPiece = 16384;
        mbar_arrive_expect_tx(&slab_full[0], p.weight_bytes);
        for (int off = 0; off < p.weight_bytes; off += kPiece)
          bulk_load(slabs + off, reinterpret_cast<const unsigned char*>(p.weight) + off,
                    p.weight_bytes - off < kPiece ? p.weight_bytes - off : kPiece, &slab_full[0]);
      }
    } else if (lane == 0) {
      constexpr int kSlabElems = slab_bytes<kBlockN>() / int(sizeof(T));
      int s = 0;  // stages (time tap x channel chunk) so far: stage s fills weight slots kTaps * (s & 1) + tap
      for (int idx = blockIdx.x; idx < p.tiles; idx += gridDim.x) {
        const Tile tile(idx, p, kF);
        for (int dt = 0; dt < p.KT; ++dt) {
          if (tile.t + dt - p.tp < -p.n_cache) continue;
          const T* w = p.weight + int64_t((tile.nt * p.KT + dt) * chunks) * kTaps * kSlabElems;
          for (int cc = 0; cc < chunks; ++cc, ++s) {
            const int base = kTaps * (s & 1);
            const uint32_t phase = (s >> 1) & 1;
#pragma unroll
            for (int tap = 0; tap < kTaps; ++tap) {
              mbar_wait(&slab_empty[base + tap], phase ^ 1);
              mbar_arrive_expect_tx(&slab_full[base + tap], slab_bytes<kBlockN>());
              bulk_load(slabs + (base + tap) * slab_bytes<kBlockN>(), w + int64_t(cc * kTaps + tap) * kSlabElems,
                        slab_bytes<kBlockN>(), &slab_full[base + tap]);
            }
          }
        }
      }
    }
  } else {  // ------------------------------------------------------------------------------------ consumers
    const int c = warp / 4 - 1;  // rows 2c, 2c + 1 of the tile
    const int wq = warp % 4;
    // Epilogue of output frame t: bias and residual in fp32, then (p.norm.gamma) the RMS norm of each pixel's
    // channels + SiLU, one rounding, 4-byte stores of channel pairs; pixels past the frame not stored. A pixel's
    // channels are spread over 4 lanes (lane % 4), so its sum of squares is two shuffles: every lane takes part in
    // them. With a separate normed output, out gets the sum before the norm, and the norm reads that sum as stored
    // (rounded). Every load comes before the first store (the compiler cannot move a load past a store to memory
    // that may alias it): the residual of all four pixel rows, the bias and gamma (kept in registers for the tile)
    // first; run 71 measured the norm at +0.37 ms a 96 -> 96 call with the loads between the stores.
    const auto store_frame = [&](float (&acc)[2][kBlockN / 2], const Tile& tile, int t) {
      T* out = p.out + tile.b * p.ob + t * p.of + tile.nt * kBlockN;
      T* normed = p.normed ? p.normed + tile.b * p.nb + t * p.nf : nullptr;  // O == kBlockN: one tile
      const int c0 = tile.nt * kBlockN + 2 * (lane % 4);  // this lane's first channel; then + 8 j, + 1
      if (p.res) {
        const T* res = p.res + tile.b * p.rb + t * p.rf + tile.nt * kBlockN + 2 * (lane % 4);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int h = tile.h0 + 2 * c + r;
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int w = tile.w0 + 16 * wq + lane / 4 + 8 * i;
            if (h >= p.Ho || w >= p.Wo) continue;
            float* v = acc[r] + 2 * i;  // v[4 j], v[4 j + 1]: channels c0 + 8 j, c0 + 8 j + 1
            const T* res_row = res + h * p.rr + int64_t(w) * p.O;
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
              const float2 s = load2(res_row + 8 * j);
              v[4 * j] += s.x, v[4 * j + 1] += s.y;
            }
          }
        }
      }
      if (p.bias) {
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
          const float2 b = *reinterpret_cast<const float2*>(p.bias + c0 + 8 * j);
#pragma unroll
          for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int i = 0; i < 2; ++i) acc[r][2 * i + 4 * j] += b.x, acc[r][2 * i + 4 * j + 1] += b.y;
        }
      }
      // (At 128 channels, 32 more registers would spill: gamma is read where it is used.)
      constexpr bool kGammaInRegs = kBlockN <= 96;
      float2 gamma[kGammaInRegs ? kBlockN / 8 : 1];
      if (kGammaInRegs && p.norm.gamma) {
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) gamma[j] = *reinterpret_cast<const float2*>(p.norm.gamma + c0 + 8 * j);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int h = tile.h0 + 2 * c + r;
        if (h >= p.Ho) continue;  // warp-uniform
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int w = tile.w0 + 16 * wq + lane / 4 + 8 * i;
          const bool in_frame = w < p.Wo;
          float* v = acc[r] + 2 * i;
          if (normed) {  // the sum as stored: out's values, then their norm into normed
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
              round2<T>(v[4 * j], v[4 * j + 1]);
              T* pair = out + h * p.orow + int64_t(w) * p.O + 2 * (lane % 4) + 8 * j;
              if (in_frame) store2(pair, v[4 * j], v[4 * j + 1]);
            }
          }
          if (p.norm.gamma) {  // diffusers' WanRMS_norm: x / max(||x||, eps) * sqrt(C) * gamma (+ beta), then SiLU
            float ss = 0.f;
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) ss += v[4 * j] * v[4 * j] + v[4 * j + 1] * v[4 * j + 1];
            ss += __shfl_xor_sync(0xffffffffu, ss, 1);
            ss += __shfl_xor_sync(0xffffffffu, ss, 2);
            const float k = __fdiv_rn(p.norm.scale, fmaxf(__fsqrt_rn(ss), p.norm.eps));
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
              // (gamma's index is 0 where the array has one element: that branch is never taken there)
              const float2 g = kGammaInRegs ? gamma[kGammaInRegs ? j : 0]
                                            : *reinterpret_cast<const float2*>(p.norm.gamma + c0 + 8 * j);
              float y0 = v[4 * j] * k * g.x, y1 = v[4 * j + 1] * k * g.y;
              if (p.norm.beta) y0 += p.norm.beta[c0 + 8 * j], y1 += p.norm.beta[c0 + 8 * j + 1];
              v[4 * j] = p.norm.silu ? __fdividef(y0, 1.f + __expf(-y0)) : y0;
              v[4 * j + 1] = p.norm.silu ? __fdividef(y1, 1.f + __expf(-y1)) : y1;
              if constexpr (sizeof(T) == 4) {
                if (p.norm.tf32) v[4 * j] = round_tf32(v[4 * j]), v[4 * j + 1] = round_tf32(v[4 * j + 1]);
              }
            }
          }
          if (!in_frame) continue;
          T* row = (normed ? normed + h * p.nr : out + h * p.orow) + int64_t(w) * p.O + 2 * (lane % 4);
#pragma unroll
          for (int j = 0; j < kBlockN / 8; ++j)
            store2(row + 8 * j, v[4 * j], v[4 * j + 1]);
        }
      }
    };
    // Descriptors: A = the halo at row 2c of slot 0 (lbo one channel group, sbo 8 pixels), B = slab 0 (lbo one
    // group of 8 input channels, sbo 8 output channels; narrow: one time tap); each product's is one of these plus
    // a byte offset.
    const SmemDesc a0 = SmemDesc::interleaved(smem_u32(halo) + 2 * c * kGroups * kHaloCols * 16, kHaloCols * 16, 128);
    Ring ring;  // the halo ring
    if constexpr (narrow<kBlockN>()) {
      // B: one product's N blocks are time taps 0, 1, 2 (lbo one group of 8 input channels, sbo the packed weight's
      // time-tap stride). An input frame's products go to part[r][4 dt ...] (one register range, as wgmma's
      // accumulators must be: the output frames' own cannot be its N blocks), which is added into the output frames'
      // acc before the next input frame's products (the wgmmas drained first: ptxas serializes every wgmma, C7514,
      // when other instructions read accumulators with any product in flight).
      const uint32_t dt_bytes = chunks * kTaps * slab_bytes<kBlockN>();
      const SmemDesc b0 = SmemDesc::interleaved(smem_u32(slabs), kBlockN * 16, dt_bytes);
      mbar_wait(&slab_full[0], 0);  // the whole packed weight
      for (int idx = blockIdx.x; idx < p.tiles; idx += gridDim.x) {
        const Tile tile(idx, p, kF);
        float acc[kF][2][kBlockN / 2];           // output frames t ... t + kF - 1
        float part[2][kNarrowKT * kBlockN / 2];  // one input frame's products, time tap dt's at 4 dt
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int i = 0; i < kBlockN / 2; ++i) {
#pragma unroll
            for (int f = 0; f < kF; ++f) acc[f][r][i] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < kNarrowKT * kBlockN / 2; ++i) part[r][i] = 0.f;
        }
        // Input frame v's products (all done) into the output frames t + v - dt that read them, then zeros.
        const auto fold = [&](auto v_) {
          constexpr int v = decltype(v_)::value;
          wgmma_wait<0>();
          fence_regs(part[0]);
          fence_regs(part[1]);
#pragma unroll
          for (int dt = 0; dt < kNarrowKT; ++dt) {
            if (v - dt < 0 || v - dt >= kF) continue;
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
              for (int i = 0; i < kBlockN / 2; ++i) acc[v - dt][r][i] += part[r][kBlockN / 2 * dt + i];
          }
#pragma unroll
          for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int i = 0; i < kNarrowKT * kBlockN / 2; ++i) part[r][i] = 0.f;
        };
        bool pending = false;  // the previous input frame's products are not folded yet
        int prev_halo = -1;    // the previous stage's halo slot, released once its last products are done
        static_for<kF + kNarrowKT - 1>([&](auto u_) {  // input frame t + u (padded), as the producer walks them
          constexpr int u = decltype(u_)::value;
          const int src = tile.t + u - p.tp;
          const bool skip = src < -p.n_cache || src >= p.Ti;  // zeros, or a frame no output frame here reads
          if constexpr (u > 0) {  // (the frames read are consecutive: pending means frame u - 1's products)
            if (pending) fold(std::integral_constant<int, u - 1>()), pending = false;
          }
          if (skip) return;
          for (int cc = 0; cc < chunks; ++cc) {
            mbar_wait(&halo_full[ring.slot], ring.phase);
            fence_async_smem();  // the halo came through cp.async (generic proxy); wgmma reads it (async proxy)
            const SmemDesc a_slot = a0.plus(ring.slot * kHaloBytes);
            const SmemDesc b_stage = b0.plus(cc * kTaps * slab_bytes<kBlockN>());
#pragma unroll
            for (int tap = 0; tap < kTaps; ++tap) {
              wgmma_fence();
              tap_products<T, kBlockN, kNarrowKT * kBlockN>(part, a_slot, b_stage, tap);
              wgmma_commit();
              wgmma_wait<1>();  // the previous tap's products are done
              if (tap == 0 && prev_halo >= 0 && lane == 0) mbar_arrive(&halo_empty[prev_halo]);
            }
            prev_halo = ring.slot;
            ring.next(stages);
          }
          pending = true;
        });
        wgmma_wait<0>();  // (fold waits too: this one for ptxas, which cannot tell that pending is always set here)
        if (pending) fold(std::integral_constant<int, kF + kNarrowKT - 2>());
        if (prev_halo >= 0 && lane == 0) mbar_arrive(&halo_empty[prev_halo]);
#pragma unroll
        for (int f = 0; f < kF; ++f) {
          if (tile.t + f >= p.To) break;
          store_frame(acc[f], tile, tile.t + f);
        }
      }
    } else {
      const SmemDesc b0 = SmemDesc::interleaved(smem_u32(slabs), kBlockN * 16, 128);
      int s = 0;  // stages so far (as the weight producer counts them)
      for (int idx = blockIdx.x; idx < p.tiles; idx += gridDim.x) {
        const Tile tile(idx, p, kF);
        float acc[2][kBlockN / 2];
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
          for (int i = 0; i < kBlockN / 2; ++i) acc[r][i] = 0.f;
        // The previous stage of this tile (-1: none): its last tap's products may still be in flight, so its last
        // weight slot and its halo slot are released once they are done.
        int prev_halo = -1;
        const auto release_prev_stage = [&]() {
          if (lane != 0) return;
          mbar_arrive(&slab_empty[kTaps * ((s - 1) & 1) + kTaps - 1]);
          mbar_arrive(&halo_empty[prev_halo]);
        };
        for (int dt = 0; dt < p.KT; ++dt) {
          if (tile.t + dt - p.tp < -p.n_cache) continue;
          for (int cc = 0; cc < chunks; ++cc) {
            mbar_wait(&halo_full[ring.slot], ring.phase);
            fence_async_smem();  // the halo came through cp.async (generic proxy); wgmma reads it (async proxy)
            const SmemDesc a_slot = a0.plus(ring.slot * kHaloBytes);
            const int base = kTaps * (s & 1);
            const uint32_t phase = (s >> 1) & 1;
            const SmemDesc b_stage = b0.plus(base * slab_bytes<kBlockN>());
#pragma unroll
            for (int tap = 0; tap < kTaps; ++tap) {
              mbar_wait(&slab_full[base + tap], phase);
              wgmma_fence();
              tap_products<T, kBlockN, kBlockN>(acc, a_slot, b_stage, tap);
              wgmma_commit();
              wgmma_wait<1>();  // the previous tap's products are done: release what only they read
              if (tap > 0) {
                if (lane == 0) mbar_arrive(&slab_empty[base + tap - 1]);
              } else if (prev_halo >= 0) {
                release_prev_stage();
              }
            }
            prev_halo = ring.slot;
            ring.next(stages);
            ++s;
          }
        }
        wgmma_wait<0>();
        fence_regs(acc[0]);
        fence_regs(acc[1]);
        if (prev_halo >= 0) release_prev_stage();
        store_frame(acc, tile, tile.t);
      }
    }
  }
}

template <typename T, int kBlockN>
cudaError_t launch(ConvParams<T> p, bool persistent, cudaStream_t stream) {
  const int kSmem = smem_bytes<kBlockN>(p.weight_bytes);
  p.halo_stages = halo_stages<kBlockN>(p.weight_bytes);
  const auto kernel = causal_conv3d_kernel<T, kBlockN>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  int ctas = p.tiles, device = 0, sms = 0, per_sm = 0;
  if (persistent) {  // as many CTAs as fit at once (1 per SM)
    if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
    if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kSmem)) != cudaSuccess)
      return err;
    ctas = sms * per_sm < ctas ? sms * per_sm : ctas;
  }
  kernel<<<unsigned(ctas), kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

bool aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
bool aligned8(const float* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 8 == 0; }  // the epilogue's float2 loads
bool strides_ok(const ConvTensor& t) {
  return t.batch_stride % 8 == 0 && t.frame_stride % 8 == 0 && t.row_stride % 8 == 0 && t.pixel_stride % 8 == 0;
}
// An output-shaped tensor (out, residual, normed): pixels of out_channels contiguous channels.
bool output_ok(const ConvTensor& t, int out_channels) {
  return aligned(t.ptr) && strides_ok(t) && t.pixel_stride == out_channels;
}
// The halo producers address a frame's pixel rows (width pixels apart) in 32 bits.
bool rows_ok(const ConvTensor& t, int height, int width, int channels) {
  return t.pixel_stride >= channels && t.row_stride == int64_t(width) * t.pixel_stride &&
         int64_t(height) * t.row_stride < (int64_t(1) << 31);
}

}  // namespace

cudaError_t causal_conv3d_fwd(ConvTensor x, ConvTensor cache, ConvTensor out, ConvTensor residual, ConvNorm norm,
                              const void* weight_packed, const float* bias, DType dtype, int batch, int channels,
                              int out_channels, int frames, int height, int width, int kt, int tp, int hp, int wp,
                              int upsample, int cache_frames, int n_cache, int block_n, bool persistent,
                              cudaStream_t stream) {
  const int Hi = height * upsample, Wi = width * upsample;  // the conv's input size
  const int To = tp + frames - kt + 1, Ho = Hi + 2 * hp - 2, Wo = Wi + 2 * wp - 2;
  // The producers read the cache with x's row and pixel strides.
  const bool cache_ok = n_cache == 0 || (cache.ptr != nullptr && aligned(cache.ptr) && strides_ok(cache) &&
                                         cache.row_stride == x.row_stride && cache.pixel_stride == x.pixel_stride &&
                                         n_cache <= cache_frames);
  const int chunk = dtype == DType::kFloat32 ? chunk_of<float>() : chunk_of<__half>();
  const int64_t weight_bytes = int64_t(kt) * channels * kTaps * out_channels * (dtype == DType::kFloat32 ? 4 : 2);
  if (batch < 1 || channels < chunk || channels % chunk != 0 || frames < 1 || kt < 1 || tp < 0 || hp < 0 ||
      wp < 0 || (upsample != 1 && upsample != 2) || n_cache < 0 || n_cache > tp || To < 1 || Ho < 1 || Wo < 1 ||
      !cache_ok || x.ptr == nullptr || out.ptr == nullptr || weight_packed == nullptr || !aligned(x.ptr) ||
      !aligned(weight_packed) || !strides_ok(x) || !rows_ok(x, height, width, channels) ||
      !output_ok(out, out_channels) || out_channels % 8 != 0 ||
      (block_n != kConvBlockNs[0] && block_n != kConvBlockNs[1] && block_n != kConvBlockNs[2]) ||
      out_channels % block_n != 0 || (residual.ptr != nullptr && !output_ok(residual, out_channels)) ||
      (norm.gamma != nullptr && out_channels != block_n) || !aligned8(bias) || !aligned8(norm.gamma) ||
      (norm.normed.ptr != nullptr && (norm.gamma == nullptr || !output_ok(norm.normed, out_channels))) ||
      (norm.tf32 && (norm.gamma == nullptr || dtype != DType::kFloat32)) ||
      (block_n == kConvBlockNs[0] &&
       (out_channels != block_n || kt != kNarrowKT || weight_bytes > kConvNarrowWeightBytes)))
    return cudaErrorInvalidValue;
  const auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    ConvParams<T> p;
    p.x = static_cast<const T*>(x.ptr);
    p.cache = n_cache ? static_cast<const T*>(cache.ptr) : p.x;
    p.out = static_cast<T*>(const_cast<void*>(out.ptr));
    p.weight = static_cast<const T*>(weight_packed);
    p.bias = bias;
    p.res = static_cast<const T*>(residual.ptr);
    p.norm = norm;
    p.normed = static_cast<T*>(const_cast<void*>(norm.normed.ptr));
    p.xb = x.batch_stride, p.xf = x.frame_stride, p.xr = x.row_stride, p.xp = int(x.pixel_stride);
    p.cb = cache.batch_stride, p.cf = cache.frame_stride;
    p.ob = out.batch_stride, p.of = out.frame_stride, p.orow = out.row_stride;
    p.rb = residual.batch_stride, p.rf = residual.frame_stride, p.rr = residual.row_stride;
    p.nb = norm.normed.batch_stride, p.nf = norm.normed.frame_stride, p.nr = norm.normed.row_stride;
    p.C = channels, p.O = out_channels, p.H = Hi, p.W = Wi, p.up = upsample == 2;
    p.Ti = frames, p.To = To, p.Ho = Ho, p.Wo = Wo, p.KT = kt, p.tp = tp, p.hp = hp, p.wp = wp;
    p.cache_frames = cache_frames, p.n_cache = n_cache;
    p.tiles_w = (Wo + kCols - 1) / kCols, p.tiles_h = (Ho + kRows - 1) / kRows, p.n_tiles = out_channels / block_n;
    const int frames_per = block_n == kConvBlockNs[0] ? kNarrowFrames : 1;
    p.tiles_t = (To + frames_per - 1) / frames_per;
    p.weight_bytes = frames_per > 1 ? int(weight_bytes) : 0;  // <= kConvNarrowWeightBytes: + 4 halo slots fit
    const int64_t tiles = int64_t(batch) * p.tiles_t * p.tiles_h * p.tiles_w * p.n_tiles;
    if (tiles > 0x7fffffff) return cudaErrorInvalidValue;
    p.tiles = int(tiles);
    if (block_n == 8) return launch<T, 8>(p, persistent, stream);
    return block_n == 96 ? launch<T, 96>(p, persistent, stream) : launch<T, 128>(p, persistent, stream);
  };
  if (dtype == DType::kBFloat16) return run(__nv_bfloat16());
  if (dtype == DType::kFloat16) return run(__half());
  if (dtype == DType::kFloat32) return run(float());
  return cudaErrorInvalidValue;
}

}  // namespace vkern
