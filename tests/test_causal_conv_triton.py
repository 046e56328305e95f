"""vkern/triton/causal_conv.py (the causal_conv3d op's "triton" backend) against the reference, on the CPU
under the Triton interpreter (small shapes), and on the GPU (marker gpu) at real Wan VAE shapes.

Error bound used throughout (a rigorous one, per output element y = bias + sum of K = taps x C products):
the kernel's products of x's dtype are exact in fp32 and summed in fp32 (error at most K * 2^-24 times the
sum of the terms' magnitudes, conv(|x|, |w|) + |bias|, by the standard recursive-summation bound), then
rounded once to x's dtype (at most u = 2^-8 bf16, 2^-11 fp16, 2^-24 fp32 times |y|). So

    |out - y| <= u * |y| + 2 * K * 2^-24 * (conv(|x|, |w|) + |bias|)     (2x: slack for the rounding's own
                                                                           error on the fp32 sum)

against y from float64 on the same (rounded) inputs. Summed over elements this bounds the relative L2 by
u plus the accumulation term: for bf16 that is 2^-8, and one round-to-nearest gives ~2^-9 on average (a
uniform error of half an ulp), which is what the kernel shows. A wrong frame, tap or padding value is an
O(1) error and fails this by orders of magnitude (test_bound_catches_wrong_rules checks that)."""
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from vkern import ops
from vkern.ops import _backend
from vkern.reference import causal_conv as ref
from vkern.triton.causal_conv import block_sizes
from vkern.triton.causal_conv import causal_conv3d as kernel

from .test_causal_conv import WAN_CONVS, conv_args
from .tolerance import assert_within_torch_error, poison, rel_l2

CL = torch.channels_last_3d
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def oracle_and_bound(x, w, b, stride, padding, cache, pad_mode, dtype):
    """float64 reference on the given (already rounded) inputs, and the per-element error bound above."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = ref.causal_conv3d(d(x), d(w), d(b), stride, padding, d(cache), pad_mode)
    absb = None if b is None else b.double().abs()
    mag = ref.causal_conv3d(d(x).abs(), d(w).abs(), absb, stride, padding, None if cache is None else d(cache).abs(),
                            pad_mode)
    K = w[0].numel()
    return y, UNIT_ROUNDOFF[dtype] * y.abs() + 2 * K * 2.0**-24 * mag


def check(out, x, w, b, stride, padding, cache, pad_mode):
    """out within the bound of the module docstring; the data must make the comparison meaningful."""
    y, bound = oracle_and_bound(x, w, b, stride, padding, cache, pad_mode, x.dtype)
    assert out.shape == y.shape and out.dtype == x.dtype
    assert out.stride(1) == 1
    assert torch.isfinite(out).all()
    assert y.std() > 0.1 * y.abs().mean()  # not a constant (e.g. bias only) output
    excess = ((out.double() - y).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g} (rel L2 {rel_l2(out, y):.3g})"
    return y


def inputs(B, C, O, T, H, W, k, cache_frames, dtype=torch.float32):
    x = torch.randn(B, C, T, H, W).to(dtype).contiguous(memory_format=CL)
    w = (torch.randn(O, C, *k) / (C * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
    b = (torch.randn(O) * 0.5).to(dtype)
    cache = None if cache_frames is None else torch.randn(B, C, cache_frames, H, W).to(dtype)
    return x, w, b, None if cache is None else cache.contiguous(memory_format=CL)


def poisoned_out(x, w, stride, padding):
    """A NaN-filled channels-last output buffer of the conv's shape, so an unwritten element cannot pass."""
    shape = ref.causal_conv3d(x[:1, :1].float(), w[:, :1].float(), None, stride, padding).shape
    return poison(torch.empty((x.shape[0], *shape[1:]), dtype=x.dtype, memory_format=CL))


# --- fp32 against the reference: every Wan conv kind, pad mode and cache length -------------------------------

@pytest.mark.parametrize("cache_frames", [None, 1, 2, 3], ids=["no-cache", "short", "equal", "long"])
@pytest.mark.parametrize("pad_mode", ref.PAD_MODES)
@pytest.mark.parametrize("kind", list(WAN_CONVS))
def test_matches_reference_fp32(kind, pad_mode, cache_frames):
    conv = WanCausalConv3d(5, 7, **WAN_CONVS[kind])
    w, b, stride, padding = conv_args(conv)
    w, b = w.detach(), b.detach()
    if cache_frames == 1:
        b = None  # bias None on one cache case of each kind and mode
    else:
        b = b + torch.randn_like(b)  # nn.Conv3d's init bias is small: make it matter
    T = 5 if stride[0] > 1 else 3  # 2 output frames for the stride-2 time conv
    x, _, _, cache = inputs(2, 5, 7, T, 9, 7, w.shape[2:], cache_frames)  # B=2, odd H and W
    out = kernel(x, w, b, stride, padding, cache, pad_mode, out=poisoned_out(x, w, stride, padding))
    y = check(out, x, w, b, stride, padding, cache, pad_mode)
    assert rel_l2(out, y) < 1e-6  # ~K^0.5 * 2^-24 (K <= 135): ~1e-7 measured; the bound above is per element


def test_bound_catches_wrong_rules():
    """The check above must fail for each plausible mistake: a cache not read, the cache's oldest frames kept
    instead of its newest, taps in the wrong order, the wrong padding mode, a missing bias."""
    x, w, b, cache = inputs(2, 5, 7, 3, 9, 7, (3, 3, 3), 3)
    args = ((1, 1, 1), (2, 1, 1))
    out = kernel(x, w, b, *args, cache, "zeros")
    check(out, x, w, b, *args, cache, "zeros")
    wrong = {
        "no cache": lambda: check(out, x, w, b, *args, None, "zeros"),
        "oldest cached frames": lambda: check(out, x, w, b, *args, cache[:, :, :2], "zeros"),
        "taps flipped": lambda: check(out, x, w.flip(2, 3, 4), b, *args, cache, "zeros"),
        "replicate": lambda: check(out, x, w, b, *args, cache, "replicate"),
        "no bias": lambda: check(out, x, w, None, *args, cache, "zeros"),
    }
    for name, fn in wrong.items():
        with pytest.raises(AssertionError, match="exceeds the bound"):
            fn()
            pytest.fail(f"a kernel with '{name}' would pass")


# --- bf16/fp16 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad_mode,cache_frames,stride", [("zeros", 2, (1, 1, 1)), ("zeros", None, (1, 2, 2)),
                                                         ("replicate", 1, (1, 1, 1)), ("first", 3, (1, 2, 2))])
def test_low_precision_one_rounding(dtype, pad_mode, cache_frames, stride):
    """Inputs in dtype; oracle: float64 on those same values. One rounding of an fp32 sum (the module
    docstring's bound), and no worse than PyTorch's own conv in dtype (F.conv3d on the CPU) by 2x."""
    x, w, b, cache = inputs(2, 24, 20, 3, 9, 7, (3, 3, 3), cache_frames, dtype)
    args = (stride, (2, 1, 1), cache, pad_mode)
    out = kernel(x, w, b, *args)
    y = check(out, x, w, b, *args)
    assert rel_l2(out, y) <= UNIT_ROUNDOFF[dtype]  # ~0.5 u measured: one round-to-nearest
    assert_within_torch_error(out, y, ref.causal_conv3d(x, w, b, *args), factor=2.0)


# --- block edges: small and large channel counts ----------------------------------------------------------

@pytest.mark.parametrize("C,O,dtype", [(3, 96, torch.bfloat16),   # encoder conv_in: C masked in one K block
                                       (96, 3, torch.bfloat16),   # decoder conv_out: O masked, 3 K blocks
                                       (40, 160, torch.float32)])  # 2 K blocks (last masked), 2 N blocks
def test_channel_blocks(C, O, dtype):
    block_n, block_k = block_sizes(C, O)
    assert block_k >= 16 and block_n >= 16  # tl.dot's minimum
    x, w, b, cache = inputs(1, C, O, 2, 5, 6, (3, 3, 3), 2, dtype)
    out = kernel(x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
    check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")


# --- chunked video, views, the op's backend choice -----------------------------------------------------------

@pytest.mark.parametrize("pad_mode", ref.PAD_MODES)
def test_chunks_with_cache_equal_whole_video(pad_mode):
    x, w, b, _ = inputs(1, 6, 8, 6, 9, 10, (3, 3, 3), None)
    args = ((1, 2, 2), (2, 1, 1))
    outs, cache = [], None
    for chunk in x.split((1, 1, 3, 1), dim=2):  # chunks shorter and longer than the cache
        outs.append(kernel(chunk, w, b, *args, cache, pad_mode))
        cache = ref.next_cache(chunk, cache)
    chunked = torch.cat(outs, dim=2)
    check(chunked, x, w, b, *args, None, pad_mode)  # the whole video's conv
    assert rel_l2(chunked, kernel(x, w, b, *args, None, pad_mode)) < 1e-6


@pytest.mark.parametrize("pad_mode", ref.PAD_MODES)
@pytest.mark.parametrize("cache_frames", [1, 2, 3])
def test_reversed_cache_reads_the_flipped_frames(pad_mode, cache_frames):
    """cache_reversed=True (frames stored newest first, walked with a negative stride): the same bits as
    the cache given oldest first; with one frame, the same as not reversed."""
    x, w, b, cache = inputs(2, 8, 8, 2, 5, 6, (3, 3, 3), cache_frames)
    args = ((1, 1, 1), (2, 1, 1), cache.flip(2).contiguous(memory_format=CL), pad_mode)
    out = kernel(x, w, b, *args, cache_reversed=True)
    assert torch.equal(out, kernel(x, w, b, (1, 1, 1), (2, 1, 1), cache, pad_mode))
    check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, pad_mode)


def test_time_slice_views():
    """x and cache as slices of one channels-last buffer [cache | chunk], out the chunk slot of another:
    only the batch strides are unusual; the out buffer's cache slot must survive."""
    B, C, O, T, H, W = 2, 16, 12, 3, 7, 9
    buf = torch.randn(B, C, 2 + T, H, W).contiguous(memory_format=CL)
    cache, x = buf[:, :, :2], buf[:, :, 2:]
    assert not x.is_contiguous(memory_format=CL) and x.stride(1) == 1
    _, w, b, _ = inputs(B, C, O, T, H, W, (3, 3, 3), None)
    out_buf = poison(torch.empty(B, O, 2 + T, H, W, memory_format=CL))
    out_buf[:, :, :2] = 7.0
    out = kernel(x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros", out=out_buf[:, :, 2:])
    assert out.data_ptr() == out_buf[:, :, 2:].data_ptr() and (out_buf[:, :, :2] == 7).all()
    check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
    with pytest.raises(ValueError, match="out: expected shape"):
        kernel(x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros", out=out_buf[:, :, 2:].contiguous())


def test_backend_order_and_forcing(monkeypatch):
    monkeypatch.delenv("VKERN_CAUSAL_CONV3D_BACKEND", raising=False)
    monkeypatch.delenv("VKERN_BACKEND", raising=False)
    cuda = torch.device("cuda")
    chosen, cands = _backend.would_choose("causal_conv3d", cuda, torch.bfloat16)
    assert chosen == "cudnn" and list(cands) == ["cudnn", "triton", "cuda", "reference"]  # cuDNN until measured
    chosen, cands = _backend.would_choose("causal_conv3d", torch.device("cpu"), torch.float32)
    assert chosen == "reference" and cands["triton"] is None  # interpreter usable, but never the default here
    x, w, b, cache = inputs(1, 4, 6, 3, 5, 7, (3, 3, 3), 2)
    ops.causal_conv3d(x, w, b, 1, (2, 1, 1), cache)
    assert _backend.last_choice["causal_conv3d"] == "reference"

    monkeypatch.setenv("VKERN_CAUSAL_CONV3D_BACKEND", "triton")
    assert _backend.would_choose("causal_conv3d", cuda, torch.bfloat16)[0] == "triton"
    x_ncdhw = x.contiguous()  # not channels-last: the op copies it once
    for pad_mode in ("zeros", "replicate"):
        out = ops.causal_conv3d(x_ncdhw, w, b, 1, (2, 1, 1), cache, pad_mode)
        assert _backend.last_choice["causal_conv3d"] == "triton"
        check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, pad_mode)


# --- GPU: real Wan VAE shapes -----------------------------------------------------------------------------

def assert_wan_conv_accuracy(out, x, w, b, cache):
    """out, a bf16 kernel's conv of [cache | x] with zeros padding (2, 1, 1), against cuDNN's fp32 conv (TF32 off)
    on the same bf16 inputs: one rounding (rel L2 <= 2^-8) and within 2x cuDNN's own bf16 error."""
    xx = torch.cat([cache, x], dim=2)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        oracle = F.conv3d(xx.float(), w.float(), b.float(), padding=(0, 1, 1))
    theirs = F.conv3d(xx, w, b, padding=(0, 1, 1))
    err = rel_l2(out, oracle)
    print(f"{tuple(w.shape[:2])} {tuple(x.shape[2:])}: rel L2 vs fp32 {err:.3g}, cuDNN bf16 {rel_l2(theirs, oracle):.3g}")
    assert err <= 2.0**-8
    assert_within_torch_error(out, oracle.double(), theirs, factor=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("C,O,T,H,W", [(96, 96, 2, 480, 832), (384, 384, 1, 60, 104), (96, 3, 1, 120, 208),
                                       (3, 96, 1, 120, 208)])
@torch.inference_mode()
def test_gpu_wan_shapes(C, O, T, H, W):
    """bf16 against cuDNN's fp32 conv (TF32 off) on the same bf16 inputs, with a 2-frame cache: one rounding
    (rel L2 <= 2^-8) and within 2x cuDNN's own bf16 error."""
    dev = torch.device("cuda")
    x, w, b, cache = (None if t is None else t.to(dev) for t in inputs(1, C, O, T, H, W, (3, 3, 3), 2, torch.bfloat16))
    out = kernel(x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
    assert_wan_conv_accuracy(out, x, w, b, cache)
    # Replicate padding runs the same loop with clamped indices; the reference (F.pad + F.conv3d) in fp32.
    out = kernel(x, w, b, (1, 1, 1), (2, 1, 1), None, "replicate")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        oracle = ref.causal_conv3d(x.float(), w.float(), b.float(), (1, 1, 1), (2, 1, 1), None, "replicate")
    assert rel_l2(out, oracle) <= 2.0**-8


@pytest.mark.gpu
@pytest.mark.parametrize("C,O,k", [(96, 96, (3, 3, 3)), (96, 3, (3, 3, 3)), (3, 96, (3, 3, 3)), (192, 96, (1, 3, 3)),
                                   (192, 192, (3, 3, 3))])
@torch.inference_mode()
def test_gpu_fp32_follows_torch_tf32_setting(C, O, k):
    """fp32 follows torch's cuDNN conv setting. TF32 on (torch's default): TF32 products like cuDNN's, within 2x
    cuDNN's own TF32 error against a float64 oracle, and above 1e-5 (IEEE products land near 1e-7: the kernel did not
    ignore the setting). TF32 off: IEEE products, within the fp32 bound of the module docstring."""
    dev = torch.device("cuda")
    tp = 2 if k[0] == 3 else 0
    x, w, b, cache = (t.to(dev) for t in inputs(1, C, O, 2, 64, 96, k, 2))
    padding = (tp, 1, 1)
    cached = torch.cat([cache, x], dim=2) if tp else x
    oracle = F.conv3d(cached.double(), w.double(), b.double(), padding=(0, 1, 1))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        out = kernel(x, w, b, (1, 1, 1), padding, cache if tp else None, "zeros")
        theirs = F.conv3d(cached, w, b, padding=(0, 1, 1))
    err, err_theirs = rel_l2(out, oracle), rel_l2(theirs, oracle)
    print(f"fp32 {C}->{O} {k}: TF32 rel L2 vs float64 ours {err:.3g}, cuDNN {err_theirs:.3g}")
    assert 1e-5 < err <= 2 * err_theirs
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        check(kernel(x, w, b, (1, 1, 1), padding, cache if tp else None, "zeros"), x, w, b, (1, 1, 1), padding,
              cache if tp else None, "zeros")


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_tf32_inputs_are_read_as_they_are():
    """inputs_tf32 (x and cache rounded to TF32 by their writer, as the VAE loop's norm pass does): the kernel skips its
    own rounding and computes what it computes rounding them itself, within 1e-6 (the same products: expected
    equal); given unrounded inputs instead, wgmma truncates them, which differs from rounding by more than 1e-5 (run
    173: 2.6x the rounding error against float64): the flag really took the rounding out of the loop."""
    from vkern.reference.causal_conv import round_to_tf32

    dev = torch.device("cuda")
    x, w, b, cache = (t.to(dev) for t in inputs(1, 96, 96, 2, 64, 96, (3, 3, 3), 2))
    xr, cr = round_to_tf32(x).contiguous(memory_format=CL), round_to_tf32(cache).contiguous(memory_format=CL)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        rounded_here = kernel(xr, w, b, (1, 1, 1), (2, 1, 1), cr, "zeros")
        as_they_are = kernel(xr, w, b, (1, 1, 1), (2, 1, 1), cr, "zeros", inputs_tf32=True)
        rounding = kernel(x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
        truncating = kernel(x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros", inputs_tf32=True)
    same, apart = rel_l2(as_they_are, rounded_here), rel_l2(truncating, rounding)
    print(f"inputs_tf32: rounded inputs {same:.3g} (equal: {torch.equal(as_they_are, rounded_here)}), unrounded "
          f"{apart:.3g}")
    assert same <= 1e-6 and apart > 1e-5


def test_in_place_residual_on_triton_adds_bias_and_shortcut_once():
    """conv3d_in_place on the Triton backend with a residual (the CUDA kernel adds it in its epilogue; here the conv
    runs without bias and residual_add_ adds bias + shortcut): within the conv's fp32 bound plus the add's two
    fp32 roundings of |conv| + |shortcut| + |bias|."""
    x, w, b, cache = inputs(1, 8, 16, 2, 5, 7, (3, 3, 3), 2)
    b = b.float()
    r = torch.randn(1, 16, 2, 5, 7).contiguous(memory_format=CL)
    out = ops.causal_conv.conv3d_in_place("triton", x, w, b, (1, 1, 1), (2, 1, 1), cache=cache, residual=r)
    y, bound = oracle_and_bound(x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros", torch.float32)
    y = y + r.double()
    bound = bound + 2 * 2.0**-24 * (y.abs() + r.double().abs() + b.double().abs().view(1, -1, 1, 1, 1))
    assert out.shape == y.shape
    excess = ((out.double() - y).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g}"
    with pytest.raises(ValueError, match="norm"):
        ops.causal_conv.conv3d_in_place("triton", x, w, b, (1, 1, 1), (2, 1, 1), cache=cache, norm=(b, None, True))


def test_round_to_tf32_is_cvt_rna():
    """round_to_tf32 (the packed fp32 weight's rounding, matching the kernel's cvt.rna.tf32.f32 on its A tiles): 10
    mantissa bits, to nearest with ties away from zero, against a float64 emulation; inf, NaN, signed zero kept."""
    from vkern.reference.causal_conv import round_to_tf32

    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    ties = torch.tensor([1 + 2.0**-11, -(1 + 3 * 2.0**-11), 2.0**-126 * (1 + 2.0**-11)])  # exactly halfway
    x = torch.cat([x, ties])
    mantissa, exponent = torch.frexp(x.double())
    scaled = mantissa * 2**11
    expected = torch.ldexp(torch.sign(scaled) * torch.floor(scaled.abs() + 0.5) / 2**11, exponent).float()
    assert torch.equal(round_to_tf32(x), expected)
    assert round_to_tf32(ties)[0] == 1 + 2.0**-10 and round_to_tf32(ties)[1] == -(1 + 4 * 2.0**-11)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])
    out = round_to_tf32(special)
    assert torch.equal(out[:2], special[:2]) and out[2].isnan() and out[3] == 0 and torch.signbit(out[3])


def test_tf32_copy_is_round_to_tf32(device):
    """The CUDA conv op's rounding copies (causal_conv._tf32_copy: one Triton pass over a dense tensor's storage, else
    round_to_tf32): round_to_tf32's bits (ties, specials, tiny and huge values) in a tensor of x's strides, x kept;
    a non-dense x (a time slice of a 2-video batch) the same bits; a count that is not a multiple of the block."""
    from vkern.ops.causal_conv import _tf32_copy
    from vkern.reference.causal_conv import round_to_tf32

    x = torch.randn(2, 48, 3, 5, 7) * torch.logspace(-30, 30, 10080).reshape(2, 48, 3, 5, 7)
    x.view(-1)[:7] = torch.tensor([1 + 2.0**-11, -(1 + 3 * 2.0**-11), float("inf"), -float("inf"), float("nan"),
                                   -0.0, 3.4028235e38])
    x = x.contiguous(memory_format=CL).to(device)
    kept = x.clone()
    out = _tf32_copy(x)
    assert out.stride() == x.stride() and torch.equal(x.view(torch.int32), kept.view(torch.int32))
    assert torch.equal(out.view(torch.int32), round_to_tf32(x).view(torch.int32))
    assert (x.view(torch.int32) & 0x1FFF).count_nonzero() > x.numel() // 2  # else a plain copy would pass
    part = x[:, :, 1:]
    assert not part.is_contiguous(memory_format=CL)
    assert torch.equal(_tf32_copy(part).view(torch.int32), round_to_tf32(part).view(torch.int32))
