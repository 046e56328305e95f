"""A vkern-patched Wan transformer under torch.compile: diffusers' regional compilation
(`compile_repeated_blocks(fullgraph=True)`: each repeated block compiled, one graph for all) and the whole model
(`torch.compile(model, fullgraph=True)`): no graph break, the compiled graph holds vkern's ops, and the output's error
against a float64 oracle stays within 2x of the eager patched model's."""
import pytest
import torch

import vkern
from vkern import models

from .tolerance import rel_l2


def build(dtype, device):
    """The tiny model at head dim 128, so that on Hopper the attention runs vkern's CUDA kernel (head dims 64, 128)."""
    torch.manual_seed(0)
    return models.build_wan_transformer("tiny", dtype, device, attention_head_dim=128, ffn_dim=256)


def forward(model, inputs):
    with torch.inference_mode():
        return model(**inputs).sample


@pytest.mark.parametrize("attention, fp8", [("auto", None), ("bf16", None), ("int8pv", None), ("int8pv", "compute")])
@pytest.mark.parametrize("whole", [False, True], ids=["repeated_blocks", "whole_model"])
def test_patched_wan_under_compile(device, attention, fp8, whole):
    inputs = models.transformer_inputs(build(torch.float32, "cpu"), "tiny", torch.float32, device)
    oracle = forward(build(torch.float64, device), {k: v.double() if v.is_floating_point() else v
                                                    for k, v in inputs.items()})
    inputs16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    model = build(torch.bfloat16, device)
    vkern.patch(model, vkern.PatchConfig(attention=attention, fp8=fp8))
    eager = forward(model, inputs16)

    seen = []  # the ops of each graph handed to the backend (then compiled by it)

    def backend(gm, example_inputs):
        seen.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return torch._inductor.compile(gm, example_inputs) if device.type == "cuda" else gm.forward

    torch._dynamo.reset()
    if whole:
        compiled = forward(torch.compile(model, fullgraph=True, backend=backend), inputs16)
    else:
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
        compiled = forward(model, inputs16)
    assert seen, "torch.compile compiled nothing"
    ops = set().union(*seen)
    ours = sorted(op for op in ops if op.startswith("vkern."))
    # the fused glue, the QK-norm + RoPE prologue and the attention (their 8-bit forms in the 8-bit modes)
    for prefix in ("vkern.layernorm_modulate", "vkern.gate_residual", "vkern.qk_norm_rope", "vkern.attention"):
        assert any(op.startswith(prefix) for op in ours), f"no {prefix}* in the compiled block: {ours}"
    assert torch.isfinite(compiled).all()
    err, eager_err = rel_l2(compiled, oracle), rel_l2(eager, oracle)
    assert err <= 2 * eager_err + 1e-6, f"compiled rel L2 {err:.3g} > 2x eager's {eager_err:.3g}"
