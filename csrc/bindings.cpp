// The one binding file: Python passes data pointers, sizes and the stream as integers; the torch
// side (vkern/ops) checks inputs and allocates outputs. No torch headers here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "causal_conv.h"
#include "flash_attention.h"
#include "fp8_quant.h"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("vkern._C.") + what + ": " + cudaGetErrorString(err));
}

template <typename P>
P* ptr(uintptr_t p) { return reinterpret_cast<P*>(p); }

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// (pointer, batch stride, seq stride, head stride) of a [B, S, H, D] tensor, strides in elements.
using TensorArg = std::tuple<uintptr_t, int64_t, int64_t, int64_t>;
vkern::AttentionTensor tensor_of(const TensorArg& t) {
  return {ptr<void>(std::get<0>(t)), std::get<1>(t), std::get<2>(t), std::get<3>(t)};
}

// (pointer, batch stride, frame stride, row stride, pixel stride) of a channels-last [B, C, T, H, W] tensor, in
// elements.
using ConvArg = std::tuple<uintptr_t, int64_t, int64_t, int64_t, int64_t>;
vkern::ConvTensor conv_tensor_of(const ConvArg& t) {
  return {ptr<const void>(std::get<0>(t)), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t)};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vkern CUDA kernels (pointer-level API; use vkern.ops instead)";
  m.attr("cuda_archs") = VKERN_CUDA_ARCHS;
  m.attr("cuda_version") = CUDART_VERSION;

  m.def("fp8_quantize_rowwise",
        [](uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t q,
           uintptr_t scale, uintptr_t stream) {
          check(vkern::fp8_quantize_rowwise(ptr<const void>(x), static_cast<vkern::DType>(dtype), rows, cols,
                                            row_stride, ptr<uint8_t>(q), ptr<float>(scale), stream_of(stream)),
                "fp8_quantize_rowwise");
        },
        py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"), py::arg("q"),
        py::arg("scale"), py::arg("stream"));

  m.def("fp8_quantize_tensorwise",
        [](uintptr_t x, int dtype, int64_t n, uintptr_t q, uintptr_t scale, uintptr_t amax_workspace,
           uintptr_t stream) {
          check(vkern::fp8_quantize_tensorwise(ptr<const void>(x), static_cast<vkern::DType>(dtype), n,
                                               ptr<uint8_t>(q), ptr<float>(scale), ptr<unsigned>(amax_workspace),
                                               stream_of(stream)),
                "fp8_quantize_tensorwise");
        },
        py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("q"), py::arg("scale"), py::arg("amax_workspace"),
        py::arg("stream"));

  m.def("fp8_dequantize",
        [](uintptr_t q, uintptr_t scale, bool per_tensor, int64_t rows, int64_t cols, uintptr_t out, int out_dtype,
           uintptr_t stream) {
          check(vkern::fp8_dequantize(ptr<const uint8_t>(q), ptr<const float>(scale), per_tensor, rows, cols,
                                      ptr<void>(out), static_cast<vkern::DType>(out_dtype), stream_of(stream)),
                "fp8_dequantize");
        },
        py::arg("q"), py::arg("scale"), py::arg("per_tensor"), py::arg("rows"), py::arg("cols"), py::arg("out"),
        py::arg("out_dtype"), py::arg("stream"));

  m.attr("conv_block_ns") = py::make_tuple(vkern::kConvBlockNs[0], vkern::kConvBlockNs[1], vkern::kConvBlockNs[2]);
  m.attr("conv_narrow_weight_bytes") = vkern::kConvNarrowWeightBytes;
  m.def("causal_conv3d_fwd",
        [](ConvArg x, ConvArg cache, ConvArg out, ConvArg residual, uintptr_t norm_gamma, uintptr_t norm_beta,
           float norm_scale, float norm_eps, bool norm_silu, ConvArg normed, bool norm_tf32, uintptr_t weight_packed,
           uintptr_t bias,
           int dtype, int batch, int channels, int out_channels, int frames, int height, int width, int kt, int tp,
           int hp, int wp, int upsample, int cache_frames, int n_cache, int block_n, bool persistent,
           uintptr_t stream) {
          check(vkern::causal_conv3d_fwd(conv_tensor_of(x), conv_tensor_of(cache), conv_tensor_of(out),
                                         conv_tensor_of(residual),
                                         vkern::ConvNorm{ptr<const float>(norm_gamma), ptr<const float>(norm_beta),
                                                         norm_scale, norm_eps, norm_silu, conv_tensor_of(normed),
                                                         norm_tf32},
                                         ptr<const void>(weight_packed),
                                         ptr<const float>(bias),
                                         static_cast<vkern::DType>(dtype), batch, channels, out_channels, frames,
                                         height, width, kt, tp, hp, wp, upsample, cache_frames, n_cache, block_n,
                                         persistent, stream_of(stream)),
                "causal_conv3d_fwd");
        },
        py::arg("x"), py::arg("cache"), py::arg("out"), py::arg("residual"), py::arg("norm_gamma"),
        py::arg("norm_beta"), py::arg("norm_scale"), py::arg("norm_eps"), py::arg("norm_silu"), py::arg("normed"),
        py::arg("norm_tf32"),
        py::arg("weight_packed"), py::arg("bias"), py::arg("dtype"),
        py::arg("batch"), py::arg("channels"), py::arg("out_channels"), py::arg("frames"), py::arg("height"),
        py::arg("width"), py::arg("kt"), py::arg("tp"), py::arg("hp"), py::arg("wp"), py::arg("upsample"),
        py::arg("cache_frames"),
        py::arg("n_cache"), py::arg("block_n"), py::arg("persistent"), py::arg("stream"));

  m.attr("flash_head_dims") = py::make_tuple(vkern::kFlashHeadDims[0], vkern::kFlashHeadDims[1]);
  {
    py::dict wide_stages;  // the wide tiles' ring depth per (keys, head dim)
    for (int keys : vkern::kFlashWideKeys)
      for (int d : vkern::kFlashHeadDims)
        if (vkern::flash_wide_stages(keys, d) > 0) wide_stages[py::make_tuple(keys, d)] = vkern::flash_wide_stages(keys, d);
    m.attr("flash_wide_stages") = wide_stages;
  }
  m.def("flash_attention_fwd",
        [](TensorArg q, TensorArg k, TensorArg v, TensorArg out, uintptr_t lse, uintptr_t key_bits, int dtype,
           int batch, int heads, int q_len, int kv_len, int head_dim, float scale, int stages, uintptr_t stream,
           uintptr_t split_workspace, int64_t split_workspace_bytes, int keys) {
          check(vkern::flash_attention_fwd(tensor_of(q), tensor_of(k), tensor_of(v), tensor_of(out), ptr<float>(lse),
                                           ptr<const void>(key_bits), static_cast<vkern::DType>(dtype), batch, heads, q_len, kv_len, head_dim,
                                           scale, stages, stream_of(stream), ptr<float>(split_workspace),
                                           split_workspace_bytes, keys),
                "flash_attention_fwd");
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("key_bits"), py::arg("dtype"),
        py::arg("batch"), py::arg("heads"), py::arg("q_len"), py::arg("kv_len"), py::arg("head_dim"), py::arg("scale"),
        py::arg("stages"), py::arg("stream"), py::arg("split_workspace") = 0, py::arg("split_workspace_bytes") = 0,
        py::arg("keys") = 128);

  m.def("flash_tail_split_floats", &vkern::flash_tail_split_floats, py::arg("batch"), py::arg("heads"),
        py::arg("q_len"), py::arg("kv_len"), py::arg("head_dim"), py::arg("stages"), py::arg("eight_bit") = false,
        py::arg("int8_pv") = false, py::arg("exp_fma") = 0, py::arg("turns") = 0, py::arg("keys") = 128);
  m.attr("flash_fp8_head_dim") = vkern::kFlashFp8HeadDim;
  m.attr("flash_fp8_int8_pv") = true;  // flash_attention_fp8_fwd takes int8_pv
  m.def("flash_attention_fp8_fwd",
        [](TensorArg q, TensorArg k, TensorArg vt, TensorArg out, uintptr_t lse, uintptr_t key_bits, uintptr_t q_scale,
           uintptr_t k_scale, uintptr_t v_scale, uintptr_t v_offset, int out_dtype, int batch, int heads, int q_len,
           int kv_len, int vt_len, int head_dim, float scale, int stages, bool int8_qk, bool int8_pv, int keys,
           int exp_fma, int turns, float rescale_slack, uintptr_t stream, uintptr_t split_workspace,
           int64_t split_workspace_bytes) {
          check(vkern::flash_attention_fp8_fwd(tensor_of(q), tensor_of(k), tensor_of(vt), tensor_of(out), ptr<float>(lse),
                                               ptr<const void>(key_bits), ptr<const float>(q_scale),
                                               ptr<const float>(k_scale), ptr<const float>(v_scale),
                                               ptr<const float>(v_offset),
                                               static_cast<vkern::DType>(out_dtype), batch, heads, q_len, kv_len, vt_len,
                                               head_dim, scale, stages, int8_qk, int8_pv, keys, exp_fma, turns,
                                               rescale_slack, stream_of(stream), ptr<float>(split_workspace),
                                               split_workspace_bytes),
                "flash_attention_fp8_fwd");
        },
        py::arg("q"), py::arg("k"), py::arg("vt"), py::arg("out"), py::arg("lse"), py::arg("key_bits"),
        py::arg("q_scale"), py::arg("k_scale"), py::arg("v_scale"), py::arg("v_offset"), py::arg("out_dtype"),
        py::arg("batch"), py::arg("heads"), py::arg("q_len"), py::arg("kv_len"), py::arg("vt_len"), py::arg("head_dim"),
        py::arg("scale"), py::arg("stages"), py::arg("int8_qk"), py::arg("int8_pv"), py::arg("keys"),
        py::arg("exp_fma"), py::arg("turns"), py::arg("rescale_slack"), py::arg("stream"),
        py::arg("split_workspace") = 0, py::arg("split_workspace_bytes") = 0);
}
