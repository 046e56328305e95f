"""vkern.patch on Wan VACE (diffusers WanVACETransformer3DModel, WanVACEPipeline): the main blocks and the VACE
blocks run vkern's fused glue and attention, the model's forward makes each hint where it is used (two VACE-sized
tensors live, not one per VACE layer) with the output norm fused; diffusers' output bit for
bit on the reference backend, within 2x PyTorch's bf16 error on the kernels, diffusers' forward under autograd,
sequence parallelism without a process group failing cleanly (sp itself: tests/test_sp_wan.py), undo restores
diffusers' model."""
import copy
import importlib
import warnings

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import vkern
from vkern import models
from vkern.distributed import SPConfig
from vkern.modules.wan_attention import VkernWanAttnProcessor
from vkern.patch import patched_handle

from .patch_checks import fp8_cosine
from .tolerance import assert_within_torch_error

MAIN, VACE = "WanTransformerBlock.forward -> fused glue", "WanVACETransformerBlock.forward -> fused glue"
MODEL = "WanVACETransformer3DModel.forward -> hints where used, fused output norm"
PROCESSOR, CHUNKED_FFN = "WanAttention processor", "FeedForward -> ChunkedFeedForward"


def tiny(dtype, device="cpu"):
    model = models.build_wan_vace_transformer("tiny", dtype, device)
    return model, models.wan_vace_transformer_inputs(model, "tiny", dtype, device)


def forward(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs).sample


def blocks(model):
    return [*model.blocks, *model.vace_blocks]


def overridden(model):
    """The blocks (main, then VACE) whose forward is an instance attribute, and whether the model's is."""
    return [("forward" in b.__dict__) for b in blocks(model)], "forward" in model.__dict__


def processors(model):
    return [type(m.processor) for m in model.modules() if hasattr(m, "processor")]


def test_vace_is_not_a_wan_transformer_subclass():
    # The adapter tells the two apart by isinstance: neither class (model or block) may match the other's check.
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock
    from diffusers.models.transformers.transformer_wan_vace import WanVACETransformer3DModel, WanVACETransformerBlock

    assert not issubclass(WanVACETransformer3DModel, WanTransformer3DModel)
    assert not issubclass(WanVACETransformerBlock, WanTransformerBlock)
    assert "WanVACETransformer3DModel" in importlib.import_module("vkern.patch").supported_models()["wan"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaled", [False, True], ids=["scale=None", "scale=given"])
def test_reference_backend_is_diffusers_bitwise(monkeypatch, dtype, scaled):
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    model, inputs = tiny(dtype)
    if scaled:  # one scale per VACE layer
        inputs["control_hidden_states_scale"] = torch.tensor([0.5, 2.0], dtype=dtype)
    patched = copy.deepcopy(model)
    handle = vkern.patch(patched, vkern.PatchConfig(attention="reference"))
    layers, vace_layers = len(model.blocks), len(model.vace_blocks)
    assert dict(handle.summary) == {MAIN: layers, VACE: vace_layers, MODEL: 1, PROCESSOR: 2 * (layers + vace_layers)}
    assert overridden(patched) == ([True] * (layers + vace_layers), True)
    want = forward(model, inputs)
    assert torch.equal(forward(patched, inputs), want)
    with torch.no_grad():
        assert torch.equal(patched(**inputs, return_dict=False)[0], want)
    handle.undo()
    assert overridden(patched) == ([False] * (layers + vace_layers), False)
    assert set(processors(patched)) == {WanAttnProcessor}
    assert torch.equal(forward(patched, inputs), want)


def vace_block_inputs(model, inputs):
    """(hidden_states, encoder_hidden_states, control_hidden_states, temb, rotary_emb) as the model hands them to
    its VACE blocks: [B, S, D] tokens, [B, text, D] text, [B, 6, D] temb."""
    rotary_emb = model.rope(inputs["hidden_states"])  # (cos, sin), each [1, S, 1, head dim]
    B, S, D = len(inputs["hidden_states"]), rotary_emb[0].shape[1], model.scale_shift_table.shape[-1]

    def randn(*shape):
        return torch.randn(*shape).to(inputs["hidden_states"].dtype)
    return randn(B, S, D), randn(B, 16, D), randn(B, S, D), randn(B, 6, D), rotary_emb


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunked"])
def test_vace_blocks_equal_diffusers_and_leave_their_inputs(monkeypatch, chunk):
    # Block 0 has proj_in (control = proj_in(control) + hidden_states) and writes its residuals into that sum;
    # block 1 has none: the caller's control tensor must come back untouched from both.
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    model, inputs = tiny(torch.float32)
    patched = copy.deepcopy(model)
    vkern.patch(patched, vkern.PatchConfig(attention="reference", ffn_chunk_size=chunk, attention_chunk_size=chunk))
    args = vace_block_inputs(model, inputs)
    kept = [a.clone() for a in args[:4]]
    assert patched.vace_blocks[0].proj_in is not None and patched.vace_blocks[1].proj_in is None  # both kinds
    with torch.no_grad():
        for ours, theirs in zip(patched.vace_blocks, model.vace_blocks):
            got, want = ours(*args), theirs(*args)
            assert all(torch.equal(a, k) for a, k in zip(args[:4], kept))
            if chunk is None:  # bit for bit (chunked: GEMMs over token chunks, fp32 rounding apart)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, summary", [
    (dict(fused_block=False), {PROCESSOR: 8}),
    (dict(fused_block=False, ffn_chunk_size=5), {PROCESSOR: 8, CHUNKED_FFN: 4}),
    (dict(ffn_chunk_size=5, attention_chunk_size=5), {PROCESSOR: 8, MAIN: 2, VACE: 2, MODEL: 1}),
], ids=["processors", "processors+chunked-ffn", "fused+chunked"])
def test_config_paths_match_diffusers(monkeypatch, config, summary):
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    model, inputs = tiny(torch.float32)
    patched = copy.deepcopy(model)
    with vkern.patch(patched, vkern.PatchConfig(attention="reference", **config)) as handle:
        assert dict(handle.summary) == summary
        fused = config.get("fused_block", True)
        assert overridden(patched) == ([fused] * len(blocks(model)), fused)
        got = forward(patched, inputs)
    # fp32 rounding only (token-chunked GEMMs); the bitwise check of the default path is above.
    torch.testing.assert_close(got, forward(model, inputs), rtol=1e-5, atol=1e-5)


def test_filter_fn_leaves_a_vace_block_to_diffusers(monkeypatch):
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    model, inputs = tiny(torch.float32)
    patched = copy.deepcopy(model)
    handle = vkern.patch(patched, vkern.PatchConfig(attention="reference",
                                                    filter_fn=lambda m, fqn: not fqn.startswith("vace_blocks.0")))
    assert dict(handle.summary) == {MAIN: 2, VACE: 1, MODEL: 1, PROCESSOR: 6}
    assert overridden(patched) == ([True, True, False, True], True)
    assert isinstance(patched.vace_blocks[0].attn1.processor, WanAttnProcessor)
    assert torch.equal(forward(patched, inputs), forward(model, inputs))


def test_default_config_within_twice_torch_bf16_error(device):
    model32, inputs = tiny(torch.float32, device)
    model16 = models.build_wan_vace_transformer("tiny", torch.bfloat16, device)
    model16.load_state_dict(model32.state_dict())
    inputs16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inputs.items()}
    oracle, torch_bf16 = forward(model32, inputs), forward(model16, inputs16)
    with vkern.patch(model16) as handle:
        assert handle.summary[VACE] == len(model16.vace_blocks)
        assert isinstance(model16.vace_blocks[0].attn1.processor, VkernWanAttnProcessor)
        ours = forward(model16, inputs16)
    assert_within_torch_error(ours, oracle.double(), torch_bf16)


def test_hints_are_made_where_they_are_used():
    """diffusers keeps every VACE layer's hint through the main blocks; the patched forward makes hint j just before
    the main block that takes it: no hint is alive when a main block starts (counted through weak references to
    the VACE blocks' proj_out outputs, the hints)."""
    import weakref

    def alive_at_main_blocks(m):
        hints, alive = [], []
        for block in m.vace_blocks:
            block.proj_out.register_forward_hook(lambda mod, args, out: hints.append(weakref.ref(out)))
        for block in m.blocks:
            block.register_forward_pre_hook(lambda mod, args: alive.append(sum(h() is not None for h in hints)))
        return alive, forward(m, inputs)

    model, inputs = tiny(torch.float32)
    patched = copy.deepcopy(model)
    vkern.patch(patched)
    (theirs, want), (ours, got) = alive_at_main_blocks(model), alive_at_main_blocks(patched)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert max(theirs) == len(model.vace_blocks) >= 2  # (the check can fail)
    assert len(ours) == len(model.blocks) and max(ours) == 0


@pytest.mark.parametrize("trained", ["model", "text"])
def test_autograd_runs_diffusers_forward(monkeypatch, trained):
    """vkern's ops have no backward: with autograd recording (model: the parameters and the control latents require
    grad; text: only the prompt embeddings do, as in prompt tuning) the VACE blocks run diffusers' own forward, the
    main blocks and the processors diffusers' ops, so the output and the gradients are the unpatched model's."""
    from diffusers.models.transformers.transformer_wan_vace import WanVACETransformerBlock

    model, inputs = tiny(torch.float32)
    model.requires_grad_(trained == "model")
    patched = copy.deepcopy(model)
    vkern.patch(patched)
    ran = []
    diffusers_forward = WanVACETransformerBlock.forward
    monkeypatch.setattr(WanVACETransformerBlock, "forward", lambda *args: ran.append(1) or diffusers_forward(*args))
    results = []
    for m in (patched, model):
        leaf = "control_hidden_states" if trained == "model" else "encoder_hidden_states"
        x = inputs[leaf].clone().requires_grad_(True)
        out = m(**{**inputs, leaf: x}).sample
        out.square().mean().backward()
        weights = [m.vace_blocks[0].proj_in.weight.grad, m.blocks[0].ffn.net[0].proj.weight.grad]
        results.append([out, x.grad, *(weights if trained == "model" else [])])
        if m is patched:
            assert len(ran) == len(patched.vace_blocks)
    for ours, want in zip(*results):
        assert ours is not None
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)


def test_sequence_parallel_without_a_process_group_fails_and_leaves_the_model_unpatched():
    """sp is taken for VACE (run on gloo ranks in tests/test_sp_wan.py); without torchrun's group it says so."""
    model, inputs = tiny(torch.float32)
    want = forward(model, inputs)
    with pytest.raises(RuntimeError, match="init_from_env"):
        vkern.patch(model, vkern.PatchConfig(sp=SPConfig()))
    assert patched_handle(model) is None
    assert overridden(model) == ([False] * len(blocks(model)), False)
    assert set(processors(model)) == {WanAttnProcessor}
    assert torch.equal(forward(model, inputs), want)
    vkern.patch(model).undo()  # patchable after the refusal


def test_vace_pipeline_patches_transformer_and_vae(monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline

    monkeypatch.setenv("VKERN_BACKEND", "reference")
    # A fresh record of warned classes: a warning said earlier in this process must not hide one here.
    monkeypatch.setattr(importlib.import_module("vkern.patch"), "_warned_unpatched", set())
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=models.build_wan_vae("tiny", torch.float32),
                           transformer=models.build_wan_vace_transformer("tiny", torch.float32))
    pipe.set_progress_bar_config(disable=True)
    prompt = torch.randn(1, 16, pipe.transformer.config.text_dim)

    def video():  # a control video of zeros, the pipeline's default; the tiny VAE encodes and decodes it
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=prompt, height=32, width=32, num_frames=9,
                    num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).frames

    want = video()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = vkern.patch(pipe, vkern.PatchConfig(attention="reference"))
    assert not [w for w in caught if "unpatched" in str(w.message)]
    assert sorted(type(c.target).__name__ for c in handle.children) == ["AutoencoderKLWan", "WanVACETransformer3DModel"]
    assert "'WanVACETransformer3DModel: WanVACETransformerBlock.forward -> fused glue': 2" in repr(handle)
    assert "CachedCausalConv3d" in repr(handle)
    assert torch.equal(video(), want)
    handle.undo()
    assert patched_handle(pipe.transformer) is None and patched_handle(pipe.vae) is None


@pytest.mark.parametrize("fp8, floor", [("storage", 0.999), ("compute", 0.995)])
def test_fp8_meets_the_readme_floors(fp8, floor):
    model, inputs = tiny(torch.bfloat16)

    def check(model, handle):
        assert any(type(m).__name__ == "Fp8Linear" for m in model.vace_blocks.modules())
    assert fp8_cosine(model, inputs, fp8, check) >= floor
