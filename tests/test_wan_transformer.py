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


def test_autograd_through_the_text_alone_runs_diffusers_forward():
    # Prompt tuning: a frozen model, only the text embeddings require grad (the fused output norm would fail).
    model, inputs = tiny(torch.float32)
    patched = copy.deepcopy(model)
    vkern.patch(patched)
    grads = []
    for m in (patched, model):
        text = inputs["encoder_hidden_states"].clone().requires_grad_(True)
        m(**{**inputs, "encoder_hidden_states": text}).sample.square().mean().backward()
        grads.append(text.grad)
    torch.testing.assert_close(*grads, rtol=1e-5, atol=1e-7)


# --- the blocks overwrite the forward's own hidden states in place (overwrite_input) ------------------

def _record_block_calls(model, marked=True):
    """Hooks on every block recording, per call, the overwrite_input keyword it got and whether its output is
    its input tensor. marked: probes that leave overwriting on (ignores_block_inputs); else plain hooks, which
    turn it off. Returns (calls, remove)."""
    from vkern.modules.wan_block import ignores_block_inputs

    calls, handles = [], []
    mark = ignores_block_inputs if marked else (lambda hook: hook)
    for i, block in enumerate(model.blocks):
        def pre(block, args, kwargs, i=i):
            calls.append({"block": i, "overwrite_input": kwargs.get("overwrite_input"), "ptr": args[0].data_ptr()})

        def post(block, args, output):
            calls[-1]["in_place"] = output.data_ptr() == calls[-1]["ptr"]
        handles += [block.register_forward_pre_hook(mark(pre), with_kwargs=True),
                    block.register_forward_hook(mark(post))]
    return calls, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("chunk", [None, 5], ids=["whole", "chunked"])
@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
def test_blocks_overwrite_their_input_bitwise(chunk, wan22):
    model, inputs = tiny(torch.float32)
    inputs = per_token(inputs, model) if wan22 else inputs
    vkern.patch(model, vkern.PatchConfig(attention="reference", attention_chunk_size=chunk, ffn_chunk_size=chunk))
    with torch.no_grad():
        calls, remove = _record_block_calls(model)
        got = model(**inputs).sample
        remove()
        assert [(c["overwrite_input"], c["in_place"]) for c in calls] == [(True, True)] * len(model.blocks)
        calls, remove = _record_block_calls(model, marked=False)  # plain hooks: every block makes a new tensor
        want = model(**inputs).sample
        remove()
        assert [(c["overwrite_input"], c["in_place"]) for c in calls] == [(None, False)] * len(model.blocks)
    assert torch.equal(got, want)


def test_an_output_a_hook_holds_is_not_overwritten():
    # E.g. diffusers' FirstBlockCache keeps the first block's output to subtract it at the last block.
    model, inputs = tiny(torch.float32)
    vkern.patch(model, vkern.PatchConfig(attention="reference"))
    kept = []
    model.blocks[0].register_forward_hook(lambda block, args, output: kept.append((output, output.clone())))
    with torch.no_grad():
        calls, _ = _record_block_calls(model)
        model(**inputs)
    assert [c["overwrite_input"] for c in calls] == [None, None]  # hooked block 0; its output is not private
    assert torch.equal(*kept[0])


def test_unfused_blocks_get_diffusers_call(monkeypatch):
    # A block filter_fn leaves to diffusers (its forward takes no overwrite_input) beside fused ones.
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    model, inputs = tiny(torch.float32)
    patched = copy.deepcopy(model)
    vkern.patch(patched, vkern.PatchConfig(attention="reference", filter_fn=lambda m, fqn: fqn != "blocks.0"))
    assert "forward" not in patched.blocks[0].__dict__
    with torch.no_grad():
        calls, _ = _record_block_calls(patched)
        got = patched(**inputs).sample
        assert torch.equal(got, model(**inputs).sample)
    assert [(c["overwrite_input"], c["in_place"]) for c in calls] == [(None, False), (True, True)]
