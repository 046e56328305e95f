"""FP8 layerwise casting: Fp8Linear accuracy (SQNR floors), diffusers' skip list, save/load of
pre-quantized weights, NaN/Inf at patch time, undo, and (GPU) the kernels and _scaled_mm path."""
import pytest
import torch
from torch import nn

import vkern
from vkern import models, ops
from vkern.modules.fp8_linear import Fp8Linear
from vkern.reference import fp8 as ref


def sqnr_db(signal, noisy):
    signal, noisy = signal.double(), noisy.double()
    return (10 * torch.log10(signal.pow(2).sum() / (signal - noisy).pow(2).sum())).item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("mode, floor_db", [("storage", 30.0), ("compute", 25.0)])
@pytest.mark.parametrize("tokens, k, n", [(113, 256, 96), (64, 1536, 512)])
def test_layer_sqnr_floor(mode, floor_db, tokens, k, n, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    linear = nn.Linear(k, n).to(device)
    x = torch.randn(2, tokens, k, device=device)
    exact = linear(x)  # fp32 weights and activations: the signal
    fp8 = Fp8Linear.from_linear(linear.to(dtype), mode)
    with torch.inference_mode():
        y = fp8(x.to(dtype))
    assert y.dtype == dtype and y.shape == exact.shape
    assert sqnr_db(exact, y) >= floor_db, f"{mode}: {sqnr_db(exact, y):.1f} dB"


def test_compute_mode_really_quantizes_activations():
    linear = nn.Linear(64, 32)
    x = torch.randn(40, 64)
    storage = Fp8Linear.from_linear(linear, "storage")(x)
    compute = Fp8Linear.from_linear(linear, "compute")(x)
    torch.testing.assert_close(compute, ref.fp8_linear_compute(x, *ops.fp8_quantize(linear.weight, "row"), linear.bias))
    assert not torch.equal(storage, compute)


@pytest.mark.parametrize("mode, floor", [("storage", 0.999), ("compute", 0.995)])
def test_tiny_wan_cosine_floor(mode, floor):
    model = models.build_wan_transformer("tiny", torch.float32)
    inputs = models.transformer_inputs(model, "tiny", torch.float32, "cpu")
    with torch.inference_mode():
        before = model(**inputs).sample
        with vkern.patch(model, vkern.PatchConfig(fp8=mode)) as handle:
            after = model(**inputs).sample
            assert handle.summary[f"Linear -> Fp8Linear ({mode})"] == 10 * model.config.num_layers
    assert cosine(before, after) >= floor


def test_default_skip_list_equals_diffusers_layerwise_casting():
    model = models.build_wan_transformer("tiny", torch.float32)
    twin = models.build_wan_transformer("tiny", torch.float32)
    twin.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    cast_by_diffusers = {n for n, m in twin.named_modules() if type(m) is nn.Linear
                         and getattr(m, "_diffusers_hook", None) is not None
                         and m._diffusers_hook.get_hook("layerwise_casting") is not None}
    vkern.patch(model, vkern.PatchConfig(fp8="storage"))
    ours = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert ours == cast_by_diffusers and ours
    assert not any(n.startswith(("condition_embedder", "proj_out")) for n in ours)


def test_fp8_filter_fn_overrides_the_default():
    model = models.build_wan_transformer("tiny", torch.float32)
    config = vkern.PatchConfig(fp8="storage", fp8_filter_fn=lambda m, fqn: fqn.endswith("ffn.net.2"))
    vkern.patch(model, config)
    assert {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)} == {
        f"blocks.{i}.ffn.net.2" for i in range(model.config.num_layers)}


def test_nan_or_inf_weight_is_a_clear_error_at_patch_time():
    model = models.build_wan_transformer("tiny", torch.float32)
    with torch.no_grad():
        model.blocks[1].attn1.to_k.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.1\.attn1\.to_k: weight has NaN or Inf"):
        vkern.patch(model, vkern.PatchConfig(fp8="storage"))


def test_prequantized_state_dict_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    a = models.build_wan_transformer("tiny", torch.float32)
    vkern.patch(a, vkern.PatchConfig(fp8="storage"))
    path = tmp_path / "wan-fp8.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    loaded = load_file(str(path))
    assert loaded["blocks.0.attn1.to_q.weight"].dtype == torch.float8_e4m3fn
    assert loaded["blocks.0.attn1.to_q.weight_scale"].shape == (a.blocks[0].attn1.to_q.out_features, 1)

    torch.manual_seed(1234)  # different random weights, then the checkpoint
    b = models.build_wan_transformer("tiny", torch.float32)
    vkern.patch(b, vkern.PatchConfig(fp8="storage"))
    b.load_state_dict(loaded, strict=True)
    inputs = models.transformer_inputs(a, "tiny", torch.float32, "cpu")
    with torch.inference_mode():
        assert torch.equal(a(**inputs).sample, b(**inputs).sample)


def test_model_dtype_cast_keeps_fp8_weights_and_undo_is_exact():
    model = models.build_wan_transformer("tiny", torch.float32)
    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    inputs = models.transformer_inputs(model, "tiny", torch.float32, "cpu")
    with torch.inference_mode():
        before = model(**inputs).sample
    handle = vkern.patch(model, vkern.PatchConfig(fp8="storage"))
    model.to(torch.float64)  # a cast that round-trips exactly for the other parameters
    layer = model.blocks[0].ffn.net[2]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.float64
    model.to(torch.float32)
    handle.undo()
    assert all(dict(model.named_modules())[n] is m for n, m in originals.items())
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, before)


def test_drop_originals_then_undo_raises():
    model = models.build_wan_transformer("tiny", torch.float32)
    handle = vkern.patch(model, vkern.PatchConfig(fp8="storage", fp8_keep_original="drop"))
    with pytest.raises(RuntimeError, match="dropped the original weights"):
        handle.undo()


@pytest.mark.parametrize("bad, match", [(dict(fp8="int8"), "PatchConfig.fp8"),
                                        (dict(fp8="storage", fp8_keep_original="disk"), "fp8_keep_original"),
                                        (dict(fp8="storage", fp8_filter_fn=3), "fp8_filter_fn")])
def test_config_validation(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        vkern.PatchConfig(**bad)


def test_op_input_errors():
    q, s = ops.fp8_quantize(torch.randn(48, 32), "row")
    with pytest.raises(ValueError, match=r"bias: expected shape \(48,\)"):
        ops.fp8_linear(torch.randn(3, 32), q, s, torch.randn(47))
    with pytest.raises(ValueError, match="weight_scale: expected one fp32 scale or shape"):
        ops.fp8_linear(torch.randn(3, 32), q, s[:5])
    with pytest.raises(ValueError, match="multiples of 16"):
        ops.fp8_linear_compute(torch.randn(3, 32), *ops.fp8_quantize(torch.randn(40, 32), "row"))
    with pytest.raises(TypeError, match="q: expected dtype"):
        ops.fp8_dequantize(torch.randn(4, 4), torch.ones(()))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape, granularity", [((113, 113), "row"), ((13824, 5120), "row"), ((5120, 5120), "tensor"),
                                                ((3, 7, 64), "row")])
def test_cuda_dequantize_bit_exact(dtype, shape, granularity):
    q, s = ops.fp8_quantize(torch.randn(shape, device="cuda") * 3, granularity)
    out = ops.fp8_dequantize(q, s, dtype)
    assert ops._backend.last_choice["fp8_dequantize"] == "cuda"
    assert torch.equal(out, ref.fp8_dequantize(q, s, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n", [(113, 5120, 5120), (4096, 5120, 13824), (1, 1536, 8960)])
def test_scaled_mm_path_matches_the_emulation(m, k, n):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q, s = ops.fp8_quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5, "row")
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = ops.fp8_linear_compute(x, q, s, bias, fast_accum=False)
    assert ops._backend.last_choice["fp8_linear_compute"] == "scaled_mm"
    emulated = ref.fp8_linear_compute(x, q, s, bias)
    # Same e4m3 products, fp32 accumulation in another order, one bf16 rounding each: within 2 bf16 ulps.
    assert ((y.float() - emulated.float()).norm() / emulated.float().norm()).item() < 2 * 2**-8
    # Fast accumulation trades accumulator precision for speed: it must stay far below the e4m3
    # quantization noise (31 dB ~ 2.8e-2 rel L2); allow 4e-3.
    fast = ops.fp8_linear_compute(x, q, s, bias, fast_accum=True)
    assert ((fast.float() - emulated.float()).norm() / emulated.float().norm()).item() < 4e-3


@pytest.mark.gpu
def test_gpu_weight_memory_and_tiny_wan_floors():
    model = models.build_wan_transformer("tiny", torch.bfloat16, "cuda")
    inputs = models.transformer_inputs(model, "tiny", torch.bfloat16, "cuda")
    linear_bytes = sum(m.weight.numel() * 2 for m in model.modules() if type(m) is nn.Linear)
    with torch.inference_mode():
        before = model(**inputs).sample
        for mode, floor in (("storage", 0.999), ("compute", 0.995)):
            torch.cuda.synchronize()
            allocated = torch.cuda.memory_allocated()
            handle = vkern.patch(model, vkern.PatchConfig(fp8=mode))
            torch.cuda.synchronize()
            freed = allocated - torch.cuda.memory_allocated()
            after = model(**inputs).sample
            handle.undo()
            assert cosine(before, after) >= floor, (mode, cosine(before, after))
            assert freed > 0.3 * linear_bytes  # bf16 weights left the GPU, e4m3 + scales stayed
