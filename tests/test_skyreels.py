"""SkyReels-V2's own checks (the ones every family passes are in test_model_families.py): diffusion forcing (a timestep
per latent frame) and the block-causal attention of num_frame_per_block > 1 (a [1, 1, S, S] mask in diffusers: here
one unmasked call per frame block over its key prefix, in the 8-bit modes the exact 16-bit attention with a one-time
warning), with the reference mode bit-identical to diffusers and the kernels within 2x of PyTorch's bf16 error; its
blocks run Wan's fused glue."""
import copy
import warnings

import pytest
import torch

import vkern
from vkern import models
from vkern.modules import wan_attention

from .tolerance import assert_within_torch_error, rel_l2

FRAMES = 4  # latent frames: two blocks of two under num_frame_per_block=2


def build(dtype, device="cpu", frames_per_block=1):
    torch.manual_seed(0)
    model = models.build_skyreels_transformer("tiny", dtype, device)
    if frames_per_block > 1:
        model._set_ar_attention(frames_per_block)
    return model


def inputs(model, dtype, device="cpu", diffusion_forcing=True):
    x = models.skyreels_transformer_inputs(model, "tiny", dtype, device, diffusion_forcing=diffusion_forcing)
    latents = torch.randn((1, 16, FRAMES, 4, 4), generator=torch.Generator().manual_seed(1))
    x["hidden_states"] = latents.to(device, dtype)
    if diffusion_forcing:
        x["timestep"] = torch.tensor([[100, 300, 500, 700]], device=device)
    return x


def forward(model, x):
    with torch.inference_mode():
        return model(**x).sample


@pytest.mark.parametrize("frames_per_block", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_mode_is_diffusers_bitwise(dtype, frames_per_block, monkeypatch):
    """With every op's reference, the fused blocks (Wan's glue, the mask to the self-attention, diffusion forcing's
    [B, 6, S, D] per-token temb) and the processors give diffusers' output to the bit."""
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    model = build(dtype, frames_per_block=frames_per_block)
    x = inputs(model, dtype)
    want = forward(model, x)
    patched = copy.deepcopy(model)
    with vkern.patch(patched, vkern.PatchConfig(attention="reference")) as handle:
        assert handle.summary["SkyReelsV2TransformerBlock.forward -> fused glue"] == 2
        assert torch.equal(forward(patched, x), want)


@pytest.mark.parametrize("mode", ["auto", "bf16", "int8pv"])
def test_block_causal_attention_within_twice_torch_bf16_error(mode, monkeypatch):
    """Two blocks of two frames: the first block's tokens cannot see the second's. The kernels' output within 2x of
    PyTorch's bf16 error vs the fp32 model (int8pv: the masked calls run exact attention, said once)."""
    monkeypatch.setattr(wan_attention, "_warned_masked", set())
    model32, model16 = build(torch.float32, frames_per_block=2), build(torch.bfloat16, frames_per_block=2)
    x32 = inputs(model32, torch.float32)
    x16 = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in x32.items()}
    oracle, torch_bf16 = forward(model32, x32), forward(model16, x16)
    assert rel_l2(oracle, forward(build(torch.float32), x32)) > 1e-3  # the mask matters here (the check can fail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with vkern.patch(model16, vkern.PatchConfig(attention=mode)):
            ours = forward(model16, x16)
            forward(model16, x16)
    assert_within_torch_error(ours, oracle, torch_bf16)
    said = [w for w in caught if "has no kernel for an attention mask" in str(w.message)]
    assert len(said) == (1 if mode == "int8pv" else 0)


def test_first_block_cannot_see_later_frames():
    """Block-causal: changing the last two frames leaves the first two frames' output unchanged, in every mode."""
    model = build(torch.float32, frames_per_block=2)
    x = inputs(model, torch.float32)
    later = dict(x, hidden_states=x["hidden_states"].clone())
    later["hidden_states"][:, :, 2:] = torch.randn_like(later["hidden_states"][:, :, 2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("reference", "auto", "int8pv"):
            with vkern.patch(model, vkern.PatchConfig(attention=mode)):
                a, b = forward(model, x), forward(model, later)
            torch.testing.assert_close(a[:, :, :2], b[:, :, :2], rtol=1e-5, atol=1e-5)
            assert rel_l2(a[:, :, 2:], b[:, :, 2:]) > 1e-2


def test_block_causal_mask_runs_as_unmasked_key_prefix_calls(monkeypatch):
    """Two blocks of two frames (8 tokens each): each self-attention makes two unmasked calls, queries 0:8 on keys 0:8
    and queries 8:16 on keys 0:16, then the cross-attention its one (16 tokens on the 16 text keys)."""
    from vkern import ops

    calls = []
    attention = ops.attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape[1], k.shape[1], attn_mask))
        return attention(q, k, v, attn_mask, **kwargs)

    monkeypatch.setattr(ops, "attention", spy)
    model = build(torch.float32, frames_per_block=2)
    x = inputs(model, torch.float32)
    with vkern.patch(model, vkern.PatchConfig(attention="bf16")):
        forward(model, x)
    assert calls == [(8, 8, None), (8, 16, None), (16, 16, None)] * len(model.blocks)


def test_other_masks_are_not_taken_for_block_causal():
    from vkern.modules.skyreels_attention import block_causal_blocks

    block = torch.arange(8) // 4
    causal = (block[None, :] <= block[:, None])[None, None]
    assert block_causal_blocks(causal) == [(0, 4), (4, 8)]
    assert block_causal_blocks(causal.clone()) == [(0, 4), (4, 8)]
    holes = causal.clone()
    holes[0, 0, 5, 1] = False
    assert block_causal_blocks(holes) is None
    assert block_causal_blocks(torch.ones(1, 1, 8, 8, dtype=torch.bool)) is None  # one block: no mask needed
    assert block_causal_blocks(causal.float()) is None
    causal[0, 0, 6, 5] = False  # changed in place: looked at again
    assert block_causal_blocks(causal) is None
    with torch.inference_mode():  # (no version counter: looked at every call)
        frozen = (block[None, :] <= block[:, None])[None, None]
        assert block_causal_blocks(frozen) == [(0, 4), (4, 8)]
        frozen[0, 0, 6, 5] = False
        assert block_causal_blocks(frozen) is None
