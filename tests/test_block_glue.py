"""Fused DiT block glue: the references equal diffusers' expressions bit for bit; the Triton kernels
match them (gate + residual bit for bit; LayerNorm + modulate within 2x PyTorch's own error and
almost everywhere bitwise); the fused Wan block equals diffusers' block (bitwise on the reference
backend, within 2x PyTorch's bf16 error on the kernels) and allocates no fp32 copy of the hidden
states and no full FFN intermediate."""
import copy

import pytest
import torch
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vkern import ops
from vkern.modules.wan_attention import VkernWanAttnProcessor
from vkern.modules.wan_block import VkernWanBlock, _modulation, fused_block_forward
from vkern.ops import _backend
from vkern.reference import block_glue as ref

from vkern.models import wan_rope_tables as wan_freqs
from .tolerance import assert_within_torch_error

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
    (lambda: ops.layernorm_modulate(X, M, None, EPS), "^shift, scale: pass both"),
    (lambda: ops.layernorm_modulate(X, M, torch.randn(2, 5, 64), EPS), "^shift, scale: expected the same shape"),
    (lambda: ops.layernorm_modulate(X, None, None, -1.0), "^eps:"),
    (lambda: ops.layernorm_modulate(X, None, None, EPS, torch.randn(32)), "^weight: expected shape"),
    (lambda: ops.layernorm_modulate(X, None, None, EPS, None, [0.0] * 64), "^bias: expected a torch.Tensor"),
    (lambda: ops.layernorm_modulate(X, None, None, EPS, shift_table=M[0, 0], scale_table=M[0, 0]),
     "^shift_table, scale_table: given without"),
    (lambda: ops.layernorm_modulate(X, M, M, EPS, shift_table=M[0, 0]), "^shift_table, scale_table: pass both"),
    (lambda: ops.gate_residual(X, X[:, :4], M), "^y: expected shape"),
    (lambda: ops.gate_residual(X, X.int(), M), "^y: expected dtype"),
    (lambda: ops.gate_residual(X, X, M[..., :1]), "^gate: expected shape"),
    (lambda: ops.gate_residual(X, X, M[0]), "^gate: expected 3 dimensions"),
    (lambda: ops.gate_residual_(X, X, M, torch.randn(1, 64)), "^gate_table: expected shape"),
    (lambda: ops.gate_residual(X, X, M, torch.randn(64).half().to(torch.float8_e4m3fn)), "^gate_table: expected dtype"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


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
        for attn in (block.attn1, block.attn2):
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


def test_fused_block_under_torch_compile_fullgraph():
    block = make_block(torch.bfloat16)
    inputs = block_inputs(torch.bfloat16, True, S=9)
    compiled = torch.compile(fused_block_forward, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(block, *inputs, ffn_chunk_size=4), fused_block_forward(block, *inputs, 4))


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


@pytest.mark.gpu
def test_gpu_wan14b_block_within_twice_torch_error_and_smaller_peak():
    dim, heads, ffn, S = 5120, 40, 13824, 32760
    block = make_block(torch.bfloat16, True, dim, heads, ffn, device="cuda")
    inputs = block_inputs(torch.bfloat16, False, "cuda", B=1, S=S, dim=dim, heads=heads, text=512)

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    with torch.no_grad():
        want, peak_diffusers = peak(lambda: block(*inputs))
        got, peak_fused = peak(lambda: fused_block_forward(block, *inputs, ffn_chunk_size=4096))
        oracle = copy.deepcopy(block).float()(*upcast(inputs))
    assert_within_torch_error(got, oracle.double(), want, what="block output")
    # diffusers holds fp32 copies of the hidden states and two [tokens, ffn] bf16 buffers (1.8 GB)
    # at its FFN; the fused block holds neither. Its peak may be the attention's, so only "not more".
    print(f"peak activation memory: diffusers {peak_diffusers / 2**30:.2f} GiB, fused {peak_fused / 2**30:.2f} GiB")
    assert peak_fused <= peak_diffusers
