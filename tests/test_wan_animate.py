"""vkern.patch on Wan 2.2 Animate (WanAnimateTransformer3DModel): diffusers' copies of WanAttention and
WanTransformerBlock get vkern's processor and fused block forward as Wan's; the reference backend is diffusers' output
bit for bit, the kernels within 2x of PyTorch's bf16 error; autograd runs diffusers' ops; sp without a process group
fails cleanly (sp itself: tests/test_sp_wan.py); fp8 meets the README's floors, and its filter_fn recipe keeps the
face modules in bf16."""
import copy

import pytest
import torch

import vkern
from vkern import models
from vkern.modules.wan_attention import VkernWanAttnProcessor

from .patch_checks import assert_autograd_runs_diffusers_ops, fp8_cosine
from .tolerance import assert_within_torch_error


def build(dtype=torch.float32, device="cpu", **overrides):
    torch.manual_seed(0)
    return models.build_wan_animate_transformer("tiny", dtype, device, **overrides)


def forward(model, x):
    with torch.inference_mode():
        return model(**x).sample


def to16(x):
    return {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_backend_is_diffusers_bitwise(dtype, monkeypatch):
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    model = build(dtype)
    x = models.wan_animate_transformer_inputs(model, "tiny", dtype, "cpu")
    want = forward(model, x)
    patched = copy.deepcopy(model)
    handle = vkern.patch(patched, vkern.PatchConfig(attention="reference"))
    assert handle.summary["WanAttention processor"] == 4  # 2 blocks x (self, cross); the face adapter's stay
    assert handle.summary["WanTransformerBlock.forward -> fused glue"] == 2
    assert "WanTransformer3DModel.forward -> fused output norm" not in handle.summary
    assert torch.equal(forward(patched, x), want)
    handle.undo()
    assert not any("forward" in b.__dict__ for b in patched.blocks)
    assert torch.equal(forward(patched, x), want)


@pytest.mark.parametrize("fused_block", [True, False])
def test_kernels_within_twice_torch_bf16_error(fused_block, device):
    overrides = dict(attention_head_dim=128)  # the CUDA kernels' head dim on a GPU
    model32, model16 = build(torch.float32, device, **overrides), build(torch.bfloat16, device, **overrides)
    x = models.wan_animate_transformer_inputs(model32, "tiny", torch.float32, device)
    oracle, torch_bf16 = forward(model32, x), forward(model16, to16(x))
    with vkern.patch(model16, vkern.PatchConfig(fused_block=fused_block)):
        assert sum(isinstance(getattr(m, "processor", None), VkernWanAttnProcessor) for m in model16.modules()) == 4
        ours = forward(model16, to16(x))
    assert_within_torch_error(ours, oracle, torch_bf16)


def test_autograd_runs_diffusers_ops():
    model = build()
    inputs = models.wan_animate_transformer_inputs(model, "tiny", torch.float32, "cpu")
    assert_autograd_runs_diffusers_ops(model, inputs)


def test_sequence_parallel_without_a_process_group_fails_and_leaves_the_model_as_it_was():
    """sp is taken for Animate (run on gloo ranks in tests/test_sp_wan.py); without torchrun's group it says so."""
    from vkern.distributed import SPConfig

    model = build()
    with pytest.raises(RuntimeError, match="init_from_env"):
        vkern.patch(model, vkern.PatchConfig(sp=SPConfig()))
    assert not any(isinstance(getattr(m, "processor", None), VkernWanAttnProcessor) for m in model.modules())
    assert not hasattr(model, "_vkern_patch_handle")


@pytest.mark.parametrize("fp8, floor", [("storage", 0.999), ("compute", 0.995)])
def test_fp8_meets_the_readme_floors(fp8, floor):
    model = build(torch.bfloat16)
    x = models.wan_animate_transformer_inputs(model, "tiny", torch.bfloat16, "cpu")

    def check(model, handle):
        assert any(type(m).__name__ == "Fp8Linear" for m in model.blocks.modules())
    assert fp8_cosine(model, x, fp8, check) >= floor


def test_filter_fn_keeps_the_face_modules_in_bf16_and_the_default_skip_list():
    """The README's recipe for Animate's fp8 error: filter_fn leaves face_* alone, the blocks' Linears still go to fp8
    and diffusers' skip list still holds (condition_embedder, proj_out stay nn.Linear)."""
    from vkern.modules.fp8_linear import Fp8Linear

    model = build(torch.bfloat16)
    vkern.patch(model, vkern.PatchConfig(fp8="storage", filter_fn=lambda m, fqn: not fqn.startswith("face_")))
    fp8 = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert fp8 and all(n.startswith("blocks.") for n in fp8)
    assert any(n.startswith("face_adapter.") for n in linears) and any(n.startswith("face_encoder.") for n in linears)
    assert "proj_out" in linears and any(n.startswith("condition_embedder.") for n in linears)
