"""csrc/causal_conv.cu (the causal_conv3d op's "cuda" backend) against the float64 reference, with the per-element
error bound of tests/test_causal_conv_triton.py (one rounding of an fp32 sum; a wrong frame, tap, channel or
padding value fails it by orders of magnitude). The kernel needs Hopper, so those tests are marked gpu; the
weight packing and the backend choice are checked on the CPU."""
import pytest
import torch
import torch.nn.functional as F

from vkern import ops
from vkern.ops import _backend
from vkern.ops import causal_conv as cc
from vkern.reference import causal_conv as ref

from .test_causal_conv_triton import UNIT_ROUNDOFF, assert_wan_conv_accuracy, check, inputs, oracle_and_bound
from .tolerance import rel_l2

CL = torch.channels_last_3d


# --- CPU: the packed weight and the backend choice ------------------------------------------------------------

@pytest.mark.parametrize("dtype,C,chunk", [(torch.bfloat16, 64, 32), (torch.float32, 48, 16)])
@pytest.mark.parametrize("O,block_n", [(96, 96), (192, 96), (256, 128)])
def test_packed_weight_layout(dtype, C, chunk, O, block_n):
    """Element (tile, dt, chunk, tap, group, n, e) of the packed weight is weight[tile * block_n + n,
    chunk * chunk_size + group * chunk_size / 4 + e, dt, tap // 3, tap % 3] (causal_conv.h): 64-byte chunks of 4
    16-byte groups, 32 channels in 16 bits, 16 in fp32."""
    kt, group = 3, chunk // 4
    w = torch.randn(O, C, kt, 3, 3, dtype=dtype)
    p = cc.cuda_packed_weight(w, block_n)
    assert p.shape == (O // block_n, kt, C // chunk, 9, 4, block_n, group) and p.is_contiguous()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        tile, dt, c, tap, grp, n, e = (int(torch.randint(0, s, (1,), generator=g)) for s in p.shape)
        assert p[tile, dt, c, tap, grp, n, e] == w[tile * block_n + n, c * chunk + grp * group + e, dt,
                                                   tap // 3, tap % 3]


def test_cuda_pack_rounds_fp32_to_tf32():
    w = torch.randn(96, 48, 3, 3, 3)
    packed = cc.cuda_pack(w)
    assert torch.equal(packed, cc.cuda_packed_weight(ref.round_to_tf32(w), 96))
    assert not torch.equal(packed, cc.cuda_packed_weight(w, 96))  # the rounding changed values


def test_cuda_pack_pads_few_output_channels():
    """O <= 8: zero output channels up to 8, then the same packing; wider O: just the packing."""
    w = torch.randn(3, 64, 3, 3, 3, dtype=torch.bfloat16)
    p = cc.cuda_pack(w)
    assert p.shape == (1, 3, 2, 9, 4, 8, 8)
    padded = torch.cat([w, torch.zeros(5, 64, 3, 3, 3, dtype=torch.bfloat16)])
    assert torch.equal(p, cc.cuda_packed_weight(padded, 8))
    w = torch.randn(192, 32, 1, 3, 3, dtype=torch.bfloat16)
    assert torch.equal(cc.cuda_pack(w), cc.cuda_packed_weight(w, 96))


def test_unsupported_convs_say_why():
    x = torch.empty(1, 96, 1, 8, 8, dtype=torch.bfloat16)
    ok = torch.empty(96, 96, 3, 3, 3, dtype=torch.bfloat16)
    assert cc.cuda_unsupported(x, ok, (1, 1, 1)) is None
    assert "stride" in cc.cuda_unsupported(x, ok, (1, 2, 2))
    assert "3 x 3" in cc.cuda_unsupported(x, torch.empty(96, 96, 3, 1, 1, dtype=torch.bfloat16), (1, 1, 1))
    assert "96 or 128" in cc.cuda_unsupported(x, torch.empty(48, 96, 3, 3, 3, dtype=torch.bfloat16), (1, 1, 1))
    assert cc.cuda_unsupported(x, torch.empty(3, 96, 3, 3, 3, dtype=torch.bfloat16), (1, 1, 1)) is None  # padded
    # O <= 8: the packed weight stays whole in shared memory (bf16 up to 284 channels, fp32 up to 142), 3 x 3 x 3
    wide = torch.empty(1, 256, 1, 8, 8, dtype=torch.bfloat16)
    assert cc.cuda_unsupported(wide, torch.empty(3, 256, 3, 3, 3, dtype=torch.bfloat16), (1, 1, 1)) is None
    assert "fits" in cc.cuda_unsupported(torch.empty(1, 288, 1, 8, 8, dtype=torch.bfloat16),
                                         torch.empty(3, 288, 3, 3, 3, dtype=torch.bfloat16), (1, 1, 1))
    assert "3 x 3 x 3" in cc.cuda_unsupported(x, torch.empty(3, 96, 1, 3, 3, dtype=torch.bfloat16), (1, 1, 1))
    assert cc._cuda_narrow_weight_bytes(128, 3, torch.float32) <= cc.CUDA_NARROW_WEIGHT_BYTES
    assert cc._cuda_narrow_weight_bytes(144, 3, torch.float32) > cc.CUDA_NARROW_WEIGHT_BYTES
    assert "multiple of 32" in cc.cuda_unsupported(x[:, :48], torch.empty(96, 48, 3, 3, 3, dtype=torch.bfloat16),
                                                   (1, 1, 1))
    assert "float64" in cc.cuda_unsupported(x.double(), ok.double(), (1, 1, 1))


def test_fp32_only_with_tf32_convs():
    """fp32 runs TF32 products, so only while torch runs cuDNN's fp32 convs in TF32 (its default); C a multiple of
    16 there (64 bytes, as 32 16-bit channels)."""
    x = torch.empty(1, 48, 1, 8, 8)
    w = torch.empty(96, 48, 3, 3, 3)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert cc.cuda_unsupported(x, w, (1, 1, 1)) is None
        assert "multiple of 16" in cc.cuda_unsupported(x[:, :40], w[:, :40], (1, 1, 1))
        assert "multiple of 32" in cc.cuda_unsupported(x.bfloat16(), w.bfloat16(), (1, 1, 1))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert "TF32" in cc.cuda_unsupported(x, w, (1, 1, 1))


def test_norm_tf32_arguments():
    """norm_tf32 rounds the epilogue norm's fp32 output: it needs a norm and fp32."""
    w = torch.empty(96, 48, 3, 3, 3)
    norm = (torch.ones(96), None, True)
    x = torch.empty(1, 48, 1, 8, 8).contiguous(memory_format=CL)
    with pytest.raises(ValueError, match="norm_tf32: needs norm and fp32"):
        cc.causal_conv3d_cuda(x, w, None, (2, 1, 1), norm_tf32=True)
    with pytest.raises(ValueError, match="norm_tf32: needs norm and fp32"):
        cc.causal_conv3d_cuda(x.bfloat16(), w.bfloat16(), None, (2, 1, 1), norm=norm, norm_tf32=True)
    with pytest.raises(ValueError, match="only the cuda backend"):
        cc.conv3d_in_place("triton", x, w, None, (1, 1, 1), (2, 1, 1), norm_tf32=True)


def test_fp32_preference_table(monkeypatch):
    """fp32 convs go to the CUDA kernel by CUDA_FASTER_TF32 (measured in TF32), 16-bit ones by CUDA_FASTER."""
    monkeypatch.delenv("VKERN_CONV_CUDA", raising=False)
    monkeypatch.setattr(cc, "CUDA_FASTER_TF32", {(48, 96, (3, 3, 3))})
    monkeypatch.setattr(cc, "CUDA_FASTER", {(96, 96, (3, 3, 3))})
    w48, w96 = torch.empty(96, 48, 3, 3, 3), torch.empty(96, 96, 3, 3, 3)
    assert cc._cuda_preferred(w48, torch.float32) and not cc._cuda_preferred(w96, torch.float32)
    assert cc._cuda_preferred(w96, torch.bfloat16) and not cc._cuda_preferred(w48, torch.bfloat16)


@pytest.mark.parametrize("O,block_n", [(96, 96), (192, 96), (384, 128), (256, 128), (3, 8), (8, 8), (1, 8), (16, None),
                                       (48, None)])
def test_block_n(O, block_n):
    assert cc._cuda_block_n(O) == block_n


def test_cuda_first_only_where_preferred(monkeypatch):
    monkeypatch.delenv("VKERN_CAUSAL_CONV3D_BACKEND", raising=False)
    monkeypatch.delenv("VKERN_BACKEND", raising=False)
    dev = torch.device("cuda")
    cands = cc._causal_conv_candidates(dev, torch.bfloat16, cuda=None, prefer_cuda=False)
    assert list(cands)[0] == "cudnn"
    cands = cc._causal_conv_candidates(dev, torch.bfloat16, cuda=None, prefer_cuda=True)
    first = "cuda" if _backend.cuda_ext_usable(dev) is None else "cudnn"  # no vkern._C here: cuDNN
    assert list(cands)[0] == first
    w = torch.empty(96, 96, 3, 3, 3)
    monkeypatch.setenv("VKERN_CONV_CUDA", "all")
    assert cc._cuda_preferred(w)
    monkeypatch.setenv("VKERN_CONV_CUDA", "0")
    assert not cc._cuda_preferred(w)
    monkeypatch.setenv("VKERN_CONV_CUDA", "yes")
    with pytest.raises(ValueError, match="VKERN_CONV_CUDA"):
        cc._cuda_preferred(w)


# --- GPU --------------------------------------------------------------------------------------------------------

def _gpu(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,O,T,H,W", [(32, 96, 1, 5, 7),       # one chunk, one partial tile
                                       (96, 96, 3, 9, 70),      # 2 column tiles (the second 6 wide), 3 row tiles
                                       (64, 128, 2, 4, 64),     # exact tile
                                       (96, 192, 2, 11, 65),    # 2 output-channel tiles of 96
                                       (128, 384, 1, 6, 130)])  # 3 of 128
@pytest.mark.parametrize("cache_frames", [None, 1, 2, 3], ids=["no-cache", "short", "equal", "long"])
def test_gpu_matches_reference(dtype, C, O, T, H, W, cache_frames):
    x, w, b, cache = _gpu(*inputs(2, C, O, T, H, W, (3, 3, 3), cache_frames, dtype))
    if cache_frames == 1:
        b = None
    out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache)
    y = check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
    assert rel_l2(out, y) <= UNIT_ROUNDOFF[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("padding", [(0, 1, 1), (2, 0, 0), (1, 2, 1)])
def test_gpu_other_paddings(padding):
    """No time padding (a [cache | chunk] buffer's conv), no spatial padding, and one of each uneven."""
    x, w, b, cache = _gpu(*inputs(1, 64, 96, 4, 10, 67, (3, 3, 3), 2, torch.bfloat16))
    out = cc.causal_conv3d_cuda(x, w, b, padding, cache)
    check(out, x, w, b, (1, 1, 1), padding, cache, "zeros")


@pytest.mark.gpu
def test_gpu_time_kernel_of_one():
    x, w, b, _ = _gpu(*inputs(1, 32, 96, 3, 6, 9, (1, 3, 3), None, torch.bfloat16))
    out = cc.causal_conv3d_cuda(x, w, b, (0, 1, 1))
    check(out, x, w, b, (1, 1, 1), (0, 1, 1), None, "zeros")


@pytest.mark.gpu
@pytest.mark.parametrize("cache_frames", [1, 2, 3])
def test_gpu_reversed_cache_reads_the_flipped_frames(cache_frames):
    x, w, b, cache = _gpu(*inputs(1, 32, 96, 2, 5, 66, (3, 3, 3), cache_frames, torch.bfloat16))
    flipped = cache.flip(2).contiguous(memory_format=CL)
    out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), flipped, cache_reversed=True)
    assert torch.equal(out, cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache))
    check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")


@pytest.mark.gpu
def test_gpu_chunks_with_cache_equal_whole_video():
    x, w, b, _ = _gpu(*inputs(1, 64, 96, 6, 9, 70, (3, 3, 3), None, torch.bfloat16))
    outs, cache = [], None
    for chunk in x.split((1, 1, 3, 1), dim=2):
        outs.append(cc.causal_conv3d_cuda(chunk, w, b, (2, 1, 1), cache))
        cache = ref.next_cache(chunk, cache)
    whole = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1))
    assert torch.equal(torch.cat(outs, dim=2), whole)  # the same sums in the same order
    check(whole, x, w, b, (1, 1, 1), (2, 1, 1), None, "zeros")


@pytest.mark.gpu
def test_gpu_one_cta_per_tile_same_bits():
    """One CTA per tile and persistent CTAs (here with more tiles than SMs, so each loops) compute the same sums in
    the same order."""
    x, w, b, cache = _gpu(*inputs(1, 96, 96, 2, 64, 640, (3, 3, 3), 2, torch.bfloat16))
    out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache)
    check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
    assert torch.equal(cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, persistent=False), out)


@pytest.mark.gpu
def test_gpu_time_slice_views():
    """x and cache as slices of one channels-last buffer [cache | chunk] (unusual batch strides)."""
    B, C, O, T, H, W = 2, 32, 96, 3, 7, 9
    buf = torch.randn(B, C, 2 + T, H, W, device="cuda").to(torch.bfloat16).contiguous(memory_format=CL)
    cache, x = buf[:, :, :2], buf[:, :, 2:]
    _, w, b, _ = _gpu(*inputs(B, C, O, T, H, W, (3, 3, 3), None, torch.bfloat16))
    out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache)
    check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
    with pytest.raises(ValueError, match="pixel rows"):
        cc.causal_conv3d_cuda(x.contiguous(), w, b, (2, 1, 1), cache)


@pytest.mark.gpu
def test_gpu_op_forcing(monkeypatch):
    monkeypatch.setenv("VKERN_CAUSAL_CONV3D_BACKEND", "cuda")
    x, w, b, cache = _gpu(*inputs(1, 32, 96, 2, 5, 7, (3, 3, 3), 2, torch.bfloat16))
    out = ops.causal_conv3d(x.contiguous(), w, b, 1, (2, 1, 1), cache)  # NCDHW: the op copies it once
    assert _backend.last_choice["causal_conv3d"] == "cuda"
    check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
    with pytest.raises(_backend.BackendError, match="96 or 128"):
        ops.causal_conv3d(x, w[:48], b[:48], 1, (2, 1, 1), cache)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("O", [1, 3, 8])
@pytest.mark.parametrize("cache_frames", [None, 2])
def test_gpu_few_output_channels(dtype, O, cache_frames):
    """O <= 8 (a VAE's RGB output): 8-wide output-channel tiles, weight and output padded to 8 channels, the
    padding cut off (a channel slice). A weight packed once by the caller (cuda_pack) gives the same bits; one of
    another size is refused."""
    x, w, b, cache = _gpu(*inputs(1, 64, O, 3, 9, 70, (3, 3, 3), cache_frames, dtype))
    out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache)
    y = check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
    assert rel_l2(out, y) <= UNIT_ROUNDOFF[dtype]
    assert torch.equal(cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, packed=cc.cuda_pack(w)), out)
    with pytest.raises(ValueError, match="packed"):
        cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, packed=cc.cuda_pack(w)[:, :, :1])


@pytest.mark.gpu
def test_gpu_extension_constants_match():
    """The Python side's copies of csrc/causal_conv.h's constants (the dispatch decides with them)."""
    from vkern._ext import cuda_ext

    assert tuple(sorted(cuda_ext().conv_block_ns)) == tuple(sorted(cc.CUDA_BLOCK_NS))
    assert cuda_ext().conv_narrow_weight_bytes == cc.CUDA_NARROW_WEIGHT_BYTES


@pytest.mark.gpu
# (input channels: 1, 3 and 6 channel chunks a frame, in bf16 (32 channels a chunk) and in fp32 (16))
@pytest.mark.parametrize("dtype,C", [(torch.bfloat16, 32), (torch.bfloat16, 96), (torch.bfloat16, 192),
                                     (torch.float32, 16), (torch.float32, 48), (torch.float32, 96)])
@pytest.mark.parametrize("T,padding,cache_frames", [(9, (2, 1, 1), None), (9, (2, 1, 1), 1), (6, (2, 1, 1), 2),
                                                    (7, (2, 1, 1), 3), (5, (1, 1, 1), 1), (7, (0, 1, 1), None),
                                                    (1, (2, 1, 1), 2), (2, (2, 1, 1), 2), (3, (0, 1, 1), 2)])
@torch.inference_mode()
def test_gpu_few_output_channels_frames_per_tile(dtype, C, T, padding, cache_frames):
    """O <= 8 takes 4 output frames per tile (each input frame fetched once and its products added into every output
    frame that reads it): frame counts that are not multiples of 4, caches shorter than, equal to and longer than
    the time padding, no time padding (a [cache | chunk] buffer), B = 2, 1 to 6 channel chunks a frame (the halo
    ring's slots wrap within and across frames). One CTA per tile gives the same bits, and so do chunks of 1 and 4
    frames with their caches (the VAE loop's): each output's sum runs in the same order."""
    x, w, b, cache = _gpu(*inputs(2, C, 3, T, 9, 70, (3, 3, 3), cache_frames, dtype))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        out = cc.causal_conv3d_cuda(x, w, b, padding, cache)
        assert torch.equal(cc.causal_conv3d_cuda(x, w, b, padding, cache, persistent=False), out)
        if padding[0] == 2 and T > 1:  # (a causal stream: time padding kt - 1)
            outs, c = [], cache
            for chunk in x.split([1] + [min(4, T - 1 - i) for i in range(0, T - 1, 4)], dim=2):
                outs.append(cc.causal_conv3d_cuda(chunk, w, b, padding, c))
                c = ref.next_cache(chunk, c)
            assert torch.equal(torch.cat(outs, dim=2), out)
    if dtype == torch.float32:  # the op rounds x, the cache and the weight to TF32 (see the fp32 tests)
        x, w, cache = _tf32(x, w, cache)
    check(out, x, w, b, (1, 1, 1), padding, cache, "zeros")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C,O,T,H,W", [(96, 96, 2, 9, 70), (64, 128, 1, 4, 64), (32, 192, 2, 5, 7)])
def test_gpu_residual_and_fp32_bias(dtype, C, O, T, H, W):
    """conv + bias + residual in the epilogue, in fp32 with one rounding (the residual block's fused add): within
    the bound of the conv of [x | the residual as one more input channel with weight 1] (exact in fp32), with an
    fp32 bias that no 16-bit value equals; a non-pixel-rows residual is copied once."""
    x, w, _, cache = _gpu(*inputs(1, C, O, T, H, W, (3, 3, 3), 2, dtype))
    b = torch.randn(O, device="cuda", dtype=torch.float64).float() / 3
    r = torch.randn(1, O, T, H, W, device="cuda").to(dtype).contiguous(memory_format=CL)
    out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, residual=r)
    y, bound = oracle_and_bound(x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros", dtype)
    y = y + r.double()
    bound = bound + UNIT_ROUNDOFF[dtype] * r.double().abs()  # the rounding of the larger sum
    assert out.shape == y.shape and torch.isfinite(out).all()
    excess = ((out.double() - y).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g}"
    assert torch.equal(cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, residual=r.contiguous()), out)
    with pytest.raises(ValueError, match="residual"):
        cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, residual=r[:, :, :, :1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("O,beta,silu,residual", [(96, False, True, False), (128, True, True, True),
                                                  (96, True, False, False)])
def test_gpu_epilogue_rms_norm_silu(dtype, O, beta, silu, residual):
    """conv + bias (+ residual), then diffusers' WanRMS_norm over each pixel's channels (+ SiLU) in the epilogue,
    against float64. Bound per element: the output's one rounding (u |ref|), plus the conv's fp32 sum error
    (oracle_and_bound at fp32) carried through the norm's scale k * |gamma| and SiLU's slope (<= 1.1), plus the
    norm's fp32 arithmetic (its sum of C squares, sqrt, division and products: (C + 8) 2^-24 relative) and SiLU's
    fast exp and division (2^-20 relative)."""
    C, T, H, W = 64, 2, 6, 70
    x, w, b, cache = _gpu(*inputs(1, C, O, T, H, W, (3, 3, 3), 2, dtype))
    gamma = (1 + 0.3 * torch.randn(O, device="cuda")).to(dtype)
    bta = (0.2 * torch.randn(O, device="cuda")).to(dtype) if beta else None
    r = torch.randn(1, O, T, H, W, device="cuda").to(dtype).contiguous(memory_format=CL) if residual else None
    out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, residual=r, norm=(gamma, bta, silu))
    v, conv_err = oracle_and_bound(x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros", torch.float32)
    if r is not None:
        v = v + r.double()
    k = O ** 0.5 / v.norm(dim=1, keepdim=True).clamp_min(cc.NORM_EPS)
    g = gamma.double().view(1, O, 1, 1, 1)
    y = v * k * g + (0 if bta is None else bta.double().view(1, O, 1, 1, 1))
    ref = y * torch.sigmoid(y) if silu else y
    bound = (UNIT_ROUNDOFF[dtype] * ref.abs() + 1.1 * (k * g.abs() * conv_err + (O + 8) * 2.0**-24 * y.abs())
             + 2.0**-20 * ref.abs())
    assert out.shape == ref.shape and torch.isfinite(out).all() and ref.std() > 0.1
    excess = ((out.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g} (rel L2 {rel_l2(out, ref):.3g})"
    with pytest.raises(ValueError, match="one tile" if O == 128 else "at most 8 output channels"):
        cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, norm=(gamma, bta, silu), block_n=96 if O == 128 else 8)


@pytest.mark.gpu
def test_gpu_block_n_96_for_384_channels():
    """The narrower tile where both divide O (a benchmark probe): the same conv within the bound."""
    x, w, b, cache = _gpu(*inputs(1, 64, 384, 2, 6, 70, (3, 3, 3), 2, torch.bfloat16))
    out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, block_n=96)
    check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")


@pytest.mark.gpu
@pytest.mark.parametrize("C,O,T,H,W", [(96, 96, 4, 480, 832), (192, 192, 4, 240, 416), (384, 384, 2, 120, 208),
                                       (384, 384, 1, 60, 104), (96, 3, 4, 480, 832)])
@torch.inference_mode()
def test_gpu_wan_shapes(C, O, T, H, W):
    """bf16 at the Wan VAE decoder's shapes against cuDNN's fp32 conv (TF32 off) on the same bf16 inputs, with a
    2-frame cache: one rounding (rel L2 <= 2^-8) and within 2x cuDNN's own bf16 error."""
    x, w, b, cache = _gpu(*inputs(1, C, O, T, H, W, (3, 3, 3), 2, torch.bfloat16))
    assert_wan_conv_accuracy(cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache), x, w, b, cache)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 2])
def test_gpu_cache_frames_from_separate_tensors(B):
    """The cache as a list of 1-frame tensors anywhere (the VAE loop's kept inputs): the same bits as one cache
    tensor of those frames; B > 1 frames of tensors with different frame counts (batch strides) are copied once."""
    x, w, b, cache = _gpu(*inputs(B, 64, 96, 3, 9, 70, (3, 3, 3), 2, torch.bfloat16))
    old = torch.randn(B, 64, 4, 9, 70, device="cuda").to(torch.bfloat16).contiguous(memory_format=CL)
    old[:, :, 3:] = cache[:, :, :1]
    new = cache[:, :, 1:].clone(memory_format=CL)
    frames = [old[:, :, 3:], new]  # frames of a 4-frame and a 1-frame tensor, oldest first
    out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), frames)
    assert torch.equal(out, cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache))
    check(out, x, w, b, (1, 1, 1), (2, 1, 1), cache, "zeros")
    assert torch.equal(cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), [new]),
                       cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache[:, :, 1:]))
    assert torch.equal(cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), []), cc.causal_conv3d_cuda(x, w, b, (2, 1, 1)))
    with pytest.raises(ValueError, match="cache frame"):
        cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), [cache[:, :, :1].contiguous(), new])


def _upsampled(t):
    return t.repeat_interleave(2, 3).repeat_interleave(2, 4).contiguous(memory_format=CL)


@pytest.mark.gpu
@pytest.mark.parametrize("k,padding,cache_frames", [((1, 3, 3), (0, 1, 1), None), ((3, 3, 3), (2, 1, 1), 2),
                                                    ((1, 3, 3), (0, 0, 1), None)])
def test_gpu_upsample_reads_nearest_2x(k, padding, cache_frames):
    """upsample=2: the conv of x (and the cache) nearest-upsampled 2x in space, read on the fly: the same bits as the
    conv of the upsampled copy (the same halo values, the same sums), and within the bound of the reference."""
    x, w, b, cache = _gpu(*inputs(1, 64, 96, 3, 5, 35, k, cache_frames, torch.bfloat16))
    out = cc.causal_conv3d_cuda(x, w, b, padding, cache, upsample=2)
    up_cache = None if cache is None else _upsampled(cache)
    assert torch.equal(out, cc.causal_conv3d_cuda(_upsampled(x), w, b, padding, up_cache))
    check(out, _upsampled(x), w, b, (1, 1, 1), padding, up_cache, "zeros")


@pytest.mark.gpu
def test_gpu_upsample_of_interleaved_frames():
    """The decoder's upsampling conv after a time upsampling: a [B, 2C, T, H, W] tensor whose pixels hold 2 frames
    of C channels (frame 2t + i = channels i C ...), read as B * T items of 2 frames with pixels 2C apart: the same
    bits as the conv of the de-interleaved, upsampled copy."""
    B, C, T, H, W = 2, 64, 2, 6, 33
    y = torch.randn(B, 2 * C, T, H, W, device="cuda").to(torch.bfloat16).contiguous(memory_format=CL)
    _, w, b, _ = _gpu(*inputs(1, C, 96, 1, H, W, (1, 3, 3), None, torch.bfloat16))
    src = y.permute(0, 2, 3, 4, 1).unflatten(-1, (2, C)).permute(0, 1, 4, 2, 3, 5)  # [B, T, I, H, W, C]
    frames = src.flatten(0, 1).permute(0, 4, 1, 2, 3)  # [B * T, C, I, H, W], pixel stride 2C
    assert frames.stride(4) == 2 * C and cc._pixel_grid(frames) and not cc.pixel_rows(frames)
    out = cc.causal_conv3d_cuda(frames, w, b, (0, 1, 1), upsample=2)
    plain = frames.contiguous(memory_format=CL)
    assert torch.equal(out, cc.causal_conv3d_cuda(_upsampled(plain), w, b, (0, 1, 1)))
    check(out, _upsampled(plain), w, b, (1, 1, 1), (0, 1, 1), None, "zeros")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("residual,upsample", [(True, 1), (False, 2)])
def test_gpu_normed_second_output(dtype, residual, upsample):
    """normed=True: the output is conv + bias (+ residual) as without a norm (the same bits), and the second output
    the norm + SiLU of that output as rounded: within the norm's arithmetic bound of float64's norm of it (the
    output's one rounding, u |ref| or, for fp16 values among its subnormals, half their spacing 2^-25; the norm's fp32
    sum of C squares, sqrt, division and products; SiLU's fast exp)."""
    O = 96
    x, w, b, cache = _gpu(*inputs(1, 64, O, 2, 6, 70, (3, 3, 3), 2, dtype))
    gamma = (1 + 0.3 * torch.randn(O, device="cuda")).to(dtype)
    beta = (0.2 * torch.randn(O, device="cuda")).to(dtype)
    shape = (1, O, 2, 6 * upsample, 70 * upsample)
    r = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=CL) if residual else None
    out, normed = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, residual=r, norm=(gamma, beta, True),
                                        normed=True, upsample=upsample)
    assert torch.equal(out, cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, residual=r, upsample=upsample))
    v = out.double()
    k = O ** 0.5 / v.norm(dim=1, keepdim=True).clamp_min(cc.NORM_EPS)
    y = v * k * gamma.double().view(1, O, 1, 1, 1) + beta.double().view(1, O, 1, 1, 1)
    ref = y * torch.sigmoid(y)
    subnormal = 2.0**-25 if dtype == torch.float16 else 0.0
    bound = (UNIT_ROUNDOFF[dtype] * ref.abs() + subnormal + 1.1 * (O + 8) * 2.0**-24 * y.abs()
             + 2.0**-20 * ref.abs())
    assert normed.shape == ref.shape and normed.is_contiguous(memory_format=CL) and ref.std() > 0.1
    excess = ((normed.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"error exceeds the bound by {excess:.3g} (rel L2 {rel_l2(normed, ref):.3g})"
    with pytest.raises(ValueError, match="normed: needs norm"):
        cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, normed=True)


# --- GPU: fp32 with TF32 products ------------------------------------------------------------------------------

def _tf32(*ts):
    """ts rounded to TF32 (None stays None), channels-last kept: inputs whose TF32 products are exact in fp32, so the
    kernel's only error is its fp32 sum and the fp32 bound of check() applies to it."""
    return [None if t is None else ref.round_to_tf32(t) for t in ts]


@pytest.mark.gpu
@pytest.mark.parametrize("C,O,T,H,W", [(16, 96, 1, 5, 7),       # one 16-channel chunk, one partial tile
                                       (48, 96, 3, 9, 70),      # 3 chunks, 2 column tiles, 3 row tiles
                                       (64, 128, 2, 4, 64),     # exact tile
                                       (96, 192, 2, 11, 65),    # 2 output-channel tiles of 96
                                       (32, 3, 2, 9, 70)])      # 8-wide tile (an RGB output)
@pytest.mark.parametrize("cache_frames", [None, 2, 3], ids=["no-cache", "equal", "long"])
@torch.inference_mode()
def test_gpu_fp32_tf32_products(C, O, T, H, W, cache_frames):
    """fp32: the op rounds x, the cache and the weight to TF32 (to nearest, as cuDNN), and the products of those are
    exact: within the fp32 bound of the float64 conv of the rounded operands. Truncated operands (what wgmma does to
    unrounded ones) would miss it by ~2^-11 of a product. inputs_tf32 on rounded operands: the same bits without the
    copies; on unrounded ones the kernel truncates, and the result moves by more than 1e-5."""
    x, w, b, cache = _gpu(*inputs(1, C, O, T, H, W, (3, 3, 3), cache_frames))
    xr, wr, cr = _tf32(x, w, cache)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert cc.cuda_unsupported(x, w, (1, 1, 1)) is None
        out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache)
        as_they_are = cc.causal_conv3d_cuda(xr, w, b, (2, 1, 1), cr, inputs_tf32=True)
        truncated = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache, inputs_tf32=True)
    check(out, xr, wr, b, (1, 1, 1), (2, 1, 1), cr, "zeros")
    assert torch.equal(as_they_are, out)
    assert rel_l2(truncated, out) > 1e-5


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_fp32_epilogue_and_cache_frames():
    """fp32 through the epilogue and the cache forms: bias + residual (the fp32 bound of the conv plus the two fp32
    adds' roundings), the norm + SiLU (the bf16 test's bound at fp32), a cache given as frames of other tensors (the
    same bits as the tensor), upsampling (the same bits as the upsampled copy)."""
    C, O, T, H, W = 48, 96, 2, 6, 70
    x, w, b, cache = _gpu(*inputs(1, C, O, T, H, W, (3, 3, 3), 2))
    xr, wr, cr = _tf32(x, w, cache)
    r = torch.randn(1, O, T, H, W, device="cuda").contiguous(memory_format=CL)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        out = cc.causal_conv3d_cuda(xr, w, b, (2, 1, 1), cr, residual=r, inputs_tf32=True)
        y, bound = oracle_and_bound(xr, wr, b, (1, 1, 1), (2, 1, 1), cr, "zeros", torch.float32)
        y = y + r.double()
        adds = 2 * 2.0**-24 * (y.abs() + r.double().abs() + b.double().abs().view(1, O, 1, 1, 1))  # + r, + b
        excess = ((out.double() - y).abs() - bound - adds).max().item()
        assert excess <= 0, f"residual: error exceeds the bound by {excess:.3g}"
        frames = [cr[:, :, :1].clone(memory_format=CL), cr[:, :, 1:].clone(memory_format=CL)]
        assert torch.equal(cc.causal_conv3d_cuda(xr, w, b, (2, 1, 1), frames, residual=r, inputs_tf32=True), out)
        gamma = 1 + 0.3 * torch.randn(O, device="cuda")
        normed = cc.causal_conv3d_cuda(xr, w, b, (2, 1, 1), cr, norm=(gamma, None, True), inputs_tf32=True)
        v, conv_err = oracle_and_bound(xr, wr, b, (1, 1, 1), (2, 1, 1), cr, "zeros", torch.float32)
        k = O ** 0.5 / v.norm(dim=1, keepdim=True).clamp_min(cc.NORM_EPS)
        yn = v * k * gamma.double().view(1, O, 1, 1, 1)
        want = yn * torch.sigmoid(yn)
        bound = (2.0**-24 * want.abs() + 1.1 * (k * gamma.double().abs().view(1, O, 1, 1, 1) * conv_err
                                                 + (O + 8) * 2.0**-24 * yn.abs()) + 2.0**-20 * want.abs())
        excess = ((normed.double() - want).abs() - bound).max().item()
        assert excess <= 0, f"norm: error exceeds the bound by {excess:.3g}"
        # norm_tf32: the same values, each rounded as round_to_tf32 rounds (a next TF32 conv's operand), bit for bit
        rounded = cc.causal_conv3d_cuda(xr, w, b, (2, 1, 1), cr, norm=(gamma, None, True), inputs_tf32=True,
                                        norm_tf32=True)
        assert torch.equal(rounded, ref.round_to_tf32(normed)) and not torch.equal(rounded, normed)
        out, second = cc.causal_conv3d_cuda(xr, w, b, (2, 1, 1), cr, residual=r, norm=(gamma, None, True),
                                            normed=True, inputs_tf32=True, norm_tf32=True)
        plain, second_plain = cc.causal_conv3d_cuda(xr, w, b, (2, 1, 1), cr, residual=r, norm=(gamma, None, True),
                                                    normed=True, inputs_tf32=True)
        assert torch.equal(out, plain) and torch.equal(second, ref.round_to_tf32(second_plain))
        up = cc.causal_conv3d_cuda(xr, w, b, (2, 1, 1), cr, upsample=2, inputs_tf32=True)
        assert torch.equal(up, cc.causal_conv3d_cuda(_upsampled(xr), w, b, (2, 1, 1), _upsampled(cr),
                                                     inputs_tf32=True))


@pytest.mark.gpu
@pytest.mark.parametrize("C,O,T,H,W", [(96, 96, 2, 480, 832), (192, 192, 2, 240, 416), (384, 384, 1, 120, 208),
                                       (96, 3, 2, 480, 832)])
@torch.inference_mode()
def test_gpu_fp32_wan_shapes_within_cudnn_tf32_error(C, O, T, H, W):
    """fp32 at the Wan VAE decoder's shapes with a 2-frame cache, TF32 on: within 1.25x cuDNN's own TF32 error
    against float64 (the same rounded operands; the sums' order differs)."""
    x, w, b, cache = _gpu(*inputs(1, C, O, T, H, W, (3, 3, 3), 2))
    xx = torch.cat([cache, x], dim=2)
    oracle = F.conv3d(xx.double(), w.double(), b.double(), padding=(0, 1, 1))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        out = cc.causal_conv3d_cuda(x, w, b, (2, 1, 1), cache)
        theirs = F.conv3d(xx, w, b, padding=(0, 1, 1))
    err, err_theirs = rel_l2(out, oracle), rel_l2(theirs, oracle)
    print(f"fp32 {C}->{O} {(T, H, W)}: TF32 rel L2 vs float64 ours {err:.3g}, cuDNN {err_theirs:.3g}")
    assert 1e-5 < err <= 1.25 * err_theirs
