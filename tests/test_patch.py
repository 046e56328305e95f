"""vkern.patch on Wan models and pipelines: swaps, undo (bit-identical), errors, .to() order."""
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import vkern
from vkern import models
from vkern.modules.causal_conv import CachedCausalConv3d
from vkern.modules.wan_attention import VkernWanAttnProcessor
from vkern.patch import patched_handle


def forward(model, inputs):
    with torch.inference_mode():
        return model(**inputs).sample


@pytest.fixture
def transformer():
    return models.build_wan_transformer("tiny", torch.float32)


@pytest.fixture
def inputs(transformer):
    return models.transformer_inputs(transformer, "tiny", torch.float32, "cpu")


def test_transformer_patch_and_undo(transformer, inputs):
    before = forward(transformer, inputs)
    handle = vkern.patch(transformer)
    processors = [m.processor for m in transformer.modules() if hasattr(m, "processor")]
    assert processors and all(isinstance(p, VkernWanAttnProcessor) for p in processors)
    assert handle.summary["WanAttention processor"] == 2 * transformer.config.num_layers
    patched = forward(transformer, inputs)
    torch.testing.assert_close(patched, before, rtol=1e-5, atol=1e-5)
    handle.undo()
    assert all(isinstance(m.processor, WanAttnProcessor) for m in transformer.modules() if hasattr(m, "processor"))
    assert torch.equal(forward(transformer, inputs), before)
    with pytest.raises(RuntimeError, match="already undone"):
        handle.undo()


def test_vae_patch_swaps_every_causal_conv_and_undo_restores_them():
    vae = models.build_wan_vae("tiny", torch.float32)
    z = torch.randn(models.latent_shape("tiny"))
    originals = {n: m for n, m in vae.named_modules() if type(m).__name__ == "WanCausalConv3d"}
    with torch.inference_mode():
        before = vae.decode(z).sample
        handle = vkern.patch(vae)
        assert not any(type(m).__name__ == "WanCausalConv3d" for m in vae.modules())
        assert sum(isinstance(m, CachedCausalConv3d) for m in vae.modules()) == len(originals)
        assert torch.equal(vae.decode(z).sample, before)  # reference op: the same torch math
        handle.undo()
        assert all(dict(vae.named_modules())[n] is m for n, m in originals.items())
        assert torch.equal(vae.decode(z).sample, before)


def test_pipeline_patches_its_components():
    pipe = models.build_wan_pipeline("tiny", dtype=torch.float32)
    handle = vkern.patch(pipe)
    assert len(handle.children) == 2 and "CachedCausalConv3d" in repr(handle)
    with pytest.raises(RuntimeError, match="already patched"):
        vkern.patch(pipe.transformer)
    handle.undo()
    vkern.patch(pipe.transformer).undo()  # patchable again after undo


def test_double_patch_is_a_clear_error(transformer):
    vkern.patch(transformer)
    with pytest.raises(RuntimeError, match="WanTransformer3DModel is already patched by vkern"):
        vkern.patch(transformer)


def test_unsupported_objects_say_what_is_supported():
    with pytest.raises(TypeError, match="unsupported object Linear; supported: WanPipeline"):
        vkern.patch(torch.nn.Linear(2, 2))

    class FakePipeline:
        components = {"unet": torch.nn.Linear(2, 2), "tokenizer": None}

    with pytest.raises(TypeError, match=r"unsupported object FakePipeline.*its components: \['unet'\]"):
        vkern.patch(FakePipeline())


def test_patch_before_to_equals_patch_after_to(transformer, inputs):
    other = models.build_wan_transformer("tiny", torch.float32)
    other.load_state_dict(transformer.state_dict())
    h1 = vkern.patch(transformer)
    transformer.to(torch.float64)
    other.to(torch.float64)
    h2 = vkern.patch(other)
    inputs64 = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    assert torch.equal(forward(transformer, inputs64), forward(other, inputs64))
    h1.undo()
    h2.undo()
    assert torch.equal(forward(transformer, inputs64), forward(other, inputs64))


def test_vae_patch_then_to_moves_the_shared_weights():
    vae = models.build_wan_vae("tiny", torch.float32)
    handle = vkern.patch(vae)
    vae.to(torch.float64)
    handle.undo()
    assert all(p.dtype == torch.float64 for p in vae.parameters())


def test_filter_fn_and_config_options(transformer):
    config = vkern.PatchConfig(filter_fn=lambda module, fqn: not fqn.endswith("attn2"))
    handle = vkern.patch(transformer, config)
    assert handle.summary["WanAttention processor"] == transformer.config.num_layers
    assert all(isinstance(b.attn2.processor, WanAttnProcessor) for b in transformer.blocks)
    handle.undo()
    with vkern.patch(transformer, vkern.PatchConfig(ffn_chunk_size=7)) as handle:
        # The fused block (default) chunks its own FFN: an instance forward, the class stays.
        assert handle.summary["WanTransformerBlock.forward -> fused glue"] == transformer.config.num_layers
        assert all("forward" in b.__dict__ and type(b).__name__ == "WanTransformerBlock" for b in transformer.blocks)
    assert not handle.active and not any("forward" in b.__dict__ for b in transformer.blocks)
    with vkern.patch(transformer, vkern.PatchConfig(ffn_chunk_size=7, fused_block=False)) as handle:
        assert handle.summary["FeedForward -> ChunkedFeedForward"] == transformer.config.num_layers


@pytest.mark.parametrize("bad, match", [
    (dict(attention="flash3"), "PatchConfig.attention"),
    (dict(ffn_chunk_size=0), "PatchConfig.ffn_chunk_size"),
    (dict(filter_fn="attn1"), "PatchConfig.filter_fn"),
    (dict(vae="no"), "PatchConfig.vae: expected True or False"),
    (dict(fused_block=1), "PatchConfig.fused_block"),
    (dict(fused_qk_norm_rope=None), "PatchConfig.fused_qk_norm_rope"),
    (dict(fp8_fast_accum="yes"), "PatchConfig.fp8_fast_accum"),
    (dict(vae_output_device="bogus"), "PatchConfig.vae_output_device: expected None or a device"),
])
def test_config_validation(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        vkern.PatchConfig(**bad)


def test_fused_block_none_is_each_familys_default():
    config = vkern.PatchConfig()
    assert config.fused_block is None and config.fused_blocks() and not config.fused_blocks(family_default=False)
    for value in (True, False):
        assert vkern.PatchConfig(fused_block=value).fused_blocks(family_default=not value) is value
    vkern.PatchConfig(attention_chunk_size=64)  # chunked attention runs in the fused Wan block: on by default
    with pytest.raises(ValueError, match="attention_chunk_size"):
        vkern.PatchConfig(attention_chunk_size=64, fused_block=False)


def test_config_changed_after_construction_is_checked_by_patch(transformer):
    config = vkern.PatchConfig(ffn_chunk_size=4096)
    config.ffn_chunk_size = 0
    with pytest.raises(ValueError, match="PatchConfig.ffn_chunk_size"):
        vkern.patch(transformer, config)
    assert patched_handle(transformer) is None
    assert vkern.PatchConfig(vae_output_device="cpu").vae_output_device == "cpu"


def test_config_type_is_checked(transformer):
    with pytest.raises(TypeError, match="config: expected a vkern.PatchConfig"):
        vkern.patch(transformer, {"attention": "sdpa"})


def test_patched_pipeline_on_device_within_bf16_tolerance(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = models.build_wan_pipeline("tiny", dtype=dtype, device=device)
    inputs = models.transformer_inputs(pipe.transformer, "tiny", dtype, device)
    before = forward(pipe.transformer, inputs)
    with vkern.patch(pipe):
        after = forward(pipe.transformer, inputs)
    rel = ((after.float() - before.float()).norm() / before.float().norm()).item()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 1e-5), rel


def test_patch_refuses_hooks_it_would_bypass_and_leaves_the_model_as_it_was(transformer, inputs):
    """diffusers' hooks (here FirstBlockCache) wrap a module's forward on the instance; patching over them would drop
    them silently. patch() says so and undoes its partial work; patched first, the cache wraps vkern's forward, and
    undo() refuses while the cache is on (it would drop the cache), then restores the model bit for bit."""
    from diffusers import FirstBlockCacheConfig

    before = forward(transformer, inputs)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    with pytest.raises(RuntimeError, match="carries hooks that wrap its forward.*Patch first"):
        vkern.patch(transformer)
    assert patched_handle(transformer) is None
    assert all(isinstance(m.processor, WanAttnProcessor) for m in transformer.modules() if hasattr(m, "processor"))
    transformer.disable_cache()
    assert torch.equal(forward(transformer, inputs), before)

    handle = vkern.patch(transformer)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    with transformer.cache_context("cond"):
        torch.testing.assert_close(forward(transformer, inputs), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="changed nothing: .*wrapped after vkern patched it"):
        handle.undo()
    assert handle.active
    transformer.disable_cache()
    handle.undo()
    assert torch.equal(forward(transformer, inputs), before)


def test_fp8_patch_refuses_layerwise_casting_hooks(transformer):
    transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="Linear carries hooks"):
        vkern.patch(transformer, vkern.PatchConfig(fp8="storage"))
    assert patched_handle(transformer) is None


def test_pipeline_undo_after_a_component_was_undone_on_its_own():
    pipe = models.build_wan_pipeline("tiny", dtype=torch.float32)
    handle = vkern.patch(pipe)
    handle.children[0].undo()
    handle.undo()
    assert not handle.active and all(not child.active for child in handle.children)
    assert patched_handle(pipe) is None and patched_handle(pipe.transformer) is None


@pytest.mark.parametrize("attention", ["auto", "int8pv", "fp8"])
def test_training_through_a_patched_model_runs_diffusers_ops(transformer, inputs, attention):
    """vkern's ops have no backward: with autograd recording, the transformer, its blocks and the attention
    processors run diffusers' ops, so loss.backward() works and the gradients are the unpatched model's."""
    import copy

    transformer.requires_grad_(True)
    patched = copy.deepcopy(transformer)
    vkern.patch(patched, vkern.PatchConfig(attention=attention))
    out, expected = patched(**inputs).sample, transformer(**inputs).sample
    out.square().mean().backward()
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad, expected_grad = patched.blocks[0].attn1.to_q.weight.grad, transformer.blocks[0].attn1.to_q.weight.grad
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_pipeline_with_an_unsupported_model_warns_and_sums_same_class_components():
    """A pipeline's diffusers model that no adapter takes is named in a warning (once per class); two components of
    one class (Wan 2.2's transformer and transformer_2) are both patched and counted in the handle's summary."""
    import types

    from diffusers import ConfigMixin, ModelMixin

    class ToyModel(ModelMixin, ConfigMixin):
        pass

    first, second = (models.build_wan_transformer("tiny", torch.float32) for _ in range(2))
    pipe = types.SimpleNamespace(components={"transformer": first, "transformer_2": second, "extra": ToyModel()})
    with pytest.warns(UserWarning, match="left the pipeline's extra \\(ToyModel\\) unpatched"):
        handle = vkern.patch(pipe)
    per_model = 2 * first.config.num_layers
    assert f"'WanTransformer3DModel: WanAttention processor': {2 * per_model}" in repr(handle)
    handle.undo()
