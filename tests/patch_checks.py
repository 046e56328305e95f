"""Checks shared by the per-model patch tests (the families', Wan VACE's, Wan Animate's): autograd runs diffusers'
ops, and fp8 layerwise casting meets README's cosine floors and undoes exactly."""
import torch

import vkern


def assert_autograd_runs_diffusers_ops(model, inputs):
    """Every float input requires grad (a call whose inputs do not may run vkern's kernels, with no gradient to lose,
    and its rounding would show in the output): the patched model (int8pv, the mode furthest from diffusers) gives
    diffusers' output exactly, and the gradient reaches the hidden states."""
    for t in inputs.values():
        if torch.is_tensor(t) and t.is_floating_point():
            t.requires_grad_(True)
    want = model(**inputs).sample
    with vkern.patch(model, vkern.PatchConfig(attention="int8pv")):
        got = model(**inputs).sample
    assert torch.equal(got, want)
    got.sum().backward()
    assert inputs["hidden_states"].grad is not None


def fp8_cosine(model, inputs, fp8, check=None):
    """The patched model's output cosine vs its own unpatched bf16 output under PatchConfig(fp8=fp8); check(model,
    handle) runs while patched (e.g. which Linears were quantized). Asserts undo() gives the original output back."""
    def forward():
        with torch.inference_mode():
            return model(**inputs).sample

    want = forward()
    with vkern.patch(model, vkern.PatchConfig(fp8=fp8)) as handle:
        if check is not None:
            check(model, handle)
        got = forward()
    assert torch.equal(forward(), want)  # undone: the original weights back
    return torch.nn.functional.cosine_similarity(got.double().flatten(), want.double().flatten(), dim=0).item()
