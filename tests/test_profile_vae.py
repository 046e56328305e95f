"""bench/profile_vae.py: the kernel classifier (GPU kernel names with the ops and module scopes that
launched them), and the whole run on the CPU with the tiny Wan VAE."""
import json
import re
from types import SimpleNamespace

import pytest
import torch

from bench import profile_vae
from vkern import models


def launched_by(*names):
    """A fake profiler CPU event chain, innermost first (as FunctionEvent.cpu_parent links them)."""
    event = None
    for name in reversed(names):
        event = SimpleNamespace(name=name, cpu_parent=event)
    return event


# (kernel name as an H100/H200 profile shows it, launcher chain innermost first, class)
KERNELS = [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1",
     ("aten::cudnn_convolution", "aten::_convolution", "aten::conv3d"), "conv"),
    ("cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_128x128_32x5_nhwc_align8>",
     ("aten::cudnn_convolution",), "conv"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>",
     ("aten::cudnn_convolution", "aten::conv3d"), "copy"),
    ("void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>",
     ("aten::cudnn_convolution",), "copy"),
    ("void cudnn::ops::computeOffsetsKernel<int>(...)", ("aten::cudnn_convolution",), "conv"),
    # the weight's layout change inside a channels-last conv: a copy, not conv time
    ("void at::native::elementwise_kernel<128, 4, ...direct_copy_kernel_cuda...>",
     ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cudnn_convolution"), "copy"),
    ("_rms_norm_silu_kernel", ("vkern::rms_norm_silu_",), "norm_silu"),
    ("_rms_norm_silu_kernel", (), "norm_silu"),  # a Triton launch no op claimed
    ("_residual_add_kernel", ("vkern::residual_add_",), "elementwise"),  # fuse_bias: the biases live here
    # diffusers' WanRMS_norm + SiLU: every kernel under the module hooks' range
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<...>>>",
     ("aten::linalg_vector_norm", "vae:norm", "aten::conv3d"), "norm_silu"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, "
     "at::native::binary_internal::DivFunctor<float>>>", ("aten::div", "vae:norm"), "norm_silu"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda>",
     ("aten::copy_", "aten::_to_copy", "aten::to", "vae:norm"), "norm_silu"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::silu_kernel...>",
     ("aten::silu",), "norm_silu"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy_aligned16_contig<...>", ("aten::cat",), "copy"),
    ("void at::native::elementwise_kernel<128, 2, ...constant_pad_nd...>", ("aten::fill_", "aten::constant_pad_nd"),
     "copy"),
    ("void at::native::(anonymous namespace)::upsample_nearest_exact2d_out_frame<c10::BFloat16, ...>",
     ("aten::upsample_nearest_exact2d",), "copy"),
    ("Memcpy DtoD (Device -> Device)", ("aten::copy_",), "copy"),
    ("Memset (Device)", ("aten::zero_",), "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     ("aten::add_",), "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::clamp_scalar_kernel_impl...>",
     ("aten::clamp_",), "elementwise"),
    # the mid block's attention: its norm, 1x1 convs and SDPA are "other"
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0",
     ("aten::_scaled_dot_product_cudnn_attention", "vae:attention"), "other"),
    ("sm90_xmma_fprop_implicit_gemm_bf16", ("aten::cudnn_convolution", "vae:attention"), "other"),
    ("void at::native::reduce_kernel<...NormTwoOps...>", ("aten::linalg_vector_norm", "vae:norm", "vae:attention"),
     "other"),
    # CPU op names (the CI run): the op is its own launcher
    ("aten::mkldnn_convolution", ("aten::mkldnn_convolution",), "conv"),
    ("aten::cat", ("aten::cat",), "copy"), ("vkern::rms_norm_silu_", ("vkern::rms_norm_silu_",), "norm_silu"),
    ("aten::add_", ("aten::add_",), "elementwise"), ("aten::empty_strided", ("aten::empty_strided",), "other"),
]


@pytest.mark.parametrize("name,chain,cls", KERNELS)
def test_classifier(name, chain, cls):
    assert profile_vae.classify(name, launched_by(*chain)) == cls


def test_tiny_cpu_run_writes_rows_and_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", "reference")  # the interpreted kernel takes minutes
    out, md = tmp_path / "rows.jsonl", tmp_path / "profile.md"
    rows = profile_vae.main(["--res", "tiny", "--device", "cpu", "--out", str(out), "--md", str(md)])
    assert [(r["op"], r["provider"]) for r in rows] == [
        ("profile-vae-decode", "diffusers"), ("profile-vae-decode", "vkern"),
        ("profile-vae-encode", "diffusers"), ("profile-vae-encode", "vkern")]
    assert [json.loads(line)["provider"] for line in out.read_text().splitlines()] == [r["provider"] for r in rows]
    for r in rows:
        assert r["shape"] == "wan-vae-tiny" and r["world"] == 1 and {"gpu", "torch", "commit", "date"} <= set(r)
        parts = [r[f"{c}_ms"] for c in profile_vae.CLASSES]
        assert all(p >= 0 for p in parts) and abs(sum(parts) - r["total_ms"]) < 1e-6
        assert r["conv_ms"] > 0 and r["norm_silu_ms"] > 0 and r["copy_ms"] > 0, r
        assert len(r["top"]) == profile_vae.TOP and r["wall_ms"] > 0
    diffusers, vkern = rows[:2]
    assert "aten::cat" in {t["name"] for t in diffusers["top"]}
    assert vkern["norm_silu_ms"] > 0  # under inference_mode the loop calls the norm's body, not the custom op
    assert not any(t["name"].startswith(profile_vae.SCOPE) for r in rows for t in r["top"])  # hook ranges: no time
    text = capsys.readouterr().out
    assert "| op | provider | conv | norm+silu | copy+cat+pad | other elementwise | other |" in text
    assert "| decode tiny | vkern |" in text and "top 15: profile-vae-encode wan-vae-tiny vkern" in text
    assert md.read_text().strip() == text.strip()


def test_real_sizes_need_a_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        profile_vae.main(["--res", "480p", "--device", "cpu"])


LABEL = re.compile(r"^(\d+)->(\d+) k([\dx]+) ([\dx]+) (\w+)$")  # "96->96 k3x3x3 4x480x832 cuda"


def conv_entry_points():
    from vkern.ops import causal_conv
    return torch.nn.functional.conv3d, torch.nn.functional.conv2d, causal_conv.conv3d_in_place


def test_conv_ranges_labels_flops_and_restore(monkeypatch):
    from vkern.ops import causal_conv

    def in_place(backend, x, weight, bias, stride, padding, cache=None, cache_reversed=False, residual=None):
        return x.new_zeros(1, 16, 4, 6, 6)  # what the kernel returns for the call below

    monkeypatch.setattr(causal_conv, "conv3d_in_place", in_place)
    before = conv_entry_points()
    F = torch.nn.functional
    with profile_vae.conv_ranges() as stats:
        F.conv2d(torch.randn(2, 4, 9, 9), torch.randn(6, 2, 3, 3), None, 2, 1, 2, 2)  # stride 2, pad 1, dil 2, groups 2
        F.conv3d(torch.randn(1, 3, 5, 8, 8), torch.randn(8, 3, 1, 3, 3), padding="same")
        causal_conv.conv3d_in_place("triton", torch.randn(1, 8, 4, 6, 6), torch.randn(16, 8, 3, 3, 3), None,
                                    (1, 1, 1), (2, 1, 1), cache=None, residual=None)
    assert stats == {
        "4->6 k3x3 2x4x4 cpu": dict(backend="cpu", calls=1, flops=2 * (2 * 6 * 4 * 4) * 2 * 9),
        "3->8 k1x3x3 5x8x8 cpu": dict(backend="cpu", calls=1, flops=2 * (8 * 5 * 8 * 8) * 3 * 9),
        "8->16 k3x3x3 4x6x6 triton": dict(backend="triton", calls=1, flops=2 * (16 * 4 * 6 * 6) * 8 * 27)}
    assert conv_entry_points() == before
    with pytest.raises(RuntimeError), profile_vae.conv_ranges():  # restored when the call fails too
        raise RuntimeError
    assert conv_entry_points() == before


def test_tiny_cpu_conv_layers(monkeypatch):
    """The profiled rows carry every conv of the tiny VAE's decoder, by channels and kernel; the entry
    points are the originals afterwards."""
    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", "reference")
    before = conv_entry_points()
    rows = profile_vae.run("tiny", ["decode"], ["diffusers", "vkern"], torch.device("cpu"))
    assert conv_entry_points() == before
    vae = models.build_wan_vae("tiny")
    convs = [m for m in [*vae.decoder.modules(), vae.post_quant_conv] if isinstance(m, torch.nn.modules.conv._ConvNd)]
    want = {(m.in_channels, m.out_channels, "x".join(map(str, m.kernel_size))) for m in convs}
    assert {(16, 16, "3x3x3"), (8, 3, "3x3x3"), (16, 48, "1x1")} <= want  # a residual conv, conv_out, attention qkv
    for r in rows:
        layers = r["conv_layers"]
        assert layers and [c["ms"] for c in layers] == sorted((c["ms"] for c in layers), reverse=True)
        parsed = [LABEL.match(c["label"]).groups() for c in layers]
        assert {(int(i), int(o), k) for i, o, k, _, _ in parsed} == want, r["provider"]
        assert all(c["calls"] > 0 and c["ms"] >= 0 and c["backend"] == b == "cpu" for c, (*_, b) in zip(layers, parsed))
        assert sum(c["calls"] for c in layers) >= len(convs) and sum(c["ms"] for c in layers) > 0


def test_gpu_idle_sums_the_gaps_between_kernels():
    """Idle time is the time no kernel ran between the first start and the last end (overlapping kernels count
    once), filed under the kernel that came after each gap."""
    NS = SimpleNamespace
    cuda = torch.autograd.DeviceType.CUDA

    def kernel(name, start, end):
        return NS(device_type=cuda, key=name, time_range=NS(start=start, end=end, elapsed_us=lambda: end - start))

    events = [kernel("a", 0, 100), kernel("b", 50, 120), kernel("c", 1120, 1200), kernel("b", 1700, 1800),
              NS(device_type=torch.autograd.DeviceType.CPU, key="cpu op", time_range=NS(start=0, end=5000,
                                                                                        elapsed_us=lambda: 5000))]
    idle, before = profile_vae.gpu_idle(NS(events=lambda: events))
    assert idle == (1000 + 500) / 1e3
    assert before == [dict(name="c", ms=1.0, gaps=1), dict(name="b", ms=0.5, gaps=1)]
