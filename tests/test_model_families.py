"""vkern.patch on the model families beyond Wan (HunyuanVideo and its FramePack form, HunyuanVideo 1.5, CogVideoX,
LTX-Video, LTX-2, Mochi, SkyReels-V2), the checks every adapter must
pass: the reference mode is diffusers' forward bit for bit, the kernels are within 2x of PyTorch's own bf16 error, the
padded prompt cannot change the output, autograd runs diffusers' attention, fp8 layerwise casting meets README's
floors, a pipeline patch patches the transformer and says what it left, and the errors of a wrong config. Each
family's own checks (masks, fused projections, 8-bit accuracy on its attention) are in test_<family>.py."""
import copy
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import vkern
from vkern import models
from vkern.modules.cogvideox_attention import VkernCogVideoXAttnProcessor
from vkern.modules.hunyuan15_attention import VkernHunyuanVideo15AttnProcessor
from vkern.modules.hunyuan_attention import VkernHunyuanVideoAttnProcessor
from vkern.modules.ltx2_attention import VkernLTX2AttnProcessor
from vkern.modules.ltx_attention import VkernLTXVideoAttnProcessor
from vkern.modules.mochi_attention import VkernMochiAttnProcessor
from vkern.modules.skyreels_attention import VkernSkyReelsV2AttnProcessor

from .patch_checks import assert_autograd_runs_diffusers_ops, fp8_cosine
from .tolerance import assert_within_torch_error, rel_l2


@dataclass
class Family:
    build: Callable
    inputs: Callable
    processor: type
    summary: str
    processors: int  # how many the tiny model has
    vae: str  # the pipeline's VAE class, left unpatched (None: the pipeline's VAE is Wan's, patched)
    gpu_overrides: dict = field(default_factory=dict)  # head dim 128 or 64: the CUDA kernels' paths on a GPU


def _hunyuan_pipeline(transformer):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    vae = AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None)


def _framepack_pipeline(transformer):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline

    vae = AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
    return HunyuanVideoFramepackPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                         scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None,
                                         tokenizer_2=None, image_encoder=None, feature_extractor=None)


def _hunyuan15_pipeline(transformer):
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline

    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1)
    return HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None,
                                  guider=None)


def _cogvideox_pipeline(transformer):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=4)
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


def _ltx_pipeline(transformer):
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline

    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_block_out_channels=(8, 8, 8, 8), decoder_layers_per_block=(1, 1, 1, 1, 1))
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=transformer)


def _ltx2_pipeline(transformer):
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler, LTX2Pipeline

    vae = AutoencoderKLLTX2Video(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                 decoder_block_out_channels=(8, 8, 8),
                                 layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1))
    return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=AutoencoderKLLTX2Audio(),
                        text_encoder=None, tokenizer=None, connectors=None, transformer=transformer, vocoder=None)


def _mochi_pipeline(transformer):
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    vae = AutoencoderKLMochi(latent_channels=4, encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                             layers_per_block=(1, 1, 1, 1, 1))
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                         transformer=transformer)


FAMILIES = {
    "hunyuan": Family(models.build_hunyuan_transformer, models.hunyuan_transformer_inputs,
                      VkernHunyuanVideoAttnProcessor, "HunyuanVideo attention processor", 4, "AutoencoderKLHunyuanVideo",
                      dict(attention_head_dim=128, rope_axes_dim=(16, 56, 56))),
    "framepack": Family(models.build_framepack_transformer, models.framepack_transformer_inputs,
                        VkernHunyuanVideoAttnProcessor, "HunyuanVideo attention processor", 4,
                        "AutoencoderKLHunyuanVideo", dict(attention_head_dim=128, rope_axes_dim=(16, 56, 56))),
    "hunyuan15": Family(models.build_hunyuan15_transformer, models.hunyuan15_transformer_inputs,
                        VkernHunyuanVideo15AttnProcessor, "HunyuanVideo 1.5 attention processor", 2,
                        "AutoencoderKLHunyuanVideo15", dict(attention_head_dim=128, rope_axes_dim=(16, 56, 56))),
    "cogvideox": Family(models.build_cogvideox_transformer, models.cogvideox_transformer_inputs,
                        VkernCogVideoXAttnProcessor, "CogVideoX attention processor", 2, "AutoencoderKLCogVideoX"),
    "ltx": Family(models.build_ltx_transformer, models.ltx_transformer_inputs, VkernLTXVideoAttnProcessor,
                  "LTX-Video attention processor", 4, "AutoencoderKLLTXVideo"),
    "ltx2": Family(models.build_ltx2_transformer, models.ltx2_transformer_inputs, VkernLTX2AttnProcessor,
                   "LTX-2 attention processor", 12, "AutoencoderKLLTX2Video",
                   dict(attention_head_dim=128, audio_attention_head_dim=64)),
    "mochi": Family(models.build_mochi_transformer, models.mochi_transformer_inputs, VkernMochiAttnProcessor,
                    "Mochi attention processor", 2, "AutoencoderKLMochi", dict(attention_head_dim=128)),
    "skyreels": Family(models.build_skyreels_transformer, models.skyreels_transformer_inputs,
                       VkernSkyReelsV2AttnProcessor,
                       "SkyReels-V2 attention processor", 4, None, dict(attention_head_dim=128)),
}
def _skyreels_pipeline(transformer):
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    return SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, transformer=transformer,
                              vae=models.build_wan_vae("tiny", torch.float32), scheduler=UniPCMultistepScheduler())


PIPELINES = {"hunyuan": _hunyuan_pipeline, "framepack": _framepack_pipeline, "hunyuan15": _hunyuan15_pipeline,
             "cogvideox": _cogvideox_pipeline, "ltx": _ltx_pipeline,
             "ltx2": _ltx2_pipeline, "mochi": _mochi_pipeline, "skyreels": _skyreels_pipeline}
ADAPTER_OF = {"framepack": "hunyuan"}  # the test families another family's adapter takes
# (family, what differs from its tiny model): the processor forms each adapter takes
VARIANTS = {"hunyuan": ("hunyuan", {}), "hunyuan-token_replace": ("hunyuan", dict(image_condition_type="token_replace")),
            "framepack": ("framepack", {}), "hunyuan15": ("hunyuan15", {}),
            "cogvideox": ("cogvideox", {}), "cogvideox-fused_qkv": ("cogvideox", "fuse_qkv_projections"),
            "ltx": ("ltx", {}), "ltx2": ("ltx2", {}), "mochi": ("mochi", {}), "skyreels": ("skyreels", {})}


def build(name, dtype=torch.float32, device="cpu", **overrides):
    torch.manual_seed(0)  # the same weights for every dtype
    return FAMILIES[name].build("tiny", dtype, device, **overrides)


def inputs_for(name, model, dtype=torch.float32, device="cpu"):
    return FAMILIES[name].inputs(model, "tiny", dtype, device)


def to_dtype(inputs, dtype):
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def forward(model, inputs):
    with torch.inference_mode():
        return model(**inputs).sample


def vkern_processors(model):
    return [m.processor for m in model.modules() if type(getattr(m, "processor", None)).__name__.startswith("Vkern")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_mode_is_diffusers_bitwise(variant, dtype, monkeypatch):
    monkeypatch.setenv("VKERN_BACKEND", "reference")  # every op's reference (LTX-Video's fused block glue too)
    name, change = VARIANTS[variant]
    model = build(name, dtype, **(change if isinstance(change, dict) else {}))
    if isinstance(change, str):
        getattr(model, change)()
    inputs = inputs_for(name, model, dtype)
    want = forward(model, inputs)
    patched = copy.deepcopy(model)
    handle = vkern.patch(patched, vkern.PatchConfig(attention="reference"))
    assert handle.summary[FAMILIES[name].summary] == FAMILIES[name].processors == len(vkern_processors(patched))
    assert torch.equal(forward(patched, inputs), want)
    handle.undo()
    assert not vkern_processors(patched)
    assert torch.equal(forward(patched, inputs), want)


@pytest.mark.parametrize("mode", ["auto", "bf16", "sdpa"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_patched_within_twice_torch_bf16_error(name, mode, device):
    overrides = FAMILIES[name].gpu_overrides
    model32, model16 = build(name, torch.float32, device, **overrides), build(name, torch.bfloat16, device, **overrides)
    inputs = inputs_for(name, model32, torch.float32, device)
    inputs16 = to_dtype(inputs, torch.bfloat16)
    oracle, torch_bf16 = forward(model32, inputs), forward(model16, inputs16)
    with vkern.patch(model16, vkern.PatchConfig(attention=mode)):
        ours = forward(model16, inputs16)
    assert_within_torch_error(ours, oracle, torch_bf16)


@pytest.mark.parametrize("mode", ["reference", "auto", "bf16", "int8pv"])
# the families whose prompt comes padded, with a mask
@pytest.mark.parametrize("name", ["hunyuan", "ltx", "ltx2", "mochi"])
def test_padded_prompt_cannot_change_the_output(name, mode, device):
    model = build(name, torch.bfloat16, device, **FAMILIES[name].gpu_overrides)
    inputs = inputs_for(name, model, torch.bfloat16, device)
    real = int(inputs["encoder_attention_mask"][0].sum())
    other = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    other["encoder_hidden_states"][:, real:] = torch.randn_like(other["encoder_hidden_states"][:, real:]) * 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (LTX's additive mask in the 8-bit modes: 16-bit cross-attention, said once)
        with vkern.patch(model, vkern.PatchConfig(attention=mode)):
            padded = forward(model, inputs)
            assert torch.equal(padded, forward(model, other))
            unmasked = dict(other, encoder_attention_mask=torch.ones_like(inputs["encoder_attention_mask"]))
            assert rel_l2(forward(model, unmasked), padded) > 1e-3  # (the check can fail)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_autograd_runs_diffusers_attention(name):
    """Every float input requires grad (LTX-2's audio stream too: a call whose inputs do not may run vkern's kernels,
    with no gradient to lose, and its rounding would show in the video output)."""
    model = build(name)
    assert_autograd_runs_diffusers_ops(model, inputs_for(name, model))


@pytest.mark.parametrize("fp8, floor", [("storage", 0.999), ("compute", 0.995)])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fp8_quantizes_the_linears_outside_the_skip_list(name, fp8, floor):
    from vkern.patch.fp8 import default_skip_patterns

    model = build(name, torch.bfloat16)
    skip = default_skip_patterns(model)

    def check(model, handle):
        fp8_layers = [n for n, m in model.named_modules() if type(m).__name__ == "Fp8Linear"]
        assert fp8_layers and handle.summary[FAMILIES[name].summary] == FAMILIES[name].processors
        assert not any(re.search(p, n) for n in fp8_layers for p in skip)
    # the floors README states for Wan's model output (storage / compute)
    assert fp8_cosine(model, inputs_for(name, model, torch.bfloat16), fp8, check) >= floor


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pipeline_patches_the_transformer_and_warns_about_the_vae(name, monkeypatch):
    # (the warning is said once per class, and HunyuanVideo's VAE is FramePack's too)
    monkeypatch.setattr(sys.modules["vkern.patch"], "_warned_unpatched", set())
    pipe = PIPELINES[name](build(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = vkern.patch(pipe)
    vae = FAMILIES[name].vae
    if vae is None:  # Wan's VAE: patched by the Wan adapter, nothing left unpatched
        assert not any("unpatched" in str(w.message) for w in caught)
        assert len(handle.children) == 2 and "WanCausalConv3d -> CachedCausalConv3d" in repr(handle)
    else:
        assert any(vae in str(w.message) and "unpatched" in str(w.message) for w in caught)
        assert len(handle.children) == 1
    assert FAMILIES[name].summary in repr(handle)
    assert len(vkern_processors(pipe.transformer)) == FAMILIES[name].processors
    handle.undo()
    assert not vkern_processors(pipe.transformer)


@pytest.mark.parametrize("option", ["ffn_chunk_size", "attention_chunk_size"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_wan_only_options_are_errors(name, option):
    model = build(name)
    with pytest.raises(ValueError, match=f"PatchConfig.{option}: not available for {type(model).__name__}"):
        vkern.patch(model, vkern.PatchConfig(**{option: 4096}))
    assert not vkern_processors(model) and not hasattr(model, "_vkern_patch_handle")


@pytest.mark.parametrize("name", [*FAMILIES, "wan"])
def test_diffusers_context_parallel_is_refused(name):
    model = models.build_wan_transformer("tiny", torch.float32) if name == "wan" else build(name)
    model._parallel_config = object()  # what enable_parallelism() leaves on the model
    with pytest.raises(ValueError, match="enable_parallelism"):
        vkern.patch(model)
    assert not vkern_processors(model) and not hasattr(model, "_vkern_patch_handle")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_double_patch_is_a_clear_error(name):
    model = build(name)
    vkern.patch(model)
    with pytest.raises(RuntimeError, match=f"{type(model).__name__} is already patched by vkern"):
        vkern.patch(model)


@pytest.mark.parametrize("name", [*FAMILIES, "wan"])
def test_a_diffusers_attention_backend_is_named_when_replaced(name):
    """model.set_attention_backend() before the patch: vkern's processors replace that choice, and say so once
    (CogVideoX's and Mochi's processors call SDPA directly: diffusers sets no backend on them, none to name)."""
    model = models.build_wan_transformer("tiny", torch.float32) if name == "wan" else build(name)
    model.set_attention_backend("native")
    has_backend = any(getattr(m.processor, "_attention_backend", None) is not None for m in model.modules()
                      if hasattr(m, "processor"))
    assert has_backend == (name not in ("cogvideox", "mochi"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = vkern.patch(model)
    said = [str(w.message) for w in caught if "had diffusers' attention backend 'native'" in str(w.message)]
    assert len(said) == has_backend
    handle.undo()
    assert all(getattr(m.processor, "_attention_backend", None) is not None for m in model.modules()
               if type(getattr(m, "processor", None)).__name__ in ("WanAttnProcessor", "HunyuanVideoAttnProcessor2_0",
                                                                   "LTXVideoAttnProcessor", "SkyReelsV2AttnProcessor",
                                                                   "LTX2AudioVideoAttnProcessor"))


# q/k prologue passes per tiny-model forward with fused_qk_norm_rope on (off: none): HunyuanVideo 2 dual-stream blocks
# x 2 + 2 single-stream x 4 (the video part with RoPE, the appended text without); 1.5: 2 x 2; Mochi: 2 x 2 (the
# video's q and k); LTX-Video: 2 blocks x 2 attentions x 2; LTX-2: 2 blocks x 6 attentions x 2; SkyReels-V2 (Wan's
# processor): 2 blocks x 2 attentions x 2; CogVideoX: 2 blocks x 2 (the text, the video with RoPE) x 2
PROLOGUE_PASSES = {"hunyuan": 12, "framepack": 12, "hunyuan15": 4, "mochi": 4, "ltx": 8, "ltx2": 24, "skyreels": 8,
                   "cogvideox": 8}


@pytest.mark.parametrize("name", list(PROLOGUE_PASSES))
def test_fused_qk_norm_rope_is_one_pass_per_q_and_k(name, monkeypatch):
    """fused_qk_norm_rope (default): each q and k norm (+ RoPE) is one vkern.ops.qk_norm_rope pass; off: diffusers'
    ops. Both within float32 rounding of each other."""
    from vkern import ops

    passes = []
    original = ops.qk_norm_rope
    monkeypatch.setattr(ops, "qk_norm_rope", lambda *a, **k: passes.append(1) or original(*a, **k))
    model = build(name)
    inputs = inputs_for(name, model)
    outs = []
    for fused in (True, False):
        passes.clear()
        with vkern.patch(model, vkern.PatchConfig(fused_qk_norm_rope=fused)):
            outs.append(forward(model, inputs))
        assert len(passes) == (PROLOGUE_PASSES[name] if fused else 0)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def _prologue_cases():
    """(the fused prologue, diffusers' prologue, its arguments) where the kernel computes something else: no norm, a
    norm without weight or eps, tables of another shape, LTX-2's split RoPE at a head dim not a power of two."""
    from diffusers.models.normalization import MochiRMSNorm

    from vkern.modules import cogvideox_attention, ltx2_attention, ltx_attention, mochi_attention
    from vkern.reference import cogvideox_attention as cogvideox_ref
    from vkern.reference import ltx2_attention as ltx2_ref
    from vkern.reference import ltx_attention as ltx_ref
    from vkern.reference import mochi_attention as mochi_ref

    S, H, D = 12, 2, 32
    x = torch.randn(1, S, H * D)
    angles = torch.rand(S, H, D // 2)
    mochi_rope = (angles.cos(), angles.sin())
    whole = torch.rand(1, S, H * D)
    ltx_rope = (whole.cos(), whole.sin())
    split = torch.rand(1, H, S, D // 2)
    split24 = torch.rand(1, H, S, 12)  # (head dim 24)
    mochi = (mochi_attention.fused_norm_rope, mochi_ref.norm_rope)
    ltx = (ltx_attention.fused_norm_rope, ltx_ref.norm_rope)
    ltx2 = (ltx2_attention.fused_ltx2_norm_rope, ltx2_ref.norm_rope)
    cog = (cogvideox_attention.fused_norm_rope, cogvideox_ref.norm_rope)
    cog_angles = torch.rand(S - 4, D)
    cog_rope = (cog_angles.cos(), cog_angles.sin())
    return {"cogvideox-no-norm": (*cog, (x, None, H, cog_rope, 4)),
            "cogvideox-no-bias": (*cog, (x, torch.nn.LayerNorm(D, 1e-6, bias=False), H, cog_rope, 4)),
            "cogvideox-rms-norm": (*cog, (x, torch.nn.RMSNorm(D, 1e-6), H, cog_rope, 4)),
            "mochi-no-norm": (*mochi, (x, None, H, mochi_rope)),
            "mochi-no-weight": (*mochi, (x, MochiRMSNorm(D, 1e-5, elementwise_affine=False), H, mochi_rope)),
            "mochi-shared-tables": (*mochi, (x, MochiRMSNorm(D, 1e-5), H, tuple(t[:, :1] for t in mochi_rope))),
            "ltx-no-weight": (*ltx, (x, torch.nn.RMSNorm(H * D, 1e-6, elementwise_affine=False), H, ltx_rope)),
            "ltx-no-eps": (*ltx, (x, torch.nn.RMSNorm(H * D), H, ltx_rope)),
            "ltx-2d-tables": (*ltx, (x, torch.nn.RMSNorm(H * D, 1e-6), H, tuple(t[0] for t in ltx_rope))),
            "ltx2-split-no-eps": (*ltx2, (x, torch.nn.RMSNorm(H * D), H, (split.cos(), split.sin()), "split")),
            "ltx2-split-head-dim-24": (*ltx2, (x[..., :H * 24], torch.nn.RMSNorm(H * 24, 1e-6), H,
                                               (split24.cos(), split24.sin()), "split"))}


@pytest.mark.parametrize("case", list(_prologue_cases()))
def test_fused_prologue_leaves_other_forms_to_diffusers(case):
    """What the kernel does not compute runs diffusers' ops (CogVideoX, Mochi, LTX-Video, LTX-2; HunyuanVideo's in
    test_hunyuan.py): the result is theirs exactly."""
    fused, theirs, args = _prologue_cases()[case]
    with torch.no_grad():
        assert torch.equal(fused(*args), theirs(*args))


def test_each_adapter_names_the_models_it_takes():
    from vkern.patch import ADAPTERS, supported_models

    for name in FAMILIES:
        model = build(name)
        family = ADAPTER_OF.get(name, name)
        assert [f for f, a in ADAPTERS.items() if a.supports(model)] == [family]
        assert type(model).__name__ in supported_models()[family]
        assert type(model).__name__ in vkern.info(print_=False)["vkern.patch"]
