"""Fused DiT block glue: the references equal diffusers' expressions bit for bit; the Triton kernels
match them (gate + residual bit for bit; LayerNorm + modulate within 2x PyTorch's own error and
almost everywhere bitwise); the fused Wan block equals diffusers' block (bitwise on the reference
backend, within 2x PyTorch's bf16 error on the kernels) and allocates no fp32 copy of the hidden
states and no full FFN intermediate."""
import copy

import pytest
import torch
import triton
import triton.language as tl
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vkern import ops
from vkern.modules.wan_attention import VkernWanAttnProcessor
from vkern.modules.wan_block import VkernWanBlock, _modulation, fused_block_forward
from vkern.ops import _backend
from vkern.reference import block_glue as ref
from vkern.triton._common import to_e4m3

from vkern.models import wan_rope_tables as wan_freqs
from .tolerance import assert_within_torch_error, poison

LOW = (torch.bfloat16, torch.float16)
EPS = 1e-6


def glue_inputs(B, S, D, dtype, per_token, device="cpu"):
    """Hidden states with a non-zero mean, a temb as Wan's time_proj makes it (x's dtype; per-token
    [B, S, 6, D] for Wan 2.2) and an fp32 scale_shift_table; `mods` are the six (chunk, table row) pairs."""
    x = (3 * torch.randn(B, S, D, device=device) + 1).to(dtype)
    temb = torch.randn((B, S, 6, D) if per_token else (B, 6, D), device=device).to(dtype)
    table = torch.randn(1, 6, D, device=device) / D**0.5
    return x, temb, table, _modulation(table, temb, B, S, D)


def diffusers_chunks(table, temb):
    """The six fp32 modulation tensors exactly as WanTransformerBlock.forward makes them."""
    if temb.ndim == 4:
        return [c.squeeze(2) for c in (table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    return list((table + temb.float()).chunk(6, dim=1))


def assert_mostly_bitwise(got, want, max_fraction=0.01):
    """The same computation as PyTorch's, up to fp32 summation order: at most max_fraction of the
    elements may round differently."""
    frac = (got != want).double().mean().item()
    assert frac <= max_fraction, f"{frac:.2%} of elements differ from PyTorch's result"


def assert_norm_like_torch(got, exact, want):
    """A fused norm kernel's result against PyTorch's (want) and a float64 oracle (exact). The fp32 mean of squares (or
    variance) is summed in another order than torch's (and 1 / sqrt, not rsqrt): an ulp of fp32 now and then, which a
    16-bit rounding rarely flips (and every later 16-bit op keeps the flip). So: as close to float64 as PyTorch is, and
    in 16 bits the same bits almost everywhere."""
    assert got.dtype == want.dtype
    assert_within_torch_error(got, exact, want)
    if want.dtype != torch.float32:
        assert_mostly_bitwise(got, want)


# --- references vs diffusers' own expressions -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [False, True], ids=["wan2.1", "wan2.2"])
def test_reference_is_diffusers_bitwise(dtype, per_token):
    B, S, D = 2, 33, 64
    x, temb, table, mods = glue_inputs(B, S, D, dtype, per_token)
    shift, scale, gate = diffusers_chunks(table, temb)[3:]  # the FFN's (c_shift, c_scale, c_gate)
    norm3 = FP32LayerNorm(D, EPS, elementwise_affine=False)
    want = (norm3(x.float()) * (1 + scale) + shift).type_as(x)
    got = ref.layernorm_modulate(x, mods[3][0], mods[4][0], EPS, shift_table=mods[3][1], scale_table=mods[4][1])
    assert torch.equal(got, want)

    norm2 = FP32LayerNorm(D, EPS, elementwise_affine=True)
    with torch.no_grad():
        norm2.weight.uniform_(0.5, 1.5), norm2.bias.normal_()
    assert torch.equal(ref.layernorm_modulate(x, None, None, EPS, norm2.weight, norm2.bias),
                       norm2(x.float()).type_as(x))

    # The attention residual multiplies y by the fp32 gate directly, the FFN one upcasts y first: the
    # same fp32 ops in the same order, so one reference serves both.
    y = torch.randn(B, S, D).to(dtype)
    attn_form = (x.float() + y * gate).type_as(x)
    ffn_form = (x.float() + y.float() * gate).type_as(x)
    assert torch.equal(attn_form, ffn_form)
    assert torch.equal(ref.gate_residual(x, y, *mods[5]), ffn_form)


# --- the kernels vs the references ------------------------------------------------------------------

def oracle_layernorm_modulate(x, shift, scale, weight=None, bias=None):
    """float64 throughout; shift/scale are (chunk, table row) pairs or None."""
    xd = x.double()
    y = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + EPS)
    if weight is not None:
        y = y * weight.double() + bias.double()
    if scale is not None:
        y = y * (1 + scale[1].double() + scale[0].double()) + shift[1].double() + shift[0].double()
    return y


# (B, S, D, mode): token counts 1, 113, 257 and dims 64, 96 between them, each mode at least once.
NORM_CASES = [(1, 1, 64, "wan2.1"), (2, 113, 96, "wan2.2"), (1, 257, 64, "wan2.1"), (1, 113, 96, "affine")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,S,D,mode", NORM_CASES)
def test_layernorm_modulate_kernel(device, dtype, B, S, D, mode):
    x, temb, table, mods = glue_inputs(B, S, D, dtype, mode == "wan2.2", device)
    if mode == "affine":  # norm2: LayerNorm with weight and bias, no modulation
        w, b = 1 + 0.5 * torch.randn(D, device=device), torch.randn(D, device=device)
        args, oracle_args = (x, None, None, EPS, w, b), (None, None, w, b)
    else:
        args = (x, mods[0][0], mods[1][0], EPS, None, None, mods[0][1], mods[1][1])
        oracle_args = (mods[0], mods[1])
    got = ops.layernorm_modulate(*args)
    assert _backend.last_choice["layernorm_modulate"] == "triton"
    want = ref.layernorm_modulate(*args)  # diffusers' numerics: PyTorch's own result in this dtype
    # Not bit-exact: the fp32 mean/variance are summed in another order than torch's LayerNorm
    # (Welford on CPU and CUDA), which moves the fp32 result by an ulp or so and, rarely, flips a
    # rounding to bf16/fp16 (by more than one output ulp where `+ shift` cancels). So: as close to
    # float64 as PyTorch (max and relative L2), and the same bits almost everywhere.
    assert_within_torch_error(got, oracle_layernorm_modulate(x, *oracle_args), want)
    if dtype in LOW:
        assert_mostly_bitwise(got, want)


# (B, S, D, mode, in_place)
GATE_CASES = [(1, 1, 64, "wan2.1", False), (2, 113, 96, "wan2.2", True), (1, 257, 64, "wan2.1", False),
              (2, 113, 64, "no table", True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,S,D,mode,in_place", GATE_CASES)
def test_gate_residual_kernel_is_bit_exact(device, dtype, B, S, D, mode, in_place):
    # Bit-exact by construction: the same three roundings as diffusers (fp32 product, fp32 sum, to x's
    # dtype) and no FMA contraction on the GPU (enable_fp_fusion=False).
    x, temb, table, mods = glue_inputs(B, S, D, dtype, mode == "wan2.2", device)
    gate = mods[2] if mode != "no table" else (torch.randn(B, 1, D, device=device), None)
    y = torch.randn(B, S, D, device=device).to(dtype)
    want = ref.gate_residual(x, y, *gate)
    if in_place:
        assert ops.gate_residual_(x, y, *gate) is x
        got = x
    else:
        got = ops.gate_residual(x, y, *gate)
    assert _backend.last_choice["gate_residual"] == "triton"
    assert torch.equal(got, want)


def test_non_contiguous_inputs(device):
    B, S, D, dtype = 2, 37, 96, torch.bfloat16
    wide = torch.randn(B, S, 3 * D, device=device).to(dtype)
    x = wide[..., D:2 * D]  # a slice of a fused projection: row stride 3D
    wide0 = wide.clone()
    _, temb, table, mods = glue_inputs(B, S, D, dtype, True, device)  # temb chunks: row stride 6D
    scale = (mods[1][0].contiguous(), mods[1][1])  # shift and scale with different strides
    y_t = torch.randn(S, B, D, device=device).to(dtype).transpose(0, 1)  # batch stride D
    y_strided = torch.randn(B, S, 2 * D, device=device).to(dtype)[..., ::2]  # last stride 2: copied once
    xc = x.contiguous()

    got = ops.layernorm_modulate(x, mods[0][0], scale[0], EPS, None, None, mods[0][1], scale[1])
    assert torch.equal(got, ops.layernorm_modulate(xc, mods[0][0].contiguous(), scale[0], EPS, None, None,
                                                   mods[0][1], scale[1]))
    for y in (y_t, y_strided):
        assert torch.equal(ops.gate_residual(x, y, *mods[2]), ref.gate_residual(xc, y, *mods[2]))
    # In place into a token slice of x, and into a tensor whose last stride is not 1.
    want = ref.gate_residual(xc[:, 5:30], y_t[:, 5:30], mods[2][0][:, 5:30], mods[2][1])
    ops.gate_residual_(x[:, 5:30], y_t[:, 5:30], mods[2][0][:, 5:30], mods[2][1])
    assert torch.equal(x[:, 5:30], want) and torch.equal(x[:, :5], xc[:, :5]) and torch.equal(x[:, 30:], xc[:, 30:])
    assert torch.equal(wide[..., :D], wide0[..., :D]) and torch.equal(wide[..., 2 * D:], wide0[..., 2 * D:])
    xs = torch.randn(B, S, 2 * D, device=device).to(dtype)[..., 1::2]
    want = ref.gate_residual(xs, y_t, *mods[2])
    ops.gate_residual_(xs, y_t, *mods[2])
    assert torch.equal(xs, want)


@pytest.mark.filterwarnings("ignore:vkern.ops")  # the one-time fallback warning for float64
@pytest.mark.parametrize("why", ["forced", "float64 x", "float64 gate"])
def test_reference_backend_when_forced_or_float64(monkeypatch, why):
    x, temb, table, mods = glue_inputs(1, 9, 64, torch.bfloat16, False)
    y, gate = torch.randn_like(x), mods[2]
    if why == "forced":
        monkeypatch.setenv("VKERN_BACKEND", "reference")
    elif why == "float64 x":  # no float64 kernel: the reference, with diffusers' own type promotion
        x, y = x.double(), y.double()
    else:
        gate = (gate[0].double(), gate[1])
    args = (x, mods[0][0], mods[1][0], EPS, None, None, mods[0][1], mods[1][1])
    assert torch.equal(ops.layernorm_modulate(*args), ref.layernorm_modulate(*args))
    assert torch.equal(ops.gate_residual(x, y, *gate), ref.gate_residual(x, y, *gate))
    assert _backend.last_choice["gate_residual"] == "reference"
    if why != "float64 gate":
        assert _backend.last_choice["layernorm_modulate"] == "reference"


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])  # aot_eager: fake impls + functionalized mutation
def test_ops_under_torch_compile_fullgraph(backend):
    x, temb, table, mods = glue_inputs(1, 17, 64, torch.bfloat16, True)
    y = torch.randn(1, 17, 64).to(torch.bfloat16)

    def glue(x, y, temb, table):
        m = _modulation(table, temb, 1, 17, 64)
        n = ops.layernorm_modulate(x, m[0][0], m[1][0], EPS, None, None, m[0][1], m[1][1])
        r = ops.gate_residual(x, n, *m[2])
        ops.gate_residual_(r[:, 3:9], y[:, 3:9], m[5][0][:, 3:9], m[5][1])
        return n, r

    compiled = torch.compile(glue, fullgraph=True, backend=backend)
    for got, want in zip(compiled(x, y, temb, table), glue(x, y, temb, table)):
        assert torch.equal(got, want)


X = torch.randn(2, 5, 64)
M = torch.randn(2, 1, 64)


@pytest.mark.parametrize("call,match", [
    (lambda: ops.layernorm_modulate(X[0], M, M, EPS), "^x: expected 3 dimensions"),
    (lambda: ops.layernorm_modulate(X.to(torch.complex64), M, M, EPS), "^x: expected dtype"),
    (lambda: ops.gate_residual_(X.int(), X, M), "^x: expected dtype"),
    (lambda: ops.layernorm_modulate(X, M[..., :63], M, EPS), "^shift: expected shape"),
    (lambda: ops.layernorm_modulate(X, torch.randn(3, 1, 64), M, EPS), "^shift: expected shape"),
    (lambda: ops.layernorm_modulate(X, M.to("meta"), M, EPS), "^shift: expected a tensor on cpu"),
    (lambda: ops.layernorm_modulate(X, M, torch.randn(2, 4, 64), EPS), "^scale: expected shape"),
    (lambda: ops.layernorm_modulate(X, M, None, EPS), "^shift: given without scale"),
    (lambda: ops.layernorm_modulate(X, M, torch.randn(2, 5, 64), EPS), "^shift, scale: expected the same shape"),
    (lambda: ops.layernorm_modulate(X, None, None, -1.0), "^eps:"),
    (lambda: ops.layernorm_modulate(X, None, None, EPS, torch.randn(32)), "^weight: expected shape"),
    (lambda: ops.layernorm_modulate(X, None, None, EPS, None, [0.0] * 64), "^bias: expected a torch.Tensor"),
    (lambda: ops.layernorm_modulate(X, None, None, EPS, shift_table=M[0, 0], scale_table=M[0, 0]),
     "^shift_table, scale_table: each needs its temb chunk"),
    (lambda: ops.layernorm_modulate(X, None, M, EPS, shift_table=M[0, 0]), "^shift_table, scale_table: each needs"),
    (lambda: ops.layernorm_modulate(X, M, M, EPS, shift_table=M[0, 0]), "^shift_table, scale_table: pass both"),
    (lambda: ops.gate_residual(X, X[:, :4], M), "^y: expected shape"),
    (lambda: ops.rms_gate_residual(X, X[:, :4], M, EPS), "^y: expected shape"),
    (lambda: ops.rms_gate_residual(X, X, M, -1.0), "^eps:"),
    (lambda: ops.rms_gate_residual_(X.bfloat16(), X, M, EPS), "^x: the result is torch.float32"),
    (lambda: ops.gate_residual(X, X.int(), M), "^y: expected dtype"),
    (lambda: ops.gate_residual(X, X, M[..., :1]), "^gate: expected shape"),
    (lambda: ops.gate_residual(X, X, M[0]), "^gate: expected 3 dimensions"),
    (lambda: ops.gate_residual_(X, X, M, torch.randn(1, 64)), "^gate_table: expected shape"),
    (lambda: ops.gate_residual(X, X, M, torch.randn(64).half().to(torch.float8_e4m3fn)), "^gate_table: expected dtype"),
    (lambda: ops.layernorm_modulate(X.double(), M, M, EPS, fp8=True), "^x: fp8=True needs"),
    (lambda: ops.layernorm_modulate(X, M[..., :63], M, EPS, fp8=True), "^shift: expected shape"),
    (lambda: ops.block_glue.gelu_tanh_fp8(X.int()), "^h: expected dtype"),
    (lambda: ops.block_glue.gelu_tanh_fp8(X.double()), "^h: expected dtype"),
    (lambda: ops.block_glue.gelu_tanh_fp8(X[0, 0, 0]), "^h: expected shape"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


@pytest.mark.parametrize("good,bad,match", [
    (lambda: ops.layernorm_modulate(X, None, None, 1.0), lambda: ops.layernorm_modulate(X, None, None, True), "^eps:"),
    (lambda: ops.gate_residual(X.bfloat16(), X, M, native_dtypes=True),
     lambda: ops.gate_residual_(X.bfloat16(), X, M, native_dtypes=True), "^x: the result is torch.float32"),
    (lambda: ops.rms_gate_residual(X.bfloat16(), X, M, EPS),
     lambda: ops.rms_gate_residual_(X.bfloat16(), X, M, EPS), "^x: the result is torch.float32"),
    (lambda: ops.rms_gate_residual(X, X, M, 1.0), lambda: ops.rms_gate_residual(X, X, M, True), "^eps:"),
], ids=["bool-eps", "gate-in-place", "rms-in-place", "rms-bool-eps"])
def test_a_call_that_passed_its_checks_does_not_let_a_bad_one_through(good, bad, match):
    """The checks are skipped for an argument signature that passed them before (the same tensors' shapes, dtypes
    and devices, the same other arguments); a call differing only in the form (in place) or in a value's type
    (True for 1.0) is another signature and still fails, every time."""
    good(), good()
    for _ in range(2):
        with pytest.raises((TypeError, ValueError), match=match):
            bad()


def test_checks_run_once_per_signature(monkeypatch):
    """A repeated signature skips the checks (the point: ~7 us of a glue call's host time); a new shape runs them."""
    from vkern.ops import block_glue

    calls = []
    check = block_glue._check_layernorm_modulate
    monkeypatch.setattr(block_glue, "_check_layernorm_modulate", lambda *a: calls.append(1) or check(*a))
    x = torch.randn(1, 3, 40)
    for _ in range(3):
        ops.layernorm_modulate(x, None, None, EPS)
    assert len(calls) == 1
    ops.layernorm_modulate(x[:, :2], None, None, EPS)
    assert len(calls) == 2


# --- the fused Wan block vs diffusers' WanTransformerBlock -----------------------------------------

DIM, HEADS, FFN = 64, 2, 160
B, S = 2, 37  # 74 token rows: FFN chunks of 16 leave 5 per batch element


def make_block(dtype, cross_attn_norm=True, dim=DIM, heads=HEADS, ffn=FFN, device="cpu"):
    """A WanTransformerBlock as from_pretrained(torch_dtype=dtype) leaves it (scale_shift_table and the
    norms in fp32), with a non-trivial norm2 affine so a dropped weight or bias cannot pass."""
    with torch.device(device):
        block = WanTransformerBlock(dim, ffn, heads, cross_attn_norm=cross_attn_norm)
    with torch.no_grad():
        if cross_attn_norm:
            block.norm2.weight.uniform_(0.5, 1.5), block.norm2.bias.normal_(0, 0.2)
    for name, p in block.named_parameters():
        keep = name.split(".")[0] in ("scale_shift_table", "norm1", "norm2", "norm3")
        p.data = p.data.to(torch.float32 if keep else dtype)
    return block.eval().requires_grad_(False)


def block_inputs(dtype, per_token, device="cpu", B=B, S=S, dim=DIM, heads=HEADS, text=7):
    """(hidden_states, encoder_hidden_states, temb, rotary_emb) in the model's dtype, temb [B, 6, D] or
    Wan 2.2's per-token [B, S, 6, D]."""
    x = torch.randn(B, S, dim, device=device).to(dtype)
    context = torch.randn(B, text, dim, device=device).to(dtype)
    temb = torch.randn((B, S, 6, dim) if per_token else (B, 6, dim), device=device).to(dtype)
    cos, sin = wan_freqs(S, dim // heads)
    return x, context, temb, (cos.to(device), sin.to(device))


def upcast(inputs):
    x, context, temb, rope = inputs
    return x.float(), context.float(), temb.float(), rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cross_attn_norm", [True, False])
@pytest.mark.parametrize("per_token", [False, True], ids=["wan2.1", "wan2.2"])
def test_fused_block_on_the_reference_backend_is_diffusers_bitwise(monkeypatch, dtype, cross_attn_norm, per_token):
    # The wiring (modulation chunks, which norm, residual order, in-place updates, the FFN through its
    # modules with an in-place GELU) is exactly diffusers' when the ops run their references.
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    block = make_block(dtype, cross_attn_norm)
    inputs = block_inputs(dtype, per_token)
    x0 = inputs[0].clone()
    with torch.no_grad():
        assert torch.equal(fused_block_forward(block, *inputs), block(*inputs))
    assert torch.equal(inputs[0], x0)  # the caller's hidden states are not written


def test_fused_block_calls_the_ffn_layers_as_modules(monkeypatch):
    # Fp8Linear (vkern's fp8 patch) in the FFN: the fused block runs the block's own layers.
    from vkern.modules.fp8_linear import Fp8Linear

    monkeypatch.setenv("VKERN_BACKEND", "reference")
    block = make_block(torch.bfloat16)
    block.ffn.net[0].proj = Fp8Linear.from_linear(block.ffn.net[0].proj)
    block.ffn.net[2] = Fp8Linear.from_linear(block.ffn.net[2])
    inputs = block_inputs(torch.bfloat16, False)
    with torch.no_grad():
        assert torch.equal(fused_block_forward(block, *inputs), block(*inputs))


FUSED_CASES = [  # (cross_attn_norm, per_token, ffn_chunk_size)
    (True, False, None), (True, True, 16), (False, False, 5), (False, True, None)]


@pytest.mark.parametrize("cross_attn_norm,per_token,chunk", FUSED_CASES)
def test_fused_block_fp32_matches_diffusers(cross_attn_norm, per_token, chunk):
    block = make_block(torch.float32, cross_attn_norm)
    inputs = block_inputs(torch.float32, per_token)
    with torch.no_grad():
        got, want = fused_block_forward(block, *inputs, ffn_chunk_size=chunk), block(*inputs)
    # fp32 LayerNorm statistics in another summation order, and GEMMs over chunks: fp32 rounding only.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cross_attn_norm,per_token,chunk", FUSED_CASES)
def test_fused_block_bf16_within_twice_torch_error(device, cross_attn_norm, per_token, chunk):
    block = make_block(torch.bfloat16, cross_attn_norm, device=device)
    oracle_block = copy.deepcopy(block).float()  # the same weights, every op in fp32
    inputs = block_inputs(torch.bfloat16, per_token, device)
    with torch.no_grad():
        got = fused_block_forward(block, *inputs, ffn_chunk_size=chunk)
        want, oracle = block(*inputs), oracle_block(*upcast(inputs))
    assert_within_torch_error(got, oracle.double(), want, what="block output")


def test_fused_block_composes_with_vkern_attention():
    block = make_block(torch.bfloat16)
    oracle_block = copy.deepcopy(block).float()
    for attn in (block.attn1, block.attn2):
        attn.set_processor(VkernWanAttnProcessor())
    inputs = block_inputs(torch.bfloat16, True, B=1, S=21)
    with torch.no_grad():
        got = fused_block_forward(block, *inputs, ffn_chunk_size=8)
        want, oracle = block(*inputs), oracle_block(*upcast(inputs))  # diffusers' glue, vkern's attention
    assert _backend.last_choice["qk_norm_rope"] == "triton"
    assert_within_torch_error(got, oracle.double(), want, what="block output")


class AllocationProbe(TorchDispatchMode):
    """Records (dtype, shape, op) of every tensor produced outside the block's attention modules (the
    attention processor is another issue's business). A custom op is seen as one call: vkern's fused
    ops show their output and nothing else, as on the GPU where the kernel allocates nothing."""

    def __init__(self, block):
        super().__init__()
        self.seen, self.paused = [], False
        for attn in (getattr(block, name) for name in ("attn1", "attn2") if hasattr(block, name)):
            attn.register_forward_pre_hook(lambda *_: setattr(self, "paused", True))
            attn.register_forward_hook(lambda *_: setattr(self, "paused", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            inputs = {t.untyped_storage().data_ptr() for t in tensors}
            for t in tree_leaves(out):  # new storage only: views (select, slice, ...) allocate nothing
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.seen.append((t.dtype, t.numel(), t.shape[-1] if t.dim() else 0, str(func)))
        return out

    def largest(self, dtype=None, width=None):
        return max([n for d, n, w, _ in self.seen if (dtype is None or d == dtype) and (width is None or w == width)],
                   default=0)


@pytest.mark.parametrize("per_token", [False, True], ids=["wan2.1", "wan2.2"])
def test_fused_block_allocates_no_fp32_hidden_states_and_no_full_ffn_intermediate(per_token):
    block = make_block(torch.bfloat16)
    inputs = block_inputs(torch.bfloat16, per_token)
    chunk, rows = 16, B * S
    with torch.no_grad():
        probe = AllocationProbe(block)
        with probe:
            block(*inputs)
        # The probe sees what diffusers allocates: fp32 copies of the hidden states (and, for Wan 2.2,
        # of the 6x larger temb) and the whole [tokens, ffn_dim] intermediate.
        assert probe.largest(torch.float32) >= rows * DIM * (6 if per_token else 1)
        assert probe.largest(width=FFN) == rows * FFN

        probe = AllocationProbe(block)
        with probe:
            fused_block_forward(block, *inputs, ffn_chunk_size=chunk)
    # The probe saw the fused ops, running their kernels (a reference backend would hide fp32 inside).
    assert any("vkern.layernorm_modulate" in op for *_, op in probe.seen)
    assert _backend.last_choice["layernorm_modulate"] == _backend.last_choice["gate_residual"] == "triton"
    assert probe.largest(torch.float32) == 0  # no fp32 tensor at all outside attention
    assert probe.largest(width=FFN) == chunk * FFN


def test_module_wrapper_shares_the_block_and_runs_the_fused_forward():
    block = make_block(torch.bfloat16)
    mod = VkernWanBlock.from_diffusers(block, ffn_chunk_size=16)
    assert [id(p) for p in mod.parameters()] == [id(p) for p in block.parameters()]
    assert list(mod.state_dict()) == list(block.state_dict())
    inputs = block_inputs(torch.bfloat16, False, S=9)
    with torch.inference_mode():
        assert torch.equal(mod(*inputs), fused_block_forward(block, *inputs, ffn_chunk_size=16))
    assert "ffn_chunk_size=16" in repr(mod)


@pytest.mark.parametrize("make,match", [
    (lambda b: VkernWanBlock.from_diffusers(b.ffn), "^block: expected a diffusers WanTransformerBlock"),
    (lambda b: VkernWanBlock.from_diffusers(b, ffn_chunk_size=0), "^ffn_chunk_size:"),
    (lambda b: VkernWanBlock.from_diffusers(b, ffn_chunk_size=True), "^ffn_chunk_size:"),
    (lambda b: (b.register_forward_hook(lambda *a: None), VkernWanBlock.from_diffusers(b)),
     "^block: has forward hooks"),
    (lambda b: fused_block_forward(b, *block_inputs(torch.bfloat16, False)[:2], torch.zeros(B, 5, DIM), None),
     r"^temb: expected shape \(2, 6, 64\) or \(2, 37, 6, 64\)"),
])
def test_module_bad_input(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make(make_block(torch.bfloat16))


def test_autograd_runs_diffusers_forward():
    # The fused ops have no backward: with autograd recording, the block is diffusers' own forward.
    block = make_block(torch.float32).requires_grad_(True)
    inputs = block_inputs(torch.float32, False, S=9)
    got = fused_block_forward(block, *inputs, ffn_chunk_size=4)
    assert got.grad_fn is not None and torch.equal(got, block(*inputs))


@pytest.mark.parametrize("leaf", [1, 2], ids=["text", "temb"])
def test_autograd_through_the_text_or_temb_alone_runs_diffusers_forward(leaf):
    # A frozen block whose hidden states need no grad, but whose text (prompt tuning) or temb does: the fused ops
    # would drop the FFN's share of the text's gradient without a word, and fail on temb's.
    block = make_block(torch.float32)
    inputs = list(block_inputs(torch.float32, False, S=9))
    grads = []
    for forward in (lambda *a: fused_block_forward(block, *a, ffn_chunk_size=4), block):
        x = inputs[leaf].clone().requires_grad_(True)
        forward(*inputs[:leaf], x, *inputs[leaf + 1:]).square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(*grads)


def assert_compiled_block_equals_eager(block):
    """fused_block_forward under torch.compile(fullgraph=True) equals eager bit for bit (Wan 2.2 temb)."""
    inputs = block_inputs(torch.bfloat16, True, S=9)
    compiled = torch.compile(fused_block_forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = fused_block_forward(block, *inputs, 4)
        assert torch.equal(compiled(block, *inputs, ffn_chunk_size=4), want)
        # overwrite_input: an input mutation, which the compiled graph writes back into the caller's tensor.
        mine = inputs[0].clone()
        assert torch.equal(compiled(block, mine, *inputs[1:], ffn_chunk_size=4, overwrite_input=True), want)
        assert torch.equal(mine, want)


def test_fused_block_under_torch_compile_fullgraph():
    assert_compiled_block_equals_eager(make_block(torch.bfloat16))


# --- GPU, at Wan 14B sizes (480p: 32760 tokens, dim 5120, 40 heads, ffn 13824) ---------------------

@pytest.mark.gpu
@pytest.mark.parametrize("per_token", [False, True], ids=["wan2.1", "wan2.2"])
def test_gpu_wan14b_glue_ops(per_token):
    x, temb, table, mods = glue_inputs(1, 32760, 5120, torch.bfloat16, per_token, "cuda")
    args = (x, mods[0][0], mods[1][0], EPS, None, None, mods[0][1], mods[1][1])
    got = ops.layernorm_modulate(*args)
    assert _backend.last_choice["layernorm_modulate"] == "triton"
    want = ref.layernorm_modulate(*args)
    assert_within_torch_error(got, oracle_layernorm_modulate(x, mods[0], mods[1]), want)
    assert_mostly_bitwise(got, want)
    # Gate + residual: bit-exact with PyTorch's CUDA ops too (no FMA contraction in the kernel).
    y = torch.randn_like(x)
    want = ref.gate_residual(x, y, *mods[2])
    assert torch.equal(ops.gate_residual(x, y, *mods[2]), want)
    assert torch.equal(ops.gate_residual_(x, y, *mods[2]), want)


def cuda_peak(fn):
    """(fn(), the peak bytes allocated during it over what was allocated before)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
def test_gpu_wan14b_block_within_twice_torch_error_and_smaller_peak():
    dim, heads, ffn, S = 5120, 40, 13824, 32760
    block = make_block(torch.bfloat16, True, dim, heads, ffn, device="cuda")
    inputs = block_inputs(torch.bfloat16, False, "cuda", B=1, S=S, dim=dim, heads=heads, text=512)

    with torch.no_grad():
        want, peak_diffusers = cuda_peak(lambda: block(*inputs))
        got, peak_fused = cuda_peak(lambda: fused_block_forward(block, *inputs, ffn_chunk_size=4096))
        oracle = copy.deepcopy(block).float()(*upcast(inputs))
    assert_within_torch_error(got, oracle.double(), want, what="block output")
    # diffusers holds fp32 copies of the hidden states and two [tokens, ffn] bf16 buffers (1.8 GB)
    # at its FFN; the fused block holds neither. Its peak may be the attention's, so only "not more".
    print(f"peak activation memory: diffusers {peak_diffusers / 2**30:.2f} GiB, fused {peak_fused / 2**30:.2f} GiB")
    assert peak_fused <= peak_diffusers


# --- fp8 outputs: LayerNorm + modulate and tanh GELU emitting e4m3 + per-token scales ---------------

def sqnr_db(signal, noisy):
    signal, noisy = signal.double(), noisy.double()
    return (10 * torch.log10(signal.pow(2).sum() / (signal - noisy).pow(2).sum())).item()


def dequant(q, s):
    return q.double() * s.double()


def bits(q):
    return q.view(torch.uint8)


# Per-token e4m3 of a LayerNorm-ish or GELU row keeps ~30 dB (3 mantissa bits: about 2**-4.5 relative
# RMS error for the bulk of values); 25 dB is the floor stated for these paths (as for Fp8Linear compute).
FP8_SQNR_FLOOR_DB = 25.0


# Fewer rows than NORM_CASES: each row is one interpreted program on the CPU.
FP8_NORM_CASES = [(1, 1, 64, "wan2.1"), (2, 37, 96, "wan2.2"), (1, 45, 64, "affine")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,S,D,mode", FP8_NORM_CASES)
def test_layernorm_modulate_fp8_is_its_own_output_quantized_bitwise(device, dtype, B, S, D, mode):
    """fp8=True: the kernel's own rounded result quantized by vkern's per-token quantizer, bit for bit
    (codes and scales), in one pass; within the fp8 SQNR floor of the float64 LayerNorm."""
    x, temb, table, mods = glue_inputs(B, S, D, dtype, mode == "wan2.2", device)
    if mode == "affine":
        w, b = 1 + 0.5 * torch.randn(D, device=device), torch.randn(D, device=device)
        args, oracle_args = (x, None, None, EPS, w, b), (None, None, w, b)
    else:
        args = (x, mods[0][0], mods[1][0], EPS, None, None, mods[0][1], mods[1][1])
        oracle_args = (mods[0], mods[1])
    q, s = ops.layernorm_modulate(*args, fp8=True)
    assert _backend.last_choice["layernorm_modulate"] == "triton"
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and tuple(s.shape) == (B, S, 1)
    want_q, want_s = ops.fp8_quantize(ops.layernorm_modulate(*args), "row")
    assert torch.equal(bits(q), bits(want_q)) and torch.equal(s, want_s)
    assert sqnr_db(oracle_layernorm_modulate(x, *oracle_args), dequant(q, s)) >= FP8_SQNR_FLOOR_DB
    # vs the reference (PyTorch's LayerNorm, then the quantizer): the same up to the LayerNorm's own
    # rare last-bit differences (test_layernorm_modulate_kernel)
    ref_q, ref_s = ref.layernorm_modulate_fp8(*args)
    assert_mostly_bitwise(bits(q), bits(ref_q), max_fraction=0.02)


def test_layernorm_modulate_fp8_writes_every_element_and_propagates_nan():
    from vkern.ops.block_glue import norm_rounding
    from vkern.triton import block_glue as kernels

    B, S, D = 2, 19, 96
    x, temb, table, mods = glue_inputs(B, S, D, torch.bfloat16, False)
    x[1, 3, 7] = float("nan")  # that token's row is NaN after the LayerNorm: NaN codes and a NaN scale
    args = (x, mods[0][0], mods[1][0], EPS, None, None, mods[0][1], mods[1][1])
    q = torch.full((B, S, D), float("nan")).to(torch.float8_e4m3fn)  # poisoned: 0x7f everywhere
    s = poison(torch.empty(B, S, 1))
    kernels.layernorm_modulate(*args, q, norm_rounding(x, mods[1][0], mods[1][1], False), q_scale=s)
    want_q, want_s = ref.layernorm_modulate_fp8(*args)
    assert torch.equal(bits(q), bits(want_q.contiguous())) or \
        (bits(q) != bits(want_q)).double().mean().item() <= 0.01
    assert torch.isnan(s[1, 3]).all() and torch.isnan(q[1, 3].float()).all()
    good = torch.ones(B, S, dtype=torch.bool)
    good[1, 3] = False
    assert torch.isfinite(s[good]).all() and torch.isfinite(q[good].float()).all()
    torch.testing.assert_close(s[good], want_s[good], rtol=2**-7, atol=0)


GELU_CASES = [(1, 16), (37, 113), (8, 4097)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,N", GELU_CASES)
def test_gelu_tanh_fp8_kernel(device, dtype, M, N):
    """GELU(tanh) + per-row quantization in one pass vs PyTorch's F.gelu then vkern's quantizer: equal up
    to tanh's last ulp (rare single-code differences, a scale off by at most one ulp of x's dtype), and
    within the fp8 SQNR floor of the float64 GELU."""
    from vkern.ops.block_glue import gelu_tanh_fp8

    h = (2.5 * torch.randn(M, N, device=device)).to(dtype)
    h[0, :3] = torch.tensor([-12.0, 0.0, 12.0])  # saturating tanh both ways, and zero
    q, s = gelu_tanh_fp8(h)
    assert _backend.last_choice["gelu_tanh_fp8"] == "triton"
    want_q, want_s = ref.gelu_tanh_fp8(h)
    ulp = torch.finfo(dtype).eps  # relative spacing at the bottom of a binade is 2 eps
    torch.testing.assert_close(s, want_s, rtol=2 * ulp, atol=0)
    same_scale = (s == want_s).squeeze(-1)
    assert same_scale.double().mean().item() >= 0.9
    # where the scales agree, a differing code is one e4m3 step away (one tanh ulp moved a rounding)
    dq, dw = dequant(q, s)[same_scale], dequant(want_q, want_s)[same_scale]
    step = torch.maximum(dw.abs(), dq.abs()) * 2**-3 + 2**-9 * s.double().expand_as(q)[same_scale]
    assert ((dq - dw).abs() <= step).all()
    assert (bits(q) != bits(want_q)).double().mean().item() <= 0.01
    oracle = torch.nn.functional.gelu(h.double(), approximate="tanh")
    assert sqnr_db(oracle, dequant(q, s)) >= FP8_SQNR_FLOOR_DB
    assert sqnr_db(oracle, dequant(q, s)) >= sqnr_db(oracle, dequant(want_q, want_s)) - 0.1


def test_gelu_tanh_fp8_row_strided_input_and_nan():
    from vkern.ops.block_glue import gelu_tanh_fp8

    h = torch.randn(21, 2 * 64, dtype=torch.bfloat16)[:, :64]  # rows of a wider buffer
    h[4, 5] = float("nan")
    q, s = gelu_tanh_fp8(h)
    want_q, want_s = ref.gelu_tanh_fp8(h)
    assert torch.isnan(s[4]).all() and torch.isnan(q[4, 5].float())
    keep = torch.arange(21) != 4
    assert torch.equal(s[keep], want_s[keep]) or (s[keep] != want_s[keep]).double().mean() <= 0.1
    assert tuple(q.shape) == (21, 64) and q.is_contiguous()


@triton.jit
def _e4m3_kernel(v_ptr, q_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(q_ptr + i, to_e4m3(tl.load(v_ptr + i, mask=i < n), True), mask=i < n)


def test_e4m3_emulation_rounds_like_torch(device):
    """The interpreter's stand-in for cvt.rn.satfinite (integer arithmetic, so it runs on the GPU too):
    every e4m3 value, the midpoints between neighbours (ties to even), one fp32 ulp either side, signed
    zeros and NaN, against torch's fp32 -> e4m3 cast."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values) & (values.abs() <= 448)].unique()
    mids = (values[1:] + values[:-1]) / 2
    v = torch.cat([values, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                   torch.tensor([0.0, -0.0, float("nan"), 2.0**-10, -(2.0**-10), 3 * 2.0**-11, 1e-30])])
    v = v.to(device)
    q = torch.empty(v.shape, dtype=torch.float8_e4m3fn, device=device)
    _e4m3_kernel[(triton.cdiv(v.numel(), 1024),)](v, q, v.numel(), BLOCK=1024)
    want = v.to(torch.float8_e4m3fn)
    nan = torch.isnan(v)
    assert torch.equal(bits(q)[~nan], bits(want)[~nan])
    assert torch.isnan(q[nan].float()).all()


# --- the fused block in fp8 compute mode -----------------------------------------------------------

def fp8_compute_block(block=None, fused_qkv=False):
    """A block (make_block's by default) with vkern's processor and every attention/FFN Linear an fp8
    compute-mode Fp8Linear, as vkern.patch(model, PatchConfig(fp8="compute")) leaves a Wan block."""
    from vkern.modules.fp8_linear import Fp8Linear

    block = make_block(torch.bfloat16) if block is None else block
    for attn in (block.attn1, block.attn2):
        attn.set_processor(VkernWanAttnProcessor())
    if fused_qkv:
        block.attn1.fuse_projections()
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, Fp8Linear.from_linear(child, "compute"))
    return block


class OpLog(TorchDispatchMode):
    """Counts the vkern custom ops a forward runs (a dispatch mode sees each custom op as one call)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("vkern."):
            self.calls[name[6:]] = self.calls.get(name[6:], 0) + 1
        return func(*args, **(kwargs or {}))


def no_fusion(monkeypatch):
    """Producers emit bf16 and every fp8 Linear quantizes its own input (the path before the fusion)."""
    from vkern.modules.fp8_linear import Fp8Linear

    monkeypatch.setattr(Fp8Linear, "accepts_fp8_input", property(lambda self: False))


@pytest.mark.parametrize("fused_qkv,per_token,chunk", [(False, False, None), (True, True, 5)],
                         ids=["q,k,v-wan2.1", "to_qkv-wan2.2-chunked"])
def test_fused_block_fp8_compute_has_no_quantization_pass_and_equals_the_unfused_path(monkeypatch, fused_qkv,
                                                                                   per_token, chunk):
    """attn1's q/k/v (or to_qkv), attn2's q and the FFN's up projection read the LayerNorm kernel's e4m3
    output, the FFN's down projection the GELU kernel's: no fp8_quantize anywhere except for the Linears
    whose inputs vkern does not produce (attn2's k/v on the text, the to_out projections). With the
    GELU on the reference (PyTorch's GELU then the quantizer), the output is bit-identical to the
    unfused path; with the GELU kernel, equal up to tanh's last ulp."""
    from vkern.ops import block_glue as glue_ops

    block = fp8_compute_block(fused_qkv=fused_qkv)
    S_ = 13
    inputs = block_inputs(torch.bfloat16, per_token, S=S_)
    with torch.no_grad():
        log = OpLog()
        with log:
            fused = fused_block_forward(block, *inputs, ffn_chunk_size=chunk)
        chunks = 1 if chunk is None else -(-S_ // chunk) * B
        proj = 1 if fused_qkv else 3
        assert log.calls.get("layernorm_modulate_fp8") == 2 + chunks  # norm1, norm2, norm3 per chunk
        assert log.calls.get("gelu_tanh_fp8") == chunks
        assert log.calls.get("fp8_linear_prequantized") == proj + 1 + 2 * chunks
        # the rest quantize their own input: attn1/attn2 to_out, attn2 k and v (on the text)
        assert log.calls.get("fp8_linear_compute") == 4
        assert "fp8_quantize" not in log.calls and "layernorm_modulate" not in log.calls

        monkeypatch.setattr(glue_ops, "gelu_tanh_fp8", ref.gelu_tanh_fp8)
        exact = fused_block_forward(block, *inputs, ffn_chunk_size=chunk)
        no_fusion(monkeypatch)
        unfused = fused_block_forward(block, *inputs, ffn_chunk_size=chunk)
    assert torch.equal(exact, unfused)
    assert (fused != unfused).double().mean().item() <= 0.02
    assert sqnr_db(unfused, fused) >= 40  # tanh ulps, far below the fp8 noise itself


@pytest.mark.parametrize("per_token", [False, True], ids=["wan2.1", "wan2.2"])
def test_fused_block_fp8_compute_sqnr_floor_vs_fp32_diffusers(per_token):
    """End to end against diffusers' block in fp32 (same weights, unquantized): the fp8 compute block
    keeps the SQNR floor of one fp8 layer stack, and the fusion costs nothing measurable beside it."""
    block = make_block(torch.bfloat16)
    oracle_block = copy.deepcopy(block).float()
    fp8_block = fp8_compute_block(copy.deepcopy(block))
    inputs = block_inputs(torch.bfloat16, per_token, S=21)
    with torch.no_grad():
        oracle = oracle_block(*upcast(inputs))
        got = fused_block_forward(fp8_block, *inputs, ffn_chunk_size=8)
    # the residual stream carries x itself, so compare the block's update (output - input)
    delta_oracle, delta = oracle.double() - inputs[0].double(), got.double() - inputs[0].double()
    assert sqnr_db(delta_oracle, delta) >= 20.0


def test_fp8_activation_only_where_every_consumer_takes_it():
    """A hook on a projection, a storage-mode layer among q/k/v, or diffusers' own processor: the
    LayerNorm emits bf16 for that attention, and the block still runs."""
    from vkern.modules.wan_block import _attention_takes_fp8_input
    from vkern.modules.feed_forward import ffn_takes_fp8_input

    block = fp8_compute_block()
    assert _attention_takes_fp8_input(block.attn1) and _attention_takes_fp8_input(block.attn2, cross=True)
    assert ffn_takes_fp8_input(block.ffn)
    handle = block.attn1.to_k.register_forward_pre_hook(lambda *a: None)
    assert not _attention_takes_fp8_input(block.attn1)
    handle.remove()
    block.attn1.to_v.mode = "storage"
    assert not _attention_takes_fp8_input(block.attn1)
    block.attn1.to_v.mode = "compute"
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    block.attn2.set_processor(WanAttnProcessor())
    assert not _attention_takes_fp8_input(block.attn2, cross=True)

    class ReadsHiddenStates(VkernWanAttnProcessor):
        accepts_fp8_hidden_states = False  # a processor that needs the tensor itself opts out
    block.attn1.set_processor(ReadsHiddenStates())
    assert not _attention_takes_fp8_input(block.attn1)
    block.ffn.net[0].register_forward_hook(lambda *a: None)
    assert not ffn_takes_fp8_input(block.ffn)
    inputs = block_inputs(torch.bfloat16, False, S=9)
    with torch.no_grad():
        log = OpLog()
        with log:
            fused_block_forward(block, *inputs)
    assert log.calls.get("layernorm_modulate_fp8") is None and log.calls.get("layernorm_modulate") == 3


def test_fused_block_fp8_compute_under_torch_compile_fullgraph():
    assert_compiled_block_equals_eager(fp8_compute_block())


# --- GPU, fp8 outputs at Wan sizes ------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("per_token", [False, True], ids=["wan2.1", "wan2.2"])
def test_gpu_wan14b_layernorm_fp8_bit_exact_with_the_cuda_quantizer(per_token):
    """The Triton kernel's in-register quantization equals csrc/fp8_quant.cu on the kernel's bf16 output
    bit for bit (cvt.rn.satfinite on both sides, scale = amax * fp32(1/448), IEEE 1/scale)."""
    x, temb, table, mods = glue_inputs(1, 32760, 5120, torch.bfloat16, per_token, "cuda")
    args = (x, mods[0][0], mods[1][0], EPS, None, None, mods[0][1], mods[1][1])
    q, s = ops.layernorm_modulate(*args, fp8=True)
    y = ops.layernorm_modulate(*args)
    want_q, want_s = ops.fp8_quantize(y, "row")
    assert _backend.last_choice["fp8_quantize"] == "cuda"
    codes, rows = (bits(q) != bits(want_q)), (s != want_s).squeeze(-1)
    where = codes.nonzero()[:4].tolist()
    detail = [(i, float(y[tuple(i)]), float(s[tuple(i[:-1])]), float(want_s[tuple(i[:-1])]),
               int(bits(q)[tuple(i)]), int(bits(want_q)[tuple(i)])) for i in where]
    assert not codes.any() and not rows.any(), (
        f"{codes.sum().item()} codes and {rows.sum().item()} scales differ; (index, bf16 value, scale, CUDA "
        f"scale, code, CUDA code): {detail}")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N", [(4096, 13824), (4096, 8960), (113, 4097)])
def test_gpu_gelu_tanh_fp8_vs_torch_gelu_then_cuda_quantizer(M, N):
    """libdevice tanhf is the tanhf PyTorch's GELU kernel calls: expected bit-exact or nearly (FMA
    contraction choices may differ between nvcc and Triton)."""
    from vkern.ops.block_glue import gelu_tanh_fp8

    h = (2.5 * torch.randn(M, N, device="cuda")).to(torch.bfloat16)
    q, s = gelu_tanh_fp8(h)
    want_q, want_s = ops.fp8_quantize(torch.nn.functional.gelu(h, approximate="tanh"), "row")
    frac = (bits(q) != bits(want_q)).double().mean().item()
    rows = (s != want_s).double().mean().item()
    print(f"gelu_tanh_fp8 {M}x{N}: {frac:.2e} of codes and {rows:.2e} of scales differ from torch + CUDA quantizer")
    assert frac <= 1e-3 and rows <= 1e-2
    torch.testing.assert_close(s, want_s, rtol=2**-7, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("fused_qkv", [False, True], ids=["q,k,v", "to_qkv"])
def test_gpu_wan14b_block_fp8_compute_fused_equals_unfused(monkeypatch, fused_qkv):
    """Wan-14B block (dim 5120, 40 heads, ffn 13824) at 4096 tokens in fp8 compute mode on cuBLASLt:
    the fused quantization changes the output only by tanh ulps in the FFN, and the fp8 block keeps
    its SQNR floor against the fp32 block."""
    dim, heads, ffn, S_ = 5120, 40, 13824, 4096
    block = make_block(torch.bfloat16, True, dim, heads, ffn, device="cuda")
    oracle_block = copy.deepcopy(block).float()
    block = fp8_compute_block(block, fused_qkv)
    inputs = block_inputs(torch.bfloat16, False, "cuda", B=1, S=S_, dim=dim, heads=heads, text=512)
    with torch.no_grad():
        fused = fused_block_forward(block, *inputs, ffn_chunk_size=2048)
        assert _backend.last_choice["fp8_linear_compute"] == "scaled_mm"
        oracle = oracle_block(*upcast(inputs))
        no_fusion(monkeypatch)
        unfused = fused_block_forward(block, *inputs, ffn_chunk_size=2048)
    assert sqnr_db(unfused, fused) >= 40
    x = inputs[0].double()
    assert sqnr_db(oracle.double() - x, fused.double() - x) >= 20.0
