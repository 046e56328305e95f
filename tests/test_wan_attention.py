"""Wan attention: vkern's reference equals diffusers' WanAttnProcessor exactly, and the vkern
processor (fused prologue + vkern attention) is within 2x of PyTorch's own bf16 error."""
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

import vkern
import vkern.models
from vkern.modules.wan_attention import VkernWanAttnProcessor
from vkern.reference import attention as ref

from vkern.models import wan_rope_tables as wan_freqs
from .tolerance import assert_within_torch_error

DIM, HEADS = 128, 2


def make_attention(kind, dtype=torch.float32, fused=False):
    kwargs = dict(dim=DIM, heads=HEADS, dim_head=DIM // HEADS, eps=1e-6)
    if kind != "self":
        kwargs["cross_attention_dim_head"] = DIM // HEADS
    if kind == "i2v":
        kwargs["added_kv_proj_dim"] = DIM  # Wan I2V: image tokens arrive at the model dim
    attn = WanAttention(**kwargs)
    with torch.no_grad():  # non-trivial norm weights, so a dropped weight cannot pass
        for norm in (attn.norm_q, attn.norm_k, getattr(attn, "norm_added_k", None)):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    if fused:
        attn.fuse_projections()
    return attn.to(dtype).eval()


def make_inputs(kind, S=37, dtype=torch.float32):
    x = torch.randn(2, S, DIM).to(dtype)
    if kind == "self":
        return dict(hidden_states=x, rotary_emb=wan_freqs(S, DIM // HEADS))
    text = torch.randn(2, 512 if kind == "i2v" else 23, DIM).to(dtype)
    if kind == "i2v":  # image tokens first, then Wan's 512 text tokens
        return dict(hidden_states=x, encoder_hidden_states=torch.cat([torch.randn(2, 9, DIM).to(dtype), text], 1))
    return dict(hidden_states=x, encoder_hidden_states=text)


def run(attn, processor, inputs):
    with torch.no_grad():
        return processor(attn, inputs["hidden_states"], inputs.get("encoder_hidden_states"), None,
                         inputs.get("rotary_emb"))


@pytest.mark.parametrize("kind", ["self", "cross", "i2v"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_diffusers_processor(kind, fused, dtype):
    attn = make_attention(kind, dtype, fused)
    inputs = make_inputs(kind, dtype=dtype)
    expected = run(attn, WanAttnProcessor(), inputs)
    with torch.no_grad():
        got = ref.wan_attention(attn, inputs["hidden_states"], inputs.get("encoder_hidden_states"), None,
                                inputs.get("rotary_emb"))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["self", "cross", "i2v"])
def test_vkern_processor_within_twice_torch_bf16_error(kind, device):
    attn32 = make_attention(kind).to(device)
    attn16 = make_attention(kind, torch.bfloat16).to(device)
    attn16.load_state_dict(attn32.state_dict())
    inputs32 = {k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)) for k, v in make_inputs(kind).items()}
    inputs16 = {k: (v if isinstance(v, tuple) else v.bfloat16()) for k, v in inputs32.items()}
    oracle = run(attn32.double(), WanAttnProcessor(), {k: (v if isinstance(v, tuple) else v.double()) for k, v in inputs32.items()})
    torch_bf16 = run(attn16, WanAttnProcessor(), inputs16)
    ours = run(attn16, VkernWanAttnProcessor(), inputs16)
    assert_within_torch_error(ours, oracle, torch_bf16)


def test_processor_under_compile_fullgraph():
    attn = make_attention("self")
    attn.set_processor(VkernWanAttnProcessor())
    inputs = make_inputs("self")
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(inputs["hidden_states"], None, None, inputs["rotary_emb"])
        expected = run(attn, WanAttnProcessor(), inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_attention_mode():
    with pytest.raises(ValueError, match="attention: expected one of"):
        VkernWanAttnProcessor(attention="flash")


def test_tiny_wan_transformer_patched_within_twice_torch_bf16_error(device):
    model32 = vkern.models.build_wan_transformer("tiny", torch.float32, device)
    model16 = vkern.models.build_wan_transformer("tiny", torch.bfloat16, device)
    model16.load_state_dict(model32.state_dict())
    inputs = vkern.models.transformer_inputs(model32, "tiny", torch.float32, device)
    inputs16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.inference_mode():
        oracle = model32(**inputs).sample
        torch_bf16 = model16(**inputs16).sample
        with vkern.patch(model16):
            ours = model16(**inputs16).sample
    assert_within_torch_error(ours, oracle, torch_bf16)


@pytest.mark.parametrize("mode", ["int8", "int8pv", "fp8"])
def test_8bit_modes_run_on_a_float32_model(mode):
    """The 8-bit modes quantize the fp32 model's Q/K/V as they would bf16 ones (attention="int8" keeps V in the
    model's dtype: float32 goes to the reference emulation); the output stays near the unpatched model's."""
    model = vkern.models.build_wan_transformer("tiny", torch.float32)
    inputs = vkern.models.transformer_inputs(model, "tiny", torch.float32, "cpu")
    with torch.inference_mode():
        expected = model(**inputs).sample
        with vkern.patch(model, vkern.PatchConfig(attention=mode)):
            out = model(**inputs).sample
    assert out.dtype == torch.float32
    assert ((out - expected).norm() / expected.norm()).item() < 0.01
