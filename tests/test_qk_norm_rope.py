"""The fused QK prologue (RMSNorm across heads + interleaved RoPE) against the reference, which
tests/test_wan_reference.py ties to diffusers. On the CPU the Triton kernel runs interpreted."""
import pytest
import torch

from vkern import ops
from vkern.models import wan_rope_tables as wan_freqs
from vkern.reference import attention as ref

from .tolerance import assert_within_torch_error


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


def test_bad_inputs_name_the_argument():
    x, w = prologue_inputs(1, 8, 2, 64, torch.float32, "cpu")
    cos, sin = wan_freqs(8, 64)
    with pytest.raises(ValueError, match="heads: expected a positive divisor of x's last dimension 128"):
        ops.qk_norm_rope(x, w, 1e-6, 3)
    with pytest.raises(ValueError, match=r"weight: expected shape \(128\)"):
        ops.qk_norm_rope(x, w[:64], 1e-6, 2)
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


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 113, 4097, 32760])
@pytest.mark.parametrize("H,D", [(12, 128), (40, 128), (48, 64)])
def test_gpu_within_twice_torch_bf16_error(S, H, D):
    x, w = prologue_inputs(1, S, H, D, torch.bfloat16, "cuda")
    cos, sin = (t.cuda() for t in wan_freqs(S, D))
    out = ops.qk_norm_rope(x, w, 1e-6, H, cos, sin)
    assert ops._backend.last_choice["qk_norm_rope"] == "triton"
    oracle = ref.qk_norm_rope(x.double(), w.double(), 1e-6, H, cos, sin)
    assert_within_torch_error(out, oracle, ref.qk_norm_rope(x, w, 1e-6, H, cos, sin))
