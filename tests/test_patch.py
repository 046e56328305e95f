"""vkern.patch on Wan models and pipelines: swaps, undo (bit-identical), errors, .to() order."""
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import vkern
from vkern import models
from vkern.modules.causal_conv import CachedCausalConv3d
from vkern.modules.wan_attention import VkernWanAttnProcessor


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
])
def test_config_validation(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        vkern.PatchConfig(**bad)


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
