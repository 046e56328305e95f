"""FP8 layerwise casting: Fp8Linear accuracy (SQNR floors), diffusers' skip list, save/load of
pre-quantized weights, NaN/Inf at patch time, undo, and (GPU) the kernels and _scaled_mm path."""
import copy

import pytest
import torch
from torch import nn

import vkern
from vkern import models, ops
from vkern.modules.fp8_linear import Fp8Activation, Fp8Linear, takes_fp8_input
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


def test_drop_originals_then_undo_raises_and_changes_nothing():
    """undo() refuses before it touches anything: the model stays wholly patched and keeps running, and the
    handle stays active (a second undo() says the same, not an AttributeError from a half-undone model)."""
    model = models.build_wan_transformer("tiny", torch.float32)
    inputs = models.transformer_inputs(model, "tiny", torch.float32, "cpu")
    handle = vkern.patch(model, vkern.PatchConfig(fp8="storage", fp8_keep_original="drop"))
    with torch.inference_mode():
        before = model(**inputs).sample
    for _ in range(2):
        with pytest.raises(RuntimeError, match="changed nothing: this patch dropped the original weights"):
            handle.undo()
    assert handle.active and isinstance(model.blocks[0].attn1.to_q, Fp8Linear)
    assert type(model.blocks[0].attn1.processor).__name__ == "VkernWanAttnProcessor"
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, before)


@pytest.mark.parametrize("mode", ["storage", "compute"])
def test_undo_after_a_dtype_cast_gives_the_originals_in_the_new_dtype(mode):
    """Patched in fp32, cast to bf16, undone: the original weights (parked off the model while patched, so the cast
    never reached them) come back in bf16, and the model equals the unpatched model cast the same way."""
    model = models.build_wan_transformer("tiny", torch.float32)
    reference = copy.deepcopy(model).to(torch.bfloat16)
    inputs = models.transformer_inputs(model, "tiny", torch.bfloat16, "cpu")
    handle = vkern.patch(model, vkern.PatchConfig(fp8=mode))
    model.to(torch.bfloat16)
    handle.undo()
    assert {m.weight.dtype for m in model.modules() if type(m) is nn.Linear} == {torch.bfloat16}
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, reference(**inputs).sample)


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


# --- pre-quantized activations (Fp8Activation), as vkern's fused LayerNorm/GELU kernels make them ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prequantized_activation_is_bit_identical_to_the_tensor(dtype, device):
    linear = nn.Linear(96, 48).to(device, dtype)
    x = torch.randn(2, 37, 96, device=device, dtype=dtype)
    act = Fp8Activation(*ops.fp8_quantize(x, "row"), dtype)
    compute = Fp8Linear.from_linear(linear, "compute")
    with torch.inference_mode():
        assert torch.equal(compute(act), compute(x))
        # storage mode (or dims the fp8 GEMM cannot take) dequantizes it: correct, the slow way round
        storage = Fp8Linear.from_linear(linear, "storage")
        assert torch.equal(storage(act), storage(act.dequantize()))
    assert takes_fp8_input(compute) and not takes_fp8_input(storage) and not takes_fp8_input(linear)
    odd = Fp8Linear.from_linear(nn.Linear(96, 40).to(device, dtype), "compute")
    assert not odd.accepts_fp8_input
    handle = compute.register_forward_pre_hook(lambda *a: None)
    assert not takes_fp8_input(compute)  # a hook would see a tuple where it expects a tensor
    handle.remove()
    compute.accept_prequantized = False  # the A/B switch (bench.profile_step's -unfused provider)
    assert not takes_fp8_input(compute)


def test_prequantized_activation_fails_loudly_in_a_plain_linear():
    act = Fp8Activation(*ops.fp8_quantize(torch.randn(5, 32), "row"), torch.float32)
    with pytest.raises(TypeError):
        nn.Linear(32, 16)(act)


def test_prequantized_op_input_errors_and_compile():
    xq, xs = ops.fp8_quantize(torch.randn(3, 5, 32), "row")
    q, s = ops.fp8_quantize(torch.randn(48, 32), "row")
    f = ops.fp8.fp8_linear_prequantized
    with pytest.raises(TypeError, match="xq: expected dtype"):
        f(torch.randn(3, 5, 32), xs, q, s)
    with pytest.raises(ValueError, match=r"x_scale: expected shape \(3, 5, 1\)"):
        f(xq, xs[:, :4], q, s)
    with pytest.raises(ValueError, match="xq: expected last dimension 32"):
        f(xq[..., :16], xs, q, s)
    with pytest.raises(TypeError, match="out_dtype"):
        f(xq, xs, q, s, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="multiples of 16"):
        f(xq, xs, *ops.fp8_quantize(torch.randn(40, 32), "row"))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(xq, xs, q, s, None, True, torch.float32), f(xq, xs, q, s, None, True, torch.float32))


@pytest.mark.parametrize("mode", ["storage", "compute"])
def test_fp8_with_unfused_block_and_chunked_ffn(mode):
    """PatchConfig(fp8=..., fused_block=False, ffn_chunk_size=N): ChunkedFeedForward runs the Fp8Linear
    layers (it used to refuse them); the output equals the unchunked fp8 model (compute mode: up to the
    GELU kernel's tanh ulps)."""
    model = models.build_wan_transformer("tiny", torch.bfloat16)
    inputs = models.transformer_inputs(model, "tiny", torch.bfloat16, "cpu")
    with torch.inference_mode():
        with vkern.patch(model, vkern.PatchConfig(fp8=mode, fused_block=False)):
            want = model(**inputs).sample
        with vkern.patch(model, vkern.PatchConfig(fp8=mode, fused_block=False, ffn_chunk_size=100)) as handle:
            got = model(**inputs).sample
            assert handle.summary["FeedForward -> ChunkedFeedForward"] == model.config.num_layers
    if mode == "storage":
        assert torch.equal(got, want)
    else:
        assert sqnr_db(want, got) >= 35


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


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n", [(4096, 5120, 13824), (113, 13824, 5120)])
def test_gpu_prequantized_equals_compute_mode(m, k, n):
    """The same cuBLASLt call on the same e4m3 activation: fp8_linear_compute(x) is
    fp8_linear_prequantized(fp8_quantize(x)) bit for bit, fast accumulation or not."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q, s = ops.fp8_quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5, "row")
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for fast in (True, False):
        y = ops.fp8.fp8_linear_prequantized(*ops.fp8_quantize(x, "row"), q, s, bias, fast)
        assert ops._backend.last_choice["fp8_linear_compute"] == "scaled_mm"
        assert torch.equal(y, ops.fp8_linear_compute(x, q, s, bias, fast))
