"""The fused block glue of the families whose glue runs in the tensors' own dtypes (LTX-Video, CogVideoX): the
native-dtype references equal diffusers' LTXVideoTransformerBlock and CogVideoXLayerNormZero expressions bit for bit;
the kernels match them (gate + residual bit for bit, RMSNorm / LayerNorm + modulate the same bits almost everywhere and
within 2x PyTorch's own error); each fused block equals diffusers' block (bitwise on the reference backend, within 2x
PyTorch's bf16 error on the kernels), is installed by vkern.patch (fused_block) and hands the call to diffusers where
it would not be the same computation; LTX-Video's allocates no fp32 hidden states."""
import copy

import pytest
import torch
from diffusers.models.normalization import CogVideoXLayerNormZero, RMSNorm
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from diffusers.models.transformers.transformer_ltx import LTXVideoTransformerBlock

import vkern
from vkern import models, ops
from vkern.modules.cogvideox_block import fused_cogvideox_block_forward
from vkern.modules.ltx_block import fused_ltx_block_forward
from vkern.ops import _backend
from vkern.reference import block_glue as ref

from .test_block_glue import AllocationProbe, assert_mostly_bitwise, assert_norm_like_torch
from .tolerance import assert_within_torch_error, rel_l2

EPS = 1e-6
B, S, DIM, HEADS, TEXT = 2, 37, 64, 2, 9
BLOCK_SUMMARY = "LTXVideoTransformerBlock.forward -> fused glue"
COG_SUMMARY = "CogVideoXBlock.forward -> fused glue"


def glue_inputs(dtype, per_token, device="cpu", table_dtype=None):
    """Hidden states with a non-zero mean, LTX's temb [B, 1|S, 6 * D] in x's dtype, a scale_shift_table [6, D] (the
    model's dtype unless table_dtype), and the six (temb chunk, table row) pairs the fused block reads."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(B, S, DIM, generator=g) + 1).to(device, dtype)
    temb = torch.randn(B, S if per_token else 1, 6 * DIM, generator=g).to(device, dtype)
    table = (torch.randn(6, DIM, generator=g) / DIM**0.5).to(device, table_dtype or dtype)
    ada = temb.reshape(B, temb.shape[1], 6, DIM)
    return x, temb, table, [(ada[:, :, k], table[k]) for k in range(6)]


def diffusers_glue(x, temb, table, y):
    """LTXVideoTransformerBlock.forward's own expressions: (norm1 + modulate, the attention's gate + residual)."""
    ada = table[None, None] + temb.reshape(B, temb.size(1), 6, -1)
    shift, scale, gate = ada.unbind(dim=2)[:3]
    norm = RMSNorm(DIM, eps=EPS, elementwise_affine=False)(x) * (1 + scale) + shift
    return norm, x + y * gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-video", "per-token"])
def test_native_reference_is_diffusers_bitwise(dtype, per_token):
    x, temb, table, mods = glue_inputs(dtype, per_token)
    y = torch.randn(B, S, DIM).to(dtype)
    want_norm, want_residual = diffusers_glue(x, temb, table, y)
    norm = ref.layernorm_modulate(x, mods[0][0], mods[1][0], EPS, shift_table=mods[0][1], scale_table=mods[1][1],
                                  rms=True, native=True)
    assert norm.dtype == want_norm.dtype and torch.equal(norm, want_norm)
    assert torch.equal(ref.gate_residual(x, y, *mods[2], native=True), want_residual)


def oracle(x, mods, y=None):
    """float64: RMSNorm + modulate (y None), or gate + residual."""
    xd = x.double()
    if y is None:
        n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS)
        (shift, st), (scale, sc) = mods[0], mods[1]
        return n * (1 + sc.double() + scale.double()) + st.double() + shift.double()
    gate, gt = mods[2]
    return xd + y.double() * (gt.double() + gate.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-video", "per-token"])
@pytest.mark.parametrize("fp8", [False, True], ids=["x-dtype", "fp8"])
def test_native_rms_modulate_kernel(device, dtype, per_token, fp8):
    x, temb, table, mods = glue_inputs(dtype, per_token, device)
    args = (x, mods[0][0], mods[1][0], EPS, None, None, mods[0][1], mods[1][1])
    got = ops.layernorm_modulate(*args, rms=True, native_dtypes=True, fp8=fp8)
    assert _backend.last_choice["layernorm_modulate"] == "triton"
    if fp8:  # the native result quantized per token: the reference's e4m3 codes almost everywhere
        want_q, want_s = ref.layernorm_modulate_fp8(*args, rms=True, native=True)
        assert_mostly_bitwise(got[0].view(torch.uint8), want_q.view(torch.uint8))
        torch.testing.assert_close(got[1], want_s, rtol=2**-7, atol=0)
        return
    want = ref.layernorm_modulate(*args, rms=True, native=True)  # diffusers' numerics
    assert want.dtype == dtype
    assert_norm_like_torch(got, oracle(x, mods), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("in_place", [False, True])
def test_native_gate_residual_kernel_is_bit_exact(device, dtype, in_place):
    # Each op rounded where eager PyTorch rounds it (the table + temb sum, the product, the sum): the same bits.
    x, temb, table, mods = glue_inputs(dtype, True, device)
    y = torch.randn(B, S, DIM, device=device).to(dtype)
    want = ref.gate_residual(x, y, *mods[2], native=True)
    if in_place:
        got = x.clone()
        assert ops.gate_residual_(got, y, *mods[2], native_dtypes=True) is got
    else:
        got = ops.gate_residual(x, y, *mods[2], native_dtypes=True)
    assert _backend.last_choice["gate_residual"] == "triton"
    assert torch.equal(got, want)
    assert not torch.equal(got, ref.gate_residual(x, y, *mods[2])) or dtype == torch.float32  # (the forms differ)


def test_native_result_takes_eager_pytorchs_dtype():
    # An fp32 table with a bf16 temb and x (a model cast by hand): diffusers' expressions promote to fp32, so do the
    # ops, their fake impls (torch.compile) included; the in-place form refuses to narrow the result into x.
    x, temb, table, mods = glue_inputs(torch.bfloat16, False, table_dtype=torch.float32)
    y = torch.randn(B, S, DIM).to(torch.bfloat16)
    want_norm, want_residual = diffusers_glue(x, temb, table, y)
    norm = ops.layernorm_modulate(x, mods[0][0], mods[1][0], EPS, shift_table=mods[0][1], scale_table=mods[1][1],
                                  rms=True, native_dtypes=True)
    residual = ops.gate_residual(x, y, *mods[2], native_dtypes=True)
    assert norm.dtype == want_norm.dtype == residual.dtype == want_residual.dtype == torch.float32
    assert_mostly_bitwise(norm, want_norm)
    assert torch.equal(residual, want_residual)
    with torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, mods[0][0], mods[1][0], mods[0][1], mods[1][1])]
        out = ops.layernorm_modulate(fake[0], fake[1], fake[2], EPS, shift_table=fake[3], scale_table=fake[4],
                                     rms=True, native_dtypes=True)
        assert out.dtype == torch.float32
    with pytest.raises(TypeError, match="cannot be written in place"):
        ops.gate_residual_(x.clone(), y, *mods[2], native_dtypes=True)


def test_native_bad_input():
    x, _, _, mods = glue_inputs(torch.bfloat16, False)
    with pytest.raises(ValueError, match="^weight, bias: not supported with rms=True and native_dtypes=True"):
        ops.layernorm_modulate(x, None, None, EPS, torch.ones(DIM), rms=True, native_dtypes=True)
    # one modulation dtype: eager PyTorch would round shift and scale each to its own
    with pytest.raises(TypeError, match="^shift, scale: native_dtypes=True needs them"):
        ops.layernorm_modulate(x, mods[0][0].float(), mods[1][0], EPS, rms=True, native_dtypes=True)


def test_fp32_rms_kernel_matches_its_reference(device):
    # rms=True in the fp32 form (Wan's rounding: fp32 math, one rounding at the end), with an affine weight and bias.
    x, _, _, mods = glue_inputs(torch.bfloat16, True, device)
    w, b = 1 + 0.5 * torch.randn(DIM, device=device), torch.randn(DIM, device=device)
    args = (x, mods[0][0], mods[1][0], EPS, w, b, mods[0][1], mods[1][1])
    got, want = ops.layernorm_modulate(*args, rms=True), ref.layernorm_modulate(*args, rms=True)
    xd = x.double()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * w.double() + b.double()
    exact = n * (1 + mods[1][1].double() + mods[1][0].double()) + mods[0][1].double() + mods[0][0].double()
    assert_within_torch_error(got, exact, want)
    assert_mostly_bitwise(got, want)


# --- the fused block ---------------------------------------------------------------------------------

def make_block(dtype, device="cpu", affine=False):
    torch.manual_seed(0)
    block = LTXVideoTransformerBlock(DIM, HEADS, DIM // HEADS, cross_attention_dim=DIM, elementwise_affine=affine)
    with torch.no_grad():
        block.scale_shift_table.normal_(0, 0.3)  # modulation that matters
    return block.to(device, dtype).eval()


def block_inputs(dtype, per_token, device="cpu"):
    """(hidden_states, encoder_hidden_states, temb, image_rotary_emb, encoder_attention_mask) as the model passes
    them: RoPE tables over the whole inner dim, the prompt mask as an additive bias [B, 1, N]."""
    g = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(B, S, DIM, generator=g) + 0.5).to(device, dtype)
    text = torch.randn(B, TEXT, DIM, generator=g).to(device, dtype)
    temb = torch.randn(B, S if per_token else 1, 6 * DIM, generator=g).to(device, dtype)
    angles = torch.randn(B, S, DIM, generator=g).to(device)
    bias = torch.zeros(B, 1, TEXT, device=device, dtype=dtype)
    bias[1, :, 6:] = -10000.0
    return x, text, temb, (angles.cos(), angles.sin()), bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-video", "per-token"])
def test_fused_block_on_the_reference_backend_is_diffusers_bitwise(monkeypatch, dtype, per_token):
    # The wiring (which temb chunk and table row where, the residual order, in-place updates, the FFN through its
    # modules with an in-place GELU) is exactly diffusers' when the ops run their references.
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    block = make_block(dtype)
    inputs = block_inputs(dtype, per_token)
    x0 = inputs[0].clone()
    with torch.no_grad():
        assert torch.equal(fused_ltx_block_forward(block, *inputs), block(*inputs))
    assert torch.equal(inputs[0], x0)  # the caller's hidden states are not written


@pytest.mark.parametrize("per_token", [False, True], ids=["per-video", "per-token"])
def test_fused_block_bf16_within_twice_torch_error(device, per_token):
    block = make_block(torch.bfloat16, device)
    oracle_block = copy.deepcopy(block).float()  # the same weights, every op in fp32
    inputs = block_inputs(torch.bfloat16, per_token, device)
    with torch.no_grad():
        got = fused_ltx_block_forward(block, *inputs)
        want = block(*inputs)
        oracle_out = oracle_block(*[t.float() if torch.is_tensor(t) else tuple(u.float() for u in t) for t in inputs])
    assert _backend.last_choice["layernorm_modulate"] == _backend.last_choice["gate_residual"] == "triton"
    assert got.dtype == want.dtype
    assert_within_torch_error(got, oracle_out.double(), want, what="block output")


def test_fused_block_allocates_no_fp32_hidden_states():
    block = make_block(torch.bfloat16)
    inputs = block_inputs(torch.bfloat16, True)
    with torch.no_grad():
        probe = AllocationProbe(block)
        with probe:
            block(*inputs)
        # diffusers' RMSNorm makes fp32 [B, S, D] tensors (x * rsqrt(...) promotes), and table + temb a [B, S, 6, D]
        assert probe.largest(torch.float32) >= B * S * DIM
        assert probe.largest(torch.bfloat16) >= B * S * 6 * DIM
        probe = AllocationProbe(block)
        with probe:
            fused_ltx_block_forward(block, *inputs)
    assert any("vkern.layernorm_modulate" in op for *_, op in probe.seen)
    assert probe.largest(torch.float32) == 0  # no fp32 tensor at all outside attention
    assert probe.largest(torch.bfloat16) < B * S * 6 * DIM  # and no table + temb tensor


@pytest.mark.parametrize("case", ["autograd", "affine norms", "hooked norm", "other temb"])
def test_fused_block_hands_other_calls_to_diffusers(monkeypatch, case):
    """Where the fused path would not be the same computation, diffusers' forward runs (no vkern glue op called)."""
    block = make_block(torch.float32, affine=case == "affine norms")
    inputs = list(block_inputs(torch.float32, False))
    if case == "hooked norm":
        block.norm2.register_forward_hook(lambda m, args, out: out * 2)
    if case == "other temb":  # one temb row for a batch of two: diffusers' reshape decides (here: an error)
        inputs[2] = inputs[2][:1]
    called = []
    for name in ("layernorm_modulate", "gate_residual", "gate_residual_"):
        monkeypatch.setattr(ops, name, lambda *a, _n=name, **k: called.append(_n))
    grad = case == "autograd"
    with torch.set_grad_enabled(grad):
        if case == "other temb":
            with pytest.raises(RuntimeError):
                block(*inputs)
            with pytest.raises(RuntimeError):
                fused_ltx_block_forward(block, *inputs)
        else:
            assert torch.equal(fused_ltx_block_forward(block, *inputs), block(*inputs))
    assert not called


def test_fused_block_under_compile_fullgraph():
    # aot_eager traces the ops through their fake impls (the result dtypes included): no graph break.
    import functools

    block = make_block(torch.bfloat16)
    inputs = block_inputs(torch.bfloat16, True)
    compiled = torch.compile(functools.partial(fused_ltx_block_forward, block), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(*inputs), fused_ltx_block_forward(block, *inputs))


# --- CogVideoX ---------------------------------------------------------------------------------------

def cog_block(dtype, device="cpu"):
    torch.manual_seed(0)
    block = CogVideoXBlock(DIM, HEADS, DIM // HEADS, time_embed_dim=16)
    with torch.no_grad():
        for norm in (block.norm1, block.norm2):
            norm.norm.weight.uniform_(0.5, 1.5), norm.norm.bias.normal_(0, 0.3)
    return block.to(device, dtype).eval()


def cog_inputs(dtype, device="cpu"):
    """(hidden_states, encoder_hidden_states, temb, image_rotary_emb) as CogVideoXTransformer3DModel passes them:
    RoPE tables [S, head_dim] for the video tokens (CogVideoX-5B)."""
    g = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(B, S, DIM, generator=g) + 0.5).to(device, dtype)
    text = (torch.randn(B, TEXT, DIM, generator=g) - 0.3).to(device, dtype)
    temb = torch.randn(B, 16, generator=g).to(device, dtype)
    angles = torch.randn(S, DIM // HEADS, generator=g).to(device)
    return x, text, temb, (angles.cos(), angles.sin())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_layernorm_reference_is_cogvideox_bitwise(dtype):
    torch.manual_seed(0)
    norm = CogVideoXLayerNormZero(16, DIM).to(dtype)
    with torch.no_grad():
        norm.norm.weight.uniform_(0.5, 1.5), norm.norm.bias.normal_()
    x, text, temb, _ = cog_inputs(dtype)
    want_x, want_text, gate, text_gate = norm(x, text, temb)
    shift, scale, _, t_shift, t_scale, _ = [c[:, None, :] for c in norm.linear(norm.silu(temb)).chunk(6, dim=1)]
    ln = (norm.norm.eps, norm.norm.weight, norm.norm.bias)
    assert torch.equal(ref.layernorm_modulate(x, shift, scale, *ln, native=True), want_x)
    assert torch.equal(ref.layernorm_modulate(text, t_shift, t_scale, *ln, native=True), want_text)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_native_layernorm_modulate_kernel(device, dtype):
    block = cog_block(dtype, device)
    x, _, temb, _ = cog_inputs(dtype, device)
    shift, scale = [c[:, None, :] for c in block.norm1.linear(block.norm1.silu(temb)).chunk(6, dim=1)[:2]]
    w, b = block.norm1.norm.weight, block.norm1.norm.bias
    args = (x, shift, scale, block.norm1.norm.eps, w, b)
    with torch.no_grad():
        got = ops.layernorm_modulate(*args, native_dtypes=True)
        want = ref.layernorm_modulate(*args, native=True)
    assert _backend.last_choice["layernorm_modulate"] == "triton" and got.dtype == want.dtype == dtype
    xd = x.double()
    n = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + block.norm1.norm.eps)
    exact = (n * w.double() + b.double()) * (1 + scale.double()) + shift.double()
    assert_norm_like_torch(got, exact, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cogvideox_fused_block_on_the_reference_backend_is_diffusers_bitwise(monkeypatch, dtype):
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    block = cog_block(dtype)
    inputs = cog_inputs(dtype)
    x0, text0 = inputs[0].clone(), inputs[1].clone()
    with torch.no_grad():
        got, want = fused_cogvideox_block_forward(block, *inputs), block(*inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(inputs[0], x0) and torch.equal(inputs[1], text0)  # the caller's tensors are not written


def test_cogvideox_fused_block_bf16_within_twice_torch_error(device):
    block = cog_block(torch.bfloat16, device)
    oracle_block = copy.deepcopy(block).float()
    inputs = cog_inputs(torch.bfloat16, device)
    with torch.no_grad():
        got, want = fused_cogvideox_block_forward(block, *inputs), block(*inputs)
        oracle_out = oracle_block(*[t.float() if torch.is_tensor(t) else tuple(u.float() for u in t) for t in inputs])
    assert _backend.last_choice["layernorm_modulate"] == _backend.last_choice["gate_residual"] == "triton"
    for stream in range(2):  # video, text
        assert got[stream].dtype == want[stream].dtype
        assert_within_torch_error(got[stream], oracle_out[stream].double(), want[stream], what=f"stream {stream}")


@pytest.mark.parametrize("case", ["autograd", "hooked norm", "other norm"])
def test_cogvideox_fused_block_hands_other_calls_to_diffusers(monkeypatch, case):
    block = cog_block(torch.float32)
    inputs = cog_inputs(torch.float32)
    if case == "hooked norm":
        block.norm2.norm.register_forward_hook(lambda m, args, out: out * 2)
    if case == "other norm":  # a LayerNorm subclass (e.g. a user's) is not the computation the kernel does
        block.norm1.norm = type("MyLayerNorm", (torch.nn.LayerNorm,), {})(DIM)
    called = []
    for name in ("layernorm_modulate", "gate_residual", "gate_residual_"):
        monkeypatch.setattr(ops, name, lambda *a, _n=name, **k: called.append(_n))
    with torch.set_grad_enabled(case == "autograd"):
        got, want = fused_cogvideox_block_forward(block, *inputs), block(*inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not called


def test_cogvideox_fused_block_under_compile_fullgraph():
    import functools

    block = cog_block(torch.bfloat16)
    inputs = cog_inputs(torch.bfloat16)
    compiled = torch.compile(functools.partial(fused_cogvideox_block_forward, block), fullgraph=True,
                             backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(*inputs), fused_cogvideox_block_forward(block, *inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# family -> (its step model's builder and inputs, its block class, the handle's summary key)
PATCHED = {
    "ltx": (models.build_ltx_transformer, models.ltx_transformer_inputs, LTXVideoTransformerBlock, BLOCK_SUMMARY),
    "ltx2": (models.build_ltx2_transformer, models.ltx2_transformer_inputs, "LTX2VideoTransformerBlock",
             "LTX2VideoTransformerBlock.forward -> fused glue"),
    "cogvideox": (models.build_cogvideox_transformer, models.cogvideox_transformer_inputs, CogVideoXBlock, COG_SUMMARY),
    "skyreels": (models.build_skyreels_transformer, models.skyreels_transformer_inputs, "SkyReelsV2TransformerBlock",
                 "SkyReelsV2TransformerBlock.forward -> fused glue"),
    "hunyuan": (models.build_hunyuan_transformer, models.hunyuan_transformer_inputs, "HunyuanVideoTransformerBlock",
                "HunyuanVideoTransformerBlock.forward -> fused glue"),
    "hunyuan-single": (models.build_hunyuan_transformer, models.hunyuan_transformer_inputs,
                       "HunyuanVideoSingleTransformerBlock", "HunyuanVideoSingleTransformerBlock.forward -> fused glue"),
    "framepack": (models.build_framepack_transformer, models.framepack_transformer_inputs,
                  "HunyuanVideoTransformerBlock", "HunyuanVideoTransformerBlock.forward -> fused glue"),
    "hunyuan15": (models.build_hunyuan15_transformer, models.hunyuan15_transformer_inputs,
                  "HunyuanVideo15TransformerBlock", "HunyuanVideo15TransformerBlock.forward -> fused glue"),
    "mochi": (models.build_mochi_transformer, models.mochi_transformer_inputs, "MochiTransformerBlock",
              "MochiTransformerBlock.forward -> fused glue"),
}
# the families whose fused glue rounds each op where diffusers does (in the tensors' own dtypes, or Mochi's fp32
# norms rounded per module), so it keeps diffusers' bits (LTX-2's: tests/test_ltx2.py)
NATIVE = ["ltx", "cogvideox", "hunyuan", "framepack", "hunyuan15", "mochi"]


@pytest.mark.parametrize("family", list(PATCHED))
def test_patch_installs_the_fused_blocks_and_undo_restores_them(family):
    build, make_inputs, block_class, summary = PATCHED[family]
    model = build("tiny", torch.bfloat16)
    inputs = make_inputs(model, "tiny", torch.bfloat16, "cpu")
    blocks = [m for m in model.modules() if type(m).__name__ == getattr(block_class, "__name__", block_class)]
    with torch.inference_mode():
        want = model(**inputs).sample
    with vkern.patch(model, vkern.PatchConfig(attention="sdpa")) as handle:  # each family's default
        assert handle.summary.get(summary, 0) == 2
    handle = vkern.patch(model, vkern.PatchConfig(attention="sdpa", fused_block=True))
    assert handle.summary[summary] == len(blocks) == 2
    assert all("forward" in b.__dict__ for b in blocks)
    with torch.inference_mode():
        assert rel_l2(model(**inputs).sample, want) < 0.02  # (bf16 rounding; the family tests bound it tightly)
    handle.undo()
    assert not any("forward" in b.__dict__ for b in blocks)
    with torch.inference_mode():
        assert torch.equal(model(**inputs).sample, want)
    with vkern.patch(model, vkern.PatchConfig(fused_block=False)) as handle:
        assert handle.summary[summary] == 0 and not any("forward" in b.__dict__ for b in blocks)


@pytest.mark.parametrize("family", NATIVE)
def test_fused_glue_keeps_diffusers_bits(family):
    """The glue's kernels with diffusers' attention and q/k ops (so only the glue differs), bf16: diffusers' output,
    bar a rare flipped rounding (the norms' fp32 sum order)."""
    build, make_inputs, _, summary = PATCHED[family]
    model = build("tiny", torch.bfloat16)
    inputs = make_inputs(model, "tiny", torch.bfloat16, "cpu")
    with torch.inference_mode():
        want = model(**inputs).sample
    with vkern.patch(model, vkern.PatchConfig(attention="reference", fused_qk_norm_rope=False)) as handle:
        assert handle.summary[summary] == 2
        with torch.inference_mode():
            got = model(**inputs).sample
    assert _backend.last_choice["layernorm_modulate"] == _backend.last_choice["gate_residual"] == "triton"
    assert_mostly_bitwise(got, want)


@pytest.mark.parametrize("family", ["hunyuan", "hunyuan-single", "hunyuan15"])
def test_hunyuan_hooked_norm_keeps_diffusers_forward(family):
    """A hook that changes a block's norm output: that block runs diffusers' forward, so the hook still applies."""
    build, make_inputs, block_class, _ = PATCHED[family]
    model = build("tiny", torch.float32)
    block = next(m for m in model.modules() if type(m).__name__ == block_class)
    norm = block.norm if family == "hunyuan-single" else block.norm2
    norm.register_forward_hook(lambda m, args, out: (out[0] * 2, *out[1:]) if isinstance(out, tuple) else out * 2)
    inputs = make_inputs(model, "tiny", torch.float32, "cpu")
    with torch.inference_mode():
        want = model(**inputs).sample
    with vkern.patch(model, vkern.PatchConfig(attention="reference", fused_qk_norm_rope=False)):
        with torch.inference_mode():
            got = model(**inputs).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_family_whose_glue_is_off_by_default_fuses_only_on_request(monkeypatch):
    """ProcessorAdapter(fused_by_default=False) (a family whose glue measured slower, as LTX-2's did before session
    43): fused_block=None leaves its blocks to diffusers, True fuses them, False never does."""
    from vkern.patch.ltx2 import ADAPTER

    monkeypatch.setattr(ADAPTER, "fused_by_default", False)
    build, _, _, summary = PATCHED["ltx2"]
    model = build("tiny", torch.bfloat16)
    for fused_block, fused in ((None, 0), (True, 2), (False, 0)):
        with vkern.patch(model, vkern.PatchConfig(attention="sdpa", fused_block=fused_block)) as handle:
            assert handle.summary.get(summary, 0) == fused
