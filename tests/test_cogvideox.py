"""vkern.patch on CogVideoX: the reference processor is diffusers' bit for bit (plain and fused projections), the
vkern processor is within 2x of PyTorch's own bf16 error, the 8-bit modes meet issue #3's bound on the joint
attention, and patch/undo/errors behave as for Wan."""
import copy
import warnings

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

import vkern
from vkern import models
from vkern.modules.cogvideox_attention import VkernCogVideoXAttnProcessor

from .tolerance import assert_within_torch_error, rel_l2


def build(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)  # the same weights for every dtype
    return models.build_cogvideox_transformer("tiny", dtype, device)


def forward(model, inputs):
    with torch.inference_mode():
        return model(**inputs).sample


def processors(model):
    return [m.processor for m in model.modules() if hasattr(m, "processor")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused_qkv"])
def test_reference_mode_is_diffusers_bitwise(dtype, fused):
    model = build(dtype)
    if fused:
        model.fuse_qkv_projections()
    inputs = models.cogvideox_transformer_inputs(model, "tiny", dtype, "cpu")
    want = forward(model, inputs)
    patched = copy.deepcopy(model)
    handle = vkern.patch(patched, vkern.PatchConfig(attention="reference"))
    assert handle.summary["CogVideoX attention processor"] == 2
    assert all(p.fused == fused for p in processors(patched))
    assert torch.equal(forward(patched, inputs), want)
    handle.undo()
    assert not any(isinstance(p, VkernCogVideoXAttnProcessor) for p in processors(patched))
    assert torch.equal(forward(patched, inputs), want)


@pytest.mark.parametrize("mode", ["auto", "bf16", "sdpa"])
def test_patched_within_twice_torch_bf16_error(mode, device):
    model32, model16 = build(torch.float32, device), build(torch.bfloat16, device)
    inputs = models.cogvideox_transformer_inputs(model32, "tiny", torch.float32, device)
    inputs16 = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    oracle, torch_bf16 = forward(model32, inputs), forward(model16, inputs16)
    with vkern.patch(model16, vkern.PatchConfig(attention=mode)):
        ours = forward(model16, inputs16)
    assert_within_torch_error(ours, oracle, torch_bf16)


def joint_attention(dtype, device, video=300, text=26, dim=128):
    """One CogVideoX block's attention (head dim 64, per-head LayerNorm, RoPE on the video) and its inputs."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    torch.manual_seed(1)
    block = CogVideoXBlock(dim, dim // 64, 64, time_embed_dim=16).to(device, dtype).eval()
    angles = torch.randn(video, 64, device=device)
    args = (torch.randn(1, video, dim, device=device, dtype=dtype), torch.randn(1, text, dim, device=device, dtype=dtype))
    return block.attn1, args, (angles.cos(), angles.sin())


def run_processor(attn, processor, args, rope):
    with torch.inference_mode():
        return torch.cat(processor(attn, *args, None, rope), dim=1)


@pytest.mark.parametrize("mode", ["int8pv", "int8"])
def test_8bit_joint_attention_meets_issue_3_bound(mode, device):
    """Issue #3's accuracy bound (cos >= 0.9995, rel L2 <= 0.02 vs fp32) on CogVideoX's joint attention, before the
    output projection's rounding (to_out an identity map)."""
    attn, args, rope = joint_attention(torch.bfloat16, device)
    with torch.no_grad():
        attn.to_out[0].weight.copy_(torch.eye(attn.to_out[0].weight.shape[0]))
        attn.to_out[0].bias.zero_()
    oracle = run_processor(attn.double(), CogVideoXAttnProcessor2_0(), [a.double() for a in args],
                           tuple(t.double() for t in rope))
    attn.bfloat16()
    ours = run_processor(attn, VkernCogVideoXAttnProcessor(mode), args, rope)
    cos = torch.nn.functional.cosine_similarity(ours.double().flatten(), oracle.flatten(), dim=0).item()
    assert cos >= 0.9995 and rel_l2(ours, oracle) <= 0.02, (cos, rel_l2(ours, oracle))


def test_processor_under_compile_fullgraph():
    attn, args, rope = joint_attention(torch.float32, "cpu")
    expected = run_processor(attn, CogVideoXAttnProcessor2_0(), args, rope)
    attn.set_processor(VkernCogVideoXAttnProcessor())
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = torch.cat(compiled(*args, image_rotary_emb=rope), dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_autograd_runs_diffusers_attention():
    model = build()
    inputs = models.cogvideox_transformer_inputs(model, "tiny", torch.float32, "cpu")
    inputs["hidden_states"].requires_grad_(True)
    want = model(**inputs).sample
    with vkern.patch(model, vkern.PatchConfig(attention="int8pv")):
        got = model(**inputs).sample
    assert torch.equal(got, want)
    got.sum().backward()
    assert inputs["hidden_states"].grad is not None


@pytest.mark.parametrize("fp8, floor", [("storage", 0.999), ("compute", 0.995)])
def test_fp8_quantizes_the_blocks_linears(fp8, floor):
    model = build(torch.bfloat16)
    inputs = models.cogvideox_transformer_inputs(model, "tiny", torch.bfloat16, "cpu")
    want = forward(model, inputs)
    with vkern.patch(model, vkern.PatchConfig(fp8=fp8)):
        fp8_layers = [n for n, m in model.named_modules() if type(m).__name__ == "Fp8Linear"]
        assert fp8_layers and not any(n.startswith("patch_embed") or "norm" in n for n in fp8_layers)  # skip list
        got = forward(model, inputs)
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(), want.double().flatten(), dim=0).item()
    assert cos >= floor  # the floors README states for Wan's model output (storage / compute)
    assert torch.equal(forward(model, inputs), want)  # undone: the original weights back


def test_pipeline_patches_the_transformer_and_warns_about_the_vae():
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=4,
                                 temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=build(),
                             scheduler=CogVideoXDDIMScheduler())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = vkern.patch(pipe)
    assert any("AutoencoderKLCogVideoX" in str(w.message) for w in caught)
    assert len(handle.children) == 1 and "CogVideoX attention processor" in repr(handle)
    handle.undo()
    assert not any(isinstance(p, VkernCogVideoXAttnProcessor) for p in processors(pipe.transformer))


@pytest.mark.parametrize("field", ["ffn_chunk_size", "attention_chunk_size"])
def test_wan_only_options_are_errors(field):
    model = build()
    with pytest.raises(ValueError, match=f"PatchConfig.{field}: not available for CogVideoXTransformer3DModel"):
        vkern.patch(model, vkern.PatchConfig(**{field: 4096}))
    assert not any(isinstance(p, VkernCogVideoXAttnProcessor) for p in processors(model))


def test_diffusers_context_parallel_is_refused():
    model = build()
    model._parallel_config = object()  # what enable_parallelism() leaves on the model
    with pytest.raises(ValueError, match="enable_parallelism"):
        vkern.patch(model)
    assert not hasattr(model, "_vkern_patch_handle")
