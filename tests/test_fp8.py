"""fp8 e4m3 quantization: the reference's numerics, the op's contract, and (GPU) the CUDA kernel
bit for bit against the reference."""
import pytest
import torch

from vkern import ops
from vkern.reference import fp8 as ref

E4M3 = torch.float8_e4m3fn


def e4m3_half_ulp(v):
    """Half the spacing of e4m3 values around |v| (3 mantissa bits; subnormal spacing 2^-9)."""
    exp = torch.floor(torch.log2(v.abs().clamp_min(2.0**-6)))
    return 2.0 ** (exp - 3) / 2


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 113), (64, 4097), (3, 5, 48)])
def test_reference_rounds_to_nearest_within_range(granularity, shape):
    x = torch.randn(shape) * 3
    q, scale = ref.fp8_quantize(x, granularity)
    assert q.dtype == E4M3 and scale.dtype == torch.float32
    assert scale.shape == (() if granularity == "tensor" else (*shape[:-1], 1))
    scaled = x * (1.0 / scale)
    assert scaled.abs().max() <= 448 * (1 + 2**-20)  # amax maps to the top of the range
    err = (q.float() - scaled).abs()
    assert (err <= e4m3_half_ulp(scaled) + 1e-12).all()  # nearest representable value


def test_reference_sqnr_and_saturation():
    x = torch.randn(256, 512)
    q, scale = ref.fp8_quantize(x, "row")
    deq = ref.fp8_dequantize(q, scale, torch.float32)
    sqnr = 10 * torch.log10(x.pow(2).sum() / (x - deq).pow(2).sum())
    assert sqnr > 28, f"SQNR {sqnr:.1f} dB"  # e4m3: 3 mantissa bits ~ 30 dB on Gaussian data
    # An outlier sets the scale; everything stays finite, the outlier maps to +-448.
    x[0, 0] = 1e4
    q, scale = ref.fp8_quantize(x, "row")
    assert q[0, 0].float() == 448 and torch.isfinite(q.float()).all()


def test_zero_rows_quantize_to_zero():
    x = torch.zeros(4, 32)
    x[1] = torch.randn(32)
    q, scale = ref.fp8_quantize(x, "row")
    assert torch.equal(q[0].float(), torch.zeros(32)) and torch.isfinite(scale).all()


def test_op_matches_reference_on_cpu():
    x = torch.randn(33, 96, dtype=torch.bfloat16)
    for g in ("tensor", "row"):
        q, s = ops.fp8_quantize(x, g)
        q_ref, s_ref = ref.fp8_quantize(x, g)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_fp8_linear_matches_dequantized_linear():
    x = torch.randn(5, 64)
    w = torch.randn(48, 64)
    qw, sw = ops.fp8_quantize(w, "row")
    y = ops.fp8_linear(x, qw, sw, torch.randn(48))
    assert y.shape == (5, 48)
    rel = (y - ref.fp8_linear(x, qw, sw, None)).norm() / y.norm()
    assert rel > 0  # the bias was applied
    assert torch.allclose(ops.fp8_linear(x, qw, sw), x @ ops.fp8_dequantize(qw, sw, torch.float32).T, atol=1e-5)


def test_compile_fullgraph():
    fn = torch.compile(lambda x: ops.fp8_quantize(x, "row"), fullgraph=True, backend="eager")
    x = torch.randn(9, 64)
    q, s = fn(x)
    q_ref, s_ref = ref.fp8_quantize(x, "row")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_bad_inputs_name_the_argument():
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.fp8_quantize(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="granularity"):
        ops.fp8_quantize(torch.ones(4), "block")
    with pytest.raises(ValueError, match="x: granularity='row' needs"):
        ops.fp8_quantize(torch.tensor(1.0), "row")
    qw, sw = ops.fp8_quantize(torch.randn(8, 16), "row")
    with pytest.raises(ValueError, match="x: expected last dimension 16"):
        ops.fp8_linear(torch.randn(2, 15), qw, sw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("shape", [(1, 16), (113, 113), (257, 4096), (5120, 13824), (3, 7, 5120)])
def test_cuda_kernel_bit_exact(dtype, granularity, shape):
    x = (torch.randn(shape, device="cuda") * 4).to(dtype)
    q, s = torch.ops.vkern.fp8_quantize(x, granularity)
    assert ops._backend.last_choice["fp8_quantize"] == "cuda"
    q_ref, s_ref = ref.fp8_quantize(x, granularity)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.gpu
def test_cuda_kernel_non_contiguous_rows_and_zeros():
    base = torch.randn(64, 3 * 512, device="cuda", dtype=torch.bfloat16)
    x = base[:, 512:1024]  # rows 1536 apart: the kernel reads them in place
    q, s = ops.fp8_quantize(x, "row")
    q_ref, s_ref = ref.fp8_quantize(x, "row")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    z = torch.zeros(8, 64, device="cuda", dtype=torch.bfloat16)
    q, s = ops.fp8_quantize(z, "tensor")
    assert torch.equal(q.view(torch.uint8), torch.zeros_like(q.view(torch.uint8))) and torch.isfinite(s)
