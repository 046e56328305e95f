"""The fused QK prologue (RMSNorm across heads, or per head, + interleaved RoPE) against the reference, which
tests/test_wan_reference.py ties to diffusers (and test_per_head_norm_is_hunyuans to HunyuanVideo's ops). On the CPU
the Triton kernel runs interpreted."""
import pytest
import torch

from vkern import ops
from vkern.models import wan_rope_tables as wan_freqs
from vkern.reference import attention as ref

from .tolerance import assert_within_torch_error, rel_l2


def prologue_inputs(B, S, H, D, dtype, device, fused_qkv=True):
    width = 3 * H * D if fused_qkv else H * D
    x = torch.randn(B, S, width, device=device).to(dtype)[..., : H * D]  # a slice of a fused QKV output
    w = (1 + 0.1 * torch.randn(H * D, device=device)).to(dtype)
    return x, w


@pytest.mark.parametrize("S", [1, 113, 257])
@pytest.mark.parametrize("H,D", [(2, 64), (3, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_exactly_on_cpu(S, H, D, dtype):
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check; the GPU test below covers the compiled kernel")
    x, w = prologue_inputs(2, S, H, D, dtype, "cpu")
    cos, sin = wan_freqs(S, D)
    out = ops.qk_norm_rope(x, w, 1e-6, H, cos, sin)
    assert ops._backend.last_choice["qk_norm_rope"] == "triton"
    # Same rounding points as torch (fp32 math, one rounding after the weight, fp32 rotation):
    # bit-exact except where fp32 vs float64 rotation straddles a rounding boundary.
    expected = ref.qk_norm_rope(x, w, 1e-6, H, cos, sin)
    mismatch = (out != expected).float().mean().item()
    assert mismatch < 0.01, f"{mismatch:.2%} of elements differ"
    assert_within_torch_error(out, ref.qk_norm_rope(x.double(), w.double(), 1e-6, H, cos, sin), expected)


KEY_BLOCK_CASES = ([pytest.param(2, S, H, D, "cpu", id=f"cpu-S{S}-H{H}-D{D}") for S in (1, 129, 300)
                    for H, D in ((2, 64), (3, 128))]
                   + [pytest.param(1, 32760, 40, 128, "cuda", marks=pytest.mark.gpu, id="gpu-wan14b-480p")])


@pytest.mark.parametrize("B,S,H,D,device", KEY_BLOCK_CASES)
def test_e4m3_key_blocks_match_reference(B, S, H, D, device):
    """quant="e4m3", token_block=128 (the fp8 keys): the Triton block kernel against the reference quantizer of
    the same normed, rotated values. The norm's sum of squares runs in another order (and on the GPU its square
    root may be approximate), so a normed value may round to the neighbouring bf16 (one ulp <= 2^-7 |x|); the
    rotation x1 cos - x2 sin then moves by <= 2^-7 (|x1| + |x2|), which near a cancellation is many e4m3 codes
    of a small result (seen on the GPU: 17 of 168M values). Beyond that, one e4m3 code: 2^-3 |x| among normals,
    one subnormal step 2^-9 s (2^-8 s here: the dequantizing fp32 products round). Scales within an fp32 ulp."""
    if device == "cpu" and torch.cuda.is_available():
        pytest.skip("CPU interpreter check; the gpu case covers the compiled kernel")
    x, w = prologue_inputs(B, S, H, D, torch.bfloat16, device)
    cos, sin = wan_freqs(S, D)
    cos, sin = cos.to(device), sin.to(device)
    k8, ks = ops.qk_norm_rope(x, w, 1e-6, H, cos, sin, quant="e4m3", token_block=128)
    assert ops._backend.last_choice["qk_norm_rope"] == "triton"
    r8, rs = ref.qk_norm_rope_quantized(x, w, 1e-6, H, cos, sin, "e4m3", 128)
    assert ks.shape == rs.shape == (B, H, -(-S // 128))
    torch.testing.assert_close(ks, rs, rtol=2**-22, atol=0)
    differ = (k8.view(torch.uint8) != r8.view(torch.uint8)).float().mean().item()
    assert differ < 0.01, f"{differ:.2%} of codes differ"
    per_token = ref.key_scales_per_token(rs, S).transpose(1, 2)[..., None]
    got, expected = k8.float() * per_token, r8.float() * per_token
    normed = ref.rms_norm(x, w, 1e-6).float().unflatten(2, (H, D)).unflatten(-1, (-1, 2))
    pair = normed.abs().sum(-1, keepdim=True).expand_as(normed).flatten(-2)  # |x1| + |x2| of each RoPE pair
    excess = (got - expected).abs() - (2**-3 * expected.abs() + 2**-8 * per_token + 2**-7 * pair)
    worst = excess.flatten().argmax()
    assert excess.max() <= 0, (f"{(excess > 0).sum().item()} values beyond a bf16 ulp and an e4m3 code; worst: "
                               f"{got.flatten()[worst].item()} vs {expected.flatten()[worst].item()}")


def hunyuan_rope(S, D, device="cpu"):
    """HunyuanVideo's RoPE tables (cos, sin) [S, D], fp32, repeat-interleaved, and their [1, S, 1, D] views."""
    angles = torch.rand(S, D // 2, device=device) * S
    cos, sin = (t.repeat_interleave(2, -1) for t in (angles.cos(), angles.sin()))  # (as diffusers makes them)
    return (cos, sin), (cos[None, :, None], sin[None, :, None])


@pytest.mark.parametrize("quant, token_block", [(None, 1), ("int8", 1), ("e4m3", 128)])
@pytest.mark.parametrize("S", [1, 129])
@pytest.mark.parametrize("H,D", [(2, 64), (3, 128)])
def test_per_head_norm_triton_matches_reference_on_cpu(S, H, D, quant, token_block):
    """weight [D]: each head normalized over its own D values (HunyuanVideo), in every output form."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check; the GPU test covers the compiled kernel")
    x, _ = prologue_inputs(2, S, H, D, torch.bfloat16, "cpu")
    w = (1 + 0.1 * torch.randn(D)).bfloat16()
    _, (cos, sin) = hunyuan_rope(S, D)
    got = ops.qk_norm_rope(x, w, 1e-6, H, cos, sin, quant=quant, token_block=token_block)
    assert ops._backend.last_choice["qk_norm_rope"] == "triton"
    if quant is None:
        expected = ref.qk_norm_rope(x, w, 1e-6, H, cos, sin)
        assert (got != expected).float().mean().item() < 0.01
        assert_within_torch_error(got, ref.qk_norm_rope(x.double(), w.double(), 1e-6, H, cos, sin), expected)
    else:
        r8, rs = ref.qk_norm_rope_quantized(x, w, 1e-6, H, cos, sin, quant, token_block)
        torch.testing.assert_close(got[1], rs, rtol=2**-20, atol=0)
        assert (got[0].view(torch.uint8) != r8.view(torch.uint8)).float().mean().item() < 0.01
    per_head = x.float().unflatten(2, (H, D))
    assert not torch.allclose(per_head.pow(2).mean(-1)[..., 0], per_head.pow(2).mean(-1)[..., -1])  # heads differ


def rope_tables(form, S, H, D, per_head, dtype=torch.float32, device="cpu"):
    """Random (cos, sin) tables in `form`'s layout [1, S, 1|H, D or D / 2] (not repeat-interleaved: every entry its
    own angle, where the forms differ)."""
    angles = torch.rand(S, H if per_head else 1, D // 2 if form in ("pairs", "split") else D, device=device) * 7
    return angles.cos()[None].to(dtype), angles.sin()[None].to(dtype)


@pytest.mark.parametrize("S", [1, 113])
@pytest.mark.parametrize("H,D", [(2, 64), (3, 128)])
@pytest.mark.parametrize("form", ["per_element", "pairs", "split"])
@pytest.mark.parametrize("per_head_tables", [False, True], ids=["shared-tables", "per-head-tables"])
@pytest.mark.parametrize("per_head_norm", [False, True], ids=["norm-across-heads", "norm-per-head"])
def test_rope_table_forms_triton_matches_reference_on_cpu(S, H, D, form, per_head_tables, per_head_norm):
    """rope_tables "per_element" (diffusers' apply_rotary_emb), "pairs" (Mochi's) and "split" (LTX-2's halves), with
    tables shared by the heads or a row per head (LTX, Mochi, LTX-2), under either norm: the Triton kernel against the
    reference, in both output forms (out= and new), where each form differs from Wan's and from its twin's."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check; the GPU test covers the compiled kernel")
    x, w = prologue_inputs(2, S, H, D, torch.bfloat16, "cpu")
    w = w[:D] if per_head_norm else w
    cos, sin = rope_tables(form, S, H, D, per_head_tables)
    got = ops.qk_norm_rope(x, w, 1e-6, H, cos, sin, rope_tables=form)
    out = torch.empty_like(got)
    ops.qk_norm_rope(x, w, 1e-6, H, cos, sin, out=out, rope_tables=form)
    assert ops._backend.last_choice["qk_norm_rope"] == "triton"
    expected = ref.qk_norm_rope(x, w, 1e-6, H, cos, sin, form)
    assert torch.equal(got, out)
    assert (got != expected).float().mean().item() < 0.01
    assert_within_torch_error(got, ref.qk_norm_rope(x.double(), w.double(), 1e-6, H, cos.double(), sin.double(),
                                                    form), expected)
    if form == "per_element" and not per_head_tables:
        assert rel_l2(expected, ref.qk_norm_rope(x, w, 1e-6, H, cos, sin)) > 0.05  # Wan's form differs here
    twin = {"pairs": "split", "split": "pairs"}.get(form)  # the other form with tables D / 2 wide: other pairs
    if twin:
        assert rel_l2(expected, ref.qk_norm_rope(x, w, 1e-6, H, cos, sin, twin)) > 0.05
    if per_head_tables and H > 1:  # each head its own row: sharing the first head's differs
        shared = tuple(t[:, :, :1] for t in (cos, sin))
        assert rel_l2(expected, ref.qk_norm_rope(x, w, 1e-6, H, *shared, form)) > 0.05
    with pytest.raises(ValueError, match=f"rope_tables: '{form}' only for the 16-bit output"):
        ops.qk_norm_rope(x, w, 1e-6, H, cos, sin, quant="int8", rope_tables=form)
    with pytest.raises(ValueError, match="rope_tables: expected one of"):
        ops.qk_norm_rope(x, w, 1e-6, H, cos, sin, rope_tables="wan")
    other = "pairs" if form == "per_element" else "per_element"  # a form whose tables have the other width
    with pytest.raises(ValueError, match=f"freqs_cos: expected shape .* for rope_tables='{other}'"):
        ops.qk_norm_rope(x, w, 1e-6, H, cos, sin, rope_tables=other)


def test_per_head_norm_is_hunyuans(device):
    """The per-head form against HunyuanVideo's own ops (its attention's norm_q, diffusers' apply_rotary_emb), within
    2x of their bf16 error vs fp64."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    S, H, D = 300, 4, 128
    x, _ = prologue_inputs(1, S, H, D, torch.bfloat16, device)
    norm = RMSNorm(D, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(D))
    (cos, sin), views = hunyuan_rope(S, D, device)

    def theirs(x, norm, tables):
        return apply_rotary_emb(norm(x.unflatten(2, (H, D))), tables, sequence_dim=1)

    with torch.no_grad():
        oracle = theirs(x.double(), norm.double(), (cos.double(), sin.double()))
        torch_bf16 = theirs(x, norm.bfloat16(), (cos, sin))
        ours = ops.qk_norm_rope(x, norm.weight, norm.eps, H, *views, rope_tables="per_element")
    assert_within_torch_error(ours, oracle, torch_bf16)


def test_per_head_norm_and_pair_tables_are_mochis(device):
    """Mochi's attention prologue (its norm_q, MochiRMSNorm over each head, then its per-pair RoPE with [S, H, D / 2]
    tables) against rope_tables="pairs", within 2x of their bf16 error vs fp64."""
    from diffusers.models.normalization import MochiRMSNorm

    S, H, D = 300, 4, 128
    x, _ = prologue_inputs(1, S, H, D, torch.bfloat16, device)
    norm = MochiRMSNorm(D, eps=1e-5).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(D))
    cos, sin = rope_tables("pairs", S, H, D, per_head=True, device=device)

    def theirs(x, norm, cos, sin):
        return ref.apply_rotary_pairs(norm(x.unflatten(2, (H, D))), cos[0], sin[0])  # (the [S, H, D / 2] tables)

    with torch.no_grad():
        oracle = theirs(x.double(), norm.double(), cos.double(), sin.double())
        torch_bf16 = theirs(x, norm.bfloat16(), cos, sin)
        ours = ops.qk_norm_rope(x, norm.weight, norm.eps, H, cos, sin, rope_tables="pairs")
    assert_within_torch_error(ours, oracle, torch_bf16)


def test_split_tables_are_ltx2s(device):
    """LTX-2's attention prologue with rope_type="split" (the released checkpoints'): its norm_q, torch's RMSNorm
    across heads, then diffusers' apply_split_rotary_emb with per-head fp32 tables [B, H, S, D / 2] (swapaxes views,
    as diffusers makes them) against rope_tables="split", within 2x of their bf16 error vs fp64; the reference is
    theirs but for rare flipped roundings (its fp32 rotation's rounding may differ with the memory layout)."""
    from diffusers.models.transformers.transformer_ltx2 import apply_split_rotary_emb

    B, S, H, D = 2, 300, 4, 128
    x, _ = prologue_inputs(B, S, H, D, torch.bfloat16, device)
    norm = torch.nn.RMSNorm(H * D, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(H * D))
    angles = torch.rand(B, S, H, D // 2, device=device) * 7
    cos, sin = angles.cos().transpose(1, 2), angles.sin().transpose(1, 2)  # [B, H, S, D / 2]

    def theirs(x, norm, cos, sin):
        return apply_split_rotary_emb(norm(x), (cos, sin)).unflatten(2, (H, D))

    with torch.no_grad():
        oracle = theirs(x.double(), norm.double(), cos.double(), sin.double())
        torch_bf16 = theirs(x, norm.bfloat16(), cos, sin)
        tables = cos.transpose(1, 2), sin.transpose(1, 2)  # [B, S, H, D / 2] views
        ours = ops.qk_norm_rope(x, norm.weight, norm.eps, H, *tables, rope_tables="split")
        spec = ref.qk_norm_rope(x, norm.weight, norm.eps, H, *tables, "split")
    assert_within_torch_error(ours, oracle, torch_bf16)
    assert (spec != torch_bf16).float().mean().item() < 0.01


def test_whole_dim_tables_are_ltxs(device):
    """LTX-Video's attention prologue (its norm_q, torch's RMSNorm across heads, then diffusers' LTX apply_rotary_emb
    with tables over the whole inner dim, per batch row) against rope_tables="per_element" with a table row per
    head, within 2x of their bf16 error vs fp64."""
    from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

    B, S, H, D = 2, 300, 4, 64
    x, _ = prologue_inputs(B, S, H, D, torch.bfloat16, device)
    norm = torch.nn.RMSNorm(H * D, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(H * D))
    angles = torch.rand(B, S, H * D, device=device) * 7
    cos, sin = angles.cos(), angles.sin()

    def theirs(x, norm, cos, sin):
        return apply_rotary_emb(norm(x), (cos, sin)).unflatten(2, (H, D))

    with torch.no_grad():
        oracle = theirs(x.double(), norm.double(), cos.double(), sin.double())
        torch_bf16 = theirs(x, norm.bfloat16(), cos, sin)
        ours = ops.qk_norm_rope(x, norm.weight, norm.eps, H, cos.unflatten(2, (H, D)), sin.unflatten(2, (H, D)),
                                rope_tables="per_element")
    assert_within_torch_error(ours, oracle, torch_bf16)


@pytest.mark.parametrize("S", [1, 113])
@pytest.mark.parametrize("H,D", [(2, 48), (3, 64)])
@pytest.mark.parametrize("rope", [False, True])
def test_layer_norm_triton_matches_reference_on_cpu(S, H, D, rope):
    """norm="layer" (a LayerNorm over each head, CogVideoX's), with or without per-element RoPE, at a head dim the
    tile pads (48) and one it does not: the Triton kernel against the reference, in both output forms."""
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter check; the GPU test covers the compiled kernel")
    x, _ = prologue_inputs(2, S, H, D, torch.bfloat16, "cpu")
    x = x + 3  # a mean the norm must take out
    w, b = (1 + 0.1 * torch.randn(D)).bfloat16(), (0.1 * torch.randn(D)).bfloat16()
    tables = rope_tables("per_element", S, H, D, per_head=False) if rope else ()
    got = ops.qk_norm_rope(x, w, 1e-6, H, *tables, rope_tables="per_element", norm="layer", bias=b)
    out = torch.empty_like(got)
    ops.qk_norm_rope(x, w, 1e-6, H, *tables, out=out, rope_tables="per_element", norm="layer", bias=b)
    assert ops._backend.last_choice["qk_norm_rope"] == "triton"
    expected = ref.qk_norm_rope(x, w, 1e-6, H, *tables, rope_tables="per_element", bias=b)
    assert torch.equal(got, out)
    assert (got != expected).float().mean().item() < 0.01
    oracle = ref.qk_norm_rope(x.double(), w.double(), 1e-6, H, *(t.double() for t in tables),
                              rope_tables="per_element", bias=b.double())
    assert_within_torch_error(got, oracle, expected)
    assert rel_l2(expected, ref.qk_norm_rope(x, w, 1e-6, H, *tables, rope_tables="per_element")) > 0.05  # not RMS
    with pytest.raises(ValueError, match="bias: the LayerNorm's"):
        ops.qk_norm_rope(x, w, 1e-6, H, bias=b)
    with pytest.raises(ValueError, match=r"weight: norm='layer' takes a LayerNorm over each head"):
        ops.qk_norm_rope(x, torch.ones(H * D), 1e-6, H, norm="layer", bias=b)
    with pytest.raises(ValueError, match="norm: 'layer' only for the 16-bit output"):
        ops.qk_norm_rope(x, w, 1e-6, H, quant="int8", norm="layer", bias=b)


def test_layer_norm_is_cogvideoxs(device):
    """CogVideoX's attention prologue (its norm_q, torch's LayerNorm over each head, then diffusers' apply_rotary_emb
    on the heads-first video tokens) against norm="layer" with rope_tables="per_element", within 2x of their bf16
    error vs fp64."""
    from diffusers.models.embeddings import apply_rotary_emb

    S, H, D = 300, 4, 64
    x, _ = prologue_inputs(1, S, H, D, torch.bfloat16, device)
    norm = torch.nn.LayerNorm(D, eps=1e-6).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(D))
        norm.bias.copy_(0.1 * torch.randn(D))
    cos, sin = (t[0, :, 0] for t in rope_tables("per_element", S, H, D, per_head=False, device=device))

    def theirs(x, norm, cos, sin):
        return apply_rotary_emb(norm(x.unflatten(2, (H, D)).transpose(1, 2)), (cos, sin)).transpose(1, 2)

    with torch.no_grad():
        oracle = theirs(x.double(), norm.double(), cos.double(), sin.double())
        torch_bf16 = theirs(x, norm.bfloat16(), cos, sin)
        ours = ops.qk_norm_rope(x, norm.weight, norm.eps, H, cos[None, :, None], sin[None, :, None],
                                rope_tables="per_element", norm="layer", bias=norm.bias)
    assert_within_torch_error(ours, oracle, torch_bf16)


def test_norm_without_rope_and_fp32():
    x, w = prologue_inputs(1, 40, 4, 64, torch.float32, "cpu", fused_qkv=False)
    out = ops.qk_norm_rope(x, w, 1e-5, 4)
    assert out.shape == (1, 40, 4, 64) and out.is_contiguous()
    torch.testing.assert_close(out, ref.qk_norm_rope(x, w, 1e-5, 4), rtol=1e-6, atol=1e-6)


def test_compile_fullgraph():
    x, w = prologue_inputs(1, 17, 2, 64, torch.float32, "cpu")
    cos, sin = wan_freqs(17, 64)
    fn = torch.compile(lambda *a: ops.qk_norm_rope(*a), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, w, 1e-6, 2, cos, sin), ref.qk_norm_rope(x, w, 1e-6, 2, cos, sin),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("H,G,P", [(3, 1, 3), (5, 2, 3), (4, 2, 2), (1, 4, 1)])
def test_out_writes_the_same_values_into_any_layout(monkeypatch, device, backend, H, G, P):
    """out=: the values of the call without out, written into a strided [B, S, H, D] or into head groups
    [B, S, G, P, D] (a head-sharded all-to-all send buffer; slots past H zero-filled), nothing else."""
    monkeypatch.setenv("VKERN_QK_NORM_ROPE_BACKEND", backend)
    B, S, D = 2, 13, 64
    x, w = prologue_inputs(B, S, H, D, torch.bfloat16, device)
    cos, sin = (f.to(device) for f in wan_freqs(S, D))
    want = ops.qk_norm_rope(x, w, 1e-6, H, cos, sin)
    buffer = torch.full((G, B, S, 3, P, D), float("nan"), dtype=torch.bfloat16, device=device)  # q/k/v side by side
    slot = buffer[:, :, :, 1].permute(1, 2, 0, 3, 4)
    assert ops.qk_norm_rope(x, w, 1e-6, H, cos, sin, out=slot) is slot
    assert ops._backend.last_choice["qk_norm_rope"] == backend
    heads = slot.flatten(2, 3)
    assert torch.equal(heads[:, :, :H], want) and torch.equal(heads[:, :, H:], torch.zeros_like(heads[:, :, H:]))
    assert buffer[:, :, :, 0::2].isnan().all()
    strided = torch.full((B, S, H, 2 * D), float("nan"), dtype=torch.bfloat16, device=device)[..., :D]
    ops.qk_norm_rope(x, w, 1e-6, H, cos, sin, out=strided)
    assert torch.equal(strided, want)


def test_out_under_compile_and_bad_out():
    x, w = prologue_inputs(1, 17, 2, 64, torch.float32, "cpu")
    cos, sin = wan_freqs(17, 64)
    fn = torch.compile(lambda x, w, c, s, o: ops.qk_norm_rope(x, w, 1e-6, 2, c, s, out=o), fullgraph=True,
                       backend="eager")
    buffer = torch.zeros(2, 1, 17, 3, 1, 64)
    slot = buffer[:, :, :, 0].permute(1, 2, 0, 3, 4)
    fn(x, w, cos, sin, slot)
    assert torch.equal(slot.flatten(2, 3), ops.qk_norm_rope(x, w, 1e-6, 2, cos, sin))
    with pytest.raises(ValueError, match="out: only for the unquantized output"):
        ops.qk_norm_rope(x.bfloat16(), w.bfloat16(), 1e-6, 2, quant="e4m3", out=slot)
    with pytest.raises(TypeError, match="out: expected dtype"):
        ops.qk_norm_rope(x, w, 1e-6, 2, out=slot.bfloat16())
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 17, 2, 64\)"):
        ops.qk_norm_rope(x, w, 1e-6, 2, out=torch.empty(1, 17, 2, 32))
    with pytest.raises(ValueError, match="G \\* P >= heads=2"):
        ops.qk_norm_rope(x, w, 1e-6, 2, out=torch.empty(1, 17, 1, 1, 64))
    with pytest.raises(ValueError, match="last .* dimension must be contiguous"):
        ops.qk_norm_rope(x, w, 1e-6, 2, out=torch.empty(1, 17, 2, 128)[..., ::2])


def test_bad_inputs_name_the_argument():
    x, w = prologue_inputs(1, 8, 2, 64, torch.float32, "cpu")
    cos, sin = wan_freqs(8, 64)
    with pytest.raises(ValueError, match="heads: expected a positive divisor of x's last dimension 128"):
        ops.qk_norm_rope(x, w, 1e-6, 3)
    with pytest.raises(ValueError, match=r"weight: expected shape \(128,\) \(across heads\) or \(64,\) \(per head\)"):
        ops.qk_norm_rope(x, w[:32], 1e-6, 2)
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.qk_norm_rope(x.int(), w, 1e-6, 2)
    with pytest.raises(ValueError, match="x: expected 3 dimensions"):
        ops.qk_norm_rope(x[0], w, 1e-6, 2)
    with pytest.raises(ValueError, match="freqs_cos: expected shape"):
        ops.qk_norm_rope(x, w, 1e-6, 2, cos[:, :4], sin[:, :4])
    with pytest.raises(ValueError, match="freqs_cos, freqs_sin: pass both"):
        ops.qk_norm_rope(x, w, 1e-6, 2, cos, None)
    with pytest.raises(ValueError, match="head dimension 63"):
        ops.qk_norm_rope(torch.randn(1, 2, 126), torch.ones(126), 1e-6, 2)
    with pytest.raises(ValueError, match="rope_tables: 'split' needs a power-of-two head dimension, got 48"):
        ops.qk_norm_rope(torch.randn(1, 8, 96), torch.ones(96), 1e-6, 2, *rope_tables("split", 8, 2, 48, True),
                         rope_tables="split")


@pytest.mark.gpu
@pytest.mark.parametrize("per_head", [False, True], ids=["across-heads", "per-head"])
@pytest.mark.parametrize("S", [1, 113, 4097, 32760])
@pytest.mark.parametrize("H,D", [(12, 128), (40, 128), (48, 64)])
def test_gpu_within_twice_torch_bf16_error(S, H, D, per_head):
    x, w = prologue_inputs(1, S, H, D, torch.bfloat16, "cuda")
    w = w[:D] if per_head else w
    cos, sin = (t.cuda() for t in wan_freqs(S, D))
    out = ops.qk_norm_rope(x, w, 1e-6, H, cos, sin)
    assert ops._backend.last_choice["qk_norm_rope"] == "triton"
    oracle = ref.qk_norm_rope(x.double(), w.double(), 1e-6, H, cos, sin)
    assert_within_torch_error(out, oracle, ref.qk_norm_rope(x, w, 1e-6, H, cos, sin))
