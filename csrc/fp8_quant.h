// fp8 e4m3 quantization kernels. Framework-free: raw pointers, sizes and a stream.
//
// Numerics (shared with vkern/reference/fp8.py, bit for bit):
//   amax  = max |x| over the group (a row, or the whole tensor); NaN propagates
//   scale = max(amax, 1e-12) * fp32(1 / 448)    (one multiply: identical on every device)
//   q     = e4m3(saturate(x * (1 / scale)))      (round to nearest even)
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace vkern {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// rows x cols, row r starts at x + r * row_stride elements; q is contiguous rows x cols;
// scale has one fp32 per row.
cudaError_t fp8_quantize_rowwise(const void* x, DType dtype, int64_t rows, int64_t cols,
                                 int64_t row_stride, uint8_t* q, float* scale, cudaStream_t stream);

// n contiguous elements, one fp32 scale; amax_workspace is 4 bytes of device memory.
cudaError_t fp8_quantize_tensorwise(const void* x, DType dtype, int64_t n, uint8_t* q, float* scale,
                                    unsigned* amax_workspace, cudaStream_t stream);

// out = round_to_out_dtype(float(q) * scale): q is rows x cols e4m3, contiguous; scale holds one fp32
// per row, or one for the whole tensor when per_tensor; out is rows x cols in out_dtype, contiguous.
cudaError_t fp8_dequantize(const uint8_t* q, const float* scale, bool per_tensor, int64_t rows, int64_t cols,
                           void* out, DType out_dtype, cudaStream_t stream);

}  // namespace vkern
