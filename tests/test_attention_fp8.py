"""vkern.ops.attention_8bit (issue #3): attention with Q quantized per (token, head) to e4m3 or int8 and K
per (128-key block, head) (vkern.ops.k_to_8bit: e4m3 keys, and int8 keys with pv="e4m3") or per (token, head)
(int8/bf16), and optionally V per (128-key block, head) and P to e4m3 for the PV product (pv="e4m3"; pv="bf16" keeps
V and P in V's dtype) or V to int8 with P in u8 against each 128-key block's row max (pv="int8", int8/int8), fp32
accumulation. qk="e4m3", pv="e4m3" is the issue's literal fp8 scheme; the Wan processor's attention="fp8" runs
qk="int8", pv="e4m3" (as fast on Hopper, more accurate: bench/NOTES.md run 55).
Backends: cuda (csrc/flash_attention.cu's 8-bit forms: pv="e4m3" with e4m3 or int8 Q/K, and int8/int8, head dim
128, Hopper; gpu tests),
triton (vkern/triton/attention.py, after the 8-bit QK prologue and v_to_8bit; not int8/int8) and reference
(vkern.reference.attention.attention_8bit, the same quantization in fp32).

Accuracy floors, from the quantization noise (the torchao rule: state an SQNR floor in dB). Rounding to
e4m3 (3 mantissa bits) leaves at most 2^-4 relative error per element, ~2.6% RMS on Gaussian data; int8
with a per-row amax/127 step ~0.7% of the row's std. Each rounded operand adds its share, so on
unstructured data (i.i.d. Gaussian q, k, v, default scale) the reference measures rel L2 (cos):
    e4m3/e4m3 0.051-0.052 (0.9987)   e4m3/bf16 0.037 (0.9993)   int8/e4m3 0.036-0.037 (0.9993)
    int8/bf16 0.009 (0.99996)        int8/int8 0.014-0.018 (0.99984)
and on q/k/v of a randomly initialised diffusers WanAttention (head dim 128, norm + RoPE) 0.036-0.038,
0.027-0.030, 0.024-0.025, 0.008-0.009 and 0.013-0.015. The floors below sit ~1.35x above the worst of these (in
rel L2; SQNR = -20 log10 rel L2), except int8/bf16, which is held to the issue's rel L2 <= 0.02 and
cos >= 0.9995. (That target is out of reach of e4m3 QK or e4m3 PV on these inputs: the reference
emulation itself misses it.) Sharper softmax rows (larger scale) raise the score noise, so there the
kernel is only held to the reference.
int8/int8 (u8 P: half a step is 1/510 of its block's row max; int8 V: half a step is 1/254 of its block's amax)
removes ~57% of int8/e4m3's error (0.42-0.45x on random inputs, 0.5x on WanAttention's): it meets the issue's 0.02
on these inputs (worst 0.0184); its floor, 32 dB (rel L2 <= 0.025), is 1.35x above that. Its P @ V rounding is
also held to a rigorous per-element bound and to the uniform-rounding model's RMS (int8_pv_error_model).

Against the reference backend: the kernel's relative L2 error vs the float64 oracle is at most 1.25x the
reference's and its max error at most 2x (Q, K, V quantize identically; the kernel rounds P against a
running row max, a different draw of the same noise: measured ratio 0.99-1.01). The lse obeys a rigorous
bound: |lse - lse*| <= the largest change of an attended score, and each score change is bounded by the
rounding of q and k.
"""
import pytest
import torch

from vkern import ops
from vkern.ops import _backend, fused_attention
from vkern.reference import attention as ref
from vkern.reference.fp8 import E4M3_INV, INT8_INV

from bench.wan_inputs import wan_qkv

from .attention_helpers import (ON_GPU, assert_compiled_equals_eager, assert_fake_shapes, cpu_interpreter, make_padding,
                                make_qkv, poisoned, sampled_rows, tail_split_cases, torch_attention)
from .tolerance import rel_l2

FP8 = ("e4m3", "e4m3")
INT8PV = ("int8", "int8")  # u8 P, int8 V: the reference and the CUDA kernel only (not in SCHEMES, Triton's)
SCHEMES = [FP8, ("e4m3", "bf16"), ("int8", "e4m3"), ("int8", "bf16")]
FLOORS = {  # (qk, pv): (SQNR floor in dB, cosine floor)
    ("e4m3", "e4m3"): (23.0, 0.9975),  # rel L2 <= 0.071
    ("e4m3", "bf16"): (26.0, 0.9987),  # rel L2 <= 0.050
    ("int8", "e4m3"): (26.0, 0.9987),
    ("int8", "bf16"): (34.0, 0.9995),  # rel L2 <= 0.020
    INT8PV: (32.0, 0.9997),  # rel L2 <= 0.025
}
REL_L2_VS_REFERENCE = 1.25
MAX_ERR_VS_REFERENCE = 2.0


def scheme_id(scheme):
    return "/".join(scheme)


@pytest.fixture
def use_backend(monkeypatch):
    """Force the 8-bit pipeline (V quantization, attention; on the GPU also the QK prologue) to one
    backend. On the CPU the interpreted QK prologue is slow (~1.5 s a call) and bit-identical to the
    reference quantizer (test_prequantized_path_is_the_same_op), so there it stays the reference."""
    def force(name):
        monkeypatch.setenv("VKERN_ATTENTION_8BIT_BACKEND", name)
        prologue = "triton" if name == "cuda" else name  # the CUDA attention kernel takes the Triton prologue's output
        monkeypatch.setenv("VKERN_QK_NORM_ROPE_BACKEND", prologue if ON_GPU else "reference")
        return name
    return force


def attention_8bit(q, k, v, scheme=FP8, **kwargs):
    return ops.attention_8bit(q, k, v, qk=scheme[0], pv=scheme[1], **kwargs)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def sqnr_db(out, oracle):
    return -20 * torch.log10(torch.tensor(rel_l2(out, oracle))).item()


def assert_floors(out, oracle, scheme, what="output"):
    floor_db, floor_cos = FLOORS[scheme]
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    sqnr, cos = sqnr_db(out, oracle), cosine(out, oracle)
    assert sqnr >= floor_db, f"{what}: SQNR {sqnr:.1f} dB < {floor_db} dB (rel L2 {rel_l2(out, oracle):.4f})"
    assert cos >= floor_cos, f"{what}: cosine {cos:.5f} < {floor_cos}"


def assert_close_to_reference_error(out, oracle, ref_out, what="output"):
    err_l2, ref_l2 = rel_l2(out, oracle), rel_l2(ref_out, oracle)
    assert err_l2 <= REL_L2_VS_REFERENCE * ref_l2, \
        f"{what}: rel L2 {err_l2:.4f} > {REL_L2_VS_REFERENCE} x the 8-bit reference's {ref_l2:.4f}"
    err_max = (out.double() - oracle).abs().max().item()
    ref_max = (ref_out.double() - oracle).abs().max().item()
    assert err_max <= MAX_ERR_VS_REFERENCE * ref_max, \
        f"{what}: max error {err_max:.4g} > {MAX_ERR_VS_REFERENCE} x the 8-bit reference's {ref_max:.4g}"


def key_block_amax(k, key_padding_mask=None):
    """[B, H, Skv, 1]: each key's block amax as e4m3 K's per-(128-key block, head) scale sees it (attended
    keys only)."""
    k = k.double()
    if key_padding_mask is not None:
        k = k.masked_fill(~key_padding_mask[:, :, None, None], 0)
    B, S, H, D = k.shape
    n = -(-S // ref.KEY_BLOCK)
    padded = k.new_zeros((B, n * ref.KEY_BLOCK, H, D))
    padded[:, :S] = k
    amax = padded.abs().unflatten(1, (n, ref.KEY_BLOCK)).amax(dim=(2, 4))  # [B, n, H]
    return ref.key_scales_per_token(amax.transpose(1, 2), S)[..., None]


def lse_error_bound(q, k, scheme, scale=None, key_padding_mask=None):
    """Per query [B, H, Sq]: an upper bound on |lse_8bit - lse_exact|. Log-sum-exp moves by at most the
    largest change of an attended score. Per element |x8 * s - x| <= e(x): for e4m3 (s = amax/448, round
    to nearest; amax over the token's head dim, for K over its 128-key block) 2^-4 |x| in the normal range
    plus at most 2^-10 s among subnormals (2x that here); for int8 (s = amax/127, round to nearest) s/2
    (1.02x here, for the fp32 scale). A score q.k then moves by at most scale * (|q|.e(k) + e(q).|k| +
    e(q).e(k)). The caller adds 1e-4 (1 + |lse|) for fp32."""
    qk_format, block_keys = scheme[0], ref.key_token_block(*scheme) > 1
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_amax = key_block_amax(k, key_padding_mask) if block_keys else None
    q, k = (t.double().permute(0, 2, 1, 3) for t in (q, k))  # [B, H, S, D]

    def e(x, amax=None):
        amax = x.abs().amax(-1, keepdim=True) if amax is None else amax
        if qk_format == "int8":
            return (0.51 / 127) * amax.expand_as(x)
        return 2.0**-4 * x.abs() + (2.0**-9 / 448) * amax

    eq, ek = e(q), e(k, k_amax)
    bound = scale * (q.abs() @ ek.mT + eq @ k.abs().mT + eq @ ek.mT)
    if key_padding_mask is not None:
        bound = bound.masked_fill(~key_padding_mask[:, None, None, :], 0)
    return bound.amax(-1)


def run_8bit(q, k, v, scheme=FP8, **kwargs):
    with poisoned():
        return attention_8bit(q, k, v, scheme, **kwargs)


def check_8bit(q, k, v, backend, scheme=FP8, key_padding_mask=None, scale=None, rows=None, floors=True):
    """The op's (out, lse) against the float64 oracle: floors (when `floors`), the lse bound, exact 0 /
    -inf for queries with nothing to attend, and, for the kernel, the 1.25x/2x rule against the
    reference backend. rows: query positions to check (gpu tests at real sizes)."""
    out, lse = run_8bit(q, k, v, scheme, key_padding_mask=key_padding_mask, scale=scale, return_lse=True)
    assert _backend.last_choice["attention_8bit"] == backend, _backend.last_choice["attention_8bit"]
    B, Sq, H, D = q.shape
    assert out.shape == (B, Sq, H, D) and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (B, H, Sq) and lse.dtype == torch.float32
    qs = q if rows is None else q[:, rows]
    if rows is not None:
        out, lse = out[:, rows], lse[:, :, rows]
    oracle, lse_oracle = ref.attention_lse(qs, k, v, key_padding_mask, scale)
    live = torch.ones(B, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        live = key_padding_mask.any(1)
        assert (out[~live] == 0).all(), "queries with every key masked must give 0"
        assert (lse[~live] == float("-inf")).all(), "queries with every key masked must give lse = -inf"
    if not live.any():
        return out, lse
    if floors:
        assert_floors(out[live], oracle[live], scheme)
    bound = lse_error_bound(qs, k, scheme, scale, key_padding_mask)
    lse_err = (lse.double() - lse_oracle).abs()
    slack = bound + 1e-4 * (1 + lse_oracle.abs())
    assert torch.isfinite(lse[live]).all(), "lse: non-finite where a key is attended"
    assert (lse_err[live] <= slack[live]).all(), f"lse: error {(lse_err - slack)[live].max().item():.3g} over the e4m3 bound"
    if backend != "reference":
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("VKERN_ATTENTION_8BIT_BACKEND", "reference")
            mp.setenv("VKERN_QK_NORM_ROPE_BACKEND", "reference")
            ref_out, ref_lse = attention_8bit(qs, k, v, scheme, key_padding_mask=key_padding_mask, scale=scale,
                                              return_lse=True)
        assert_close_to_reference_error(out[live], oracle[live], ref_out[live])
        ref_lse_err = (ref_lse.double() - lse_oracle).abs()[live].max().item()
        assert lse_err[live].max().item() <= 2 * ref_lse_err + 1e-4 * (1 + lse_oracle[live].abs().max().item()), \
            "lse: error over 2x the 8-bit reference's"
    return out, lse


# ------------------------------------------------------------------- CPU: reference, and Triton interpreted
BACKENDS = ["reference", pytest.param("triton", marks=cpu_interpreter)]
ODD_SIZES = [  # (B, H, Sq, Skv, D, dtype); the interpreted 8-bit kernel costs ~10 ms per 32x32 tile
    (1, 2, 1, 1, 64, torch.float16),
    (2, 1, 113, 113, 128, torch.float16),
    (1, 1, 257, 257, 64, torch.bfloat16),
    (1, 1, 113, 512, 128, torch.bfloat16),  # Wan cross-attention
    (2, 1, 257, 77, 64, torch.float16),
    (2, 4, 1, 1000, 128, torch.float16),  # one query: 8 heads x batch for a stable rel L2 (1 x 128 spreads to 0.07)
]
REFERENCE_ONLY_SIZES = [(1, 2, 1000, 1000, 128, torch.bfloat16)]  # ~20 s interpreted


def case(*values, backend, id):
    """A parameter set ending in `backend`; triton cases are interpreter-only (the gpu tests run the kernel)."""
    marks = [cpu_interpreter] if backend == "triton" else []
    return pytest.param(*values, backend, marks=marks, id=f"{id}-{backend}")


def size_id(p):
    return f"B{p[0]}H{p[1]}-{p[2]}x{p[3]}-D{p[4]}-{str(p[5])[6:]}"


# The fp8 scheme at every size; the other three schemes at two.
CASES = ([case(FP8, p, backend=b, id=f"{scheme_id(FP8)}-{size_id(p)}") for p in ODD_SIZES for b in ("reference", "triton")]
         + [case(FP8, p, backend="reference", id=f"{scheme_id(FP8)}-{size_id(p)}") for p in REFERENCE_ONLY_SIZES]
         + [case(s, p, backend=b, id=f"{scheme_id(s)}-{size_id(p)}") for s in SCHEMES[1:]
            for p in (ODD_SIZES[2], ODD_SIZES[3]) for b in ("reference", "triton")]
         + [case(INT8PV, p, backend="reference", id=f"{scheme_id(INT8PV)}-{size_id(p)}")
            for p in ODD_SIZES + REFERENCE_ONLY_SIZES])


@pytest.mark.parametrize("scheme,size,backend", CASES)
def test_random_inputs_meet_the_floors(use_backend, scheme, size, backend):
    B, H, Sq, Skv, D, dtype = size
    q, k, v = make_qkv(B, Sq, Skv, H, D, dtype)
    check_8bit(q, k, v, use_backend(backend), scheme)


WAN_CASES = [case(s, backend=b, id=scheme_id(s)) for s in SCHEMES + [INT8PV]
             for b in (("reference", "triton") if s in (FP8, ("int8", "bf16")) else ("reference",))]


@pytest.mark.parametrize("scheme,backend", WAN_CASES)
@pytest.mark.parametrize("kind,S", [("self", 257), ("cross", 129)])
def test_wan_inputs_meet_the_floors(use_backend, backend, scheme, kind, S):
    q, k, v = wan_qkv(1, S, 256, 2, torch.bfloat16, kind=kind)
    check_8bit(q, k, v, use_backend(backend), scheme)


@pytest.mark.parametrize("scheme,backend", [case(FP8, backend=b, id=scheme_id(FP8)) for b in ("reference", "triton")]
                         + [case(INT8PV, backend="reference", id=scheme_id(INT8PV))])
@pytest.mark.parametrize("pattern", ["random", "prefix", "dead_row"])
def test_key_padding_mask(use_backend, scheme, backend, pattern):
    q, k, v = make_qkv(2, 113, 257, 2, 128, torch.bfloat16)
    check_8bit(q, k, v, use_backend(backend), scheme, key_padding_mask=make_padding(2, 257, pattern))


@pytest.mark.parametrize("scheme,backend", [case(s, backend=b, id=scheme_id(s)) for s in (FP8, ("int8", "bf16"))
                                            for b in ("reference", "triton")]
                         + [case(INT8PV, backend="reference", id=scheme_id(INT8PV))])
def test_masked_keys_have_no_influence(use_backend, backend, scheme):
    """Huge keys and values where the mask says no (keys would win a row max taken before masking; their
    per-token scales are their own; values do not enter V's per-channel scales): output and lse
    bit-identical."""
    use_backend(backend)
    q, k, v = make_qkv(2, 113, 200, 1, 64, torch.float16)
    mask = make_padding(2, 200, "random")
    mask[0, 64:128] = False
    out, lse = run_8bit(q, k, v, scheme, key_padding_mask=mask, return_lse=True)
    k2 = k.clone()
    k2[~mask] = 3e4 * torch.sign(torch.randn_like(k2[~mask].float())).to(k2.dtype)
    out2, lse2 = run_8bit(q, k2, v, scheme, key_padding_mask=mask, return_lse=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    v2 = v.clone()
    v2[~mask] = -6e4
    out3, lse3 = run_8bit(q, k2, v2, scheme, key_padding_mask=mask, return_lse=True)
    assert torch.equal(out, out3) and torch.equal(lse, lse3)
    check_8bit(q, k2, v2, backend, scheme, key_padding_mask=mask)


# ---------------------------------------------------------------- int8 P/V (pv="int8"): the reference's scheme
def _blocks(x, n, dim=-1):
    """x with its key axis `dim` zero-padded to n * KEY_BLOCK and split into [n, KEY_BLOCK]."""
    dim = dim % x.dim()
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, n * ref.KEY_BLOCK - x.shape[dim]]
    return torch.nn.functional.pad(x, pad).unflatten(dim, (n, ref.KEY_BLOCK))


def int8_pv_error_model(q, k, v, key_padding_mask=None):
    """The int8 P/V scheme's P @ V rounding, isolated: Q and K quantized as the scheme does (the same fp32 scores
    s), then (a) the scheme's output in fp32 (attention_quantized, out_dtype fp32) and (b) the exact P/V output from
    those scores in float64 (P = exp(s - m) unrounded, V - offset unrounded). Returns (a, b) [B, H, Sq, D] and, per
    output element, a rigorous bound on |a - b| and the variance the uniform-rounding model predicts for it.

    Derivation (per query row; l = sum_j p_j, p_j = exp(s_j - m); key j in 128-key block b; u_j = v_j - offset):
    - P: the scheme's weight is w_j = f_b P_j / 255 with f_b = exp(m_b - m) <= 1 and P_j = round(255 e_j), e_j =
      exp(s_j - m_b) in [0, 1], so |P_j / 255 - e_j| <= 1/510 (half a u8 step of the block's max) and
      |w_j - p_j| <= f_b / 510.
    - V: v^_j = code_j * vs_b, code_j = round(u_j / vs_b) with vs_b = amax_b / 127 (the 1/scale and the product in
      fp32 move u_j / vs_b by <= 127 * 2^-22 < 0.01), so |v^_j - u_j| <= 0.51 vs_b.
    - The scheme divides by the rounded weights' sum L = sum_j w_j (as the kernel), so |L - l| <= sum_b n_b f_b / 510
      (n_b: the block's attended keys), and with out = sum_j w_j v^_j / L, out* = sum_j p_j u_j / l:
      out - out* = sum_j ((w_j - p_j) v^_j + p_j (v^_j - u_j)) / l - (L - l) / l * out, so
      |out - out*| <= (sum_b (f_b / 510) (sum_{j in b} |v^_j| + n_b |out|) + sum_b 0.51 vs_b sum_{j in b} p_j) / l
      (masked keys have w_j = p_j = 0 and drop out; out here is the smoothed output, without the offset).
    - RMS (each rounding uniform and independent, Widrow's model): P's error has variance (1/255)^2 / 12 and enters
      as (w_j - p_j) (v^_j - out) / l, V's vs_b^2 / 12, so E[(out - out*)^2] = (sum_b f_b^2 / (12 * 255^2)
      sum_{j in b} (v^_j - out)^2 + sum_b vs_b^2 / 12 sum_{j in b} p_j^2) / l^2."""
    offset = ref.value_offset(v, key_padding_mask)
    q8, qs = ref.quantize_per_head(q, "int8")
    k8, ks = ref.quantize_per_head(k, "int8", ref.KEY_BLOCK, key_padding_mask)
    v8, vs = ref.quantize_value(v, key_padding_mask, offset, "int8")
    out = ref.attention_quantized(q8, qs, k8, ks, v8, vs, key_padding_mask, None, torch.float32, offset)[0]
    B, Skv, H, D = v.shape
    qf, kf = (t.float().permute(0, 2, 1, 3) for t in (q8, k8))  # the scheme's fp32 scores, then float64
    s = (qf @ kf.mT) * qs[..., None] * ref.key_scales_per_token(ks, Skv)[:, :, None, :] * D ** -0.5
    attended = torch.ones(B, Skv, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    s = s.masked_fill(~attended[:, None, None, :], float("-inf")).double()
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    l = torch.where(l == 0, 1.0, l)
    u = (v.double() - offset[:, None].double()).permute(0, 2, 1, 3)  # [B, H, Skv, D]
    exact = p @ u / l + torch.where(p.sum(-1, keepdim=True) > 0, offset[:, :, None, :].double(), 0.0)
    n = vs.shape[-1]
    f = torch.exp(_blocks(s, n).amax(-1) - m)  # [B, H, Sq, n], 0 for a block with no attended key
    v_hat = (v8.double() * ref.key_scales_per_token(vs, Skv).transpose(1, 2)[..., None]).permute(0, 2, 1, 3)
    v_hat = v_hat * attended[:, None, :, None]
    vs = vs.double()[:, :, None, :]  # [B, H, 1, n]
    keys = _blocks(attended[:, None, :, None].double(), n, 2).sum(3)  # [B, 1, n, 1]: n_b
    added = torch.where(p.sum(-1, keepdim=True) > 0, offset[:, :, None, :].double(), 0.0)
    smoothed = (out.permute(0, 2, 1, 3).double() - added).abs()  # the scheme's |out| without the offset
    o_star = p @ u / l
    bound = ((f / 510) @ _blocks(v_hat.abs(), n, 2).sum(3) + ((f / 510) @ keys) * smoothed
             + (0.51 * vs * _blocks(p, n).sum(-1)).sum(-1, keepdim=True)) / l
    f2 = f ** 2 / (12 * 255 ** 2)  # sum_{j in b} (v^_j - out)^2 = S2_b - 2 out S1_b + n_b out^2
    p_term = (f2 @ _blocks(v_hat ** 2, n, 2).sum(3) - 2 * o_star * (f2 @ _blocks(v_hat, n, 2).sum(3))
              + o_star ** 2 * (f2 @ keys))
    var = (p_term + (vs ** 2 / 12 * _blocks(p ** 2, n).sum(-1)).sum(-1, keepdim=True)) / l ** 2
    return out.permute(0, 2, 1, 3).double(), exact, bound, var


# Measured at these sizes (torch seeds 0-2, bf16 inputs, with and without a random mask; session 22, the rounded
# weights' sum as the divisor): P/V rel L2 0.0106-0.0124, 0.98-1.03x the model's prediction; the largest |out - out*| /
# bound 0.09-0.29 (the bound adds every rounding at its worst). Skv = 1: smoothed V is 0, so the scheme is exact there.
# (Against the float64 oracle, Q/K rounding included: test_random_inputs_meet_the_floors.)
INT8PV_SIZES = [(2, 4, 1, 1, 128), (2, 2, 113, 113, 128), (1, 2, 257, 257, 64), (2, 2, 200, 1000, 128),
                (1, 2, 113, 512, 128)]


@pytest.mark.parametrize("B,H,Sq,Skv,D", INT8PV_SIZES,
                         ids=[f"B{p[0]}H{p[1]}-{p[2]}x{p[3]}-D{p[4]}" for p in INT8PV_SIZES])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_int8_pv_rounding_is_within_its_bound(B, H, Sq, Skv, D, masked):
    """The int8 P/V scheme's P @ V error (Q/K codes fixed): every element within the rigorous bound
    (int8_pv_error_model's derivation; + 1e-5 for fp32 arithmetic), and the rel L2 within 0.8-1.25x of the
    uniform-rounding model's prediction (measured 0.97-1.02x): a finer P or V (e.g. 16-bit) would fall below,
    a coarser one (e4m3 P: up to 2^-4 relative per element) above."""
    q, k, v = make_qkv(B, Sq, Skv, H, D, torch.bfloat16)
    mask = make_padding(B, Skv, "random") if masked else None
    if mask is not None:
        mask[:, 0] = True
    out, exact, bound, var = int8_pv_error_model(q, k, v, mask)
    err = (out - exact).abs()
    slack = 1e-5 * (1 + v.float().abs().amax().item())
    assert (err <= bound + slack).all(), f"P/V error over its bound by {(err - bound - slack).max().item():.3g}"
    if Skv == 1:  # one key: smoothed V is 0, the result exact
        assert err.max().item() <= slack
        return
    predicted = (var.expand_as(err).sum().sqrt() / exact.norm()).item()
    measured = ((out - exact).norm() / exact.norm()).item()
    assert 0.8 * predicted <= measured <= 1.25 * predicted, f"P/V rel L2 {measured:.4f} vs predicted {predicted:.4f}"


def test_int8_pv_halves_the_e4m3_error(use_backend):
    """On random inputs the int8 P/V scheme errs less than 0.6x the e4m3 P/V scheme (both int8 Q/K) against the
    float64 oracle: measured 0.42-0.45x (rel L2 0.0153-0.0168 vs 0.0353-0.0391, 113-1000 keys); were its P or V
    rounded as e4m3, it would be ~0.7x or more."""
    use_backend("reference")
    q, k, v = make_qkv(2, 200, 1000, 2, 128, torch.bfloat16)
    oracle = ref.attention_lse(q, k, v)[0]
    int8_pv, e4m3_pv = (rel_l2(run_8bit(q, k, v, s), oracle) for s in (INT8PV, ("int8", "e4m3")))
    assert int8_pv < 0.6 * e4m3_pv, f"int8 P/V rel L2 {int8_pv:.4f} vs e4m3 P/V {e4m3_pv:.4f}"
    assert_floors(run_8bit(q, k, v, INT8PV), oracle, INT8PV)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_pv_padded_keys_are_the_unpadded_call(use_backend, dtype):
    """Trailing padded keys holding huge K and V (batch rows of 300, 129 and 1 attended keys of 300): out and lse
    equal the call on the attended keys alone, row by row, within float error (the same blocks, scales, codes and
    scores; only fp32 sums run over more zeros)."""
    use_backend("reference")
    lengths = [300, 129, 1]
    q, k, v = make_qkv(3, 77, 300, 2, 64, dtype)
    mask = torch.arange(300)[None, :] < torch.tensor(lengths)[:, None]
    huge = 1e30 if dtype == torch.bfloat16 else 3e4
    k_pad, v_pad = k.clone(), v.clone()
    k_pad[~mask] = (huge * torch.sign(torch.randn_like(k_pad[~mask].float()))).to(dtype)
    v_pad[~mask] = -huge
    out, lse = run_8bit(q, k_pad, v_pad, INT8PV, key_padding_mask=mask, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for b, n in enumerate(lengths):
        alone, alone_lse = run_8bit(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], INT8PV, return_lse=True)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=2 * ulp, atol=1e-6)
        torch.testing.assert_close(lse[b:b + 1], alone_lse, rtol=1e-6, atol=1e-6)


@cpu_interpreter
def test_int8_pv_needs_the_reference_or_cuda(use_backend, monkeypatch):
    """The Triton kernel has no int8 P/V form (interpreted, Triton runs here: only the V format stands in the way):
    forced, it is an error naming why; left to choose (no CUDA kernel here), the reference answers, with one
    warning."""
    q, k, v = make_qkv(1, 37, 41, 2, 64, torch.bfloat16)
    use_backend("triton")
    with pytest.raises(_backend.BackendError, match="the Triton kernel takes e4m3 or 16-bit V"):
        run_8bit(q, k, v, INT8PV)
    for name in ("VKERN_ATTENTION_8BIT_BACKEND", "VKERN_QK_NORM_ROPE_BACKEND", "VKERN_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VKERN_QK_NORM_ROPE_BACKEND", "reference")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="e4m3 or 16-bit V"):
        out = run_8bit(q, k, v, INT8PV)
    assert _backend.last_choice["attention_8bit"] == "reference"
    assert torch.equal(out, ref.attention_8bit(q, k, v, qk="int8", pv="int8")[0])


def test_cuda_choice_for_int8_pv(monkeypatch):
    """_attention_8bit_candidates with V's dtype, on a stand-in Hopper build: the CUDA kernel takes int8 V with int8
    Q/K where the build says it has the form (vkern._C.flash_fp8_int8_pv), e4m3 V with either Q/K, no 16-bit V; the
    Triton kernel takes no int8 V."""
    import types

    import vkern._ext
    from vkern.ops import fused_attention as fa

    ext = types.SimpleNamespace(flash_fp8_head_dim=128, flash_fp8_int8_pv=True)
    monkeypatch.setattr(fa, "_hopper_ext_reason", lambda device, entry: None)
    monkeypatch.setattr(vkern._ext, "cuda_ext", lambda: ext)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu, bf16, i8, e4 = torch.device("cpu"), torch.bfloat16, torch.int8, torch.float8_e4m3fn

    def reasons(qk_dtype, v_dtype):
        return fa._attention_8bit_candidates(cpu, bf16, 128, qk_dtype, v_dtype)

    assert reasons(i8, i8) == {"cuda": None, "triton": "the Triton kernel takes e4m3 or 16-bit V", "reference": None}
    assert reasons(e4, i8)["cuda"] == "the CUDA fp8 kernel takes int8 P/V (pv='int8') with int8 Q/K only"
    assert reasons(i8, e4) == {"cuda": None, "triton": None, "reference": None}
    assert reasons(e4, e4)["cuda"] is None
    assert "with e4m3 V (pv='e4m3'), or int8 Q, K and V" in reasons(i8, bf16)["cuda"]
    assert reasons(i8, bf16)["triton"] is None
    assert "head dim 64" in fa._attention_8bit_candidates(cpu, bf16, 64, i8, i8)["cuda"]
    del ext.flash_fp8_int8_pv  # a build from before the int8 P/V form
    assert reasons(i8, i8)["cuda"] == "this build of vkern._C has no int8 P/V form"
    assert reasons(i8, e4)["cuda"] is None


def test_e4m3_qk_with_int8_pv_is_reference_only(use_backend):
    """qk="e4m3", pv="int8" runs on the reference (the CUDA kernel takes int8 P/V with int8 Q/K only): the lse bound,
    and an error between e4m3/bf16's and e4m3/e4m3's (measured 0.039-0.040 vs 0.037-0.038 and 0.052: e4m3 Q/K's
    rounding dominates)."""
    q, k, v = make_qkv(2, 113, 300, 2, 128, torch.bfloat16)
    check_8bit(q, k, v, use_backend("reference"), ("e4m3", "int8"), floors=False)
    oracle = ref.attention_lse(q, k, v)[0]
    err = {pv: rel_l2(run_8bit(q, k, v, ("e4m3", pv)), oracle) for pv in ("int8", "e4m3")}
    assert err["int8"] < err["e4m3"] and err["int8"] < 0.05, err


def test_int8_pv_reference_arguments():
    v = torch.randn(1, 5, 2, 64)
    with pytest.raises(ValueError, match="fmt"):
        ref.quantize_value(v, fmt="int4")
    v8, vs = ref.quantize_value(v, fmt="int8")
    assert v8.dtype == torch.int8 and vs.shape == (1, 2, 1)
    q8, qs = ref.quantize_per_head(v, "int8")
    with pytest.raises(ValueError, match="v_scale"):
        ref.attention_quantized(q8, qs, q8, qs, v8, None)
    assert ref.key_token_block("int8", "int8") == ref.KEY_BLOCK and ref.key_token_block("int8", "bf16") == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_padded_keys_do_not_enter_v_scales(use_backend, backend, dtype):
    """pv="e4m3": V's per-(128-key block, head) scales come from the attended keys only. Padded keys holding a
    huge V give the same scales, and the same e4m3 codes at the attended keys, as those keys holding 0
    (v_to_e4m3 and the reference quantizer alike, bit for bit), and attention_8bit's out and lse are
    bit-identical to the call with those V rows zeroed (the op and the module-level reference)."""
    use_backend(backend)
    B, Sq, Skv, H = 2, 65, 77, 2
    q, k, v = make_qkv(B, Sq, Skv, H, 64, dtype)
    mask = make_padding(B, Skv, "random")
    mask[0, 5] = mask[1, -1] = False
    huge = 1e30 if dtype == torch.bfloat16 else 6e4
    v_zero = v.masked_fill(~mask[:, :, None, None], 0)
    v_huge = v_zero.clone()
    v_huge[~mask] = (huge * torch.sign(torch.randn_like(v_huge[~mask].float()))).to(dtype)
    assert (ops.v_to_e4m3(v_huge)[1] > ops.v_to_e4m3(v_zero)[1]).all()  # unmasked, the garbage sets the scales
    (vq0, vs0), (vq1, vs1) = ops.v_to_e4m3(v_zero, mask), ops.v_to_e4m3(v_huge, mask)
    r8, rs = ref.quantize_per_key_block(v_huge, mask, "e4m3")
    assert torch.equal(vs0, vs1) and torch.equal(vs1, rs)
    attended = mask[:, :, None, None].expand(B, Skv, H, 64)
    codes = [t.view(torch.uint8)[attended] for t in (ref.e4m3_v_from_transposed(vq0, Skv),
                                                     ref.e4m3_v_from_transposed(vq1, Skv), r8)]
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[1], codes[2])
    for scheme in (FP8, ("int8", "e4m3")):
        out0, lse0 = run_8bit(q, k, v_zero, scheme, key_padding_mask=mask, return_lse=True)
        out1, lse1 = run_8bit(q, k, v_huge, scheme, key_padding_mask=mask, return_lse=True)
        assert torch.isfinite(out1).all() and torch.equal(out0, out1) and torch.equal(lse0, lse1)
        ref0, ref1 = (ref.attention_8bit(q, k, t, mask, qk=scheme[0], pv="e4m3")[0] for t in (v_zero, v_huge))
        assert torch.equal(ref0, ref1)


V_FMTS = [("e4m3", torch.float8_e4m3fn, E4M3_INV), ("int8", torch.int8, INT8_INV), ("u8", torch.uint8, INT8_INV)]
V_FMT_IDS = ["e4m3", "int8", "u8"]


def int8_codes(vt):
    """v_to_8bit's "u8" V^T (the int8 codes + 128, as the int8/int8 CUDA kernel reads them) as the int8 codes; other
    formats as they are."""
    return (vt.to(torch.int16) - 128).to(torch.int8) if vt.dtype == torch.uint8 else vt


def scheme_fmt(fmt):
    """The reference quantizer's format for a v_to_8bit format ("u8" holds int8 codes)."""
    return "int8" if fmt == "u8" else fmt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S", [1, 16, 45, 77, 300])
@pytest.mark.parametrize("fmt,dtype,inv", V_FMTS, ids=V_FMT_IDS)
def test_v_to_8bit_layout(use_backend, backend, S, fmt, dtype, inv):
    """V^T's column 16 u + 4 c + 2 g + b holds key 16 u + 8 g + 2 c + b (the CUDA kernel's P fragment order),
    the columns of keys past S hold zeros, the scales are one per (128-key block, head) = the block's amax *
    fp32(1/448) (e4m3) or fp32(1/127) (int8), and the codes are the reference quantizer's, bit for bit (one Triton
    kernel for both formats)."""
    use_backend(backend)
    v = make_qkv(2, 1, S, 3, 64, torch.bfloat16)[2]
    vt, scale = ops.v_to_8bit(v, fmt)
    v8, ref_scale = ref.quantize_per_key_block(v, None, scheme_fmt(fmt))
    n = -(-S // 128)
    amax = torch.stack([v[:, j * 128:(j + 1) * 128].float().abs().amax(dim=(1, 3)) for j in range(n)], dim=2)
    assert vt.shape == (2, 3, 64, -(-S // 16) * 16) and vt.dtype == dtype and torch.equal(scale, ref_scale)
    assert torch.equal(scale, amax * inv)
    vt = int8_codes(vt)  # ("u8": every column, padded ones included, holds the int8 code + 128)
    if fmt != "e4m3":  # the block's largest |V| takes code 127
        assert (v8.abs().amax(dim=(1, 3)) == 127).all() and (vt.abs().amax(dim=(2, 3)) == 127).all()
    keys = torch.tensor([16 * u + 8 * g + 2 * c + b for u in range(vt.shape[3] // 16) for c in range(4)
                         for g in range(2) for b in range(2)])
    for col, key in enumerate(keys.tolist()):
        expect = v8[:, key] if key < S else torch.zeros_like(vt[..., col])
        assert torch.equal(vt[..., col].view(torch.uint8), expect.contiguous().view(torch.uint8)), (col, key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["e4m3", "int8", "u8"])
def test_v_to_8bit_by_spans_is_the_whole(use_backend, backend, fmt):
    """V quantized a span of whole 128-key blocks at a time (the chunked Wan block's key/value pass) gives the
    same V^T columns and scales as the whole sequence at once, bit for bit."""
    use_backend(backend)
    v = make_qkv(1, 1, 300, 2, 64, torch.bfloat16)[2]
    vt, vs = ops.v_to_8bit(v, fmt)
    for start, stop in ((0, 128), (128, 256), (256, 300)):
        part, part_scale = ops.v_to_8bit(v[:, start:stop], fmt)
        assert torch.equal(part_scale, vs[..., start // 128:start // 128 + part_scale.shape[2]])
        assert torch.equal(part.view(torch.uint8), vt[..., start:start + part.shape[3]].view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["e4m3", "int8", "u8"])
def test_v_to_8bit_offset_and_mask_are_the_reference(use_backend, backend, fmt):
    """v_to_8bit(v, fmt, mask, offset) quantizes V - offset with scales from the attended keys: V^T columns and
    scales bit for bit the reference's (quantize_value), padded keys holding huge V included (their codes saturate
    at +-448 / +-127), and value_offset is the mean over the attended keys."""
    use_backend(backend)
    v = make_qkv(2, 1, 300, 2, 64, torch.bfloat16)[2] + 3.0
    mask = make_padding(2, 300, "random")
    v[~mask] = (1e6 * torch.sign(torch.randn_like(v[~mask].float()))).to(v.dtype)
    offset = ops.value_offset(v, mask)
    expect = torch.stack([v[b][mask[b]].float().mean(0) for b in range(2)])
    torch.testing.assert_close(offset, expect, rtol=1e-6, atol=1e-6)
    vt, vs = ops.v_to_8bit(v, fmt, mask, offset)
    r8, rs = ref.quantize_value(v, mask, offset, scheme_fmt(fmt))
    assert torch.equal(vs, rs)
    assert torch.equal(int8_codes(vt).view(torch.uint8), ref.e4m3_v_transposed(r8, vt.shape[3]).view(torch.uint8))
    assert (r8[~mask].float().abs() == (448 if fmt == "e4m3" else 127)).all()
    if fmt == "e4m3":  # the e4m3 name for the same op
        et, es = ops.v_to_e4m3(v, mask, offset)
        assert torch.equal(et.view(torch.uint8), vt.view(torch.uint8)) and torch.equal(es, vs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smoothing_takes_out_the_channel_bias(use_backend, backend):
    """With V = V0 + a large per-channel bias b, the smoothed fp8 attention (attention_8bit) errs by what it errs
    on V0 (its output is out(V0) + b up to the output's rounding, which is as large here); quantizing V as it is
    errs over 4x more than that (7.5x at seed 0 on the reference)."""
    use_backend(backend)
    q, k, v0 = make_qkv(1, 64, 300, 2, 128, torch.float16)
    bias = 8 * torch.rand(2, 128) + 4
    v1 = (v0.float() + bias).to(v0.dtype)
    oracle0, oracle1 = (ref.attention_lse(q, k, t)[0] for t in (v0, v1))
    err0 = (run_8bit(q, k, v0, ("int8", "e4m3")).double() - oracle0).norm().item()
    err1 = (run_8bit(q, k, v1, ("int8", "e4m3")).double() - oracle1).norm().item()
    rounding = (oracle1.abs() * 2.0 ** -11).norm().item()  # fp16 output: half an ulp per element
    assert err1 <= 1.1 * err0 + rounding, (err1, err0, rounding)
    q8, qs = ops.qk_norm_rope(q.flatten(2), None, 0.0, 2, quant="int8")
    k8, ks = ops.k_to_8bit(k, "int8")
    unsmoothed = ops.attention_prequantized(q8, qs, k8, ks, *ops.v_to_e4m3(v1), out_dtype=q.dtype)
    assert (unsmoothed.double() - oracle1).norm().item() > 4 * err1


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_v_offset_needs_8bit_v_and_its_shape(fmt):
    q, k, v = make_qkv(1, 16, 16, 2, 64, torch.bfloat16)
    q8, qs = ops.qk_norm_rope(q.flatten(2), None, 0.0, 2, quant="int8")
    k8, ks = ops.k_to_8bit(k, "int8")
    vt, vs = ops.v_to_8bit(v, fmt)
    with pytest.raises(ValueError, match="v_offset: only for 8-bit V"):
        ops.attention_prequantized(q8, qs, k8, ks, v, None, v_offset=torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match="v_offset"):
        ops.attention_prequantized(q8, qs, k8, ks, vt, vs, v_offset=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="offset"):
        ops.v_to_8bit(v, fmt, offset=torch.zeros(1, 3, 64))


def test_8bit_v_transposed_bad_inputs_name_the_argument():
    """int8 (and e4m3) V^T for attention_prequantized: its layout [B, H, D, >= Skv], its scales, its dtype; and
    v_to_8bit's and attention_8bit's format arguments."""
    q, k, v = make_qkv(1, 20, 20, 2, 64, torch.bfloat16)
    q8, qs = ops.qk_norm_rope(q.flatten(2), None, 0.0, 2, quant="int8")
    k8, ks = ops.k_to_8bit(k, "int8")
    vt, vs = ops.v_to_8bit(v, "int8")
    assert vt.dtype == torch.int8 and vt.shape == (1, 2, 64, 32) and vs.shape == (1, 2, 1)
    with pytest.raises(ValueError, match=r"v: expected shape \(1, 2, 64, \*\)"):
        ops.attention_prequantized(q8, qs, k8, ks, vt.transpose(2, 3), vs)
    with pytest.raises(ValueError, match=r"v: expected shape"):
        ops.attention_prequantized(q8, qs, k8, ks, vt[:, :1], vs)
    with pytest.raises(ValueError, match=r"v: 8-bit V\^T needs at least 20 key columns, got 16"):
        ops.attention_prequantized(q8, qs, k8, ks, vt[..., :16], vs)
    with pytest.raises(ValueError, match=r"v_scale: expected shape \(1, 2, 1\)"):
        ops.attention_prequantized(q8, qs, k8, ks, vt, torch.ones(1, 2, 64))
    with pytest.raises(TypeError, match="v_scale: expected dtype"):
        ops.attention_prequantized(q8, qs, k8, ks, vt, vs.half())
    with pytest.raises(ValueError, match=r"v_scale: 8-bit V \(torch.int8\) needs its per-key-block scales"):
        ops.attention_prequantized(q8, qs, k8, ks, vt, None)
    with pytest.raises(TypeError, match="v: expected dtype"):  # a 16-bit V with scales
        ops.attention_prequantized(q8, qs, k8, ks, v, vs)
    with pytest.raises(TypeError, match="v: expected dtype"):
        ops.attention_prequantized(q8, qs, k8, ks, vt.to(torch.int16), vs)
    with pytest.raises(ValueError, match="fmt: expected 'e4m3', 'int8' or 'u8', got 'int4'"):
        ops.v_to_8bit(v, "int4")
    with pytest.raises(ValueError, match="qk, pv: expected"):
        ops.attention_8bit(q, k, v, qk="int8", pv="u8")
    with pytest.raises(ValueError, match="qk, pv: expected"):
        ops.attention_8bit(q, k, v, qk="int4", pv="int8")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_u8_v_is_the_int8_v(use_backend, backend):
    """attention_prequantized on v_to_8bit's "u8" V^T (the CUDA kernel's own form: no sign flip per call) gives the
    int8 V^T's result bit for bit, with a mask and lse; attention_8bit(pv="int8") is that call."""
    device = "cuda" if backend == "cuda" else "cpu"
    if device == "cuda" and not ON_GPU:
        pytest.skip("needs a CUDA GPU: run `pytest -m gpu` on the GPU machine")
    use_backend(backend)
    q, k, v = make_qkv(2, 150, 300, 2, 128, torch.bfloat16, device)
    mask = make_padding(2, 300, "random", device)
    q8, qs = ops.qk_norm_rope(q.flatten(2), None, 0.0, 2, quant="int8")
    k8, ks = ops.k_to_8bit(k, "int8", mask)
    offset = ops.value_offset(v, mask)
    results = []
    for fmt in ("int8", "u8"):
        vt, vs = ops.v_to_8bit(v, fmt, mask, offset)
        results.append(ops.attention_prequantized(q8, qs, k8, ks, vt, vs, key_padding_mask=mask, return_lse=True,
                                                  out_dtype=q.dtype, v_offset=offset))
    (out, lse), (out_u8, lse_u8) = results
    assert torch.equal(out, out_u8) and torch.equal(lse, lse_u8)
    assert torch.equal(ops.attention_8bit(q, k, v, key_padding_mask=mask, qk="int8", pv="int8"), out)


def test_per_channel_v_scales_are_refused():
    """The V scale layout before session 15 ([B, H, D], per channel) gets a clear error, not a misread."""
    q, k, v = make_qkv(1, 65, 300, 2, 128, torch.bfloat16)
    q8, qs = ops.qk_norm_rope(q.flatten(2), None, 0.0, 2, quant="int8")
    k8, ks = ops.k_to_8bit(k, "int8")
    vq, vs = ops.v_to_e4m3(v)
    with pytest.raises(ValueError, match=r"v_scale: expected shape \(1, 2, 3\)"):
        ops.attention_prequantized(q8, qs, k8, ks, vq, torch.ones(1, 2, 128), out_dtype=q.dtype)


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_v_to_8bit_bad_key_padding_mask(fmt):
    v = torch.randn(2, 17, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        ops.v_to_8bit(v, fmt, torch.ones(2, 13, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype"):
        ops.v_to_8bit(v, fmt, torch.ones(2, 17))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale(use_backend, backend):
    """A flatter scale meets the floors; a sharp one (scores of std ~2.4) is held to the reference, which
    itself must honour the scale (a dropped scale is off by O(1), far beyond e4m3 noise)."""
    q, k, v = make_qkv(1, 257, 129, 2, 64, torch.bfloat16)
    check_8bit(q, k, v, use_backend(backend), scale=0.05)
    check_8bit(q, k, v, backend, scale=0.3, floors=False)
    if backend == "reference":
        assert rel_l2(run_8bit(q, k, v, scale=0.3), ref.attention_lse(q, k, v, scale=0.3)[0]) < 0.15


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -0.3])
def test_scale_zero_or_negative(use_backend, backend, scale):
    """Either an error naming scale or an answer within the floors; never NaN."""
    use_backend(backend)
    q, k, v = make_qkv(1, 70, 77, 2, 64, torch.bfloat16)
    try:
        out = run_8bit(q, k, v, scale=scale)
    except ValueError as e:
        assert "scale" in str(e), str(e)
        return
    assert_floors(out, ref.attention_lse(q, k, v, scale=scale)[0], FP8)


@pytest.mark.parametrize("layout", ["fused", "heads_first", "strided_d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(use_backend, backend, layout):
    q, k, v = make_qkv(1, 113, 113, 2, 128, torch.bfloat16, layout=layout)
    out, _ = check_8bit(q, k, v, use_backend(backend))
    assert torch.equal(out, run_8bit(*(t.contiguous() for t in (q, k, v))))


@pytest.mark.parametrize("scheme,backend", [case(s, backend=b, id=scheme_id(s)) for s in (FP8, ("int8", "e4m3"),
                                                                                      ("int8", "bf16"))
                                            for b in ("reference", "triton")]
                         + [case(INT8PV, backend="reference", id=scheme_id(INT8PV))])
def test_prequantized_path_is_the_same_op(use_backend, monkeypatch, backend, scheme):
    """attention_8bit == qk_norm_rope(weight None, quant) for Q + k_to_8bit (K scales per 128-key block: e4m3
    keys, and int8 keys with an 8-bit pv) or qk_norm_rope (int8/bf16) for K + v_to_8bit + attention_prequantized,
    bit for bit, and the 8-bit operands (from the Triton prologue too) match the reference quantizers bit for
    bit."""
    use_backend(backend)
    monkeypatch.setenv("VKERN_QK_NORM_ROPE_BACKEND", backend)
    qk, pv = scheme
    block = ref.key_token_block(qk, pv)
    q, k, v = make_qkv(2, 77, 300, 2, 64, torch.float16)
    q8, qs = ops.qk_norm_rope(q.flatten(2), None, 0.0, 2, quant=qk)
    k8, ks = ops.k_to_8bit(k, qk) if block > 1 else ops.qk_norm_rope(k.flatten(2), None, 0.0, 2, quant=qk)
    assert ks.shape == ((2, 2, 3) if block > 1 else (2, 2, 300))
    for x, x8, xs, block in ((q, q8, qs, 1), (k, k8, ks, block)):
        r8, rs = ref.quantize_per_head(x.float(), qk, block)
        assert torch.equal(x8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(xs, rs)
    v8bit = pv in ("e4m3", "int8")
    offset = ops.value_offset(v) if v8bit else None
    vq, vs = ops.v_to_8bit(v, pv, offset=offset) if v8bit else (v, None)
    if v8bit:
        assert torch.equal(offset, v.float().mean(1))
        r8, rs = ref.quantize_per_key_block(v.float() - offset[:, None], None, pv)
        assert torch.equal(vs, rs)
        assert torch.equal(vq.view(torch.uint8), ref.e4m3_v_transposed(r8, vq.shape[3]).view(torch.uint8))
    got = ops.attention_prequantized(q8, qs, k8, ks, vq, vs, out_dtype=q.dtype, v_offset=offset)
    assert torch.equal(got, attention_8bit(q, k, v, scheme))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S", [1, 77, 128, 300])
@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_k_to_8bit_block_scales(use_backend, monkeypatch, backend, S, fmt):
    """k_to_8bit: one scale per (128-key block, head) = the amax over the block's attended keys * fp32(1/448)
    (int8: * fp32(1/127)), codes = the reference quantizer's bit for bit; padded keys (huge) change neither the
    scales nor the attended keys' codes, and saturate themselves."""
    use_backend(backend)
    monkeypatch.setenv("VKERN_QK_NORM_ROPE_BACKEND", backend)
    k = make_qkv(2, 1, S, 3, 64, torch.bfloat16)[1]
    k8, ks = ops.k_to_8bit(k, fmt)
    n = -(-S // 128)
    dtype, inv, top = (torch.float8_e4m3fn, E4M3_INV, 448) if fmt == "e4m3" else (torch.int8, INT8_INV, 127)
    assert k8.shape == k.shape and k8.dtype == dtype and ks.shape == (2, 3, n)
    amax = torch.stack([k[:, j * 128:(j + 1) * 128].float().abs().amax(dim=(1, 3)) for j in range(n)], dim=2)
    assert torch.equal(ks, amax * inv)
    r8, rs = ref.quantize_per_key_block(k, fmt=fmt)
    assert torch.equal(k8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(ks, rs)
    mask = make_padding(2, S, "random")
    mask[:, 0] = True
    k_huge = k.clone()
    k_huge[~mask] = 3e4
    (m8, ms), (h8, hs) = ops.k_to_8bit(k, fmt, mask), ops.k_to_8bit(k_huge, fmt, mask)
    assert torch.equal(ms, hs) and torch.equal(ms, ref.quantize_per_key_block(k_huge, mask, fmt)[1])
    assert torch.equal(m8.view(torch.uint8)[mask], h8.view(torch.uint8)[mask])
    assert (h8.float()[~mask] == top).all()
    if fmt == "e4m3":  # the e4m3 name for the same op
        e8, es = ops.k_to_e4m3(k_huge, mask)
        assert torch.equal(e8.view(torch.uint8), h8.view(torch.uint8)) and torch.equal(es, hs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_and_per_key_scales_are_one_function(use_backend, backend):
    """attention_prequantized with K scales per 128-key block == with the same scales repeated per key, bit for
    bit (both the Triton kernel and the reference read them per key)."""
    use_backend(backend)
    q, k, v = make_qkv(1, 65, 300, 2, 64, torch.float16)
    q8, qs = ops.qk_norm_rope(q.flatten(2), None, 0.0, 2, quant="e4m3")
    k8, ks = ops.k_to_e4m3(k)
    vq, vs = ops.v_to_e4m3(v)
    per_key = ks.repeat_interleave(128, dim=2)[..., :300].contiguous()
    got = ops.attention_prequantized(q8, qs, k8, ks, vq, vs, out_dtype=q.dtype)
    assert torch.equal(got, ops.attention_prequantized(q8, qs, k8, per_key, vq, vs, out_dtype=q.dtype))
    with pytest.raises(ValueError, match="k_scale: expected shape"):
        ops.attention_prequantized(q8, qs, k8, ks[..., :2], vq, vs, out_dtype=q.dtype)


def test_qk_norm_rope_token_block_arguments():
    x = torch.randn(1, 5, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="token_block"):
        ops.qk_norm_rope(x, None, 0.0, 2, token_block=128)
    with pytest.raises(ValueError, match="fmt"):
        ops.k_to_8bit(x.view(1, 5, 2, 64), "int4")
    with pytest.raises(ValueError, match="token_block"):
        ops.qk_norm_rope(x, None, 0.0, 2, quant="e4m3", token_block=64)
    with pytest.raises(ValueError, match="key_padding_mask: only with token_block"):
        ops.qk_norm_rope(x, None, 0.0, 2, quant="e4m3", key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        ops.qk_norm_rope(x, None, 0.0, 2, quant="e4m3", token_block=128,
                         key_padding_mask=torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_false_and_determinism(use_backend, backend):
    use_backend(backend)
    q, k, v = make_qkv(1, 77, 113, 2, 64, torch.float16)
    out = run_8bit(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    out2, _ = run_8bit(q, k, v, return_lse=True)
    assert torch.equal(out, out2) and torch.equal(out, run_8bit(q, k, v))


@cpu_interpreter
def test_unsupported_head_dim_is_never_a_wrong_answer(use_backend, monkeypatch):
    """D = 96: forcing the kernel is an error naming the head dim; left to choose, the reference answers,
    with one warning."""
    q, k, v = make_qkv(1, 37, 41, 2, 96, torch.bfloat16)
    use_backend("triton")
    with pytest.raises(_backend.BackendError, match="head dim 96"):
        attention_8bit(q, k, v)
    for name in ("VKERN_ATTENTION_8BIT_BACKEND", "VKERN_QK_NORM_ROPE_BACKEND", "VKERN_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="head dim 96"):
        out = attention_8bit(q, k, v)
    assert _backend.last_choice["attention_8bit"] == "reference"
    assert_floors(out, ref.attention_lse(q, k, v)[0], FP8)


@pytest.mark.parametrize("scheme,backend", [case(FP8, backend="reference", id="e4m3/e4m3"),
                                            case(("int8", "bf16"), backend="reference", id="int8/bf16"),
                                            case(INT8PV, backend="reference", id="int8/int8"),
                                            case(FP8, backend="triton", id="e4m3/e4m3")])
def test_compile_fullgraph(use_backend, backend, scheme):
    use_backend(backend)

    def fn(q, k, v, mask):
        out, lse = attention_8bit(q, k, v, scheme, key_padding_mask=mask, return_lse=True)
        return out * 2, lse + 1

    inputs = [(*make_qkv(2, S, S, 2, 64, torch.bfloat16), make_padding(2, S, "dead_row")) for S in (65, 129)]
    assert_compiled_equals_eager(fn, inputs, "attention_8bit", backend)


def test_fake_tensor_shapes_and_dtypes():
    assert_fake_shapes(attention_8bit, torch.float16, 77)
    assert_fake_shapes(lambda *a, **kw: attention_8bit(*a, INT8PV, **kw), torch.bfloat16, 300)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        v = torch.empty(2, 300, 3, 64, dtype=torch.bfloat16)
        for fmt, dtype in (("e4m3", torch.float8_e4m3fn), ("int8", torch.int8)):
            vt, vs = ops.v_to_8bit(v, fmt)
            assert vt.shape == (2, 3, 64, 304) and vt.dtype == dtype
            assert vs.shape == (2, 3, 3) and vs.dtype == torch.float32


@pytest.mark.parametrize("pv", ["bf16", "e4m3", "int8"])
def test_no_keys_gives_zero_and_minus_inf_lse(pv):
    """As attention(): a query with no key to attend gets out 0 and lse -inf (not an error from the key scales)."""
    q = torch.randn(2, 5, 3, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 0, 3, 64, dtype=torch.bfloat16)
    out, lse = ops.attention_8bit(q, k, k, pv=pv, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and not out.any()
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32 and (lse == -torch.inf).all()
    assert torch.equal(out, ops.attention(q, k, k))


@pytest.mark.parametrize("pv", ["bf16", "e4m3", "int8"])
def test_float32_inputs_quantize_as_16_bit_ones(pv):
    """A float32 model's q, k, v (e.g. vkern.patch's HunyuanVideo processor on a float32 model) take the same 8-bit
    path, computed by the reference emulation: a float32 output as near the exact one as the bf16 call's."""
    q, k, v = make_qkv(1, 29, 150, 2, 128, torch.float32)
    exact = ref.attention_lse(q, k, v)[0]
    out = ops.attention_8bit(q, k, v, qk="int8", pv=pv)
    assert out.dtype == torch.float32
    err16 = rel_l2(ops.attention_8bit(q.bfloat16(), k.bfloat16(), v.bfloat16(), qk="int8", pv=pv), exact)
    assert rel_l2(out, exact) <= 1.1 * err16


def test_bad_inputs_name_the_argument():
    q, k, v = make_qkv(2, 13, 17, 2, 64, torch.bfloat16)
    with pytest.raises(TypeError, match="q: expected dtype"):
        attention_8bit(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="q: expected dtype"):  # already-quantized input goes to attention_prequantized
        attention_8bit(q.to(torch.float8_e4m3fn), k, v)
    with pytest.raises(TypeError, match="k: expected dtype"):
        attention_8bit(q, k.half(), v)
    with pytest.raises(ValueError, match="q: expected 4 dimensions"):
        attention_8bit(q.flatten(2), k, v)
    with pytest.raises(ValueError, match="v: expected a tensor on cpu"):
        attention_8bit(q, k, v.to("meta"))
    with pytest.raises(ValueError, match="k: expected shape"):
        attention_8bit(q, k[..., :32], v)
    with pytest.raises(ValueError, match="v: expected shape"):
        attention_8bit(q, k, v[:, :5])
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        attention_8bit(q, k, v, key_padding_mask=torch.ones(2, 13, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask: expected dtype"):
        attention_8bit(q, k, v, key_padding_mask=torch.ones(2, 17))
    with pytest.raises(ValueError, match="qk, pv: expected"):
        attention_8bit(q, k, v, ("fp8", "e4m3"))
    with pytest.raises(ValueError, match="qk, pv: expected"):
        attention_8bit(q, k, v, ("int8", "int4"))


# ------------------------------------------------------------------------------------------ GPU tests
# Real-size inputs (head dim 128 unless named): random, and q/k/v as a diffusers WanAttention computes them.
REAL_INPUTS = [
    ("wan1.3b-480p self, random", lambda: make_qkv(1, 32760, 32760, 12, 128, torch.bfloat16, "cuda")),
    ("wan1.3b-480p self, WanAttention", lambda: wan_qkv(1, 32760, 1536, 12, torch.bfloat16, "cuda")),
    ("wan1.3b-480p cross, WanAttention", lambda: wan_qkv(1, 32760, 1536, 12, torch.bfloat16, "cuda", "cross")),
]
REAL_IDS = ["wan-self-random", "wan-self", "wan-cross"]
REAL_D64 = ("head dim 64", lambda: make_qkv(1, 17550, 17550, 2, 64, torch.bfloat16, "cuda"))
GPU_ODD = [p[:5] for p in ODD_SIZES] + [(1, 3, 4097, 4097, 128), (2, 4, 4097, 333, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Sq,Skv,D", GPU_ODD, ids=[f"B{p[0]}H{p[1]}-{p[2]}x{p[3]}-D{p[4]}" for p in GPU_ODD])
def test_gpu_odd_sizes(use_backend, scheme, dtype, B, H, Sq, Skv, D):
    q, k, v = make_qkv(B, Sq, Skv, H, D, dtype, "cuda")
    check_8bit(q, k, v, use_backend("triton"), scheme)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("pattern", ["random", "prefix", "dead_row"])
def test_gpu_key_padding_mask(use_backend, pattern, backend):
    q, k, v = make_qkv(2, 4096 + 256, 4096 + 200, 4, 128, torch.bfloat16, "cuda")
    check_8bit(q, k, v, use_backend(backend), key_padding_mask=make_padding(2, 4096 + 200, pattern, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("name,inputs", REAL_INPUTS + [REAL_D64], ids=REAL_IDS + ["d64-17550"])
def test_gpu_real_shapes(use_backend, scheme, name, inputs):
    """Sampled query rows against the float64 oracle (floors, lse bound, 1.25x/2x the reference), and
    the whole output against cuDNN bf16 (whose own error, ~0.2% rel L2, is far below the floors')."""
    q, k, v = inputs()
    rows = sampled_rows(q.shape[1])
    check_8bit(q, k, v, use_backend("triton"), scheme, rows=rows)
    out = run_8bit(q, k, v, scheme)
    assert torch.isfinite(out).all()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        cudnn = torch_attention(q, k, v)
    assert_floors(out, cudnn.double(), scheme, what=f"{name} vs cuDNN")


# The CUDA kernel's 8-bit forms (csrc/flash_attention.cu, head dim 128; e4m3 or int8 Q/K, e4m3 P/V on smoothed V, and
# int8 Q/K with u8 P and int8 V (int8/int8); O promoted to fp32 per key block with the block's V scale): lengths around
# its 128-row/128-key tiles, the 16-key V^T padding and the 4-float K-scale rows (Skv % 4 != 0 takes a padded copy).
CUDA_FP8_SIZES = [(1, 2, 1, 1), (2, 1, 113, 113), (1, 1, 113, 512), (2, 4, 1, 1000), (2, 2, 200, 333),
                  (1, 2, 129, 130), (1, 3, 4097, 4097), (1, 2, 256, 4096 + 17), (1, 2, 193, 191), (2, 1, 100, 385),
                  (1, 2, 130, 577)]
CUDA_SCHEMES = [FP8, ("int8", "e4m3"), INT8PV]


@pytest.fixture(params=[128, 192], ids=["keys128", "keys192"])
def fp8_keys(request, monkeypatch):
    """The CUDA 8-bit kernel's key tile (VKERN_FLASH_FP8_KEYS): 128, O promoted to fp32 per block; 192, O in the
    tensor cores with each 64-key group's V scale folded into its P (session 20). The int8/int8 form has 128-key
    tiles only and takes them whatever the setting says (test_gpu_cuda_int8_pv_ignores_the_192_key_setting)."""
    monkeypatch.setenv("VKERN_FLASH_FP8_KEYS", str(request.param))
    return request.param


def skip_int8_pv_at_192(scheme, fp8_keys):
    if scheme == INT8PV and fp8_keys == 192:
        pytest.skip("int8/int8 runs the 128-key tile under VKERN_FLASH_FP8_KEYS=192 too (the keys128 case)")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", CUDA_SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Sq,Skv", CUDA_FP8_SIZES, ids=[f"B{p[0]}H{p[1]}-{p[2]}x{p[3]}" for p in CUDA_FP8_SIZES])
def test_gpu_cuda_fp8_odd_sizes(use_backend, fp8_keys, scheme, dtype, B, H, Sq, Skv):
    skip_int8_pv_at_192(scheme, fp8_keys)
    q, k, v = make_qkv(B, Sq, Skv, H, 128, dtype, "cuda")
    check_8bit(q, k, v, use_backend("cuda"), scheme)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", CUDA_SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("pattern", ["random", "dead_row"])
def test_gpu_cuda_fp8_key_padding_mask(use_backend, fp8_keys, scheme, pattern):
    skip_int8_pv_at_192(scheme, fp8_keys)
    q, k, v = make_qkv(2, 4096 + 256, 4096 + 200, 4, 128, torch.bfloat16, "cuda")
    check_8bit(q, k, v, use_backend("cuda"), scheme, key_padding_mask=make_padding(2, 4096 + 200, pattern, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [("int8", "e4m3"), INT8PV], ids=scheme_id)
def test_gpu_cuda_fp8_v_scales_spread(use_backend, fp8_keys, scheme):
    """V whose 128-key blocks differ 2^12 in scale (smoothed, the small blocks hold V's mean): within the floors and
    the 1.25x/2x rule. (Run 74's tensor-core-O form, which shifted each block's P by its V scale ratio to the largest,
    failed here: 0.0483 vs 1.25 x 0.0376, its small blocks' P rounding as e4m3 subnormals.)"""
    skip_int8_pv_at_192(scheme, fp8_keys)
    q, k, v = make_qkv(1, 1000, 4096 + 17, 2, 128, torch.bfloat16, "cuda")
    block_gain = 2.0 ** -torch.arange(33, device="cuda").remainder(13).float()  # 1 ... 2^-12 per 128-key block
    v = (v.float() * block_gain.repeat_interleave(128)[:v.shape[1], None, None]).to(v.dtype)
    check_8bit(q, k, v, use_backend("cuda"), scheme)


@pytest.mark.gpu
def test_gpu_cuda_int8_pv_ignores_the_192_key_setting(use_backend, monkeypatch):
    """The int8/int8 form has 128-key tiles only: under VKERN_FLASH_FP8_KEYS=192 it runs them all the same, so out
    and lse are the 128-key call's bit for bit (with a key-padding mask and a partial last block)."""
    q, k, v = make_qkv(2, 300, 1000 + 17, 2, 128, torch.bfloat16, "cuda")
    mask = make_padding(2, 1000 + 17, "random", "cuda")
    use_backend("cuda")
    results = []
    for keys in (128, 192):
        monkeypatch.setenv("VKERN_FLASH_FP8_KEYS", str(keys))
        results.append(run_8bit(q, k, v, INT8PV, key_padding_mask=mask, return_lse=True))
        assert _backend.last_choice["attention_8bit"] == "cuda"
    (out, lse), (out192, lse192) = results
    assert torch.equal(out, out192) and torch.equal(lse, lse192)
    check_8bit(q, k, v, "cuda", INT8PV, key_padding_mask=mask)


# The int8/int8 kernel's schedule options (session 22): exponentials on the FMA pipe (VKERN_FLASH_EXP_FMA: 2 of each
# 8, a cubic with relative error 1.0e-4, against MUFU.EX2's ~2^-22) and the consumers' products in turns
# (VKERN_FLASH_FP8_TURNS: 1 passed when issued, 2 when the products are done, session 23); the default is neither
# (every other int8/int8 GPU test runs it).
INT8PV_SCHEDULES = [(fma, turns) for fma in ("0", "2") for turns in ("0", "1", "2")]


@pytest.mark.gpu
@pytest.mark.parametrize("fma,turns", INT8PV_SCHEDULES, ids=[f"fma{f}-turns{t}" for f, t in INT8PV_SCHEDULES])
@pytest.mark.parametrize("B,H,Sq,Skv", [(2, 2, 200, 333), (1, 3, 4097, 4097), (2, 1, 100, 385), (1, 2, 77, 77)],
                         ids=["B2H2-200x333", "B1H3-4097x4097", "B2H1-100x385", "B1H2-77x77"])  # 3, 33, 4, 1 blocks
def test_gpu_cuda_int8_pv_schedules(use_backend, monkeypatch, fma, turns, B, H, Sq, Skv):
    """Every schedule within the floors and the 1.25x/2x rule (with a key-padding mask too); turns change only the
    order the consumers issue in, so out and lse are the MUFU-only schedule's bit for bit; the FMA pipe's exponentials
    move a code by 1 where 255 e lies within ~0.03 of a rounding boundary (0.13% of uniform inputs, bench/NOTES.md
    session 22), so out stays within 2e-3 rel L2 of the MUFU-only schedule's (a wrong exponent or cubic would move
    whole blocks)."""
    q, k, v = make_qkv(B, Sq, Skv, H, 128, torch.bfloat16, "cuda")
    mask = make_padding(B, Skv, "random", "cuda")
    use_backend("cuda")
    monkeypatch.setenv("VKERN_FLASH_EXP_FMA", "0")
    monkeypatch.setenv("VKERN_FLASH_FP8_TURNS", "0")
    base, base_lse = run_8bit(q, k, v, INT8PV, key_padding_mask=mask, return_lse=True)
    monkeypatch.setenv("VKERN_FLASH_FP8_TURNS", turns)
    same_fma, same_fma_lse = run_8bit(q, k, v, INT8PV, key_padding_mask=mask, return_lse=True)
    assert torch.equal(same_fma, base) and torch.equal(same_fma_lse, base_lse)
    monkeypatch.setenv("VKERN_FLASH_EXP_FMA", fma)
    out = run_8bit(q, k, v, INT8PV, key_padding_mask=mask)
    assert _backend.last_choice["attention_8bit"] == "cuda"
    diff = rel_l2(out, base.double())
    assert diff < 2e-3, f"schedule fma {fma}, turns {turns}: rel L2 {diff:.2e} from the MUFU-only schedule"
    check_8bit(q, k, v, "cuda", INT8PV)
    check_8bit(q, k, v, "cuda", INT8PV, key_padding_mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("slack", ["1", "8"])
@pytest.mark.parametrize("B,H,Sq,Skv", [(2, 2, 200, 333), (1, 3, 4097, 4097)], ids=["B2H2-200x333", "B1H3-4097x4097"])
def test_gpu_cuda_int8_pv_rescale_slack(use_backend, monkeypatch, slack, B, H, Sq, Skv):
    """O's rescale slack (session 24) changes which max O is kept against, not P's codes (each block's own max):
    out and lse equal slack 0's up to fp32 rounding, so each bf16 output element lies within one bf16 step (2^-7 of
    its magnitude) of slack 0's plus the fp32 rounding of O's sum, which is one of weights summing to 1: at most
    2^-24 of max |v| per key block added and 2^-22 per block factor (exp2 of another argument), under 2^-16 max |v|
    for these <= 33 blocks. With a mask too; every floor holds; a slack outside 0-8 is a clear error. (Run 88: rel
    L2 1.4e-5 - 7.7e-5 from slack 0, bf16 rounding flips; run 89: one bf16 step alone was exceeded by 8.7e-8 - 2.0e-6
    at outputs near 0, where O's sum cancels.)"""
    q, k, v = make_qkv(B, Sq, Skv, H, 128, torch.bfloat16, "cuda")
    sharp = q * 3  # the block maxima then move by more than 1 (log2) between blocks: slack 1 takes both branches
    mask = make_padding(B, Skv, "random", "cuda")
    use_backend("cuda")
    monkeypatch.setenv("VKERN_FLASH_RESCALE_SLACK", "0")
    base, base_lse = run_8bit(sharp, k, v, INT8PV, key_padding_mask=mask, return_lse=True)
    monkeypatch.setenv("VKERN_FLASH_RESCALE_SLACK", slack)
    out, lse = run_8bit(sharp, k, v, INT8PV, key_padding_mask=mask, return_lse=True)
    assert _backend.last_choice["attention_8bit"] == "cuda"
    over = (out.float() - base.float()).abs() - base.float().abs() * 2 ** -7 - v.float().abs().max() * 2 ** -16
    assert over.max().item() <= 0, f"slack {slack}: an element {over.max().item():.2e} over the bound from slack 0"
    attended = torch.isfinite(base_lse)
    assert torch.equal(attended, torch.isfinite(lse))
    assert (lse[attended] - base_lse[attended]).abs().max().item() < 1e-4
    check_8bit(q, k, v, "cuda", INT8PV)
    check_8bit(q, k, v, "cuda", INT8PV, key_padding_mask=mask)
    monkeypatch.setenv("VKERN_FLASH_RESCALE_SLACK", "9")
    with pytest.raises(ValueError, match="VKERN_FLASH_RESCALE_SLACK"):
        run_8bit(q, k, v, INT8PV)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,Sq,Skv,pattern", tail_split_cases(), ids=["main-and-tail", "tail-only", "masked-parts"])
def test_gpu_cuda_int8_pv_tail_split(use_backend, monkeypatch, B, H, Sq, Skv, pattern):
    """The tail split (session 27) merges parts that each hold O normalized in fp32 and their lse; it changes only
    the fp32 rounding of O's sums (which max O is kept against, the merge's weights), not P's codes (each block's
    own max): each bf16 output element within one bf16 step (2^-7 of its magnitude) of the unsplit call's plus 2^-16
    max |v| (as the rescale slack test), lse within 1e-4 with the same rows -inf (a part with no attended key weighs
    0; a row with none at all is 0, lse -inf), and the floors and the 1.25x/2x rule met."""
    q, k, v = make_qkv(B, Sq, Skv, H, 128, torch.bfloat16, "cuda")
    mask = make_padding(B, Skv, pattern, "cuda")
    use_backend("cuda")
    monkeypatch.setenv("VKERN_FLASH_TAIL_SPLIT", "0")
    base, base_lse = run_8bit(q, k, v, INT8PV, key_padding_mask=mask, return_lse=True)
    assert fused_attention.last_tail_split_floats == 0
    monkeypatch.setenv("VKERN_FLASH_TAIL_SPLIT", "1")
    out, lse = run_8bit(q, k, v, INT8PV, key_padding_mask=mask, return_lse=True)
    assert _backend.last_choice["attention_8bit"] == "cuda"
    assert fused_attention.last_tail_split_floats > 0, "this launch was not split"
    if pattern == "dead_then_short":
        # Every attended key of batch row 1 lies in the first part, whose weight is then exactly 1 (the later parts'
        # lse -inf, weight 0), and the unsplit kernel's fully masked blocks leave O as it was: the same bits.
        assert torch.equal(out, base) and torch.equal(lse, base_lse)
    else:  # (the merge's weights and O's other reference max move some fp32 bits of lse at least)
        assert not torch.equal(out, base) or not torch.equal(lse, base_lse), "no split happened (the same bits)"
    over = (out.float() - base.float()).abs() - base.float().abs() * 2 ** -7 - v.float().abs().max() * 2 ** -16
    assert over.max().item() <= 0, f"an element {over.max().item():.2e} over the bound from the unsplit call"
    attended = torch.isfinite(base_lse)
    assert torch.equal(attended, torch.isfinite(lse))
    assert (lse[attended] - base_lse[attended]).abs().max().item() < 1e-4
    if pattern == "dead_then_short":
        assert not attended[0].any() and (out[0] == 0).all()
    rows = None if Sq < 4096 else torch.cat([sampled_rows(Sq), torch.arange(Sq - 5 * 128, Sq, device="cuda")]).unique()
    check_8bit(q, k, v, "cuda", INT8PV, key_padding_mask=mask, rows=rows)
    monkeypatch.setenv("VKERN_FLASH_TAIL_SPLIT", "2")
    with pytest.raises(ValueError, match="VKERN_FLASH_TAIL_SPLIT"):
        run_8bit(q, k, v, INT8PV)


@pytest.mark.gpu
def test_gpu_tail_split_forms():
    """Which launch forms take the tail split is the extension's decision alone (csrc/flash_attention.cu,
    split_schedule; the wrappers ask flash_tail_split_floats with the launch's own arguments): at a split shape (sms
    + 5 tiles of 33 key blocks: 5 tail tiles in 2 parts) the 16-bit forms and the int8 P/V form's default schedule
    take 5 x 2 slots of 128 x (128 + 1) floats, with 3 stages only; the e4m3 and int8-Q/K forms, the int8 P/V form
    with FMA exponentials or turns, and a launch whose last wave is full take none."""
    from vkern._ext import cuda_ext

    ext = cuda_ext()
    B, H, Sq, Skv, _ = tail_split_cases()[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def floats(*form, stages=3, q_len=Sq):  # form: eight_bit, int8_pv, exp_fma, turns
        return ext.flash_tail_split_floats(B, H, q_len, Skv, 128, stages, *form)

    assert floats() == floats(True, True, 0, 0) == 5 * 2 * 128 * 129
    assert floats(stages=2) == floats(True, True, 0, 0, stages=2) == 0
    assert floats(True, False, 0, 0) == 0
    assert floats(True, True, 2, 0) == floats(True, True, 0, 1) == floats(True, True, 0, 2) == 0
    assert floats(q_len=2 * sms * 128) == floats(True, True, 0, 0, q_len=2 * sms * 128) == 0
    # The 16-bit wide tile (176 keys, 2 stages at head dim 128): its key blocks are 176 wide (parts of >= 16 of them).
    wide = ext.flash_tail_split_floats(B, H, Sq, 16 * 176 * 2, 128, 2, False, False, 0, 0, 176)
    assert wide == 5 * 2 * 128 * 129
    assert ext.flash_tail_split_floats(B, H, Sq, Skv, 128, 2, False, False, 0, 0, 176) == 0  # 24 blocks: one part
    assert ext.flash_tail_split_floats(B, H, Sq, 16 * 176 * 2, 128, 3, False, False, 0, 0, 176) == 0
    assert ext.flash_tail_split_floats(B, H, Sq, 16 * 176 * 2, 128, 2, True, True, 0, 0, 176) == 0
    # At head dim 64 the wide tile has 3 stages (not 2).
    assert ext.flash_tail_split_floats(B, H, Sq, 16 * 176 * 2, 64, 3, False, False, 0, 0, 176) == 5 * 2 * 128 * 65
    assert ext.flash_tail_split_floats(B, H, Sq, 16 * 176 * 2, 64, 2, False, False, 0, 0, 176) == 0
    # Head dim 64's 224-key tile (3 stages; none at head dim 128).
    assert ext.flash_tail_split_floats(B, H, Sq, 16 * 224 * 2, 64, 3, False, False, 0, 0, 224) == 5 * 2 * 128 * 65
    assert ext.flash_tail_split_floats(B, H, Sq, 16 * 224 * 2, 128, 3, False, False, 0, 0, 224) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["e4m3", "int8", "u8"])
def test_gpu_v_to_8bit_is_the_reference(use_backend, fmt):
    """The Triton V quantizer compiled for the GPU (the CUDA kernel's input): V^T and scales bit for bit the
    reference's, with an offset and padded keys holding huge V."""
    use_backend("cuda")
    v = make_qkv(2, 1, 1000 + 17, 4, 128, torch.bfloat16, "cuda")[2] + 3.0
    mask = make_padding(2, 1000 + 17, "random", "cuda")
    v[~mask] = 1e6
    offset = ops.value_offset(v, mask)
    vt, vs = ops.v_to_8bit(v, fmt, mask, offset)
    r8, rs = ref.quantize_value(v, mask, offset, scheme_fmt(fmt))
    assert torch.equal(vs, rs)
    assert torch.equal(int8_codes(vt).view(torch.uint8), ref.e4m3_v_transposed(r8, vt.shape[3]).view(torch.uint8))


@pytest.mark.gpu
def test_gpu_cuda_fp8_is_the_default_on_hopper(monkeypatch):
    """attention_8bit's own choice for e4m3 P/V with e4m3 or int8 Q/K, and for int8/int8, at head dim 128 on sm_90
    is the CUDA kernel; the other schemes and head dims stay on Triton (int8/int8 at head dim 64: the reference)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUDA fp8 kernel is Hopper-only")
    q, k, v = make_qkv(1, 300, 300, 2, 128, torch.bfloat16, "cuda")
    for scheme in CUDA_SCHEMES:
        attention_8bit(q, k, v, scheme)
        assert _backend.last_choice["attention_8bit"] == "cuda"
    attention_8bit(q, k, v, ("int8", "bf16"))
    assert _backend.last_choice["attention_8bit"] == "triton"
    attention_8bit(*make_qkv(1, 300, 300, 2, 64, torch.bfloat16, "cuda"), FP8)
    assert _backend.last_choice["attention_8bit"] == "triton"
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="head dim 64"):
        attention_8bit(*make_qkv(1, 300, 300, 2, 64, torch.bfloat16, "cuda"), INT8PV)
    assert _backend.last_choice["attention_8bit"] == "reference"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", CUDA_SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("name,inputs", REAL_INPUTS, ids=REAL_IDS)
def test_gpu_cuda_fp8_real_shapes(use_backend, fp8_keys, scheme, name, inputs):
    """As test_gpu_real_shapes, for the CUDA kernel; and its output is within the same noise of the Triton
    kernel's (the same quantization, different P roundings; int8/int8 has no Triton form)."""
    skip_int8_pv_at_192(scheme, fp8_keys)
    q, k, v = inputs()
    check_8bit(q, k, v, use_backend("cuda"), scheme, rows=sampled_rows(q.shape[1]))
    out = run_8bit(q, k, v, scheme)
    assert torch.isfinite(out).all()
    if scheme == INT8PV:
        return
    use_backend("triton")
    triton_out = run_8bit(q, k, v, scheme)
    # Each is within the e4m3 floor (rel L2 0.071) of the oracle with the same Q/K/V codes; only the P roundings
    # differ, a fraction of that noise.
    diff = rel_l2(out, triton_out.double())
    assert diff < 0.071, f"{name}: CUDA vs Triton fp8 rel L2 {diff:.4f}"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", CUDA_SCHEMES, ids=scheme_id)
@pytest.mark.parametrize("tokens", [32760, 75600], ids=["480p", "720p"])
def test_gpu_cuda_fp8_is_the_emulation_on_wan_inputs(request, use_backend, fp8_keys, scheme, tokens):
    """On WanAttention self inputs (V with channel means: O grows block by block) the kernel, each block's P V added
    to O in fp32, is as accurate as the fp32 emulation (within 5%). (O accumulated in the tensor cores instead was
    not: run 55, 0.0189 vs 0.0124 at 480p and 0.0365 vs 0.0093 at 720p, int8 Q/K; with V smoothed, runs 74-76,
    still 0.0102-0.0120 vs 0.0092 at 720p.) int8/int8: each block's u8 P against its own row max, as the emulation
    rounds it (session 21's prediction: ~0.010 at 480p)."""
    skip_int8_pv_at_192(scheme, fp8_keys)
    if fp8_keys == 192 and tokens == 75600 and scheme == ("int8", "e4m3"):
        # The opt-in 192-key tile accumulates O in the tensor cores: run 78 (4cd0679) measured 0.0104 vs the
        # emulation's 0.0094 on these sampled rows (1.11x; within issue 3's 0.02). Its e4m3 Q/K case passed.
        request.applymarker(pytest.mark.xfail(strict=True, reason="192-key tile: tensor-core O, 1.11x at 720p"))
    q, k, v = wan_qkv(1, tokens, 1536, 12, torch.bfloat16, "cuda")
    rows = sampled_rows(q.shape[1])
    oracle = ref.attention_lse(q[:, rows], k, v)[0].double()
    use_backend("reference")
    emulated = rel_l2(attention_8bit(q[:, rows], k, v, scheme), oracle)
    use_backend("cuda")
    kernel = rel_l2(run_8bit(q, k, v, scheme)[:, rows], oracle)
    assert kernel <= 1.05 * emulated, f"CUDA kernel: rel L2 {kernel:.4f} vs the emulation's {emulated:.4f}"


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,backend", [(FP8, "triton"), (("int8", "bf16"), "triton"), (FP8, "cuda"),
                                            (("int8", "e4m3"), "cuda"), (INT8PV, "cuda")],
                         ids=["e4m3/e4m3-triton", "int8/bf16-triton", "e4m3/e4m3-cuda", "int8/e4m3-cuda",
                              "int8/int8-cuda"])
def test_gpu_compile_fullgraph_inductor(use_backend, scheme, backend):
    use_backend(backend)
    q, k, v = make_qkv(1, 1025, 1025, 4, 128, torch.bfloat16, "cuda")

    def fn(q, k, v):
        out, lse = attention_8bit(q, k, v, scheme, return_lse=True)
        return out.flatten(2) * 2, lse

    got, expected = torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v)
    assert _backend.last_choice["attention_8bit"] == backend
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
