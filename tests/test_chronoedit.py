"""vkern.patch on ChronoEdit (ChronoEditTransformer3DModel, ChronoEditPipeline): diffusers' copies of WanAttention and
WanTransformerBlock get vkern's processor and fused block forward, its forward Wan's fused one; the RoPE tables are
ChronoEdit's own (a two-frame latent at temporal positions 0 and rope_temporal_skip_len - 1), at 2 latent frames (an
edit) and 3 (temporal reasoning's other table path). The reference backend is diffusers' output bit for bit, the
kernels within 2x of PyTorch's bf16 error; the pipeline patched (transformer and Wan VAE) gives the unpatched
pipeline's frames with and without temporal reasoning; autograd runs diffusers' ops; fp8 meets the README's floors.
Sequence parallelism: tests/test_sp_wan.py (chronoedit-fp32); LoRA: tests/test_lora.py."""
import copy

import PIL.Image
import pytest
import torch

import vkern
from vkern import models
from vkern.modules.wan_attention import VkernWanAttnProcessor

from .patch_checks import assert_autograd_runs_diffusers_ops, fp8_cosine
from .test_model_families import forward, to_dtype
from .tolerance import assert_within_torch_error, rel_l2

RESOLUTIONS = ["tiny", "tiny-reason"]  # 2 latent frames (the table's edit rows) and 3


def build(dtype=torch.float32, device="cpu", **overrides):
    torch.manual_seed(0)
    return models.build_chronoedit_transformer("tiny", dtype, device, **overrides)


@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_backend_is_diffusers_bitwise(dtype, res, monkeypatch):
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    model = build(dtype)
    x = models.chronoedit_transformer_inputs(model, res, dtype, "cpu")
    want = forward(model, x)
    patched = copy.deepcopy(model)
    handle = vkern.patch(patched, vkern.PatchConfig(attention="reference"))
    assert handle.summary["WanAttention processor"] == 4  # 2 blocks x (self, cross with the image keys)
    assert handle.summary["WanTransformerBlock.forward -> fused glue"] == 2
    assert handle.summary["ChronoEditTransformer3DModel.forward -> fused output norm"] == 1
    assert torch.equal(forward(patched, x), want)
    handle.undo()
    assert "forward" not in patched.__dict__ and not any("forward" in b.__dict__ for b in patched.blocks)
    assert torch.equal(forward(patched, x), want)


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_the_patched_model_runs_chronoedits_rope_table(res):
    """fp32 with vkern's defaults (the fused QK-norm + RoPE prologue) within 1e-5 of the unpatched model. At 2 latent
    frames Wan's table (temporal positions 0, 1 instead of ChronoEdit's 0, 7) moves the output by far more, so a patch
    that built Wan's table, or lost the model's, would fail; at 3 frames the two tables are the same."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    model = build()
    x = models.chronoedit_transformer_inputs(model, res, torch.float32, "cpu")
    want = forward(model, x)
    wan_table = copy.deepcopy(model)
    cfg = model.config
    wan_table.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)
    patched = copy.deepcopy(model)
    with vkern.patch(patched):
        got = forward(patched, x)
    assert rel_l2(got, want) < 1e-5
    if res == "tiny":
        assert rel_l2(forward(wan_table, x), want) > 1e-3
    else:
        assert rel_l2(forward(wan_table, x), want) < 1e-6


@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parametrize("fused_block", [True, False])
def test_kernels_within_twice_torch_bf16_error(fused_block, res, device):
    overrides = dict(attention_head_dim=128)  # the CUDA kernels' head dim on a GPU
    model32, model16 = build(torch.float32, device, **overrides), build(torch.bfloat16, device, **overrides)
    x = models.chronoedit_transformer_inputs(model32, res, torch.float32, device)
    oracle, torch_bf16 = forward(model32, x), forward(model16, to_dtype(x, torch.bfloat16))
    with vkern.patch(model16, vkern.PatchConfig(fused_block=fused_block)):
        assert sum(isinstance(getattr(m, "processor", None), VkernWanAttnProcessor) for m in model16.modules()) == 4
        ours = forward(model16, to_dtype(x, torch.bfloat16))
    assert_within_torch_error(ours, oracle, torch_bf16)


def test_autograd_runs_diffusers_ops():
    model = build()
    inputs = models.chronoedit_transformer_inputs(model, "tiny", torch.float32, "cpu")
    assert_autograd_runs_diffusers_ops(model, inputs)


@pytest.mark.parametrize("fp8, floor", [("storage", 0.999), ("compute", 0.995)])
def test_fp8_meets_the_readme_floors(fp8, floor):
    model = build(torch.bfloat16)
    x = models.chronoedit_transformer_inputs(model, "tiny", torch.bfloat16, "cpu")

    def check(model, handle):
        assert any(type(m).__name__ == "Fp8Linear" for m in model.blocks.modules())
        assert type(model.proj_out) is torch.nn.Linear  # diffusers' skip list
    assert fp8_cosine(model, x, fp8, check) >= floor


def _pipeline():
    """A tiny ChronoEditPipeline with no text encoder and a 2-layer CLIP vision tower as wide as the tiny model's
    image_dim (the pipeline takes an image and encodes it itself: it refuses image_embeds beside an image)."""
    from diffusers import ChronoEditPipeline, UniPCMultistepScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(2)
    # (UniPC, as ChronoEdit's scheduler config: temporal reasoning trims its model_outputs)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                            num_hidden_layers=2, image_size=224, patch_size=14)).eval()
    return ChronoEditPipeline(tokenizer=None, text_encoder=None, image_encoder=clip,
                              image_processor=CLIPImageProcessor(), transformer=build(),
                              vae=models.build_wan_vae("tiny", torch.float32),
                              scheduler=scheduler)


@pytest.mark.parametrize("reasoning", [False, True])
def test_pipeline_patched_gives_the_unpatched_frames(reasoning):
    """ChronoEditPipeline, fp32 on the CPU, 2 steps with guidance: vkern.patch takes the transformer and the Wan VAE,
    and the frames are the unpatched pipeline's within 1e-5. With temporal reasoning the first step runs 9 frames (3
    latent frames) and the second the trimmed 2, so both of the table's paths run."""
    pipe = _pipeline()
    x = models.chronoedit_transformer_inputs(pipe.transformer, "tiny", torch.float32, "cpu")
    g = torch.Generator().manual_seed(0)
    image = PIL.Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy())
    kwargs = dict(image=image, prompt_embeds=x["encoder_hidden_states"],
                  negative_prompt_embeds=torch.zeros_like(x["encoder_hidden_states"]), height=32, width=32,
                  num_inference_steps=2,
                  guidance_scale=3.0, output_type="pt", enable_temporal_reasoning=reasoning,
                  num_frames=9 if reasoning else 5, num_temporal_reasoning_steps=1 if reasoning else 0)
    shapes = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: shapes.append(k["hidden_states"].shape[2]),
                                               with_kwargs=True)

    def frames():
        with torch.no_grad():
            return pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames

    want = frames()
    with vkern.patch(pipe) as handle:
        assert handle.children and {type(c.target).__name__ for c in handle.children} == {
            "ChronoEditTransformer3DModel", "AutoencoderKLWan"}
        got = frames()
    assert shapes == ([3, 3, 2, 2] if reasoning else [2] * 4) * 2  # (cond and uncond per step; unpatched, patched)
    assert got.shape == want.shape and rel_l2(got, want) < 1e-5
