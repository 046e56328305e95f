"""Mochi's fused block glue (vkern/modules/mochi_block.py): the ops' references equal diffusers' MochiRMSNormZero and
MochiModulatedRMSNorm expressions bit for bit; the kernels match them (the same bits almost everywhere: the fp32
mean of squares is summed in another order; within 2x PyTorch's own error); the fused block equals diffusers' block
(bitwise on the reference backend, within 2x PyTorch's bf16 error on the kernels), for both its forms (a text stream
with its own glue, and the last block's context_pre_only), makes no fp32 hidden states, and hands the call to
diffusers where it would not be the same computation."""
import copy
import functools

import pytest
import torch
from diffusers.models.transformers.transformer_mochi import (MochiModulatedRMSNorm, MochiRMSNormZero,
                                                             MochiTransformerBlock)

from vkern import models, ops
from vkern.modules.mochi_block import fused_mochi_block_forward
from vkern.ops import _backend
from vkern.reference import block_glue as ref

from .test_block_glue import AllocationProbe, assert_mostly_bitwise, assert_norm_like_torch
from .tolerance import assert_within_torch_error

EPS = 1e-6
B, S, D = 2, 37, 64


def glue_inputs(dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(B, S, D, generator=g) + 1).to(device, dtype)
    y = (2 * torch.randn(B, S, D, generator=g) - 0.5).to(device, dtype)
    chunk = torch.randn(B, D, generator=g).to(device, dtype)  # a temb chunk as the modulation Linear gives it
    return x, y, chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_references_are_diffusers_bitwise(dtype):
    x, y, chunk = glue_inputs(dtype)
    norm_zero = MochiRMSNormZero(16, 4 * D, eps=EPS).to(dtype)
    temb = torch.randn(B, 16).to(dtype)
    want, gate, _, _ = norm_zero(x, temb)
    scale = norm_zero.linear(norm_zero.silu(temb)).chunk(4, dim=1)[0]
    assert torch.equal(ref.layernorm_modulate(x, None, scale[:, None], EPS, rms=True), want)
    # MochiModulatedRMSNorm: norm3's (1 + scale) form and the residual's tanh(gate) form
    modulated = MochiModulatedRMSNorm(EPS)
    assert torch.equal(ref.layernorm_modulate(x, None, chunk[:, None], EPS, rms=True),
                       modulated(x, 1 + chunk.unsqueeze(1).to(torch.float32)))
    tanh = torch.tanh(gate).unsqueeze(1)
    assert torch.equal(ref.rms_gate_residual(x, y, tanh, EPS), x + modulated(y, tanh))


def oracle_norm(x, scale):
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * (1 + scale.double()[:, None])


def oracle_residual(x, y, gate):
    yd = y.double()
    return x.double() + yd * torch.rsqrt(yd.pow(2).mean(-1, keepdim=True) + EPS) * gate.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fp8", [False, True], ids=["x-dtype", "fp8"])
def test_scale_only_rms_modulate_kernel(device, dtype, fp8):
    x, _, chunk = glue_inputs(dtype, device)
    got = ops.layernorm_modulate(x, None, chunk[:, None], EPS, rms=True, fp8=fp8)
    assert _backend.last_choice["layernorm_modulate"] == "triton"
    if fp8:
        want_q, want_s = ref.layernorm_modulate_fp8(x, None, chunk[:, None], EPS, rms=True)
        assert_mostly_bitwise(got[0].view(torch.uint8), want_q.view(torch.uint8))
        torch.testing.assert_close(got[1], want_s, rtol=2**-7, atol=0)
        return
    want = ref.layernorm_modulate(x, None, chunk[:, None], EPS, rms=True)
    assert want.dtype == dtype
    assert_norm_like_torch(got, oracle_norm(x, chunk), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("in_place", [False, True])
def test_rms_gate_residual_kernel(device, dtype, in_place):
    x, y, chunk = glue_inputs(dtype, device)
    gate = torch.tanh(chunk)[:, None]
    want = ref.rms_gate_residual(x, y, gate, EPS)
    if in_place:
        got = x.clone()
        assert ops.rms_gate_residual_(got, y, gate, EPS) is got
    else:
        got = ops.rms_gate_residual(x, y, gate, EPS)
    assert _backend.last_choice["gate_residual"] == "triton"
    assert want.dtype == dtype
    assert_norm_like_torch(got, oracle_residual(x, y, gate), want)
    # a y that is not normalized first (gate_residual's form) is another result: the test can tell them apart
    assert rel(got, ref.gate_residual(x, y, gate)) > 0.05


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_rms_gate_residual_result_takes_eager_pytorchs_dtype():
    # bf16 x, fp32 y: diffusers' (... ).to(y.dtype) is fp32 and x + it promotes; the in-place form refuses to narrow.
    x, y, chunk = glue_inputs(torch.bfloat16)
    y = y.float()
    gate = torch.tanh(chunk)[:, None]
    got = ops.rms_gate_residual(x, y, gate, EPS)
    assert got.dtype == torch.float32
    assert_within_torch_error(got, oracle_residual(x, y, gate), x + MochiModulatedRMSNorm(EPS)(y, gate))
    with torch._subclasses.FakeTensorMode() as mode:
        assert ops.rms_gate_residual(*[mode.from_tensor(t) for t in (x, y, gate)], EPS).dtype == torch.float32
    with pytest.raises(TypeError, match="cannot be written in place"):
        ops.rms_gate_residual_(x.clone(), y, gate, EPS)


# --- the fused block ---------------------------------------------------------------------------------

def captured_blocks(dtype, device="cpu", batch=2):
    """The tiny Mochi model's two blocks (the first with the text stream's glue, the last context_pre_only) with the
    keyword arguments the model calls them with (batch 2: classifier-free guidance's)."""
    model = models.build_mochi_transformer("tiny", dtype, device).eval()
    inputs = models.mochi_transformer_inputs(model, "tiny", dtype, device, batch=batch)
    inputs["timestep"] = torch.linspace(900, 100, batch, device=device)  # a modulation per batch row
    calls = []
    blocks = [m for m in model.modules() if type(m) is MochiTransformerBlock]
    hooks = [b.register_forward_pre_hook(lambda m, a, k: calls.append((m, copy.copy(k))), with_kwargs=True)
             for b in blocks]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    assert [b.context_pre_only for b, _ in calls] == [False, True]
    with torch.no_grad():
        for block, _ in calls:  # modulation that matters (diffusers initializes these Linears small)
            for norm in (block.norm1, block.norm1_context):
                if isinstance(norm, MochiRMSNormZero):
                    norm.linear.weight.normal_(0, 0.5)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_block_on_the_reference_backend_is_diffusers_bitwise(monkeypatch, dtype):
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    for block, kwargs in captured_blocks(dtype):
        before = {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}
        with torch.no_grad():
            got, want = fused_mochi_block_forward(block, **kwargs), block(**kwargs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert all(torch.equal(kwargs[k], v) for k, v in before.items())  # the caller's tensors are not written


def test_fused_block_bf16_within_twice_torch_error(device):
    for block, kwargs in captured_blocks(torch.bfloat16, device):
        oracle_block = copy.deepcopy(block).float()
        as_fp32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else
                   tuple(u.float() for u in v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        with torch.no_grad():
            got, want = fused_mochi_block_forward(block, **kwargs), block(**kwargs)
            oracle_out = oracle_block(**as_fp32)
        assert _backend.last_choice["layernorm_modulate"] == _backend.last_choice["gate_residual"] == "triton"
        for stream in range(2):  # video, text (the last block returns the text stream untouched)
            assert got[stream].dtype == want[stream].dtype
            assert_within_torch_error(got[stream], oracle_out[stream].double(), want[stream], what=f"stream {stream}")


def test_fused_block_allocates_no_fp32_hidden_states():
    block, kwargs = captured_blocks(torch.bfloat16)[0]
    tokens = kwargs["hidden_states"].shape[:2].numel()
    with torch.no_grad():
        probe = AllocationProbe(block)
        with probe:
            block(**kwargs)
        assert probe.largest(torch.float32, width=block.ff.net[2].out_features) >= tokens  # diffusers' fp32 norms
        probe = AllocationProbe(block)
        with probe:
            fused_mochi_block_forward(block, **kwargs)
    assert any("vkern.gate_residual" in op for *_, op in probe.seen)
    assert probe.largest(torch.float32) == 0  # no fp32 tensor at all outside attention


@pytest.mark.parametrize("case", ["autograd", "hooked norm", "other norm"])
def test_fused_block_hands_other_calls_to_diffusers(monkeypatch, case):
    block, kwargs = captured_blocks(torch.float32)[0]
    block.requires_grad_(case == "autograd")  # (the model builder freezes its parameters)
    if case == "hooked norm":
        block.norm4.register_forward_hook(lambda m, args, out: out * 2)
    if case == "other norm":  # a subclass (e.g. a user's) is not the computation the kernel does
        block.norm3 = type("MyNorm", (MochiModulatedRMSNorm,), {})(EPS)
    called = []
    for name in ("layernorm_modulate", "rms_gate_residual", "rms_gate_residual_"):
        monkeypatch.setattr(ops, name, lambda *a, _n=name, **k: called.append(_n))
    with torch.set_grad_enabled(case == "autograd"):
        got, want = fused_mochi_block_forward(block, **kwargs), block(**kwargs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not called


def test_fused_block_under_compile_fullgraph():
    for block, kwargs in captured_blocks(torch.bfloat16):
        compiled = torch.compile(functools.partial(fused_mochi_block_forward, block), fullgraph=True,
                                 backend="aot_eager")
        with torch.no_grad():
            got, want = compiled(**kwargs), fused_mochi_block_forward(block, **kwargs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
