"""The patched WanTransformer3DModel.forward (fused output norm): diffusers' forward bit for bit on the
reference backend (Wan 2.1 and Wan 2.2 per-token timesteps), no fp32 copy of the hidden states on the
kernels, diffusers' own forward under autograd, and undo restores it."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vkern
from vkern import models

INNER = 64  # the tiny config's heads * head dim


def tiny(dtype):
    torch.manual_seed(0)
    model = models.build_wan_transformer("tiny", dtype, "cpu").eval()
    with torch.no_grad():  # a non-trivial output modulation table
        model.scale_shift_table.normal_()
    inputs = models.transformer_inputs(model, "tiny", dtype, "cpu")
    return model, inputs


def per_token(inputs, model):
    """Wan 2.2 TI2V: one timestep per token, [B, S]."""
    frames, h, w = inputs["hidden_states"].shape[2:]
    p_t, p_h, p_w = model.config.patch_size
    tokens = (frames // p_t) * (h // p_h) * (w // p_w)
    return {**inputs, "timestep": torch.randint(0, 1000, (1, tokens))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
def test_reference_backend_is_diffusers_bitwise(monkeypatch, dtype, wan22):
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    model, inputs = tiny(dtype)
    inputs = per_token(inputs, model) if wan22 else inputs
    patched = copy.deepcopy(model)
    handle = vkern.patch(patched, vkern.PatchConfig(attention="reference"))
    assert handle.summary["WanTransformer3DModel.forward -> fused output norm"] == 1
    with torch.no_grad():
        want = model(**inputs).sample
        assert torch.equal(patched(**inputs).sample, want)
        assert torch.equal(patched(**inputs, return_dict=False)[0], want)
    handle.undo()
    assert "forward" not in patched.__dict__


class Fp32Rows(TorchDispatchMode):
    """Counts fp32 tensors shaped like the hidden states [B, rows, INNER]."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.seen = rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 3 \
                    and tuple(t.shape[1:]) == (self.rows, INNER):
                self.seen += 1
        return out


def test_no_fp32_copy_of_the_hidden_states():
    model, inputs = tiny(torch.bfloat16)
    patched = copy.deepcopy(model)
    vkern.patch(patched)
    rows = model.rope(inputs["hidden_states"])[0].shape[1]
    with torch.no_grad():
        diffusers, fused = Fp32Rows(rows), Fp32Rows(rows)
        with diffusers:
            want = model(**inputs).sample
        with fused:
            got = patched(**inputs).sample
    assert diffusers.seen >= 3  # the blocks' and the output norm's fp32 copies
    assert fused.seen == 0
    rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert rel < 2e-2  # bf16 kernels vs bf16 diffusers (the bitwise check is the reference-backend test)


def test_autograd_runs_diffusers_forward():
    model, inputs = tiny(torch.float32)
    model.requires_grad_(True)
    patched = copy.deepcopy(model)
    vkern.patch(patched, vkern.PatchConfig(attention="reference"))
    out = patched(**inputs).sample
    out.sum().backward()  # the fused ops have no backward: diffusers' forward ran
    assert patched.proj_out.weight.grad is not None
    torch.testing.assert_close(out, model(**inputs).sample, rtol=1e-5, atol=1e-5)
