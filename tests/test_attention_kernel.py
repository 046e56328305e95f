"""vkern.ops.attention (issue #3): vkern's flash-attention forward against the float64 oracle
(vkern.reference.attention.attention_lse).

The rule (DESIGN.md, flash-attention's): in a low precision, the kernel's error against the float64
oracle is at most 2x the error PyTorch itself makes doing the same op in the same dtype, where
"PyTorch itself" is F.scaled_dot_product_attention as diffusers calls it (the CPU flash kernel on the
CPU, cuDNN/flash/efficient on the GPU). The log-sum-exp (fp32) is held to 2x PyTorch's fp32
logsumexp error plus a floor of 1e-5 (1 + |lse|) (about 80 fp32 ulps: exp2/log2 approximations and
sums over thousands of keys; an lse that far off moves a merged partial output by 1e-5 relative,
far below bf16's 4e-3).

On the CPU the Triton kernel runs under the interpreter (conftest sets TRITON_INTERPRET=1), forced
with VKERN_ATTENTION_BACKEND=triton; those tests are small (odd sizes, 1-2 heads). Tests marked gpu
run the compiled kernel at odd and at real video-model shapes (`pytest -m gpu`).
"""
import pytest
import torch
import torch.nn.functional as F

from vkern import ops
from vkern.ops import _backend, fused_attention
from vkern.reference import attention as ref

from .attention_helpers import (ON_GPU, assert_compiled_equals_eager, assert_fake_shapes, cpu_interpreter, make_padding,
                                make_qkv, poisoned, sampled_rows, tail_split_cases, torch_attention)
from .tolerance import assert_within_torch_error, rel_l2

LSE_REL_FLOOR = 1e-5
EPS32 = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------------------- helpers
@pytest.fixture
def use_backend(monkeypatch):
    def force(name):
        monkeypatch.setenv("VKERN_ATTENTION_BACKEND", name)
        return name
    return force


def run_op(q, k, v, **kwargs):
    with poisoned():
        return ops.attention(q, k, v, **kwargs)


def assert_unbiased(out, oracle, torch_out, what="output"):
    """No systematic scaling error: the error's component along the oracle, c = <err, o> / <o, o>, is at
    most 2x PyTorch's plus 8 standard deviations of what PyTorch's own error puts there by chance, plus
    4 fp32 ulps (a row's normalization 1 / l is one shared fp32 rounding: with fp32 outputs that, not the
    per-element rounding, is the error's largest component along the output). A rounding that truncates
    instead of rounding to nearest (e.g. P or the output cast to bf16 by the Triton interpreter) biases
    every element by ~2^-9 (fp16: 2^-12) and fails this long before the 2x rule."""
    o = oracle.double()
    err, err_t = out.double() - o, torch_out.double() - o
    norm = (o * o).sum().clamp_min(1e-300)
    c, c_t = ((err * o).sum() / norm).item(), ((err_t * o).sum() / norm).item()
    sd_t = ((err_t * o).pow(2).sum().sqrt() / norm).item()
    assert abs(c) <= 2 * abs(c_t) + 8 * sd_t + 4 * EPS32, \
        f"{what}: biased by {c:.3g} relative (torch {c_t:.3g}, chance level {sd_t:.2g})"


def check_lse(lse, lse_oracle, lse_torch32, what="lse"):
    assert torch.isfinite(lse).all(), f"{what}: non-finite values where a key is attended"
    err = (lse.double() - lse_oracle).abs().max().item()
    torch_err = (lse_torch32.double() - lse_oracle).abs().max().item()
    floor = LSE_REL_FLOOR * (1 + lse_oracle.abs().max().item())
    assert err <= 2 * torch_err + floor, f"{what}: max error {err:.3g} > 2 x torch's fp32 {torch_err:.3g} + {floor:.2g}"


def check_attention(q, k, v, backend, key_padding_mask=None, scale=None, rows=None):
    """The op's (out, lse) on q, k, v against the float64 oracle, with the 2x-PyTorch rule. rows: a
    LongTensor of query positions to check (the gpu tests sample them at real sizes; attention rows
    are independent, so the oracle only needs those rows of q)."""
    with_lse = backend != "sdpa"  # SDPA does not return the log-sum-exp (the op refuses it there)
    out, lse = run_op(q, k, v, key_padding_mask=key_padding_mask, scale=scale, return_lse=True) if with_lse else \
        (run_op(q, k, v, key_padding_mask=key_padding_mask, scale=scale), None)
    assert _backend.last_choice["attention"] == backend, _backend.last_choice["attention"]
    B, Sq, H, D = q.shape
    assert out.shape == (B, Sq, H, D) and out.dtype == q.dtype and out.device == q.device
    if not with_lse:
        lse = torch.full((B, H, Sq), float("-inf"), device=q.device).masked_fill(
            torch.ones(B, dtype=torch.bool, device=q.device)[:, None, None] if key_padding_mask is None
            else key_padding_mask.any(1)[:, None, None], 0.0)  # stand-in: only its dead rows are checked
    assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32 and lse.device == q.device
    torch_out = torch_attention(q, k, v, key_padding_mask, scale)
    if rows is not None:
        q, out, lse, torch_out = q[:, rows], out[:, rows], lse[:, :, rows], torch_out[:, rows]
    oracle, lse_oracle = ref.attention_lse(q, k, v, key_padding_mask, scale, dtype=torch.float64)
    lse_torch32 = ref.attention_lse(q, k, v, key_padding_mask, scale, dtype=torch.float32)[1]
    live = torch.ones(B, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        live = key_padding_mask.any(1)
        dead = ~live
        # A query with no key to attend: out exactly 0, lse exactly -inf (SDPA itself would give NaN).
        assert (out[dead] == 0).all(), "queries with every key masked must give 0"
        assert (lse[dead] == float("-inf")).all(), "queries with every key masked must give lse = -inf"
    if live.any():
        assert_within_torch_error(out[live], oracle[live], torch_out[live])
        assert_unbiased(out[live], oracle[live], torch_out[live])
        if with_lse:
            check_lse(lse[live], lse_oracle[live], lse_torch32[live])
    return out, lse


# ------------------------------------------------------- the Triton kernel at odd sizes (CPU, interpreted)
# (B, H, Sq, Skv, D, dtype, sharpness). Interpreted cost ~ Sq * Skv * B * H * D; the whole list runs in seconds.
ODD_SIZES = [
    (1, 2, 1, 1, 64, torch.float16, 1.0),  # one query, one key
    (2, 1, 113, 113, 128, torch.float16, 1.0),
    (1, 2, 257, 257, 64, torch.float32, 1.0),
    (1, 1, 1000, 1000, 64, torch.float16, 4.0),  # peaked rows: the running max moves between key blocks
    (1, 1, 1000, 1000, 128, torch.float32, 1.0),
    (1, 2, 113, 512, 128, torch.float16, 1.0),  # Wan cross-attention: 512 text tokens
    (2, 1, 257, 77, 64, torch.float32, 3.0),  # CLIP-length context, shorter than the queries
    (1, 1, 1, 1000, 128, torch.float16, 1.0),  # one query, many keys
    (1, 2, 257, 257, 128, torch.bfloat16, 1.0),  # bf16 (the kernel upcasts its tiles when interpreting)
    (2, 1, 113, 77, 64, torch.bfloat16, 2.0),
]


def _size_id(p):
    B, H, Sq, Skv, D, dtype, sharp = p
    return f"B{B}H{H}-{Sq}x{Skv}-D{D}-{str(dtype)[6:]}" + (f"-sharp{sharp:g}" if sharp != 1 else "")


@cpu_interpreter
@pytest.mark.parametrize("B,H,Sq,Skv,D,dtype,sharpness", ODD_SIZES, ids=[_size_id(p) for p in ODD_SIZES])
def test_triton_odd_sizes_within_twice_torch_error(use_backend, B, H, Sq, Skv, D, dtype, sharpness):
    q, k, v = make_qkv(B, Sq, Skv, H, D, dtype, sharpness=sharpness)
    check_attention(q, k, v, use_backend("triton"))


@cpu_interpreter
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("pattern", ["random", "prefix", "dead_row", "all_true"])
@pytest.mark.parametrize("Sq,Skv,D,dtype", [(113, 257, 64, torch.float16), (257, 77, 128, torch.float32)])
def test_key_padding_mask(use_backend, backend, pattern, Sq, Skv, D, dtype):
    q, k, v = make_qkv(2, Sq, Skv, 2, D, dtype)
    check_attention(q, k, v, use_backend(backend), key_padding_mask=make_padding(2, Skv, pattern))


@cpu_interpreter
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_masked_keys_have_no_influence(use_backend, backend):
    """Whatever the masked keys hold (here huge but finite k, which would win any row max taken before
    masking, and huge v), the output and lse are bit-identical: a masked key contributes exactly 0."""
    use_backend(backend)
    q, k, v = make_qkv(2, 113, 200, 2, 64, torch.float16)
    mask = make_padding(2, 200, "random")
    mask[0, 64:128] = False  # a whole key block masked
    out, lse = run_op(q, k, v, key_padding_mask=mask, return_lse=True)
    k2, v2 = k.clone(), v.clone()
    k2[~mask] = 3e4 * torch.sign(torch.randn_like(k2[~mask].float())).to(k2.dtype)  # |q.k| ~ 1e6 >> fp16 range
    v2[~mask] = -6e4
    out2, lse2 = run_op(q, k2, v2, key_padding_mask=mask, return_lse=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    check_attention(q, k2, v2, backend, key_padding_mask=mask)


@cpu_interpreter
@pytest.mark.parametrize("layout,Sq,Skv", [("fused", 113, 113), ("kv_fused", 113, 77), ("heads_first", 257, 129),
                                           ("strided_d", 65, 113), ("batch_bcast", 113, 200)])
def test_non_contiguous_inputs(use_backend, layout, Sq, Skv):
    q, k, v = make_qkv(2, Sq, Skv, 2, 64, torch.float16, layout=layout)
    assert not all(t.is_contiguous() for t in (q, k, v))
    out, _ = check_attention(q, k, v, use_backend("triton"))
    # The same values laid out contiguously give the same answer bit for bit.
    out_c = run_op(*(t.contiguous() for t in (q, k, v)))
    assert torch.equal(out, out_c)


@cpu_interpreter
@pytest.mark.parametrize("scale", [0.05, 1.0, 4.0])
def test_softmax_scale(use_backend, scale):
    """scale = 4 on unit-variance q, k with D = 64 gives scores of std ~32 (maxima ~100): a kernel
    that exponentiates without subtracting the running max overflows even in fp32. (fp16 inputs: with
    fp32 outputs the errors at such scores are fp32 roundings of the scores on a few dominant keys, too
    few for a stable 2x comparison.)"""
    q, k, v = make_qkv(1, 257, 129, 2, 64, torch.float16)
    check_attention(q, k, v, use_backend("triton"), scale=scale)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=cpu_interpreter)])
@pytest.mark.parametrize("scale", [0.0, -0.3])
def test_scale_zero_or_negative(use_backend, backend, scale):
    """scale = 0 (uniform weights) and scale < 0 are valid floats to SDPA: either the right answer or an
    error naming scale, never NaN (a kernel that takes the row max of unscaled scores assumes scale > 0;
    0 * -inf at padded key positions is NaN)."""
    use_backend(backend)
    q, k, v = make_qkv(1, 70, 77, 2, 64, torch.float16)
    try:
        out, lse = run_op(q, k, v, scale=scale, return_lse=True)
    except ValueError as e:
        assert "scale" in str(e), str(e)
        return
    oracle, lse_oracle = ref.attention_lse(q, k, v, scale=scale)
    assert_within_torch_error(out, oracle, torch_attention(q, k, v, scale=scale))
    check_lse(lse, lse_oracle, ref.attention_lse(q, k, v, scale=scale, dtype=torch.float32)[1])


@cpu_interpreter
def test_return_lse_false_and_determinism(use_backend):
    use_backend("triton")
    q, k, v = make_qkv(1, 113, 77, 2, 128, torch.float16)
    out = run_op(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    out_lse, lse = run_op(q, k, v, return_lse=True)
    again = run_op(q, k, v)
    assert torch.equal(out, out_lse) and torch.equal(out, again)


@pytest.mark.parametrize("D", [32, 80, 96])
def test_unsupported_head_dim_is_never_a_wrong_answer(use_backend, monkeypatch, D):
    """Head dims other than 64 and 128: forcing the kernel is an error that names the head dim; left to
    choose, the op answers correctly with another backend (the GPU test checks the warning)."""
    q, k, v = make_qkv(1, 37, 41, 2, D, torch.float16)
    if not ON_GPU:
        use_backend("triton")
        with pytest.raises(_backend.BackendError, match=f"head dim {D}"):
            ops.attention(q, k, v)
    monkeypatch.delenv("VKERN_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("VKERN_BACKEND", raising=False)
    out, lse = ops.attention(q, k, v, return_lse=True)
    assert _backend.last_choice["attention"] in ("sdpa", "reference")
    oracle, lse_oracle = ref.attention_lse(q, k, v)
    assert_within_torch_error(out, oracle, torch_attention(q, k, v))
    check_lse(lse, lse_oracle, ref.attention_lse(q, k, v, dtype=torch.float32)[1])


def general_mask(kind, B, Sq, Skv, dtype, device="cpu"):
    if kind == "bool_4d":
        mask = torch.rand(B, 1, Sq, Skv, device=device) > 0.4
        mask[..., 0] = True  # every query keeps a key (SDPA's NaN rows are not the point here)
        return mask
    return (torch.randn(Sq, Skv, device=device) * 2).to(dtype)  # additive, broadcast over batch and heads


@pytest.mark.parametrize("mask_kind", ["bool_4d", "additive_2d"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("sdpa", marks=pytest.mark.gpu)])
def test_general_attn_mask(use_backend, backend, mask_kind):
    """attn_mask (SDPA semantics) is answered by SDPA/the reference, within 2x PyTorch's error; the
    kernel does not take it, so forcing the kernel with it is an error naming attn_mask."""
    device = "cuda" if backend == "sdpa" else "cpu"
    q, k, v = make_qkv(2, 113, 77, 2, 64, torch.float16, device)
    mask = general_mask(mask_kind, 2, 113, 77, torch.float16, device)
    oracle = ref.attention_math(q, k, v, mask, dtype=torch.float64)
    torch_out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask).transpose(1, 2)
    assert_within_torch_error(ops.attention(q, k, v, mask), oracle, torch_out)  # the op's own choice
    use_backend(backend)
    assert_within_torch_error(ops.attention(q, k, v, mask), oracle, torch_out)
    assert _backend.last_choice["attention"] == backend
    if not ON_GPU or device == "cuda":
        use_backend("triton")
        with pytest.raises(_backend.BackendError, match="attn_mask"):
            ops.attention(q, k, v, mask)
    with pytest.raises(ValueError, match="attn_mask, key_padding_mask"):
        ops.attention(q, k, v, mask, key_padding_mask=torch.ones(2, 77, dtype=torch.bool, device=device))


def test_general_attn_mask_with_return_lse(use_backend):
    """attn_mask with return_lse: either a correct lse [B, H, Sq] or an error naming both arguments,
    never a placeholder."""
    use_backend("reference")
    q, k, v = make_qkv(2, 113, 77, 2, 64, torch.float32)
    mask = general_mask("bool_4d", 2, 113, 77, torch.float32)
    try:
        out, lse = ops.attention(q, k, v, mask, return_lse=True)
    except (ValueError, TypeError, NotImplementedError) as e:
        assert "attn_mask" in str(e) and "return_lse" in str(e), str(e)
        return
    assert lse.shape == (2, 2, 113) and lse.dtype == torch.float32, f"lse: shape {tuple(lse.shape)}"
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 8
    lse_oracle = s.masked_fill(~mask, float("-inf")).logsumexp(-1)
    check_lse(lse, lse_oracle, s.float().masked_fill(~mask, float("-inf")).logsumexp(-1))
    assert_within_torch_error(out, ref.attention_math(q, k, v, mask), ref.attention(q, k, v, mask))


# ------------------------------------------------------------------------- the reference backend, fp64
def test_reference_backend_float64_is_the_oracle(use_backend):
    use_backend("reference")
    q, k, v = make_qkv(2, 113, 77, 3, 48, torch.float64)
    mask = make_padding(2, 77, "dead_row")
    out, lse = ops.attention(q, k, v, key_padding_mask=mask, scale=0.3, return_lse=True)
    oracle, lse_oracle = ref.attention_lse(q, k, v, mask, 0.3)
    assert out.dtype == torch.float64 and lse.shape == (2, 3, 113)
    torch.testing.assert_close(out, oracle, rtol=1e-12, atol=1e-12)
    live = mask.any(1)
    # lse is documented as fp32; allow either fp32 or fp64 here and hold it to fp32 rounding.
    torch.testing.assert_close(lse[live].double(), lse_oracle[live], rtol=2 * torch.finfo(torch.float32).eps, atol=1e-6)
    assert (lse[~live] == float("-inf")).all() and (out[~live] == 0).all()


# ------------------------------------------------------------------------------- compile, fake, modes
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=cpu_interpreter)])
def test_compile_fullgraph(use_backend, backend):
    """Through the custom op and its fake impl (aot_eager: fake-tensor tracing and functionalization),
    with a mask and both outputs, at two sizes; results equal eager bit for bit."""
    use_backend(backend)

    def fn(q, k, v, mask):
        out, lse = ops.attention(q, k, v, key_padding_mask=mask, return_lse=True)
        return out * 2, lse + 1

    inputs = [(*make_qkv(2, Sq, Skv, 2, 64, torch.float16), make_padding(2, Skv, "dead_row"))
              for Sq, Skv in ((65, 77), (113, 129))]
    assert_compiled_equals_eager(fn, inputs, "attention", backend)


def test_fake_tensor_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert_fake_shapes(ops.attention, torch.bfloat16, 512)
    with FakeTensorMode():
        q = torch.empty(2, 3, 113, 128, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.empty(2, 512, 3, 128, dtype=torch.bfloat16)
        out_only = ops.attention(q, k, k)
    assert out_only.shape == (2, 113, 3, 128)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=cpu_interpreter)])
def test_inference_mode_and_requires_grad_inputs(use_backend, backend):
    use_backend(backend)
    q, k, v = make_qkv(1, 33, 47, 2, 64, torch.float32)
    expected = ops.attention(q, k, v)
    with torch.inference_mode():
        torch.testing.assert_close(ops.attention(q, k, v), expected, rtol=0, atol=0)
    got = ops.attention(*(t.clone().requires_grad_() for t in (q, k, v)))  # forward works on leaf tensors
    torch.testing.assert_close(got.detach(), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_name_the_argument():
    q, k, v = make_qkv(2, 13, 17, 2, 64, torch.float32)
    mask = torch.ones(2, 17, dtype=torch.bool)
    with pytest.raises(ValueError, match="q: expected 4 dimensions"):
        ops.attention(q[0], k, v)
    with pytest.raises(ValueError, match="k: expected 4 dimensions"):
        ops.attention(q, k.flatten(2), v)
    with pytest.raises(TypeError, match="q: expected dtype"):
        ops.attention(q.int(), k.int(), v.int())
    with pytest.raises(TypeError, match="k: expected dtype"):
        ops.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="v: expected dtype"):
        ops.attention(q, k, v.bfloat16())
    with pytest.raises(ValueError, match="k: expected a tensor on cpu"):
        ops.attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="k: expected shape"):  # head dim
        ops.attention(q, k[..., :32], v)
    with pytest.raises(ValueError, match="k: expected shape"):  # heads
        ops.attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError, match="k: expected shape"):  # batch
        ops.attention(q, k[:1], v)
    with pytest.raises(ValueError, match="v: expected shape"):  # length differs from k's
        ops.attention(q, k, v[:, :16])
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):  # [B, Sq], not [B, Skv]
        ops.attention(q, k, v, key_padding_mask=torch.ones(2, 13, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        ops.attention(q, k, v, key_padding_mask=mask[0])
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        ops.attention(q, k, v, key_padding_mask=mask[:, None, None, :])  # that is an attn_mask
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype"):
        ops.attention(q, k, v, key_padding_mask=mask.float())
    with pytest.raises(ValueError, match="key_padding_mask: expected a tensor on cpu"):
        ops.attention(q, k, v, key_padding_mask=mask.to("meta"))
    with pytest.raises(TypeError, match="scale: expected a float"):
        ops.attention(q, k, v, scale=torch.tensor(0.1))


def test_unknown_forced_backend_is_an_error(use_backend):
    use_backend("flash3")
    q, k, v = make_qkv(1, 5, 5, 1, 64, torch.float32)
    with pytest.raises(_backend.BackendError, match="VKERN_ATTENTION_BACKEND"):
        ops.attention(q, k, v)


# ------------------------------------------------------------------------------------------ GPU tests
GPU_ODD = [(B, H, Sq, Skv, D, sharp) for (B, H, Sq, Skv, D, _, sharp) in ODD_SIZES] + [
    (1, 3, 4097, 4097, 128, 1.0), (2, 4, 4097, 333, 64, 2.0), (1, 2, 8191, 512, 128, 1.0)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Sq,Skv,D,sharpness", GPU_ODD, ids=[f"B{p[0]}H{p[1]}-{p[2]}x{p[3]}-D{p[4]}" for p in GPU_ODD])
def test_gpu_triton_odd_sizes(use_backend, dtype, B, H, Sq, Skv, D, sharpness):
    q, k, v = make_qkv(B, Sq, Skv, H, D, dtype, "cuda", sharpness=sharpness)
    check_attention(q, k, v, use_backend("triton"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "sdpa", "reference"])
@pytest.mark.parametrize("pattern", ["random", "prefix", "dead_row"])
def test_gpu_key_padding_mask(use_backend, backend, pattern):
    """HunyuanVideo-like joint attention: video tokens + padded text tokens in the keys."""
    q, k, v = make_qkv(2, 4096 + 256, 4096 + 256, 4, 128, torch.bfloat16, "cuda")
    mask = make_padding(2, 4096 + 256, pattern, "cuda")
    check_attention(q, k, v, use_backend(backend), key_padding_mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["fused", "heads_first", "strided_d"])
def test_gpu_non_contiguous(use_backend, layout):
    q, k, v = make_qkv(1, 4097, 4097, 12, 128, torch.bfloat16, "cuda", layout=layout)
    out, _ = check_attention(q, k, v, use_backend("triton"))
    # The same call on copies. (Run 34 saw this fail, bitwise, against a call without lse; run 35's probe found
    # the kernel with and without lse bit-identical and the test passed: not reproduced, cause not found.)
    assert torch.equal(out, run_op(*(t.contiguous() for t in (q, k, v)), return_lse=True)[0])


REAL_SHAPES = {  # per kernel: name -> (B, H, Sq, Skv, D)
    "triton": {"wan1.3b-480p self": (1, 12, 32760, 32760, 128), "wan1.3b-480p cross": (1, 12, 32760, 512, 128),
               "head dim 64": (1, 2, 17550, 17550, 64), "wan14b-480p self, 2 videos": (2, 40, 32760, 32760, 128)},
    "cuda": {"wan1.3b-480p self": (1, 12, 32760, 32760, 128), "wan1.3b-480p cross": (1, 12, 32760, 512, 128),
             "wan14b-480p self, 2 videos": (2, 40, 32760, 32760, 128), "ltx-512p self": (1, 32, 7392, 7392, 64),
             "ltx-512p cross": (1, 32, 7392, 128, 64), "cogvideox-5b joint": (1, 48, 17550 + 226, 17550 + 226, 64)},
}


@pytest.mark.gpu
@pytest.mark.parametrize("backend,name", [(b, n) for b, shapes in REAL_SHAPES.items() for n in shapes])
def test_gpu_real_shapes(use_backend, backend, name):
    """Full-size run, sampled query rows against the float64 oracle (2x PyTorch's own bf16 error on
    those rows), and the whole output against cuDNN: by the triangle inequality within 3x cuDNN's
    own relative L2 error on the sample (plus its sampling noise)."""
    B, H, Sq, Skv, D = REAL_SHAPES[backend][name]
    q, k, v = make_qkv(B, Sq, Skv, H, D, torch.bfloat16, "cuda")
    rows = sampled_rows(Sq)
    check_attention(q, k, v, use_backend(backend), rows=rows)
    out, lse = run_op(q, k, v, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        cudnn = torch_attention(q, k, v)
    oracle_rows, _ = ref.attention_lse(q[:, rows], k, v)
    cudnn_err = rel_l2(cudnn[:, rows], oracle_rows)
    assert rel_l2(out, cudnn) <= 3.3 * cudnn_err, f"{name}: rel L2 vs cuDNN {rel_l2(out, cudnn):.3g}, cuDNN's own {cudnn_err:.3g}"


TAIL_SPLIT_FORMS = [(128, "128", torch.bfloat16), (64, "128", torch.float16), (128, "128", torch.bfloat16),
                    (128, "176", torch.bfloat16), (64, "176", torch.float16), (128, "176", torch.bfloat16),
                    (64, "224", torch.bfloat16), (64, "224", torch.float16), (64, "224", torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Sq,Skv,D,keys,dtype,pattern",
                         [(*case[:4], D, keys, dtype, case[4]) for (D, keys, dtype), case in zip(
                             TAIL_SPLIT_FORMS, tail_split_cases(128) + tail_split_cases(176) + tail_split_cases(224))],
                         ids=[f"{name}-{str(dtype)[6:]}-D{D}-keys{keys}" for name, (D, keys, dtype) in zip(
                             ["main-and-tail", "tail-only", "masked-parts"] * 3, TAIL_SPLIT_FORMS)])
def test_gpu_cuda_tail_split(use_backend, monkeypatch, B, H, Sq, Skv, D, keys, dtype, pattern):
    """The tail split (session 27; the 176-key tile's, session 31): each part's P is rounded against that part's
    running max, not the whole row's, so the split output differs from the unsplit one by P's rounding, like any other
    summation order: it is held to the 2x-PyTorch rule against the float64 oracle (the tail rows all checked). Where
    every attended key of a row lies in one part (the masked-parts case) that part weighs exactly 1 and the unsplit
    kernel's masked blocks leave O as it was: the same bits; elsewhere some bits differ (the split happened)."""
    q, k, v = make_qkv(B, Sq, Skv, H, D, dtype, "cuda")
    mask = make_padding(B, Skv, pattern, "cuda")
    use_backend("cuda")
    monkeypatch.setenv("VKERN_FLASH_KEYS", keys)
    monkeypatch.setenv("VKERN_FLASH_TAIL_SPLIT", "0")
    base, base_lse = run_op(q, k, v, key_padding_mask=mask, return_lse=True)
    assert fused_attention.last_tail_split_floats == 0
    monkeypatch.setenv("VKERN_FLASH_TAIL_SPLIT", "1")
    out, lse = run_op(q, k, v, key_padding_mask=mask, return_lse=True)
    assert _backend.last_choice["attention"] == "cuda" and fused_attention.last_flash_keys == int(keys)
    assert fused_attention.last_tail_split_floats > 0, "this launch was not split"
    if pattern == "dead_then_short":
        assert torch.equal(out, base) and torch.equal(lse, base_lse)
    else:
        assert not torch.equal(out, base) or not torch.equal(lse, base_lse), "no split happened (the same bits)"
    rows = None if Sq < 4096 else torch.cat([sampled_rows(Sq), torch.arange(Sq - 5 * 128, Sq, device="cuda")]).unique()
    check_attention(q, k, v, "cuda", key_padding_mask=mask, rows=rows)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_compile_fullgraph_inductor(use_backend, backend):
    use_backend(backend)
    q, k, v = make_qkv(1, 1025, 512, 4, 128, torch.bfloat16, "cuda")
    mask = make_padding(1, 512, "prefix", "cuda")

    def fn(q, k, v):
        out, lse = ops.attention(q, k, v, key_padding_mask=mask, return_lse=True)
        return out.flatten(2) * 2, lse

    got, expected = torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v)
    assert _backend.last_choice["attention"] == backend
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.gpu
def test_gpu_unsupported_head_dim_falls_back_with_one_warning(monkeypatch):
    """D = 96 with return_lse: neither the kernel (head dim) nor SDPA (no lse) can take it; the reference
    answers, with one warning naming the head dim."""
    monkeypatch.delenv("VKERN_ATTENTION_BACKEND", raising=False)
    monkeypatch.delenv("VKERN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_warned", set())  # "once" is per process: start this test from zero
    q, k, v = make_qkv(1, 1000, 1000, 4, 96, torch.bfloat16, "cuda")
    with pytest.warns(UserWarning, match="head dim 96"):
        out, lse = ops.attention(q, k, v, return_lse=True)
    assert _backend.last_choice["attention"] == "reference"
    assert_within_torch_error(out, ref.attention_lse(q, k, v)[0], torch_attention(q, k, v))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        ops.attention(q, k, v, return_lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Sq,Skv,D", [(1, 2, 257, 257, 64), (1, 3, 1000, 512, 128)])
def test_gpu_triton_float32_is_fp32_accurate(use_backend, monkeypatch, B, H, Sq, Skv, D):
    """The kernel accepts fp32: it must then be as accurate as PyTorch in fp32 (TF32 products, ~1e-3
    relative, would be a silent 1000x loss), or decline fp32."""
    q, k, v = make_qkv(B, Sq, Skv, H, D, torch.float32, "cuda")
    use_backend("triton")
    try:
        run_op(q, k, v)
    except _backend.BackendError as e:  # declined: then the op's own choice must be fp32-accurate
        assert "float32" in str(e), str(e)
        monkeypatch.delenv("VKERN_ATTENTION_BACKEND")
        check_attention(q, k, v, _backend.would_choose("attention", q.device, q.dtype)[0])
        return
    check_attention(q, k, v, "triton")


# ------------------------------------------- main-loop variants (vkern/triton/attention.py, variant=)
# The pipelined loop ("pipe": block j+1's QK^T issued before block j's softmax) computes the same sums in
# the same order as the default loop; only the exp2 argument is rounded once more (scores scaled by a
# separate multiply, not fused into the subtraction), so both agree to a few ulps of the output dtype
# and both meet the 2x-PyTorch rule. Interpreted (BLOCK_N 32): Skv 1 and 17 are a lone partial block,
# 32 one full block, 113 and 257 full blocks plus a partial one.
VARIANT_SIZES = [(1, 2, 33, 1), (1, 1, 40, 17), (1, 1, 33, 32), (2, 2, 65, 113), (1, 2, 47, 257)]


def _kernel_direct(q, k, v, variant, key_padding_mask=None, scale=None):
    from vkern.triton.attention import attention as kernel

    B, Sq, H, D = q.shape
    with poisoned():
        out = torch.empty_like(q)
        lse = torch.empty((B, H, Sq), dtype=torch.float32)
    kernel(q, k, v, out, lse, key_padding_mask, scale, variant=variant)
    return out, lse


@cpu_interpreter
@pytest.mark.parametrize("pattern", ["none", "random", "dead_row"])
@pytest.mark.parametrize("B,H,Sq,Skv", VARIANT_SIZES, ids=[f"B{b}H{h}-{sq}x{skv}" for b, h, sq, skv in VARIANT_SIZES])
def test_pipelined_loop_matches_default_and_reference(B, H, Sq, Skv, pattern):
    if pattern == "dead_row" and B < 2:
        pytest.skip("dead_row needs two batch rows")
    q, k, v = make_qkv(B, Sq, Skv, H, 64, torch.bfloat16, sharpness=2.0)
    kpm = make_padding(B, Skv, pattern)
    out_d, lse_d = _kernel_direct(q, k, v, "default", kpm)
    out_p, lse_p = _kernel_direct(q, k, v, "pipe", kpm)
    assert torch.isfinite(out_p).all() and not torch.isnan(lse_p).any()
    oracle, lse_oracle = ref.attention_lse(q, k, v, kpm, dtype=torch.float64)
    torch_out = torch_attention(q, k, v, kpm)
    if kpm is not None:  # SDPA gives NaN for a query with no key; the convention is 0
        torch_out = torch_out.masked_fill(~kpm.any(1)[:, None, None, None], 0)
    assert_within_torch_error(out_p, oracle, torch_out)
    torch.testing.assert_close(out_p, out_d, atol=2e-2, rtol=2e-2)  # bf16: a few ulps at |out| ~ 1
    assert (out_p.float() - out_d.float()).abs().max() <= 4 * 2 ** -8 * out_d.float().abs().max().clamp(min=1)
    finite = torch.isfinite(lse_d)
    assert torch.equal(finite, torch.isfinite(lse_p)) and torch.equal(lse_d[~finite], lse_p[~finite])
    torch.testing.assert_close(lse_p[finite], lse_d[finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_p[finite].double(), lse_oracle[finite], atol=1e-4, rtol=1e-4)


@cpu_interpreter
def test_pipelined_loop_with_no_keys():
    q, k, v = make_qkv(1, 5, 0, 2, 64, torch.bfloat16)
    out_d, lse_d = _kernel_direct(q, k, v, "default")
    out_p, lse_p = _kernel_direct(q, k, v, "pipe")
    assert torch.equal(out_p, out_d) and (out_p == 0).all()
    assert torch.equal(lse_p, lse_d) and (lse_p == float("-inf")).all()


@cpu_interpreter
@pytest.mark.parametrize("qk,pv", [("e4m3", "e4m3"), ("int8", "bf16")])
@pytest.mark.parametrize("Skv", [1, 113])
def test_pipelined_loop_8bit_matches_default(monkeypatch, qk, pv, Skv):
    monkeypatch.setenv("VKERN_ATTENTION_BACKEND", "triton")
    q, k, v = make_qkv(1, 40, Skv, 2, 64, torch.bfloat16)
    kpm = make_padding(1, Skv, "random")
    if kpm is not None:
        kpm[:, 0] = True
    outs = {}
    for variant in ("default", "pipe"):
        monkeypatch.setenv("VKERN_ATTENTION_VARIANT", variant)
        outs[variant] = ops.attention_8bit(q, k, v, key_padding_mask=kpm, qk=qk, pv=pv, return_lse=True)
    (out_d, lse_d), (out_p, lse_p) = outs["default"], outs["pipe"]
    assert torch.isfinite(out_p).all()
    assert rel_l2(out_p.float(), out_d.float()) < 1e-2  # e4m3 P: a rounding flip moves one p by 2^-4
    torch.testing.assert_close(lse_p, lse_d, atol=1e-5, rtol=1e-5)


def test_unknown_variant_is_an_error(monkeypatch):
    from vkern.triton.attention import attention as kernel

    q = torch.zeros(1, 4, 1, 64)
    with pytest.raises(ValueError, match="variant"):
        kernel(q, q, q, torch.empty_like(q), variant="ws")
    monkeypatch.setenv("VKERN_ATTENTION_VARIANT", "nope")
    with pytest.raises(ValueError, match="VKERN_ATTENTION_VARIANT"):
        kernel(q, q, q, torch.empty_like(q))


@pytest.mark.gpu
def test_gpu_first_tuned_call_adds_no_flush_buffer(use_backend):
    """The call that autotunes a new shape must not raise the peak memory by Triton's default benchmark's
    256 MB L2-flush buffer (bench_without_flush): its peak is within 32 MiB of the same call repeated."""
    use_backend("triton")
    q, k, v = make_qkv(1, 6151, 6151, 2, 64, torch.bfloat16, "cuda")  # a length no other test tunes
    from vkern.triton import attention as kernel

    assert 6151 * 6151 * 2 >= kernel.SMALL_PROBLEM  # a call the autotuner tunes

    def peak():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_op(q, k, v)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    first, again = peak(), peak()
    assert first <= again + 32, f"first (tuning) call peaked {first:.1f} MiB above its start, a repeat {again:.1f}"


# ---------------------------------- the CUDA kernel (csrc/flash_attention.cu: sm_90, head dim 64 and 128)
# Its blocks are 128 queries x 128 keys: lengths 1, 127, 128, 129 and 4097 hit a lone partial block, one full
# block, and full blocks plus a partial one, on both the query side (TMA zero fill, clipped store) and the key
# side (masked scores). Head dim 64 is a separate instantiation (one 64-column block per tile, n64 PV product).
CUDA_ODD = GPU_ODD + [
    (1, 1, 1000, 1000, 128, 4.0), (3, 2, 129, 127, 128, 1.0), (1, 1, 128, 128, 128, 8.0), (2, 3, 127, 129, 128, 1.0),
    (1, 2, 300, 75600 // 8, 128, 1.0), (1, 1, 1000, 1000, 64, 4.0), (3, 2, 129, 127, 64, 1.0),
    (1, 1, 128, 128, 64, 8.0), (2, 3, 127, 129, 64, 1.0), (1, 2, 300, 7392, 64, 1.0)]


@pytest.mark.parametrize("keys,record", [(128, 16), (176, 32), (224, 32)])
@pytest.mark.parametrize("S", [1, 127, 128, 175, 176, 177, 300, 4097])
def test_key_padding_bits_layout(S, keys, record):
    """The CUDA kernel reads the mask as bits, a record of `record` bytes per tile of `keys` keys: the tile's key c
    at bit c % 32 of its little-endian 32-bit word c / 32, zero bits past the last key and past the tile's keys."""
    from vkern.ops.fused_attention import key_padding_bits

    mask = make_padding(3, S, "random")
    bits = key_padding_bits(mask, keys)
    tiles = -(-S // keys)
    assert bits.dtype == torch.uint8 and bits.shape == (3, tiles * record)
    words = (bits.view(torch.int32).long() & 0xFFFFFFFF).view(3, tiles, record // 4)  # little-endian, as the GPU
    c = torch.arange(record * 8)
    got = ((words[:, :, c // 32] >> (c % 32)) & 1).bool()  # [B, tiles, record bits]
    assert not got[:, :, keys:].any()
    got = got[:, :, :keys].reshape(3, -1)
    assert torch.equal(got[:, :S], mask) and not got[:, S:].any()


@pytest.mark.parametrize("head_dim,kv_len,first", [
    (128, 32760, "cuda"), (128, 8192, "cuda"), (128, 8191, "sdpa"), (128, 512, "sdpa"),
    (64, 7392, "cuda"), (64, 17776, "cuda"), (64, 2048, "sdpa"), (64, 128, "sdpa"),
    (64, None, "cuda"), (96, 32760, "sdpa")])
def test_auto_order_follows_the_measured_crossovers(monkeypatch, head_dim, kv_len, first):
    """On CUDA, auto tries the CUDA kernel first only from CUDA_MIN_KEYS[head dim] keys (where runs 36, 118 and 119
    measured it ahead of cuDNN), cuDNN below; head dims the kernels do not take go to SDPA. (The order only:
    whether each backend can take the call is the reasons' business, tested on the GPU.)"""
    from vkern.ops import fused_attention

    monkeypatch.setattr(fused_attention, "_cuda_kernel_reason", lambda *args: None)
    order = list(fused_attention._attention_candidates(torch.device("cuda"), torch.bfloat16, head_dim=head_dim,
                                                       kv_len=kv_len))
    assert order[0] == first, order


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Sq,Skv,D,sharpness", CUDA_ODD, ids=[f"B{p[0]}H{p[1]}-{p[2]}x{p[3]}-D{p[4]}" + (f"-sharp{p[5]:g}" if p[5] != 1 else "") for p in CUDA_ODD])
def test_gpu_cuda_odd_sizes(use_backend, dtype, B, H, Sq, Skv, D, sharpness):
    q, k, v = make_qkv(B, Sq, Skv, H, D, dtype, "cuda", sharpness=sharpness)
    check_attention(q, k, v, use_backend("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("D,keys", [(64, "128"), (128, "128"), (64, "176"), (128, "176"), (64, "224")])
@pytest.mark.parametrize("layout", ["fused", "kv_fused", "heads_first", "strided_d", "batch_bcast"])
def test_gpu_cuda_non_contiguous(use_backend, monkeypatch, layout, D, keys):
    """Strided views go to TMA as they are (fused, kv_fused, heads_first); the rest (a last-dim stride, a zero
    batch stride) are copied first. Either way the same answer as contiguous inputs, bit for bit (both key tiles)."""
    monkeypatch.setenv("VKERN_FLASH_KEYS", keys)
    Skv = 333 if layout in ("kv_fused", "batch_bcast") else 4097
    q, k, v = make_qkv(2, 4097, Skv, 12, D, torch.bfloat16, "cuda", layout=layout)
    out, _ = check_attention(q, k, v, use_backend("cuda"))
    assert fused_attention.last_flash_keys == int(keys)
    assert torch.equal(out, run_op(*(t.contiguous() for t in (q, k, v)), return_lse=True)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("scale", [0.05, 4.0])
def test_gpu_cuda_softmax_scale(use_backend, scale, D):
    q, k, v = make_qkv(1, 1000, 777, 3, D, torch.float16, "cuda")
    check_attention(q, k, v, use_backend("cuda"), scale=scale)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_gpu_cuda_scale_zero_or_negative(use_backend, scale):
    """As test_scale_zero_or_negative. PyTorch's GPU SDPA kernels give NaN for these scales, so "PyTorch doing
    the same op in fp16" is its CPU SDPA on the same inputs."""
    use_backend("cuda")
    q, k, v = make_qkv(1, 1000, 777, 3, 128, torch.float16, "cuda")
    out, lse = run_op(q, k, v, scale=scale, return_lse=True)
    oracle, lse_oracle = ref.attention_lse(q, k, v, scale=scale)
    assert_within_torch_error(out, oracle, torch_attention(q.cpu(), k.cpu(), v.cpu(), scale=scale).cuda())
    check_lse(lse, lse_oracle, ref.attention_lse(q, k, v, scale=scale, dtype=torch.float32)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("stages", ["2", "3"])
def test_gpu_cuda_ring_depths_agree(use_backend, monkeypatch, stages, D):
    """The K/V ring depth changes only when tiles arrive, never the sums: bit-identical outputs."""
    use_backend("cuda")
    q, k, v = make_qkv(2, 1500, 2100, 3, D, torch.bfloat16, "cuda")
    expected = run_op(q, k, v, return_lse=True)
    monkeypatch.setenv("VKERN_FLASH_STAGES", stages)
    got = run_op(q, k, v, return_lse=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("env,head_dim,kv_len,want", [
    (None, 128, 8192, 176), (None, 128, 8191, 128), (None, 128, 512, 128), (None, 64, 4096, 224),
    (None, 64, 4095, 128), ("176", 128, 512, 176), ("176", 64, 128, 176), ("224", 64, 128, 224), ("128", 128, 32760, 128),
    ("128", 64, 32760, 128)])
def test_flash_keys_setting(monkeypatch, env, head_dim, kv_len, want):
    """The 16-bit CUDA kernel's key tile: 176 at head dim 128, 224 at 64 (with or without a mask) from
    FLASH_WIDE_MIN_KEYS[head dim] keys, where auto takes the CUDA kernel (runs 115, 122 and 127 measured them faster
    there), else 128; VKERN_FLASH_KEYS forces one."""
    if env is None:
        monkeypatch.delenv("VKERN_FLASH_KEYS", raising=False)
    else:
        monkeypatch.setenv("VKERN_FLASH_KEYS", env)
    assert fused_attention.FLASH_WIDE_MIN_KEYS == fused_attention.CUDA_MIN_KEYS == {64: 4096, 128: 8192}
    assert fused_attention._flash_keys(head_dim, kv_len) == want


def test_flash_keys_setting_rejects_other_widths(monkeypatch):
    monkeypatch.setenv("VKERN_FLASH_KEYS", "192")
    with pytest.raises(ValueError, match="VKERN_FLASH_KEYS: expected one of 0, 128, 176, 224"):
        fused_attention._flash_keys(128, 32760)
    monkeypatch.setenv("VKERN_FLASH_KEYS", "224")  # head dim 64's only
    with pytest.raises(ValueError, match="head dim 128 takes 128 or 176"):
        fused_attention._flash_keys(128, 32760)


# The wide key tile (VKERN_FLASH_KEYS=176, session 31): lengths around multiples of 176 and of 128, cross lengths,
# one key, a single partial tile, many tiles with a partial last one.
WIDE_ODD = [(1, 1, 1, 1), (2, 3, 113, 175), (1, 2, 176, 176), (2, 2, 177, 353), (1, 3, 1000, 1000),
            (1, 2, 257, 4097), (1, 2, 300, 75600 // 8), (3, 2, 129, 127), (1, 1, 4096, 512)]


# (head dim, wide tile, sizes): the 176 tile at both head dims, head dim 64's 224 tile also around multiples of 224.
WIDE_CASES = [(D, keys, size) for D, keys in ((64, 176), (128, 176), (64, 224))
              for size in WIDE_ODD + ([(1, 2, 223, 224), (2, 2, 300, 225), (1, 2, 129, 449)] if keys == 224 else [])]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,keys,size", WIDE_CASES,
                         ids=[f"D{D}-keys{keys}-B{s[0]}H{s[1]}-{s[2]}x{s[3]}" for D, keys, s in WIDE_CASES])
def test_gpu_cuda_wide_tile_odd_sizes(use_backend, monkeypatch, dtype, D, keys, size):
    """The wide tiles (176 keys: two stages at head dim 128, three at 64; 224 keys at head dim 64, three stages) at
    odd lengths: out and lse by the 2x-PyTorch rule."""
    B, H, Sq, Skv = size
    monkeypatch.setenv("VKERN_FLASH_KEYS", str(keys))
    q, k, v = make_qkv(B, Sq, Skv, H, D, dtype, "cuda")
    check_attention(q, k, v, use_backend("cuda"))
    assert fused_attention.last_flash_keys == keys


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["prefix", "random"])
def test_gpu_cuda_joint_attention_with_padded_text_takes_the_wide_tile(use_backend, monkeypatch, pattern):
    """HunyuanVideo-like joint attention at a length where the default rule takes the 176-key tile: video tokens
    then 256 text tokens, padded per batch row (prefix: each row keeps its own number of text tokens; random: masked
    keys in every tile); sampled rows and the last ones against the float64 oracle."""
    monkeypatch.delenv("VKERN_FLASH_KEYS", raising=False)
    video, text = fused_attention.FLASH_WIDE_MIN_KEYS[128] + 7, 256
    q, k, v = make_qkv(2, video + text, video + text, 2, 128, torch.bfloat16, "cuda")
    if pattern == "prefix":
        mask = torch.ones(2, video + text, dtype=torch.bool, device="cuda")
        mask[:, video:] = make_padding(2, text, "prefix", "cuda")
    else:
        mask = make_padding(2, video + text, "random", "cuda")
    rows = torch.cat([sampled_rows(video + text), torch.arange(video - 3, video + text, device="cuda")]).unique()
    check_attention(q, k, v, use_backend("cuda"), key_padding_mask=mask, rows=rows)
    assert fused_attention.last_flash_keys == 176


@pytest.mark.gpu
def test_gpu_cuda_wide_tile_refused_outside_its_form():
    """The extension refuses the wide tile with a ring depth it has not (head dim 128: 2 stages; 64: 3) or a tile
    width it has not (it takes a mask: its records, test_gpu_cuda_key_padding_mask)."""
    from vkern._ext import cuda_ext

    q, k, v = make_qkv(1, 256, 256, 2, 128, torch.bfloat16, "cuda")
    out = torch.empty_like(q)

    def call(keys, stages, tensors=(q, k, v, out)):
        D = tensors[0].shape[-1]
        cuda_ext().flash_attention_fwd(*((t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)) for t in tensors), 0,
                                       0, fused_attention.DTYPE_CODE[torch.bfloat16], 1, 2, 256, 256, D,
                                       D ** -0.5, stages, torch.cuda.current_stream().cuda_stream, 0, 0, keys)

    q64, k64, v64 = make_qkv(1, 256, 256, 2, 64, torch.bfloat16, "cuda")
    at_64 = (q64, k64, v64, torch.empty_like(q64))
    # The depths it exports are the ones it takes, and what the Python launches pass.
    assert cuda_ext().flash_wide_stages == {(176, 64): 3, (176, 128): 2, (224, 64): 3}
    assert [fused_attention._flash_stages_for(keys, D) for keys, D in ((176, 64), (176, 128), (224, 64))] == [3, 2, 3]
    call(176, 2)  # the forms it takes
    call(176, 3, at_64)
    call(224, 3, at_64)
    torch.cuda.synchronize()
    for bad in (lambda: call(176, 3), lambda: call(160, 2), lambda: call(176, 2, at_64), lambda: call(224, 3),
                lambda: call(224, 2), lambda: call(224, 2, at_64)):
        with pytest.raises(RuntimeError, match="flash_attention_fwd"):
            bad()


@pytest.mark.gpu
@pytest.mark.parametrize("D,keys", [(64, "128"), (128, "128"), (64, "176"), (128, "176"), (64, "224")])
@pytest.mark.parametrize("pattern", ["random", "prefix", "dead_row", "all_true"])
@pytest.mark.parametrize("B,Sq,Skv", [(2, 129, 127), (2, 300, 1000), (3, 1000, 4097)])
def test_gpu_cuda_key_padding_mask(use_backend, monkeypatch, B, Sq, Skv, pattern, D, keys):
    """The CUDA kernel's key-padding bits at odd lengths, both key tiles: partial last blocks, masked keys in every
    block (random), whole blocks masked (prefix), batch rows with no key (dead_row: out 0, lse -inf)."""
    monkeypatch.setenv("VKERN_FLASH_KEYS", keys)
    q, k, v = make_qkv(B, Sq, Skv, 3, D, torch.bfloat16, "cuda")
    check_attention(q, k, v, use_backend("cuda"), key_padding_mask=make_padding(B, Skv, pattern, "cuda"))
    assert fused_attention.last_flash_keys == int(keys)


@pytest.mark.gpu
@pytest.mark.parametrize("keys", ["128", "176", "224"])
def test_gpu_cuda_all_true_mask_changes_nothing(use_backend, monkeypatch, keys):
    """A mask that keeps every key takes the kernel's unmasked path per block: the same bits as no mask."""
    use_backend("cuda")
    monkeypatch.setenv("VKERN_FLASH_KEYS", keys)
    q, k, v = make_qkv(2, 1000, 1500, 3, 64 if keys == "224" else 128, torch.bfloat16, "cuda")
    expected = run_op(q, k, v, return_lse=True)
    got = run_op(q, k, v, key_padding_mask=make_padding(2, 1500, "all_true", "cuda"), return_lse=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.gpu
def test_gpu_cuda_declines_what_it_cannot_take(use_backend, monkeypatch):
    """A general attn_mask and head dim 96 are not the CUDA kernel's: forced, a clear error; preferred,
    another backend."""
    use_backend("cuda")
    q, k, v = make_qkv(1, 300, 300, 2, 128, torch.bfloat16, "cuda")
    attn_mask = torch.rand(1, 2, 300, 300, device="cuda") > 0.3
    with pytest.raises(_backend.BackendError, match="attn_mask"):
        ops.attention(q, k, v, attn_mask)
    q96, k96, v96 = make_qkv(1, 300, 300, 2, 96, torch.bfloat16, "cuda")
    with pytest.raises(_backend.BackendError, match="head dim 96"):
        ops.attention(q96, k96, v96)
    monkeypatch.delenv("VKERN_ATTENTION_BACKEND")
    with pytest.warns(UserWarning, match="attn_mask"):
        out = ops.attention(q, k, v, attn_mask, backend="cuda")
    assert _backend.last_choice["attention"] != "cuda"
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in (q, k, v)), attn_mask=attn_mask)
    assert_within_torch_error(out, expected.transpose(1, 2), ref.attention(q, k, v, attn_mask))


@pytest.mark.gpu
def test_gpu_cuda_runs_on_the_callers_stream(use_backend):
    """The kernel runs on the caller's current stream: work queued before it on that stream is seen."""
    use_backend("cuda")
    q, k, v = make_qkv(1, 2048, 2048, 4, 128, torch.bfloat16, "cuda")
    expected = run_op(q, k, v)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        q2 = q * 1  # written on the side stream just before the kernel reads it
        out = ops.attention(q2, k, v)
    stream.synchronize()
    assert torch.equal(out, expected)
