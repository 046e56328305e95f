// fp8 e4m3 quantization: amax + scale + cast. Memory-bound: each thread step reads 16 input
// elements with 16-byte loads and writes 16 fp8 bytes with one 16-byte store.
#include "fp8_quant.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace vkern {
namespace {

constexpr int kElems = 16;      // elements per thread step (16 fp8 bytes out)
constexpr int kThreads = 256;
constexpr float kE4M3Inv = 1.f / 448.f;  // folded at compile time, correctly rounded

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Two e4m3 values to floats, exactly (e4m3 -> half is exact, half -> float is exact).
__device__ __forceinline__ float2 fp8x2_to_float2(__nv_fp8x2_storage_t v) {
  return __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(v, __NV_E4M3)));
}

// |v| as ordered bits: for non-negative floats unsigned order is float order, and NaN sorts
// above +inf, so an integer max propagates NaN (fmaxf would drop it).
__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(fabsf(v)); }

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[kElems]) {
  constexpr int kPerLoad = 16 / sizeof(T);
#pragma unroll
  for (int i = 0; i < kElems / kPerLoad; ++i) {
    uint4 raw = reinterpret_cast<const uint4*>(p)[i];
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPerLoad; ++j) f[i * kPerLoad + j] = to_f32(e[j]);
  }
}

__device__ __forceinline__ void store_vec(uint8_t* q, const float (&f)[kElems], float inv) {
  uint4 out;
  auto* pairs = reinterpret_cast<__nv_fp8x2_storage_t*>(&out);
#pragma unroll
  for (int i = 0; i < kElems / 2; ++i)
    pairs[i] = __nv_cvt_float2_to_fp8x2(make_float2(f[2 * i] * inv, f[2 * i + 1] * inv),
                                        __NV_SATFINITE, __NV_E4M3);
  *reinterpret_cast<uint4*>(q) = out;
}

__device__ __forceinline__ uint8_t cast1(float v, float inv) {
  return __nv_cvt_float_to_fp8(v * inv, __NV_SATFINITE, __NV_E4M3);
}

__device__ __forceinline__ float scale_from_amax(float amax) {
  return amax != amax ? amax : fmaxf(amax, 1e-12f) * kE4M3Inv;
}

// Max over the block; every thread gets the result.
__device__ unsigned block_max(unsigned v) {
  __shared__ unsigned warp_max[kThreads / 32];
  __shared__ unsigned result;
  v = __reduce_max_sync(0xffffffffu, v);
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    unsigned w = threadIdx.x < blockDim.x / 32 ? warp_max[threadIdx.x] : 0u;
    w = __reduce_max_sync(0xffffffffu, w);
    if (threadIdx.x == 0) result = w;
  }
  __syncthreads();
  return result;
}

// One block per row, for rows too long to hold in registers (or not 16-byte aligned). Pass 1 finds
// the row's amax, pass 2 re-reads the row (from L1/L2) and casts.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) rowwise_kernel(const T* __restrict__ x, int64_t cols,
                                                           int64_t row_stride, uint8_t* __restrict__ q,
                                                           float* __restrict__ scale) {
  const T* xr = x + blockIdx.x * row_stride;
  uint8_t* qr = q + blockIdx.x * cols;
  unsigned m = 0;
  if (kVector) {
    for (int64_t c = threadIdx.x * kElems; c < cols; c += kThreads * kElems) {
      float f[kElems];
      load_vec(xr + c, f);
#pragma unroll
      for (int j = 0; j < kElems; ++j) m = max(m, abs_bits(f[j]));
    }
  } else {
    for (int64_t c = threadIdx.x; c < cols; c += kThreads) m = max(m, abs_bits(to_f32(xr[c])));
  }
  const float s = scale_from_amax(__uint_as_float(block_max(m)));
  const float inv = 1.f / s;
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  if (kVector) {
    for (int64_t c = threadIdx.x * kElems; c < cols; c += kThreads * kElems) {
      float f[kElems];
      load_vec(xr + c, f);
      store_vec(qr + c, f, inv);
    }
  } else {
    for (int64_t c = threadIdx.x; c < cols; c += kThreads) qr[c] = cast1(to_f32(xr[c]), inv);
  }
}

// Rows up to kThreads * kElems * kVecs elements: each thread issues all its 16-byte loads up front,
// keeps the raw vectors in registers across the block reduction, and casts them from there, so the
// row is read from memory once.
template <typename T, int kVecs>
__global__ void __launch_bounds__(kThreads) rowwise_in_registers_kernel(const T* __restrict__ x, int64_t cols,
                                                                        int64_t row_stride,
                                                                        uint8_t* __restrict__ q,
                                                                        float* __restrict__ scale) {
  constexpr int kLoads = kElems * sizeof(T) / 16;  // 16-byte loads per vector of kElems
  const T* xr = x + blockIdx.x * row_stride;
  uint8_t* qr = q + blockIdx.x * cols;
  uint4 raw[kVecs][kLoads];
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t c = ((int64_t)v * kThreads + threadIdx.x) * kElems;
    if (c < cols) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) raw[v][i] = reinterpret_cast<const uint4*>(xr + c)[i];
    }
  }
  unsigned m = 0;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    if (((int64_t)v * kThreads + threadIdx.x) * kElems < cols) {
      const T* e = reinterpret_cast<const T*>(raw[v]);
#pragma unroll
      for (int j = 0; j < kElems; ++j) m = max(m, abs_bits(to_f32(e[j])));
    }
  }
  const float s = scale_from_amax(__uint_as_float(block_max(m)));
  const float inv = 1.f / s;
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t c = ((int64_t)v * kThreads + threadIdx.x) * kElems;
    if (c < cols) {
      const T* e = reinterpret_cast<const T*>(raw[v]);
      float f[kElems];
#pragma unroll
      for (int j = 0; j < kElems; ++j) f[j] = to_f32(e[j]);
      store_vec(qr + c, f, inv);
    }
  }
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) amax_kernel(const T* __restrict__ x, int64_t n,
                                                        unsigned* __restrict__ amax) {
  unsigned m = 0;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  const int64_t tid = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (kVector) {
    for (int64_t i = tid; i < n / kElems; i += stride) {
      float f[kElems];
      load_vec(x + i * kElems, f);
#pragma unroll
      for (int j = 0; j < kElems; ++j) m = max(m, abs_bits(f[j]));
    }
  } else {
    for (int64_t i = tid; i < n; i += stride) m = max(m, abs_bits(to_f32(x[i])));
  }
  m = block_max(m);
  if (threadIdx.x == 0) atomicMax(amax, m);
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) cast_kernel(const T* __restrict__ x, int64_t n,
                                                        const unsigned* __restrict__ amax,
                                                        uint8_t* __restrict__ q, float* __restrict__ scale) {
  const float s = scale_from_amax(__uint_as_float(*amax));
  const float inv = 1.f / s;
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  const int64_t tid = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (tid == 0) *scale = s;
  if (kVector) {
    for (int64_t i = tid; i < n / kElems; i += stride) {
      float f[kElems];
      load_vec(x + i * kElems, f);
      store_vec(q + i * kElems, f, inv);
    }
  } else {
    for (int64_t i = tid; i < n; i += stride) q[i] = cast1(to_f32(x[i]), inv);
  }
}

// 16 e4m3 values (one 16-byte vector) times s, rounded to T, written with 16-byte stores.
template <typename T>
__device__ __forceinline__ void store_dequantized(const uint4& raw, float s, T* dst) {
  const auto* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
  T vals[kElems];
#pragma unroll
  for (int j = 0; j < kElems / 2; ++j) {
    const float2 f = fp8x2_to_float2(pairs[j]);
    vals[2 * j] = from_f32<T>(f.x * s);
    vals[2 * j + 1] = from_f32<T>(f.y * s);
  }
#pragma unroll
  for (int j = 0; j < kElems * (int)sizeof(T) / 16; ++j)
    reinterpret_cast<uint4*>(dst)[j] = reinterpret_cast<const uint4*>(vals)[j];
}

// Dequantize: blocks stride over rows (one scale load per row, no index division: an int64 divide
// per vector was a subroutine call in SASS and cost more than the memory traffic); threads stride
// over the row, each step reading 16 e4m3 bytes with one 16-byte load and writing 16 outputs.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) dequant_kernel(const uint8_t* __restrict__ q,
                                                           const float* __restrict__ scale, bool per_tensor,
                                                           int64_t rows, int64_t cols, T* __restrict__ out) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float s = scale[per_tensor ? 0 : r];
    const uint8_t* qr = q + r * cols;
    T* outr = out + r * cols;
    if (kVector) {  // cols % 16 == 0 and 16-byte aligned rows
      for (int64_t c = threadIdx.x * kElems; c < cols; c += kThreads * kElems) {
        store_dequantized(*reinterpret_cast<const uint4*>(qr + c), s, outr + c);
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += kThreads)
        outr[c] = from_f32<T>(fp8x2_to_float2(qr[c]).x * s);  // low byte is the value
    }
  }
}

// Rows up to kThreads * kElems * kVecs: one block per row, every thread issues all its 16-byte loads
// before converting anything (the row-striding kernel above had one load in flight per thread and
// measured 0.85-1.4 TB/s).
template <typename T, int kVecs>
__global__ void __launch_bounds__(kThreads) dequant_row_in_registers_kernel(const uint8_t* __restrict__ q,
                                                                            const float* __restrict__ scale,
                                                                            bool per_tensor, int64_t cols,
                                                                            T* __restrict__ out) {
  const float s = scale[per_tensor ? 0 : blockIdx.x];
  const uint8_t* qr = q + blockIdx.x * cols;
  T* outr = out + blockIdx.x * cols;
  uint4 raw[kVecs];
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t c = ((int64_t)v * kThreads + threadIdx.x) * kElems;
    if (c < cols) raw[v] = *reinterpret_cast<const uint4*>(qr + c);
  }
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int64_t c = ((int64_t)v * kThreads + threadIdx.x) * kElems;
    if (c < cols) {
      store_dequantized(raw[v], s, outr + c);
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int grid_for(int64_t work_items) {
  // Enough blocks to fill 132 SMs several times over; grid-stride loops cover the rest.
  const int64_t blocks = (work_items + kThreads - 1) / kThreads;
  return (int)(blocks < 132 * 16 ? (blocks > 0 ? blocks : 1) : 132 * 16);
}

template <typename T>
cudaError_t rowwise(const void* xv, int64_t rows, int64_t cols, int64_t row_stride, uint8_t* q,
                    float* scale, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  const bool vec = cols % kElems == 0 && (row_stride * sizeof(T)) % 16 == 0 && aligned16(x) && aligned16(q);
  const int64_t vecs_per_thread = (cols / kElems + kThreads - 1) / kThreads;
  if (vec && vecs_per_thread <= 1)
    rowwise_in_registers_kernel<T, 1><<<rows, kThreads, 0, stream>>>(x, cols, row_stride, q, scale);
  else if (vec && vecs_per_thread <= 2)
    rowwise_in_registers_kernel<T, 2><<<rows, kThreads, 0, stream>>>(x, cols, row_stride, q, scale);
  else if (vec && vecs_per_thread <= 4)
    rowwise_in_registers_kernel<T, 4><<<rows, kThreads, 0, stream>>>(x, cols, row_stride, q, scale);
  else if (vec)  // longer rows: two passes, the second from L2
    rowwise_kernel<T, true><<<rows, kThreads, 0, stream>>>(x, cols, row_stride, q, scale);
  else
    rowwise_kernel<T, false><<<rows, kThreads, 0, stream>>>(x, cols, row_stride, q, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t tensorwise(const void* xv, int64_t n, uint8_t* q, float* scale, unsigned* amax,
                       cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  cudaError_t err = cudaMemsetAsync(amax, 0, sizeof(unsigned), stream);
  if (err != cudaSuccess) return err;
  const bool vec = n % kElems == 0 && aligned16(x) && aligned16(q);
  const int grid = grid_for(vec ? n / kElems : n);
  if (vec) {
    amax_kernel<T, true><<<grid, kThreads, 0, stream>>>(x, n, amax);
    cast_kernel<T, true><<<grid, kThreads, 0, stream>>>(x, n, amax, q, scale);
  } else {
    amax_kernel<T, false><<<grid, kThreads, 0, stream>>>(x, n, amax);
    cast_kernel<T, false><<<grid, kThreads, 0, stream>>>(x, n, amax, q, scale);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t dequantize(const uint8_t* q, const float* scale, bool per_tensor, int64_t rows, int64_t cols,
                       void* outv, cudaStream_t stream) {
  T* out = static_cast<T*>(outv);
  const bool vec = cols % kElems == 0 && aligned16(q) && aligned16(out);
  const int grid = (int)(rows < 132 * 16 ? rows : 132 * 16);
  const int64_t vecs_per_thread = (cols / kElems + kThreads - 1) / kThreads;
  if (vec && vecs_per_thread <= 2)
    dequant_row_in_registers_kernel<T, 2><<<rows, kThreads, 0, stream>>>(q, scale, per_tensor, cols, out);
  else if (vec && vecs_per_thread <= 4)
    dequant_row_in_registers_kernel<T, 4><<<rows, kThreads, 0, stream>>>(q, scale, per_tensor, cols, out);
  else if (vec)
    dequant_kernel<T, true><<<grid, kThreads, 0, stream>>>(q, scale, per_tensor, rows, cols, out);
  else
    dequant_kernel<T, false><<<grid, kThreads, 0, stream>>>(q, scale, per_tensor, rows, cols, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fp8_dequantize(const uint8_t* q, const float* scale, bool per_tensor, int64_t rows, int64_t cols,
                           void* out, DType out_dtype, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (out_dtype) {
    case DType::kFloat32: return dequantize<float>(q, scale, per_tensor, rows, cols, out, stream);
    case DType::kFloat16: return dequantize<__half>(q, scale, per_tensor, rows, cols, out, stream);
    case DType::kBFloat16: return dequantize<__nv_bfloat16>(q, scale, per_tensor, rows, cols, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t fp8_quantize_rowwise(const void* x, DType dtype, int64_t rows, int64_t cols,
                                 int64_t row_stride, uint8_t* q, float* scale, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return rowwise<float>(x, rows, cols, row_stride, q, scale, stream);
    case DType::kFloat16: return rowwise<__half>(x, rows, cols, row_stride, q, scale, stream);
    case DType::kBFloat16: return rowwise<__nv_bfloat16>(x, rows, cols, row_stride, q, scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t fp8_quantize_tensorwise(const void* x, DType dtype, int64_t n, uint8_t* q, float* scale,
                                    unsigned* amax_workspace, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return tensorwise<float>(x, n, q, scale, amax_workspace, stream);
    case DType::kFloat16: return tensorwise<__half>(x, n, q, scale, amax_workspace, stream);
    case DType::kBFloat16: return tensorwise<__nv_bfloat16>(x, n, q, scale, amax_workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vkern
