"""bench.bench's attention-module rows (gpu_run.sh `families`) run end to end on the CPU at tiny sizes: each setup
builds its module and call, every provider runs it, and vkern's processors give diffusers' output within the
mode's accuracy. A GPU session should not be the first to run this code."""
import types

import pytest
import torch

from bench import bench, shapes
from vkern import models

# Within what a provider's output must agree with the first (diffusers on PyTorch's SDPA choice): 16-bit modes
# differ from it by bf16 rounding only; the 8-bit modes by issue #3's quantization error.
BOUND = {"vkern-auto": 0.02, "vkern-auto-unfused": 0.02, "vkern-bf16": 0.02, "vkern-int8pv": 0.05, "vkern-int8": 0.05, "vkern-fp8": 0.08}


def _cpu_timing(fn, *args, **kwargs):
    fn()
    return 1.0, 1.0, 1.0


# one shape per setup (hunyuan-720p and -33f differ in their size only)
NAMES = sorted({setup: name for name, (setup, _) in sorted(bench.ATTENTION_MODULES.items())}.values())


@pytest.mark.parametrize("name", NAMES)
def test_attention_module_rows(name, monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "time_cuda", _cpu_timing)
    setup, _ = bench.ATTENTION_MODULES[name]
    rows = list(bench._attention_module(name, None, types.SimpleNamespace(warmup=0, repeats=1), setup=(setup, "tiny")))
    by_provider = {row["provider"]: row for row in rows}
    assert list(by_provider)[0] == "diffusers" and by_provider["diffusers"]["rel_l2_vs_first"] == 0
    vkern_rows = [p for p in by_provider if p.startswith("vkern-")]
    assert "vkern-auto" in vkern_rows and "vkern-bf16" in vkern_rows
    assert "vkern-auto-unfused" in vkern_rows  # (every family's prologue is fused)
    for provider in vkern_rows:
        row = by_provider[provider]
        assert "error" not in row, row
        assert row["rel_l2_vs_first"] < BOUND[provider], row
        assert row["tflops"] > 0 and row["tokens"] > 0
    assert by_provider["vkern-bf16"]["rel_l2_vs_first"] > 0  # (vkern's processor ran: its kernel is not SDPA's)
    # SDPA held to a GPU backend has no CPU kernel: an error row, not a crash
    assert all("error" in by_provider[p] for p in ("diffusers-efficient", "diffusers-cudnn"))


@pytest.mark.parametrize("family", ["ltx", "ltx2"])
def test_family_prologue_rows(family, monkeypatch):
    """gpu_run.sh's family-prologue rows at a tiny size on the CPU: both providers run and the kernel's output is
    diffusers' within bf16 rounding."""
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "time_micro", lambda fn, *args: (*_cpu_timing(fn), 1.0, "cpu"))
    import vkern.ops

    calls = []
    kernel = vkern.ops.qk_norm_rope
    monkeypatch.setattr(vkern.ops, "qk_norm_rope", lambda *a, **k: calls.append(k) or kernel(*a, **k))
    rows = list(bench._family_prologue(f"{family}-tiny", None, types.SimpleNamespace(warmup=0, repeats=1),
                                       setup=(family, "tiny")))
    assert [row["provider"] for row in rows] == ["diffusers", "vkern"]
    assert rows[0]["rel_l2_vs_diffusers"] == 0
    # (on the CPU the two agree to the bit: both round once, after the norm and after the fp32 rotation)
    assert rows[1]["rel_l2_vs_diffusers"] < 0.01, rows[1]
    form = "split" if family == "ltx2" else "per_element"  # (each family's released RoPE form)
    assert calls and all(k["rope_tables"] == form for k in calls)  # (the kernel ran, not diffusers' ops)
    assert all(row["gbps"] > 0 for row in rows)


def test_every_step_shape_names_a_step_model():
    """bench --op step: each shape's family has a builder and inputs; SkyReels-V2's diffusion-forcing variant hands
    the model one timestep per latent frame (the per-token temb its fused blocks read in place)."""
    steps = bench._step_models()
    assert all(family in steps for family, _, _ in shapes.STEPS.values())
    build, make_inputs = steps["skyreels-df"]
    model = build("tiny", torch.float32, "cpu")
    x = make_inputs(model, "tiny", torch.float32, "cpu")
    assert x["timestep"].dim() == 2 and x["timestep"].unique().numel() > 1
    with torch.inference_mode():
        assert torch.isfinite(model(**x).sample).all()


@pytest.mark.parametrize("family", ["wan-vace", "framepack", "wan22-ti2v", "cogvideox15", "wan-animate", "chronoedit"])
def test_step_models_run_at_tiny_size(family):
    """The step shapes of Wan VACE, FramePack, Wan 2.2 TI2V (a timestep per token), CogVideoX 1.5 (2x2x2 patches,
    sliced RoPE), Wan 2.2 Animate (pose latents, face video) and ChronoEdit (its two-frame table): the tiny builder and inputs run through diffusers'
    model and the patched one (vkern's defaults: fused glue, vkern's attention), and the two agree within bf16
    rounding."""
    import vkern

    build, make_inputs = bench._step_models()[family]
    model = build("tiny", torch.bfloat16, "cpu")
    x = make_inputs(model, "tiny", torch.bfloat16, "cpu")
    with torch.inference_mode():
        ours_before = model(**x).sample.double()
        with vkern.patch(model) as handle:
            assert any("fused glue" in key for key in handle.summary), handle.summary
            ours = model(**x).sample.double()
    assert (ours - ours_before).norm() / ours_before.norm() < 0.02


def test_cogvideox15_step_inputs_are_what_the_pipeline_passes():
    """CogVideoX 1.5's step inputs against CogVideoXPipeline's own call (one step, tiny model): the latent frames
    padded to a multiple of patch_size_t (9 frames: 3 latent frames, 4 after padding) and the same RoPE tables
    (the "slice" grid; 1.0's resized and cropped one has the same shape but other values)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    build, make_inputs = bench._step_models()["cogvideox15"]
    model = build("tiny", torch.float32, "cpu")
    x = make_inputs(model, "tiny", torch.float32, "cpu")
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=4)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model,
                             scheduler=CogVideoXDDIMScheduler())
    seen = {}
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True)
    frames, height, width = models.COGVIDEOX_RESOLUTIONS["tiny"]
    pipe(prompt_embeds=x["encoder_hidden_states"], num_frames=frames, height=height, width=width,
         num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    assert x["hidden_states"].shape == seen["hidden_states"].shape == (1, 4, 4, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(x["image_rotary_emb"], seen["image_rotary_emb"], strict=True))


def first_call_shapes(pipe, **call):
    """{name: shape} of the tensors pipe(**call) hands its transformer at its first call (a hook stops it there)."""
    seen = {}

    class Stop(Exception):
        pass

    def record(_, args, kwargs):
        seen.update(kwargs)
        raise Stop

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with pytest.raises(Stop):
            pipe(**call)
    finally:
        handle.remove()
    return {name: tuple(v.shape) for name, v in seen.items() if torch.is_tensor(v)}


def test_wan_animate_step_inputs_are_what_the_pipeline_passes():
    """Wan 2.2 Animate 14B's 720p step inputs against WanAnimatePipeline's own call at its default size (1280x720, a
    77-frame segment) with a 77-frame pose and face video, on the meta device (shapes only: the 14B model, the Wan VAE
    and a CLIP ViT-H/14-shaped vision tower cost nothing there); a hook stops the pipeline at the transformer's first
    call. The prompt goes in as embeddings: its 512 tokens are the pipeline's default max_sequence_length."""
    import inspect

    import PIL.Image
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanAnimatePipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    build, make_inputs = bench._step_models()["wan-animate"]
    model = build("14b", torch.bfloat16, "meta")
    x = make_inputs(model, "720p", torch.bfloat16, "meta")
    with torch.device("meta"):  # (the released VAE is diffusers' default, the image encoder laion's ViT-H/14; 2 layers)
        vae = AutoencoderKLWan()
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                                                num_hidden_layers=2, image_size=224, patch_size=14))
    pipe = WanAnimatePipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model, image_encoder=clip,
                              scheduler=UniPCMultistepScheduler(), image_processor=CLIPImageProcessor())
    segment, height, width = models.WAN_ANIMATE_RESOLUTIONS["720p"]
    defaults = inspect.signature(WanAnimatePipeline.__call__).parameters
    names = ("segment_frame_length", "height", "width", "max_sequence_length")
    assert tuple(defaults[name].default for name in names) == (segment, height, width, models.TEXT_TOKENS)
    frame, face = PIL.Image.new("RGB", (width, height)), PIL.Image.new("RGB", (512, 512))
    # (the pipeline's defaults: height, width and segment length not passed)
    passed = first_call_shapes(pipe, image=frame, pose_video=[frame] * segment, face_video=[face] * segment,
                               prompt_embeds=x["encoder_hidden_states"])
    assert passed == {name: tuple(v.shape) for name, v in x.items()}
    assert passed["hidden_states"] == (1, 36, 21, 90, 160)  # (21 x 45 x 80 = 75600 tokens after 2x2 patches)
    assert passed["encoder_hidden_states_image"] == (1, 257, 1280) and passed["face_pixel_values"][2:] == (77, 512, 512)


@pytest.mark.parametrize("reasoning", [False, True])
def test_chronoedit_step_inputs_are_what_the_pipeline_passes(reasoning):
    """ChronoEdit-14B's 720p step inputs (chronoedit14b-720p and -reason) against ChronoEditPipeline's own call at
    the example's 1280x720 with the frame counts of ChronoEdit's own script (5, or 29 with temporal reasoning), on the
    meta device (shapes only: the 14B model, the Wan VAE and a CLIP ViT-H/14-shaped vision tower); a hook stops the
    pipeline at the transformer's first call."""
    import PIL.Image
    from diffusers import AutoencoderKLWan, ChronoEditPipeline, UniPCMultistepScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    build, make_inputs = bench._step_models()["chronoedit"]
    model = build("14b", torch.bfloat16, "meta")
    x = make_inputs(model, "720p-reason" if reasoning else "720p", torch.bfloat16, "meta")
    with torch.device("meta"):
        vae = AutoencoderKLWan()
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                                                num_hidden_layers=2, image_size=224, patch_size=14))
    pipe = ChronoEditPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=model, image_encoder=clip,
                              scheduler=UniPCMultistepScheduler(), image_processor=CLIPImageProcessor())
    passed = first_call_shapes(pipe, image=PIL.Image.new("RGB", (1280, 720)), prompt_embeds=x["encoder_hidden_states"],
                               height=720, width=1280, num_frames=29 if reasoning else 5,
                               enable_temporal_reasoning=reasoning, num_temporal_reasoning_steps=10 if reasoning else 0,
                               guidance_scale=1.0)
    assert passed == {name: tuple(v.shape) for name, v in x.items()}
    # (2 x 45 x 80 = 7200 tokens after 2x2 patches; 8 x 45 x 80 = 28800 with temporal reasoning)
    assert passed["hidden_states"] == (1, 36, 8 if reasoning else 2, 90, 160)
    assert passed["encoder_hidden_states_image"] == (1, 257, 1280)


def test_cross_bf16_providers_keep_the_cross_attention_linears_in_bf16():
    """-cross-bf16 (with -fp8-compute or -fp8-storage): every block Linear but attn2's goes to fp8, attn2 keeps vkern's
    processor; without an fp8 mode the provider is refused."""
    import vkern
    from vkern.modules.fp8_linear import Fp8Linear
    from vkern.modules.wan_attention import VkernWanAttnProcessor

    config, _ = bench.vkern_config("vkern-fp8-storage-cross-bf16-attn-int8pv")
    assert (config.fp8, config.attention) == ("storage", "int8pv")
    model = models.build_chronoedit_transformer("tiny", torch.bfloat16)
    vkern.patch(model, config)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    kept = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith("blocks.")}
    assert fp8 and all(n.startswith("blocks.") and ".attn2." not in n for n in fp8)
    assert kept and all(".attn2." in n for n in kept)
    assert all(isinstance(b.attn2.processor, VkernWanAttnProcessor) for b in model.blocks)
    with pytest.raises(SystemExit, match="needs -fp8-storage or -fp8-compute"):
        bench.vkern_config("vkern-cross-bf16")
