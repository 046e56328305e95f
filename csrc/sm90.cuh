// Thin wrappers over the Hopper (sm_90a) PTX that vkern's tensor-core kernels use: mbarriers, cp.async and
// bulk copies, the bulk tensor copy engine (TMA), warpgroup matrix multiply (wgmma), named barriers and setmaxnreg.
// The attention kernel's shared-memory tiles use the 128-byte swizzle: rows of 128 bytes, the 16-byte chunk c
// of row r stored at chunk c ^ (r % 8), tiles aligned to 1024 bytes. The conv kernel's are unswizzled
// (SmemDesc::interleaved), so a tap's A tile can start at any pixel of its halo.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace vkern::sm90 {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------------------------------------- mbarrier
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(arrivals));
}
// Makes the inits visible to the copy engine before any thread uses the barriers.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// Spins until the barrier's phase with this parity has completed (a fresh barrier counts parity 1 as done).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// Two phases: both first checks issued back to back, so that two completed phases cost one check's latency.
__device__ __forceinline__ void mbar_wait2(uint64_t* a, uint32_t a_parity, uint64_t* b, uint32_t b_parity) {
  asm volatile(
      "{\n"
      ".reg .pred done_a, done_b;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done_a, [%0], %1;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done_b, [%2], %3;\n"
      "@done_a bra A_DONE;\n"
      "A_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done_a, [%0], %1;\n"
      "@!done_a bra A_WAIT;\n"
      "A_DONE:\n"
      "@done_b bra B_DONE;\n"
      "B_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done_b, [%2], %3;\n"
      "@!done_b bra B_WAIT;\n"
      "B_DONE:\n"
      "}\n" ::"r"(smem_u32(a)),
      "r"(a_parity), "r"(smem_u32(b)), "r"(b_parity)
      : "memory");
}

// ----------------------------------------------------------------------- cp.async (16 bytes) and bulk copies
// 16 bytes global -> shared, or 16 zero bytes when !valid (the source is then not read). Through L1 (.ca): L1 merges
// a warp's 16-byte pieces into one L2 request per line, where .cg's bypass sent each piece to L2 as a request of its
// own for a whole 32-byte sector (ncu, runs 193-194, the RGB conv: 39.9 M requests / 40.5 M sectors -> 11.1 M / 22.7 M;
// its time unchanged: L2's tag rate was busy, not the bound).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
// One arrival on bar once every cp.async this thread issued before has landed (counts toward the barrier's
// expected arrivals: .noinc).
__device__ __forceinline__ void cp_async_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_u32(bar)) : "memory");
}
// bytes (a multiple of 16, 16-byte aligned ends) global -> shared by the copy engine; completes on bar's tx count.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}

// ------------------------------------------------------------------------------------ TMA (bulk tensor copy)
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];" ::
          "r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, const void* src, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void tma_store_commit_and_wait() {
  asm volatile("cp.async.bulk.commit_group;\ncp.async.bulk.wait_group.read 0;" ::: "memory");
}
// Ordinary shared-memory stores that the copy engine or the tensor cores read next need this first.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// ------------------------------------------------------------------------------ named barriers, registers
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
template <int N>
__device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N)); }

// ---------------------------------------------------------------------------------------------- wgmma
// Shared-memory matrix descriptor, 128-byte swizzle. lbo/sbo in bytes: K-major operands use only sbo (the
// 1024 bytes between 8-row groups); MN-major ones use lbo between 64-element column blocks and sbo between
// 8-row groups along K. Kept as two 32-bit words: the address field (bits 0-13 of the low word, address / 16)
// never carries into lbo for shared-memory addresses (< 2^18), so a descriptor at a byte offset is one 32-bit
// add (at a constant offset, one uniform-register add), not a recomputation from the address per wgmma.
struct SmemDesc {
  uint32_t lo, hi;
  static __device__ __forceinline__ SmemDesc sw128(const void* p, uint32_t lbo, uint32_t sbo) {
    return {((smem_u32(p) & 0x3FFFF) >> 4) | (((lbo >> 4) & 0x3FFF) << 16), ((sbo >> 4) & 0x3FFF) | (1u << 30)};
  }
  // No swizzle ("interleaved"): 8 x 16-byte core matrices, each 128 contiguous bytes. K-major: lbo = bytes
  // between core matrices adjacent in K, sbo = between those adjacent in M (or N). Any 16-byte aligned start.
  static __device__ __forceinline__ SmemDesc interleaved(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
    return {((smem_addr & 0x3FFFF) >> 4) | (((lbo >> 4) & 0x3FFF) << 16), (sbo >> 4) & 0x3FFF};
  }
  __device__ __forceinline__ SmemDesc plus(uint32_t bytes) const { return {lo + (bytes >> 4), hi}; }
  __device__ __forceinline__ uint64_t bits() const { return (uint64_t(hi) << 32) | lo; }
};
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
// Keeps the compiler from moving reads or writes of accumulator registers across an async wgmma boundary.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// Accumulator operand lists for inline asm: N fp32 registers as "+f" operands %0 ... %(N-1).
#define VKERN_ACC32_OPERANDS(d)                                                                              \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),   \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),    \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),   \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define VKERN_ACC64_OPERANDS(d)                                                                              \
  VKERN_ACC32_OPERANDS(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),        \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]),   \
      "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),   \
      "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),   \
      "+f"(d[62]), "+f"(d[63])
#define VKERN_ACC32_REGS                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define VKERN_ACC64_REGS                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d[64] (+)= A[64 x 16] B[16 x 128], fp32 accumulators, A and B in shared memory (K-major both).
// accumulate = false overwrites d.
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, bool accumulate);
// The same with N = 176 (the 16-bit kernel's wide key tile): d[88]; N = 224 (head dim 64's): d[112].
template <typename T>
__device__ __forceinline__ void wgmma_m64n176k16_ss(float (&d)[88], uint64_t desc_a, uint64_t desc_b, bool accumulate);
template <typename T>
__device__ __forceinline__ void wgmma_m64n224k16_ss(float (&d)[112], uint64_t desc_a, uint64_t desc_b, bool accumulate);
// d[N / 2] += A[64 x 16] B[16 x N], N = 64 or 128: A in registers (4 x 2 packed values per thread, the
// accumulator layout), B in shared memory MN-major (its N columns contiguous).
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64nNk16_rs_bt(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b);

// N accumulators; the operand numbers after them are N, N + 1 (desc_a, desc_b) and N + 2 (accumulate).
#define VKERN_WGMMA_SS(TYPE, SHAPE, REGS, OPERANDS, A, B, P)                                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                                  \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " REGS ", " A ", " B ", p, 1, 1, 0, 0;\n}\n" \
               : OPERANDS(d)                                                                                      \
               : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)))
// N accumulators; the operand numbers after them are N ... N + 5 (a[0..3], desc_b, scale-d = 1).
#define VKERN_WGMMA_RS_BT(TYPE, SHAPE, REGS, OPERANDS, A0, A1, A2, A3, B, P)                                    \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " P ", 0;\n"                                                  \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " REGS ", {" A0 ", " A1 ", " A2 ", " \
               A3 "}, " B ", p, 1, 1, 1;\n}\n"                                                                   \
               : OPERANDS(d)                                                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
#define VKERN_WGMMA_RS_BT_N128(TYPE)                                                                            \
  VKERN_WGMMA_RS_BT(TYPE, "m64n128k16", VKERN_ACC64_REGS, VKERN_ACC64_OPERANDS, "%64", "%65", "%66", "%67", "%68", \
                    "%69")
#define VKERN_WGMMA_RS_BT_N64(TYPE)                                                                             \
  VKERN_WGMMA_RS_BT(TYPE, "m64n64k16", VKERN_ACC32_REGS, VKERN_ACC32_OPERANDS, "%32", "%33", "%34", "%35", "%36", \
                    "%37")

#define VKERN_ACC48_OPERANDS(d)                                                                              \
  VKERN_ACC32_OPERANDS(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),        \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]),   \
      "+f"(d[46]), "+f"(d[47])
#define VKERN_ACC48_REGS                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}"

#define VKERN_ACC4_OPERANDS(d) "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
#define VKERN_ACC4_REGS "{%0, %1, %2, %3}"
// 8 and 12 (m64n16, m64n24: the narrow conv's 2 or 3 time taps side by side).
#define VKERN_ACC8F_OPERANDS(d) VKERN_ACC4_OPERANDS(d), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
#define VKERN_ACC8F_REGS "{%0, %1, %2, %3, %4, %5, %6, %7}"
#define VKERN_ACC12_OPERANDS(d) VKERN_ACC8F_OPERANDS(d), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])
#define VKERN_ACC12_REGS "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}"

// 88 fp32 accumulators (m64n176) as "+f" operands %0 ... %87.
#define VKERN_ACC88_OPERANDS(d) \
  VKERN_ACC64_OPERANDS(d), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),        \
      "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]),   \
      "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]),   \
      "+f"(d[86]), "+f"(d[87])
#define VKERN_ACC88_LIST \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87"
#define VKERN_ACC88_REGS "{" VKERN_ACC88_LIST "}"

// 112 fp32 accumulators (m64n224) as "+f" operands %0 ... %111.
#define VKERN_ACC112_OPERANDS(d) \
  VKERN_ACC88_OPERANDS(d), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]),  \
      "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]),  \
      "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]),  \
      "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111])
#define VKERN_ACC112_REGS \
  "{" VKERN_ACC88_LIST ", %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111}"

// d[N / 2] += A[64 x 16] B[16 x N], N = 8, 16, 24, 96 or 128, A and B in shared memory (K-major both).
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64nNk16_ss_acc(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b);
#define VKERN_WGMMA_SS_ACC(TYPE, SHAPE, REGS, OPERANDS, A, B)                                                   \
  asm volatile("wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " REGS ", " A ", " B ", 1, 1, 1, 0, 0;\n" \
               : OPERANDS(d)                                                                                      \
               : "l"(desc_a), "l"(desc_b))

// The specializations for one 16-bit input type (CPP) and its PTX name (PTX).
#define VKERN_WGMMA_SPECIALIZATIONS(CPP, PTX)                                                                   \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64n128k16_ss<CPP>(float (&d)[64], uint64_t desc_a, uint64_t desc_b,      \
                                                           bool accumulate) {                                     \
    VKERN_WGMMA_SS(PTX, "m64n128k16", VKERN_ACC64_REGS, VKERN_ACC64_OPERANDS, "%64", "%65", "%66"); \
  }                                                                                                               \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64n176k16_ss<CPP>(float (&d)[88], uint64_t desc_a, uint64_t desc_b,      \
                                                           bool accumulate) {                                     \
    VKERN_WGMMA_SS(PTX, "m64n176k16", VKERN_ACC88_REGS, VKERN_ACC88_OPERANDS, "%88", "%89", "%90"); \
  }                                                                                                               \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64n224k16_ss<CPP>(float (&d)[112], uint64_t desc_a, uint64_t desc_b,     \
                                                           bool accumulate) {                                     \
    VKERN_WGMMA_SS(PTX, "m64n224k16", VKERN_ACC112_REGS, VKERN_ACC112_OPERANDS, "%112", "%113", "%114"); \
  }                                                                                                               \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64nNk16_rs_bt<CPP, 128>(float (&d)[64], const uint32_t (&a)[4],          \
                                                                 uint64_t desc_b) {                               \
    VKERN_WGMMA_RS_BT_N128(PTX);                                                                                  \
  }                                                                                                               \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64nNk16_rs_bt<CPP, 64>(float (&d)[32], const uint32_t (&a)[4],           \
                                                                uint64_t desc_b) {                                \
    VKERN_WGMMA_RS_BT_N64(PTX);                                                                                   \
  }                                                                                                               \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64nNk16_ss_acc<CPP, 8>(float (&d)[4], uint64_t desc_a, uint64_t desc_b) { \
    VKERN_WGMMA_SS_ACC(PTX, "m64n8k16", VKERN_ACC4_REGS, VKERN_ACC4_OPERANDS, "%4", "%5");                       \
  }                                                                                                               \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64nNk16_ss_acc<CPP, 16>(float (&d)[8], uint64_t desc_a, uint64_t desc_b) { \
    VKERN_WGMMA_SS_ACC(PTX, "m64n16k16", VKERN_ACC8F_REGS, VKERN_ACC8F_OPERANDS, "%8", "%9");                     \
  }                                                                                                               \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64nNk16_ss_acc<CPP, 24>(float (&d)[12], uint64_t desc_a, uint64_t desc_b) { \
    VKERN_WGMMA_SS_ACC(PTX, "m64n24k16", VKERN_ACC12_REGS, VKERN_ACC12_OPERANDS, "%12", "%13");                  \
  }                                                                                                               \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64nNk16_ss_acc<CPP, 96>(float (&d)[48], uint64_t desc_a, uint64_t desc_b) { \
    VKERN_WGMMA_SS_ACC(PTX, "m64n96k16", VKERN_ACC48_REGS, VKERN_ACC48_OPERANDS, "%48", "%49");                  \
  }                                                                                                               \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64nNk16_ss_acc<CPP, 128>(float (&d)[64], uint64_t desc_a, uint64_t desc_b) { \
    VKERN_WGMMA_SS_ACC(PTX, "m64n128k16", VKERN_ACC64_REGS, VKERN_ACC64_OPERANDS, "%64", "%65");                 \
  }
VKERN_WGMMA_SPECIALIZATIONS(__nv_bfloat16, "bf16")
VKERN_WGMMA_SPECIALIZATIONS(__half, "f16")

// d[N / 2] += A[64 x 8] B[8 x N] with TF32 products of fp32 operands in shared memory (K-major both: TF32 has no
// transposed forms), N = 8, 16, 24, 96 or 128. The products read each operand's top 19 bits (its low 13 mantissa
// bits are ignored: truncation; store operands rounded to TF32 for round-to-nearest ones).
template <int N>
__device__ __forceinline__ void wgmma_m64nNk8_ss_acc_tf32(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b);
#define VKERN_WGMMA_TF32_SS_ACC(N, SHAPE, REGS, OPERANDS, A, B)                                                  \
  template <>                                                                                                     \
  __device__ __forceinline__ void wgmma_m64nNk8_ss_acc_tf32<N>(float (&d)[N / 2], uint64_t desc_a,              \
                                                              uint64_t desc_b) {                                 \
    asm volatile("wgmma.mma_async.sync.aligned." SHAPE ".f32.tf32.tf32 " REGS ", " A ", " B ", 1, 1, 1;\n"         \
                 : OPERANDS(d)                                                                                    \
                 : "l"(desc_a), "l"(desc_b));                                                                     \
  }
VKERN_WGMMA_TF32_SS_ACC(8, "m64n8k8", VKERN_ACC4_REGS, VKERN_ACC4_OPERANDS, "%4", "%5")
VKERN_WGMMA_TF32_SS_ACC(16, "m64n16k8", VKERN_ACC8F_REGS, VKERN_ACC8F_OPERANDS, "%8", "%9")
VKERN_WGMMA_TF32_SS_ACC(24, "m64n24k8", VKERN_ACC12_REGS, VKERN_ACC12_OPERANDS, "%12", "%13")
VKERN_WGMMA_TF32_SS_ACC(96, "m64n96k8", VKERN_ACC48_REGS, VKERN_ACC48_OPERANDS, "%48", "%49")
VKERN_WGMMA_TF32_SS_ACC(128, "m64n128k8", VKERN_ACC64_REGS, VKERN_ACC64_OPERANDS, "%64", "%65")

// fp8 (e4m3) operands: both K-major (Hopper's 8-bit wgmma has no transposed forms), 32 K elements per
// instruction. E4M3 is the tag type for them.
struct E4M3 {};
// d[64] (+)= A[64 x 32] B[32 x 128], A and B in shared memory.
__device__ __forceinline__ void wgmma_m64n128k32_ss_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                          bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " VKERN_ACC64_REGS ", %64, %65, p, 1, 1;\n}\n"
      : VKERN_ACC64_OPERANDS(d)
      : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
}
// d[64] (+)= A[64 x 32] B[32 x 128]: A in registers (4 x 4 bytes per thread: row lane / 4 (+ 8 for a[1], a[3]),
// K elements 4 * (lane % 4) ... + 3 (+ 16 for a[2], a[3]) in byte order), B in shared memory, K-major.
// accumulate = false overwrites d.
__device__ __forceinline__ void wgmma_m64n128k32_rs_e4m3(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                          bool accumulate = true) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " VKERN_ACC64_REGS
      ", {%64, %65, %66, %67}, %68, p, 1, 1;\n}\n"
      : VKERN_ACC64_OPERANDS(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)));
}

// m64n192 (the 8-bit kernel's 192-key tile): 96 accumulators; C is the constraint ("+f" fp32, "+r" int32).
#define VKERN_ACC8(C, d, i)                                                                                    \
  C(d[i]), C(d[i + 1]), C(d[i + 2]), C(d[i + 3]), C(d[i + 4]), C(d[i + 5]), C(d[i + 6]), C(d[i + 7])
#define VKERN_ACC96_OPERANDS(C, d)                                                                             \
  VKERN_ACC8(C, d, 0), VKERN_ACC8(C, d, 8), VKERN_ACC8(C, d, 16), VKERN_ACC8(C, d, 24), VKERN_ACC8(C, d, 32),  \
      VKERN_ACC8(C, d, 40), VKERN_ACC8(C, d, 48), VKERN_ACC8(C, d, 56), VKERN_ACC8(C, d, 64),                  \
      VKERN_ACC8(C, d, 72), VKERN_ACC8(C, d, 80), VKERN_ACC8(C, d, 88)
#define VKERN_ACC96_REGS \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}"
// d[96] (+)= A[64 x 32] B[32 x 192], e4m3, A and B in shared memory.
__device__ __forceinline__ void wgmma_m64n192k32_ss_e4m3(float (&d)[96], uint64_t desc_a, uint64_t desc_b,
                                                          bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k32.f32.e4m3.e4m3 " VKERN_ACC96_REGS ", %96, %97, p, 1, 1;\n}\n"
      : VKERN_ACC96_OPERANDS("+f", d)
      : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
}

// The 8-bit integer forms' tags: int8 Q and K (S8; e4m3 P, V), and int8 Q and K with P and V unsigned int8 (S8PV: V
// offset by 128) for the P V product.
struct S8 {};
struct S8PV {};
// int32 accumulators: d must be integer registers in PTX, kept as uint32_t, so no conversion moves touch them in flight.
#define VKERN_ACC64_U32_OPERANDS(d)                                                                           \
  VKERN_ACC8("+r", d, 0), VKERN_ACC8("+r", d, 8), VKERN_ACC8("+r", d, 16), VKERN_ACC8("+r", d, 24),             \
      VKERN_ACC8("+r", d, 32), VKERN_ACC8("+r", d, 40), VKERN_ACC8("+r", d, 48), VKERN_ACC8("+r", d, 56)
// int8 operands (signed, both K-major), int32 accumulation: d[64] += A[64 x 32] B[32 x 128], A and B in shared
// memory.
__device__ __forceinline__ void wgmma_m64n128k32_ss_s8(uint32_t (&d)[64], uint64_t desc_a, uint64_t desc_b) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 " VKERN_ACC64_REGS ", %64, %65, 1;\n"
      : VKERN_ACC64_U32_OPERANDS(d)
      : "l"(desc_a), "l"(desc_b));
}
// d[64] (+)= A[64 x 32] B[32 x 128], A and B unsigned int8, A in registers (the fragment of
// wgmma_m64n128k32_rs_e4m3), B in shared memory (K-major), int32 accumulation; accumulate = false overwrites d.
__device__ __forceinline__ void wgmma_m64n128k32_rs_u8u8(uint32_t (&d)[64], const uint32_t (&a)[4], uint64_t desc_b,
                                                         bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.u8.u8 " VKERN_ACC64_REGS ", {%64, %65, %66, %67}, %68, p;\n}\n"
      : VKERN_ACC64_U32_OPERANDS(d)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(int(accumulate)));
}

// d[96] += A[64 x 32] B[32 x 192], int8, int32 accumulation, as wgmma_m64n128k32_ss_s8.
__device__ __forceinline__ void wgmma_m64n192k32_ss_s8(uint32_t (&d)[96], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n192k32.s32.s8.s8 " VKERN_ACC96_REGS ", %96, %97, 1;\n"
               : VKERN_ACC96_OPERANDS("+r", d)
               : "l"(desc_a), "l"(desc_b));
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Four fp32 values -> four e4m3 bytes in one register (a in the lowest byte), round to nearest even, saturating.
// (cvt's first source goes to the upper byte of the pair.)
__device__ __forceinline__ uint32_t pack4_e4m3(float a, float b, float c, float d) {
  uint16_t lo, hi;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

// Four fp32 values x * 2^-24 with x in [0, 255.5) -> four bytes round(x) (round to nearest even) in one register
// (a in the lowest byte). fp16's subnormals are steps of 2^-24, so the conversion itself rounds x to an integer and
// leaves it in the low byte of each half (no .ftz: the subnormal results are kept); one PRMT takes bytes 0 and 2 of
// each pair.
__device__ __forceinline__ uint32_t pack4_u8(float a, float b, float c, float d) {
  uint32_t ab, cd, out;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(ab) : "f"(b), "f"(a));  // first source to the upper half
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(cd) : "f"(d), "f"(c));
  asm("prmt.b32 %0, %1, %2, 0x6420;" : "=r"(out) : "r"(ab), "r"(cd));
  return out;
}

// Two fp32 values -> one 32-bit register of two 16-bit values (first in the low half), round to nearest.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// One 32-bit register of two 16-bit values (first in the low half) -> two fp32 values (exact).
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// a * b + c with subnormal inputs kept (no .ftz, whatever the compile flags).
__device__ __forceinline__ float fma_subnormal(float a, float b, float c) {
  float d;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(d) : "f"(a), "f"(b), "f"(c));
  return d;
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// 2^x for x <= 0 on the FMA pipe (MUFU.EX2 takes 8 clocks per warp, and the 8-bit attention kernels' softmax waits on
// it): x clamped at -30 (2^-30: below what the callers keep), rounded to an integer n (1.5 * 2^23 puts it in the
// low mantissa bits), 2^(x - n) by a cubic on [-0.5, 0.5] (relative error 1.0e-4, minimax: bench/ex2_fma_fit.py),
// n added to its exponent field.
__device__ __forceinline__ float ex2_fma(float x) {
  x = fmaxf(x, -30.f);
  const float rounded = x + 12582912.f;
  const float f = x - (rounded - 12582912.f);
  const float p = fmaf(fmaf(fmaf(0.05500858277f, f, 0.24221037328f), f, 0.69328290224f), f, 1.f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(rounded) << 23));
}

}  // namespace vkern::sm90
