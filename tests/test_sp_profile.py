from bench.sp_profile import timeline_stats


def test_timeline_stats_splits_exposed_and_hidden_communication():
    kernels = [("nvjet_gemm", 0, 100), ("ncclDevKernel_SendRecv", 50, 150), ("cudnn_sdpa_flash", 200, 300),
               ("ncclDevKernel_SendRecv", 300, 320), ("vectorized_elementwise_kernel", 310, 330)]
    s = timeline_stats(kernels)
    assert s["span_ms"] == 0.33 and s["gemm_ms"] == 0.1 and s["attention_ms"] == 0.1
    assert abs(s["nccl_ms"] - 0.12) < 1e-12 and abs(s["overlap_ms"] - 0.06) < 1e-12   # 50..100 and 310..320
    assert abs(s["nccl_alone_ms"] - 0.06) < 1e-12                                     # 100..150 and 300..310
    assert abs(s["compute_ms"] - 0.22) < 1e-12 and abs(s["idle_ms"] - 0.05) < 1e-12   # 150..200 idle
    assert s["nccl_kernels_us"] == [[100, 50], [20, 10]]
