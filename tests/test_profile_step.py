"""bench/profile_step.py: the kernel-name classifier, and the whole run on the CPU with the tiny Wan."""
import json

import pytest

from bench import profile_step

# Kernel names as torch.profiler reports them on an H100/H200 (cuDNN 9, cuBLAS 12/13, torch, vkern).
NAMES = [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT", "gemm"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_execute_segment_k_off", "gemm"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<...>>", "gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>", "elementwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, ...)", "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(...)>", "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "elementwise"),
    ("_layernorm_modulate_kernel", "elementwise"),
    ("_gate_residual_kernel", "elementwise"),
    ("_gelu_tanh_fp8_kernel", "elementwise"),
    ("_qk_norm_rope_kernel", "elementwise"),
    ("void vkern::fp8_quantize_rowwise_kernel<__nv_bfloat16>(...)", "elementwise"),
    ("void (anonymous namespace)::rowwise_in_registers_kernel<__nv_bfloat16, 4>(...)", "elementwise"),
    ("void (anonymous namespace)::dequant_row_in_registers_kernel<__nv_bfloat16>(...)", "elementwise"),
    ("void (anonymous namespace)::cast_kernel<float>(...)", "elementwise"),
    ("_v_fp8_kernel", "elementwise"), ("_attention_kernel", "attention"),
    ("aten::addmm", "gemm"), ("aten::mm", "gemm"), ("vkern::fp8_linear_prequantized", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("vkern::attention", "attention"),
    ("vkern::layernorm_modulate_fp8", "elementwise"), ("aten::empty", "other"),
]


@pytest.mark.parametrize("name,cls", NAMES)
def test_classifier(name, cls):
    assert profile_step.classify(name) == cls


def test_tiny_cpu_run_writes_rows_and_a_table(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    rows = profile_step.main(["--size", "tiny", "--device", "cpu", "--out", str(out),
                              "--providers", "diffusers,vkern,vkern-fp8-compute,vkern-fp8-compute-unfused"])
    assert [r["provider"] for r in rows] == ["diffusers", "vkern", "vkern-fp8-compute", "vkern-fp8-compute-unfused"]
    fused, unfused = ({t["name"] for t in r["top"]} for r in rows[2:])
    assert "vkern::layernorm_modulate_fp8" in fused and "vkern::layernorm_modulate_fp8" not in unfused
    assert [json.loads(line)["provider"] for line in out.read_text().splitlines()] == [r["provider"] for r in rows]
    for r in rows:
        assert r["op"] == "profile" and r["shape"] == "wan-tiny" and r["world"] == 1
        assert {"gpu", "torch", "commit", "date"} <= set(r)
        parts = [r[f"{c}_ms"] for c in profile_step.CLASSES]
        assert all(p >= 0 for p in parts) and abs(sum(parts) - r["total_ms"]) < 1e-6
        assert r["gemm_ms"] > 0 and r["attention_ms"] > 0 and r["elementwise_ms"] > 0, r
    # fp8 weights (parameter bytes, bench.timing.param_bytes): e4m3 Linears, rest as before
    assert rows[3]["param_gib"] == rows[2]["param_gib"] < rows[1]["param_gib"] == rows[0]["param_gib"]
    table = capsys.readouterr().out
    assert "| wan-tiny | attention | GEMM | elementwise+norm+copy |" in table and "| vkern-fp8-compute |" in table


def test_real_sizes_need_a_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        profile_step.main(["--size", "14b", "--device", "cpu"])


def test_another_family_tiny_cpu_run():
    """--family: LTX-Video's tiny model, its step profiled per provider; vkern's fused q/k prologue shows as its op, and
    its fused block glue unless the provider asks for diffusers' blocks."""
    providers = ["diffusers", "vkern", "vkern-diffusers-blocks"]
    rows = profile_step.main(["--family", "ltx", "--size", "tiny", "--device", "cpu", "--providers", ",".join(providers)])
    assert [(r["shape"], r["provider"]) for r in rows] == [("ltx-tiny", p) for p in providers]
    names = [{t["name"] for t in r["top"]} for r in rows]
    assert "vkern::qk_norm_rope" in names[1] and not any(n.startswith("vkern::") for n in names[0])
    assert "vkern::layernorm_modulate" in names[1] and "vkern::layernorm_modulate" not in names[2]
    assert "vkern::qk_norm_rope" in names[2]
    assert all(r["gemm_ms"] > 0 and r["attention_ms"] > 0 for r in rows)
