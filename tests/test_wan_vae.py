"""vkern's fast Wan VAE path (vkern/modules/wan_vae.py): the fused RMS norm + SiLU kernel against its
reference, the chunk loop against diffusers' AutoencoderKLWan (Wan 2.1 and 2.2 configs), bad input,
repeated calls, and the patched VAE. CPU tests run the norm's reference backend except where they
say otherwise (the interpreted Triton kernel is slow); GPU tests (marker gpu) use the default
config at a reduced size against diffusers in bf16."""
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

import vkern
from vkern import models
from vkern.modules import wan_vae as fast
from vkern.ops import causal_conv as cc
from vkern.reference import causal_conv as ref_conv
from vkern.reference import wan_vae as ref

from .test_causal_conv import WAN_CONVS, conv_args, small_vae
from .tolerance import assert_within_torch_error, poison, rel_l2

CL = torch.channels_last_3d
# fp32, CPU: the fast loop runs the same math as diffusers except the summation order of channels-last
# kernels (norm, conv2d), ~1e-6 here; a wrong cache or chunk rule gives 1e-2 to 0.4.
FP32_TOL = 1e-5


def psnr(a, b):
    """dB over the [-1, 1] range of a decoded video."""
    return (10 * torch.log10(4 / (a.double() - b.double()).pow(2).mean())).item()


@pytest.fixture
def norm_reference(monkeypatch):
    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", "reference")


# --- the fused RMS norm + SiLU -------------------------------------------------------------------------

@pytest.mark.parametrize("C,P", [(96, 113), (3, 7), (257, 5)])  # Wan's 96, a tiny and a non-power-of-2 row
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_silu_kernel(device, C, P, dtype, monkeypatch):
    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", "triton")
    B, T = 2, 3
    x = (torch.randn(B, C, T, 1, P, device=device) * 3).to(dtype).contiguous(memory_format=CL)
    gamma = torch.empty(C, 1, 1, 1, device=device).uniform_(0.5, 1.5).to(dtype)
    bias = (0.1 * torch.randn(C, device=device)).to(dtype)
    # out: the chunk slot of a conv buffer [2 cached frames | chunk]; the cached frames must survive.
    buf = poison(torch.empty(B, C, 2 + T, 1, P, device=device, dtype=dtype, memory_format=CL))
    buf[:, :, :2] = 7.0
    out = cc.rms_norm_silu(x, gamma, bias, out=buf[:, :, 2:])
    oracle = ref.rms_norm_silu(x.double(), gamma.double(), bias.double())
    expected = ref.rms_norm_silu(x, gamma, bias)  # diffusers' ops in x's dtype
    assert out.data_ptr() == buf[:, :, 2:].data_ptr() and (buf[:, :, :2] == 7).all()
    assert_within_torch_error(out, oracle, expected)
    # fp32 math with one rounding at the end (vkern/triton/vae_glue.py): in fp32 the eager ops' result up to
    # a few ulps; in bf16/fp16 no further from float64 than diffusers' eager ops, which round four times
    # (measured at the decoder's shapes on an H200: 1.7e-3 vs 3.9e-3, run 18).
    if dtype == torch.float32:
        assert rel_l2(out, expected) < 1e-6
    else:
        assert rel_l2(out.double(), oracle) <= rel_l2(expected.double(), oracle)
    # Other layouts: NCDHW x (copied once), NCDHW out (computed aside, copied in), no bias, no SiLU.
    y = cc.rms_norm_silu(x.contiguous(), gamma, None, silu=False, out=poison(torch.empty_like(x.contiguous())))
    assert_within_torch_error(y, ref.rms_norm_silu(x.double(), gamma.double(), None, silu=False),
                              ref.rms_norm_silu(x, gamma, None, silu=False))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rms_norm_silu_rounds_to_tf32(device, backend, monkeypatch):
    """tf32: the fp32 result rounded to TF32 as cuDNN's TF32 convs round their operands (round_to_tf32; on the GPU the
    kernel's cvt.rna, in the interpreter its emulation on the bits), bit for bit, for a TF32 conv that reads it next;
    the unrounded result has low mantissa bits (else the check could not fail). 16-bit x: an error."""
    from vkern.reference.causal_conv import round_to_tf32

    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", backend)
    C, P = 96, 113
    x = (torch.randn(2, C, 3, 1, P, device=device) * 3).contiguous(memory_format=CL)
    gamma = torch.empty(C, 1, 1, 1, device=device).uniform_(0.5, 1.5)
    bias, in_bias = 0.1 * torch.randn(C, device=device), 0.1 * torch.randn(C, device=device)
    plain = cc.rms_norm_silu(x, gamma, bias, in_bias=in_bias)
    rounded = cc.rms_norm_silu(x, gamma, bias, in_bias=in_bias, tf32=True)
    assert torch.equal(rounded, round_to_tf32(plain))
    assert (plain.view(torch.int32) & 0x1FFF).count_nonzero() > plain.numel() // 2
    with pytest.raises(ValueError, match="tf32: rounds fp32 values only"):
        cc.rms_norm_silu(x.bfloat16(), gamma.bfloat16(), tf32=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_silu_in_bias(device, dtype, monkeypatch):
    """in_bias: the producing conv's bias, added in fp32 before the norm. The reference adds it the way
    diffusers does (conv output + bias rounded to x's dtype); the kernel must be as close to float64."""
    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", "triton")
    C, B, T, P = 96, 2, 2, 37
    x = (torch.randn(B, C, T, 1, P, device=device) * 3).to(dtype).contiguous(memory_format=CL)
    gamma = torch.empty(C, 1, 1, 1, device=device).uniform_(0.5, 1.5).to(dtype)
    in_bias = torch.randn(C, device=device).to(dtype)  # as large as x: a dropped bias cannot pass
    out = cc.rms_norm_silu(x, gamma, in_bias=in_bias, out=poison(torch.empty_like(x)))
    oracle = ref.rms_norm_silu(x.double() + in_bias.double().reshape(C, 1, 1, 1), gamma.double())
    with monkeypatch.context() as m:
        m.setenv("VKERN_RMS_NORM_SILU_BACKEND", "reference")
        expected = cc.rms_norm_silu(x, gamma, in_bias=in_bias)
    assert rel_l2(expected.double(), oracle) < 1e-2 and rel_l2(cc.rms_norm_silu(x, gamma).double(), oracle) > 0.1
    assert_within_torch_error(out, oracle, expected)
    if dtype == torch.float32:
        assert rel_l2(out, expected) < 1e-6
    else:
        assert rel_l2(out.double(), oracle) <= rel_l2(expected.double(), oracle)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias_dtype", ["same", "fp32", None])
def test_residual_add_kernel(device, dtype, bias_dtype, monkeypatch):
    """y += shortcut + bias in fp32, rounded once: the same bits as the reference's arithmetic, for a
    shortcut that is a time slice (another batch stride) and for an NCDHW one (copied once)."""
    monkeypatch.setenv("VKERN_RESIDUAL_ADD__BACKEND", "triton")
    C, B, T, P = 12, 2, 3, 41
    y = torch.randn(B, C, T, 1, P, device=device).to(dtype).contiguous(memory_format=CL)
    wide = torch.randn(B, C, T + 2, 1, P, device=device).to(dtype).contiguous(memory_format=CL)
    bias = None if bias_dtype is None else torch.randn(C, device=device).to(torch.float32 if bias_dtype == "fp32" else dtype)
    for shortcut in (wide[:, :, 2:], wide[:, :, 2:].contiguous()):
        expected = ref.residual_add(y, shortcut, bias)
        out = cc.residual_add_(y.clone(memory_format=CL), shortcut, bias)
        assert torch.equal(out, expected)
        assert bias is None or not torch.equal(out, y + shortcut)
    oracle = y.double() + shortcut.double() + (0 if bias is None else bias.double().reshape(C, 1, 1, 1))
    assert rel_l2(expected.double(), oracle) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_residual_add_bad_inputs():
    y = torch.randn(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match=r"shortcut: expected shape \(1, 4, 2, 3, 3\)"):
        cc.residual_add_(y, torch.randn(1, 4, 1, 3, 3))
    with pytest.raises(TypeError, match="shortcut: expected dtype"):
        cc.residual_add_(y, y.bfloat16())
    with pytest.raises(ValueError, match=r"bias: expected 4 values"):
        cc.residual_add_(y, y, torch.ones(3))


def test_rms_norm_silu_matches_diffusers_module():
    norm = WanRMS_norm(24, images=False)
    norm.gamma.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 24, 3, 5, 7)
    assert torch.equal(ref.rms_norm_silu(x, norm.gamma), torch.nn.functional.silu(norm(x)))
    xb, normb = x.bfloat16(), norm.bfloat16()
    assert torch.equal(ref.rms_norm_silu(xb, normb.gamma), torch.nn.functional.silu(normb(xb)))


def test_rms_norm_silu_bad_inputs():
    x, g = torch.randn(1, 4, 2, 3, 3), torch.ones(4)
    with pytest.raises(ValueError, match="x: expected 5 dimensions"):
        cc.rms_norm_silu(x[0], g)
    with pytest.raises(TypeError, match="gamma: expected dtype"):
        cc.rms_norm_silu(x, g.bfloat16())
    with pytest.raises(ValueError, match=r"gamma: expected 4 values \(x's channels\)"):
        cc.rms_norm_silu(x, torch.ones(5))
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 4, 2, 3, 3\)"):
        cc.rms_norm_silu(x, g, out=torch.empty(1, 4, 3, 3, 3))


def test_conv3d_zeros_buffered_matches_reference():
    """The cudnn backend's buffer (one copy of cache and chunk, padding in the conv) on the CPU."""
    for kind, kw in WAN_CONVS.items():
        conv = WanCausalConv3d(5, 7, **kw)
        x = torch.randn(2, 5, 3, 13, 11)
        for frames in (None, 1, 2, 3):
            cache = None if frames is None else torch.randn(2, 5, frames, 13, 11)
            expected = conv(x, cache)
            out = cc.conv3d_zeros_buffered(x, *conv_args(conv), cache)
            assert out.shape == expected.shape and rel_l2(out, expected) < 1e-6, (kind, frames)


@pytest.mark.parametrize("C", [8, 12, 6, 3])  # 4 | C: the copy moves int64 words; else bf16 elements
def test_upsample_copy_is_a_plain_nearest_upsample(C):
    """_upsample_frames (one gather copy, through int64 views where the layout allows) gives exactly the
    frames of a per-frame nearest 2x upsampling, for the plain and the time-interleaved source views."""
    x = torch.randn(2, 2 * C, 3, 5, 7).bfloat16().contiguous(memory_format=CL)
    src = x.permute(0, 2, 3, 4, 1).unflatten(-1, (2, C)).permute(0, 1, 4, 2, 3, 5)  # [B, T, 2, H, W, C]
    assert (fast._words(src).dtype == torch.int64) == (C % 4 == 0)
    frames = src.permute(0, 1, 2, 5, 3, 4).flatten(0, 2)  # frame t * 2 + i, [B * T * 2, C, H, W]
    expected = torch.nn.functional.interpolate(frames.float(), scale_factor=2, mode="nearest").bfloat16()
    out = fast._upsample_frames(src)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, expected)
    plain = x[:, :C].permute(0, 2, 3, 4, 1).unsqueeze(2)
    assert torch.equal(fast._upsample_frames(plain), torch.nn.functional.interpolate(
        plain.permute(0, 1, 2, 5, 3, 4).flatten(0, 2).float(), scale_factor=2, mode="nearest").bfloat16())


# --- the chunk loop against diffusers (fp32, CPU) -------------------------------------------------------

@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
@pytest.mark.parametrize("B,T,frames_per_step", [(1, 1, None), (2, 3, None), (1, 3, 1), (2, 3, 2), (1, 2, 3)])
@torch.no_grad()
def test_decode_matches_diffusers(wan22, B, T, frames_per_step, norm_reference):
    vae = small_vae(wan22)
    z = torch.randn(B, 4, T, 2, 2)
    expected = vae.decode(z).sample
    out = fast.decode(vae, z, frames_per_step=frames_per_step)
    assert out.shape == expected.shape and out.is_contiguous()
    assert rel_l2(out, expected) < FP32_TOL


@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 9)])
@torch.no_grad()
def test_encode_matches_diffusers(wan22, B, T, norm_reference):
    vae = small_vae(wan22)
    x = torch.randn(B, 3, T, 32, 32) if wan22 else torch.randn(B, 3, T, 16, 16)
    expected = vae.encode(x).latent_dist.parameters
    out = fast.encode(vae, x)
    assert out.shape == expected.shape == (B, 8, 1 + (T - 1) // 4, 2, 2)
    assert rel_l2(out, expected) < FP32_TOL


@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
@pytest.mark.parametrize("latents_per_call,T,frames_per_step", [(2, 5, None), (3, 5, None), (4, 3, 2)])
@torch.no_grad()
def test_several_latents_per_call_match_diffusers(wan22, latents_per_call, T, frames_per_step, norm_reference):
    """Latent frames after the first decoded several at a time (a last group may be shorter) give
    diffusers' frames: causal convs with a cache do not depend on the chunking."""
    vae = small_vae(wan22)
    z = torch.randn(1, 4, T, 2, 2)
    expected = vae.decode(z).sample
    out = fast.decode(vae, z, frames_per_step=frames_per_step, latents_per_call=latents_per_call)
    assert out.shape == expected.shape and rel_l2(out, expected) < FP32_TOL


def test_latents_per_call_checked(monkeypatch):
    vae, z = small_vae(False), torch.randn(1, 4, 2, 2, 2)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="latents_per_call: expected a positive int"):
            fast.decode(vae, z, latents_per_call=bad)
    monkeypatch.setenv("VKERN_WAN_VAE_LATENTS_PER_CALL", "two")
    with pytest.raises(ValueError, match="VKERN_WAN_VAE_LATENTS_PER_CALL: expected a positive int"):
        fast.decode(vae, z)
    monkeypatch.setenv("VKERN_WAN_VAE_LATENTS_PER_CALL", "3")
    assert fast._latents_per_call_default() == 3
    monkeypatch.delenv("VKERN_WAN_VAE_LATENTS_PER_CALL")
    assert fast._latents_per_call_default() == fast.LATENTS_PER_CALL == 2  # measured faster (run 72)


def test_hand_norm_default_off_and_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("VKERN_WAN_VAE_HAND_NORM", raising=False)
    assert fast._chunks(None, None, False).hand_norm is fast.HAND_NORM is False  # measured no faster (run 72)
    monkeypatch.setenv("VKERN_WAN_VAE_HAND_NORM", "1")
    assert fast._chunks(None, None, False).hand_norm is True


def test_tf32_norm_default_on_and_read_from_the_environment(monkeypatch):
    monkeypatch.delenv("VKERN_WAN_VAE_TF32_NORM", raising=False)
    assert fast._chunks(None, None, False).tf32_norm is fast.TF32_NORM is True
    monkeypatch.setenv("VKERN_WAN_VAE_TF32_NORM", "0")
    assert fast._chunks(None, None, False).tf32_norm is False


def test_no_tf32_inputs_on_the_cpu(monkeypatch):
    """rounds_input: only fp32 CUDA inputs of a conv on the Triton kernel (the interpreter on CPU tensors runs IEEE
    products, as torch's CPU conv): a CPU input of a conv forced onto the kernel is not rounded."""
    monkeypatch.setenv("VKERN_CAUSAL_CONV3D_BACKEND", "triton")
    run = fast._chunks(None, None, False)
    conv = WanCausalConv3d(96, 96, 3, padding=1)
    assert run.tf32_norm and not run.rounds_input(conv, torch.zeros(1, 96, 1, 4, 4).contiguous(memory_format=CL))


@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
@torch.no_grad()
def test_fused_bias_decode_and_encode_match_diffusers(wan22, norm_reference, monkeypatch):
    """fuse_bias: residual blocks' convs without their biases, the biases added by the norm and the
    residual add. fp32: diffusers' result up to summation order; with the biases dropped instead of
    moved the output is far off (so the comparison sees them)."""
    monkeypatch.setenv("VKERN_RESIDUAL_ADD__BACKEND", "reference")
    vae = small_vae(wan22)
    for m in vae.modules():  # biases start at small values: make them matter
        if isinstance(m, WanCausalConv3d) and m.bias is not None:
            m.bias.data.normal_(0, 0.5)
    z = torch.randn(1, 4, 3, 2, 2)
    expected = vae.decode(z).sample
    assert rel_l2(fast.decode(vae, z, fuse_bias=True), expected) < FP32_TOL
    x = torch.randn(1, 3, 5, 32, 32) if wan22 else torch.randn(1, 3, 5, 16, 16)
    assert rel_l2(fast.encode(vae, x, fuse_bias=True), vae.encode(x).latent_dist.parameters) < FP32_TOL
    monkeypatch.setattr(fast, "_sum_bias", lambda *b: None)  # a residual add that forgets the biases
    assert rel_l2(fast.decode(vae, z, fuse_bias=True), expected) > 100 * FP32_TOL


@pytest.mark.parametrize("option", ["fuse_bias", "pad_channels"])
def test_measured_options_default_on_and_read_the_environment(option, monkeypatch):
    name = f"VKERN_WAN_VAE_{option.upper()}"
    monkeypatch.delenv(name, raising=False)
    assert fast._env_switch(option, None) is True  # on since measured faster on a GPU (run 21, bench/NOTES.md)
    assert fast._env_switch(option, None, default=False) is False  # pad_channels in decode (run 22)
    assert fast._env_switch(option, False) is False
    monkeypatch.setenv(name, "1")
    assert fast._env_switch(option, None, default=False) is True
    monkeypatch.setenv(name, "0")
    assert fast._env_switch(option, None) is False and fast._env_switch(option, True) is True
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name}: expected 0 or 1"):
        fast.decode(small_vae(False), torch.randn(1, 4, 1, 2, 2))


def test_triton_conv_only_where_it_measured_faster(monkeypatch):
    """vkern.ops.causal_conv.TRITON_FASTER: the 3x3x3 stride-1 convs with 96 outputs go to the Triton kernel
    on CUDA in 16 bits; in fp32 the convs of TRITON_FASTER_TF32, only while torch runs cuDNN's fp32 convs in TF32
    (with TF32 off the kernel's IEEE products lose to cuDNN's); the other Wan convs keep cuDNN; the environment
    still forces either."""
    w = lambda o, c, *k: torch.empty(o, c, *k)  # noqa: E731
    assert cc.triton_faster(w(96, 96, 3, 3, 3), (1, 1, 1)) and cc.triton_faster(w(96, 8, 3, 3, 3), (1, 1, 1))
    assert cc.triton_faster(w(96, 96, 3, 3, 3), (1, 1, 1), torch.float16)
    assert cc.TRITON_FASTER_TF32
    for C, O, k in cc.TRITON_FASTER_TF32:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
            assert cc.triton_faster(w(O, C, *k), (1, 1, 1), torch.float32), (C, O, k)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            assert not cc.triton_faster(w(O, C, *k), (1, 1, 1), torch.float32), (C, O, k)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert not cc.triton_faster(w(96, 96, 3, 3, 3), (1, 2, 2), torch.float32)
        assert not cc.triton_faster(w(96, 96, 3, 3, 3), (1, 1, 1), torch.float64)
    for weight, stride in ((w(192, 192, 3, 3, 3), (1, 1, 1)), (w(384, 384, 3, 3, 3), (1, 1, 1)),
                           (w(3, 96, 3, 3, 3), (1, 1, 1)), (w(96, 96, 3, 3, 3), (1, 2, 2)),
                           (w(768, 384, 3, 1, 1), (1, 1, 1))):
        assert not cc.triton_faster(weight, stride), (weight.shape, stride)
    cuda = torch.device("cuda")
    monkeypatch.setattr(vkern.ops._backend, "triton_usable", lambda device: None)
    assert list(cc._causal_conv_candidates(cuda, torch.bfloat16, True)) == ["triton", "cudnn", "cuda", "reference"]
    assert list(cc._causal_conv_candidates(cuda, torch.bfloat16, False)) == ["cudnn", "triton", "cuda", "reference"]
    cpu = cc._causal_conv_candidates(torch.device("cpu"), torch.float32, True)
    assert [n for n, reason in cpu.items() if reason is None][0] == "reference"
    x = torch.empty(1, 96, 1, 4, 4)
    assert cc.conv_backend(x, w(96, 96, 3, 3, 3), (1, 1, 1)) == "reference"  # the CPU: never the interpreter
    monkeypatch.setenv("VKERN_CAUSAL_CONV3D_BACKEND", "triton")
    assert cc.conv_backend(x, w(192, 96, 3, 3, 3), (1, 1, 1)) == "triton"


@pytest.mark.parametrize("wan22,T,frames_per_step", [(False, 2, None), (True, 3, 1)])
@torch.no_grad()
def test_decode_with_every_conv_on_the_interpreted_triton_kernel(wan22, T, frames_per_step, monkeypatch):
    """The fast loop's Triton branch: every causal conv reads its cached frames and the chunk in place (no
    [cache | chunk] buffer is built; 1-frame steps shift the cache), the spatial padding, the dropped bias
    under fuse_bias: every conv forced onto the interpreted kernel."""
    monkeypatch.setenv("VKERN_CAUSAL_CONV3D_BACKEND", "triton")
    buffers = []
    build = fast._Chunks.buffer
    monkeypatch.setattr(fast._Chunks, "buffer", lambda self, *a, **k: buffers.append(a[1]) or build(self, *a, **k))
    vae = small_vae(wan22)
    z = torch.randn(1, 4, T, 2, 2)
    assert rel_l2(fast.decode(vae, z, frames_per_step=frames_per_step), vae.decode(z).sample) < FP32_TOL
    assert vkern.ops._backend.last_choice["causal_conv3d"] == "triton"
    assert buffers == []  # decode pads no channels: every conv read its cache in place


@torch.no_grad()
def test_encode_with_every_conv_on_the_interpreted_triton_kernel(monkeypatch):
    """Encode on the in-place Triton branch (no channel padding); the time-downsampling conv (1 cached
    frame, stride 2) keeps its buffer."""
    monkeypatch.setenv("VKERN_CAUSAL_CONV3D_BACKEND", "triton")
    buffers = []
    build = fast._Chunks.buffer
    monkeypatch.setattr(fast._Chunks, "buffer", lambda self, *a, **k: buffers.append(k.get("keep")) or build(self, *a, **k))
    vae = small_vae(False)
    x = torch.randn(1, 3, 5, 16, 16)
    out = fast.encode(vae, x, pad_channels=False)
    assert rel_l2(out, vae.encode(x).latent_dist.parameters) < FP32_TOL
    assert buffers and set(buffers) == {1}


@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
@torch.no_grad()
def test_padded_channels_decode_and_encode_match_diffusers(wan22, norm_reference):
    """pad_channels: the encoder's 3 (12) input and the decoder's 3 (12) output channels padded with zero
    channels and zero filters to 8 (16): diffusers' result up to summation order."""
    vae = small_vae(wan22)
    z = torch.randn(1, 4, 3, 2, 2)
    out = fast.decode(vae, z, pad_channels=True)
    assert rel_l2(out, vae.decode(z).sample) < FP32_TOL
    x = torch.randn(1, 3, 5, 32, 32) if wan22 else torch.randn(1, 3, 5, 16, 16)
    run = fast._Chunks(pad_channels=True)
    assert run._channels(3) == 8 and run._channels(12) == 16 and run._channels(96) == 96
    xp = ref.patchify(x, 2) if wan22 else x
    fast.encoder_chunk(vae.encoder, fast._cl(xp[:, :, :1]), run)
    assert run.padded[vae.encoder.conv_in][0].shape[1] == (16 if wan22 else 8)  # zero input channels
    list(fast.decoder_chunk(vae.decoder, fast._cl(torch.randn(1, 4, 1, 2, 2)), run, True))
    assert run.padded[vae.decoder.conv_out][0].shape[0] == (16 if wan22 else 8)  # padded filters, cut off after
    assert rel_l2(fast.encode(vae, x, pad_channels=True), vae.encode(x).latent_dist.parameters) < FP32_TOL
    assert torch.equal(fast.decode(vae, z, pad_channels=True), out)  # padded weights are per video


@torch.no_grad()
def test_decode_with_the_interpreted_kernel(monkeypatch):
    """The Triton norm kernel inside the loop (its buffer slots, its layouts); slow when interpreted."""
    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", "triton")
    if vkern.ops._backend.triton_usable(torch.device("cpu")) is not None:
        pytest.fail("tests/conftest.py should have set TRITON_INTERPRET=1 on a machine without CUDA")
    vae = small_vae(False)
    z = torch.randn(1, 4, 2, 2, 2)
    expected = vae.decode(z).sample
    assert rel_l2(fast.decode(vae, z), expected) < FP32_TOL
    assert vkern.ops._backend.last_choice["rms_norm_silu"] == "triton"
    assert rel_l2(fast.decode(vae, z, fuse_bias=True), expected) < FP32_TOL  # both glue kernels
    assert vkern.ops._backend.last_choice["residual_add_"] == "triton"


@torch.no_grad()
def test_bf16_decode_and_encode_as_accurate_as_diffusers(norm_reference):
    """bf16: the fast path rounds differently from diffusers (conv algorithms, summation order), so
    the two differ by about bf16's own error. The check: its error against an fp32 run of the same
    bf16 weights is no larger than diffusers' (x1.25), and it stays within 45 dB of diffusers."""
    vae = small_vae(False).bfloat16()
    vae32 = small_vae(False)
    vae32.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    z = torch.randn(1, 4, 3, 2, 2).bfloat16()
    oracle, theirs = vae32.decode(z.float()).sample, vae.decode(z).sample
    for fuse_bias in (False, True):
        ours = fast.decode(vae, z, fuse_bias=fuse_bias)
        assert rel_l2(ours, oracle) <= 1.25 * rel_l2(theirs, oracle), fuse_bias
        assert psnr(ours, theirs) >= 45
    x = torch.randn(1, 3, 5, 16, 16).bfloat16()
    oracle, theirs, ours = (vae32.encode(x.float()).latent_dist.parameters, vae.encode(x).latent_dist.parameters,
                            fast.encode(vae, x))
    assert rel_l2(ours, oracle) <= 1.25 * rel_l2(theirs, oracle)


@torch.no_grad()
def test_cache_is_per_video_and_calls_repeat(norm_reference):
    vae = small_vae(True)
    z1, z2 = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 3, 2, 2)
    first = fast.decode(vae, z2)
    fast.decode(vae, z1)
    assert torch.equal(fast.decode(vae, z2), first)  # nothing of z1 leaks into z2's decode
    assert torch.equal(fast.decode(vae, z2, output_device="cpu"), first)
    x = torch.randn(1, 3, 5, 32, 32)
    assert torch.equal(fast.encode(vae, x), fast.encode(vae, x))


@torch.no_grad()
def test_frames_per_step_from_the_environment(monkeypatch, norm_reference):
    vae = small_vae(False)
    z = torch.randn(1, 4, 3, 2, 2)
    whole = fast.decode(vae, z, frames_per_step=None)
    monkeypatch.delenv("VKERN_WAN_VAE_FRAMES_PER_STEP", raising=False)
    large = fast.LARGE_FRAME_PIXELS + 1
    assert fast._auto_frames_per_step(16, 16, torch.float32) == fast.FP32_FRAMES_PER_STEP == 2
    assert fast._auto_frames_per_step(16, 16, torch.bfloat16) is None  # 16 bits: whole chunks
    assert all(fast._auto_frames_per_step(1, large, dtype) == 1 for dtype in (torch.float32, torch.float16))
    monkeypatch.setenv("VKERN_WAN_VAE_FRAMES_PER_STEP", "all")
    assert fast._auto_frames_per_step(1, large, torch.float32) is None
    monkeypatch.setenv("VKERN_WAN_VAE_FRAMES_PER_STEP", "1")
    assert fast._auto_frames_per_step(16, 16, torch.float32) == 1
    assert rel_l2(fast.decode(vae, z), whole) < FP32_TOL
    monkeypatch.setenv("VKERN_WAN_VAE_FRAMES_PER_STEP", "0")
    with pytest.raises(ValueError, match="VKERN_WAN_VAE_FRAMES_PER_STEP: expected a positive int"):
        fast.decode(vae, z)


def test_bad_inputs_name_the_argument():
    vae = small_vae(False)
    z = torch.randn(1, 4, 2, 2, 2)
    with pytest.raises(ValueError, match=r"z: expected 4 channels, got shape \(1, 5, 2, 2, 2\)"):
        fast.decode(vae, torch.randn(1, 5, 2, 2, 2))
    with pytest.raises(ValueError, match="z: expected 5 dimensions"):
        fast.decode(vae, z[0])
    with pytest.raises(TypeError, match="z: expected dtype float32 .the VAE's., got bfloat16"):
        fast.decode(vae, z.bfloat16())
    with pytest.raises(ValueError, match=r"x: expected 4k \+ 1 frames .*got 6.*drop the last 1"):
        fast.encode(vae, torch.randn(1, 3, 6, 16, 16))
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        fast.encode(vae, torch.randn(1, 4, 5, 16, 16))
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        fast.encode(vae, torch.randn(1, 3, 5, 16, 16, dtype=torch.float64))


# --- the patched VAE ----------------------------------------------------------------------------------

@torch.no_grad()
def test_patched_vae_runs_the_fast_loop_and_undo_restores(monkeypatch, norm_reference):
    monkeypatch.setenv("VKERN_WAN_VAE", "fast")  # on the CPU the patch keeps diffusers' loop by default
    vae = models.build_wan_vae("tiny", torch.float32)
    z, x = torch.randn(models.latent_shape("tiny")), torch.randn(1, 3, 9, 32, 32)
    before_dec, before_enc = vae.decode(z).sample, vae.encode(x).latent_dist.parameters
    handle = vkern.patch(vae)
    assert handle.summary["AutoencoderKLWan._decode -> vkern chunk loop"] == 1
    assert rel_l2(vae.decode(z).sample, before_dec) < FP32_TOL
    assert rel_l2(vae.decode(z, return_dict=False)[0], before_dec) < FP32_TOL
    assert rel_l2(vae.encode(x).latent_dist.parameters, before_enc) < FP32_TOL
    with pytest.raises(ValueError, match="x: expected 4k"):  # diffusers would drop 3 frames silently
        vae.encode(x[:, :, :8])
    vae.enable_tiling()  # tiled decode: diffusers' loop, over vkern's drop-in convs
    assert torch.equal(vae.decode(z).sample, before_dec)
    handle.undo()
    assert "_decode" not in vae.__dict__ and "_encode" not in vae.__dict__
    vae.disable_tiling()
    assert torch.equal(vae.decode(z).sample, before_dec)


# --- GPU: the default config against diffusers in bf16 ------------------------------------------------

def _default_vae():
    torch.manual_seed(0)
    return models.build_wan_vae("default", torch.bfloat16, "cuda")


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_default_decode_matches_diffusers():
    """17 frames at 256x256. PSNR >= 45 dB against diffusers (the issue's bound). Relative L2 against
    diffusers is bounded by 2x diffusers' own bf16 error (vs fp32): with random weights the output is
    small (std ~0.3) and bf16 alone is ~1.5% off, so two bf16 implementations with different conv
    algorithms differ by about that much (measured on the CPU: 1.8%); the issue's 1e-2 is printed."""
    vae = _default_vae()
    z = torch.randn(1, 16, 5, 32, 32, device="cuda", dtype=torch.bfloat16)
    theirs = vae.decode(z).sample
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ours = fast.decode(vae, z)
    peak_ours = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vae.decode(z)
    peak_theirs = torch.cuda.max_memory_allocated()
    vae32 = models.build_wan_vae("default", torch.float32, "cuda")
    vae32.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    oracle = vae32.decode(z.float()).sample
    err_ours, err_theirs, diff = rel_l2(ours, oracle), rel_l2(theirs, oracle), rel_l2(ours, theirs)
    print(f"decode: psnr vs diffusers {psnr(ours, theirs):.1f} dB, rel L2 vs diffusers {diff:.4f}, vs fp32: "
          f"ours {err_ours:.4f} diffusers {err_theirs:.4f}; peak {peak_ours / 2**30:.2f} vs {peak_theirs / 2**30:.2f} GiB")
    assert psnr(ours, theirs) >= 45
    assert err_ours <= 1.25 * err_theirs
    assert diff <= max(1e-2, 2 * err_theirs)
    assert peak_ours < peak_theirs
    unfused = fast.decode(vae, z, fuse_bias=False, pad_channels=False)  # the options off: cuDNN adds the biases
    print(f"unfused biases: psnr vs diffusers {psnr(unfused, theirs):.1f} dB, vs fp32 {rel_l2(unfused, oracle):.4f}")
    assert psnr(unfused, theirs) >= 45 and rel_l2(unfused, oracle) <= 1.25 * err_theirs
    # frames written to the CPU (pinned) and a second call: the same frames
    assert torch.equal(fast.decode(vae, z, output_device="cpu"), ours.cpu())


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_default_encode_matches_diffusers():
    vae = _default_vae()
    x = torch.rand(1, 3, 17, 256, 256, device="cuda", dtype=torch.bfloat16) * 2 - 1
    theirs = vae.encode(x).latent_dist.parameters
    ours = fast.encode(vae, x)
    vae32 = models.build_wan_vae("default", torch.float32, "cuda")
    vae32.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    oracle = vae32.encode(x.float()).latent_dist.parameters
    print(f"encode: rel L2 vs diffusers {rel_l2(ours, theirs):.4f}, vs fp32 ours {rel_l2(ours, oracle):.4f} "
          f"diffusers {rel_l2(theirs, oracle):.4f}")
    assert rel_l2(ours, oracle) <= 1.25 * rel_l2(theirs, oracle)
    assert rel_l2(fast.encode(vae, x, fuse_bias=False, pad_channels=False), oracle) <= 1.25 * rel_l2(theirs, oracle)


def _spy_kernel_convs(monkeypatch):
    """Records (backend, in channels, out channels, kernel, cache_reversed, residual given, norm given, normed, cache
    frames from two tensors, upsample, inputs_tf32, norm_tf32) of every conv the VAE loop sends to vkern's conv
    kernels (all go through ops.causal_conv.conv3d_in_place)."""
    from vkern.ops import causal_conv as cc

    calls, run = [], cc.conv3d_in_place

    def spy(backend, x, weight, *args, cache=None, cache_reversed=False, residual=None, norm=None, normed=False,
            upsample=1, **kwargs):
        apart = isinstance(cache, list) and len(cache) == 2 and (
            cache[0].untyped_storage().data_ptr() != cache[1].untyped_storage().data_ptr())
        calls.append((backend, weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), cache_reversed,
                      residual is not None, norm is not None and not normed, normed, apart, upsample,
                      kwargs.get("inputs_tf32", False), kwargs.get("norm_tf32", False)))
        return run(backend, x, weight, *args, cache=cache, cache_reversed=cache_reversed, residual=residual, norm=norm,
                   normed=normed, upsample=upsample, **kwargs)
    monkeypatch.setattr(cc, "conv3d_in_place", spy)
    return calls


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch without per-op fp32_precision settings")
def test_cudnn_conv_tf32_reads_torch_settings_as_cudnn_does():
    """cudnn_conv_tf32: the legacy flag, and the per-op setting inheriting from cudnn's, then the global one."""
    from vkern.ops._backend import cudnn_conv_tf32

    cudnn = torch.backends.cudnn
    saved = cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision
    try:
        with cudnn.flags(enabled=True, allow_tf32=True):
            assert cudnn_conv_tf32()
        with cudnn.flags(enabled=True, allow_tf32=False):
            assert not cudnn_conv_tf32()
        cudnn.conv.fp32_precision = "ieee"
        assert not cudnn_conv_tf32()
        cudnn.conv.fp32_precision, torch.backends.fp32_precision = "none", "tf32"
        assert cudnn_conv_tf32()
        torch.backends.fp32_precision = "ieee"
        assert not cudnn_conv_tf32()
    finally:
        cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision = saved


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_decode_runs_vkern_convs_where_they_measured_faster(monkeypatch):
    """On CUDA the default decode sends the convs of CUDA_FASTER (incl. the 2D upsampling convs and the RGB output
    conv) to the CUDA kernel, the other 96-output 3x3x3 convs (TRITON_FASTER) to the Triton kernel, and nothing
    else to either; residual blocks whose conv2 runs on the CUDA kernel add their shortcut in it, and those whose
    conv1 (C -> C, one tile) and conv2 run on it apply norm2 + SiLU in conv1's epilogue (and only those); with
    every conv on cuDNN the output stays within bf16's error of it (both vs fp32). The convs that hand the next
    block its norm1 (or the decoder its norm_out) as a second output are 96-channel conv2s and 2D upsampling convs
    (which read the upsampled frames on the fly)."""
    from vkern.ops import causal_conv as cc

    monkeypatch.delenv("VKERN_CONV_CUDA", raising=False)
    monkeypatch.setenv("VKERN_WAN_VAE_HAND_NORM", "1")  # the optional hand-off too
    vae = _default_vae()
    z = torch.randn(1, 16, 2, 32, 32, device="cuda", dtype=torch.bfloat16)
    calls = _spy_kernel_convs(monkeypatch)
    ours = fast.decode(vae, z)
    kinds = {c[:4] for c in calls}
    assert any(k[0] == "cuda" for k in kinds), kinds
    for backend, C, O, k in kinds:
        assert (backend == "cuda") == ((C, O, k) in cc.CUDA_FASTER), kinds
        assert backend == "cuda" or (O == 96 and k == (3, 3, 3)), kinds
    assert {k[1:4] for k in kinds} >= {(192, 96, (1, 3, 3)), (96, 3, (3, 3, 3))}  # the upsampling and RGB output convs
    for flag in (5, 6):  # residual, norm
        fused = {c[1:4] for c in calls if c[flag]}
        assert fused and all(C == O and k == (3, 3, 3) and (C, O, k) in cc.CUDA_FASTER for C, O, k in fused), fused
    # Every C -> C 3x3x3 conv2 on the CUDA kernel adds its shortcut (96 and 192 channels); norm2 + SiLU needs a
    # pixel's channels in one output tile, so only the 96 -> 96 blocks' conv1s apply it: one per such block.
    assert {c[1:4] for c in calls if c[5]} == {k[1:4] for k in kinds if k[0] == "cuda" and k[1] == k[2]}, kinds
    assert {c[1:4] for c in calls if c[6]} == {(96, 96, (3, 3, 3))}
    assert sum(c[6] for c in calls) == sum(c[5] for c in calls if c[2] == cc._cuda_block_n(c[2]))
    handing = {(c[1:4], c[5], c[9]) for c in calls if c[7]}
    assert handing == {((96, 96, (3, 3, 3)), True, 1), ((192, 96, (1, 3, 3)), False, 2)}, handing
    assert all(c[9] == 2 for c in calls if c[3] == (1, 3, 3))  # every 2D upsampling conv reads x upsampled
    monkeypatch.setenv("VKERN_CAUSAL_CONV3D_BACKEND", "cudnn")
    n = len(calls)
    cudnn = fast.decode(vae, z)
    assert len(calls) == n  # forced cuDNN: neither kernel is called
    vae32 = models.build_wan_vae("default", torch.float32, "cuda")
    vae32.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    oracle = vae32.decode(z.float()).sample
    print(f"kernel convs {n}: vs fp32 {rel_l2(ours, oracle):.4f}, all-cuDNN {rel_l2(cudnn, oracle):.4f}")
    assert rel_l2(ours, oracle) <= 1.25 * rel_l2(cudnn, oracle)


@pytest.mark.gpu
@pytest.mark.parametrize("conv_cuda,backend", [("table", "cuda"), ("0", "triton")])
@torch.inference_mode()
def test_gpu_one_frame_steps_read_the_ring_cache(monkeypatch, conv_cuda, backend):
    """1-frame steps (the 720p default) on CUDA: the CUDA kernel reads its 2 cached frames from the two inputs they
    came from (kept, no copy); the Triton one (VKERN_CONV_CUDA=0) its 2-frame ring cache reversed (negative frame
    stride) on every other step; the frames match whole-chunk decoding's within the issue's parity bound (rel. L2
    1e-2): the same kernels and sums, except that cuDNN may pick another algorithm for the per-frame upsampling conv
    (bit equality is printed)."""
    monkeypatch.setenv("VKERN_CONV_CUDA", conv_cuda)
    vae = _default_vae()
    z = torch.randn(1, 16, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    calls = _spy_kernel_convs(monkeypatch)
    stepped = fast.decode(vae, z, frames_per_step=1)
    whole = fast.decode(vae, z, frames_per_step=None)
    flags = [c[4] if backend == "triton" else c[8] for c in calls if c[0] == backend]
    print(f"{backend}: reversed or two-tensor reads {sum(flags)} of {len(flags)}; bit-equal {torch.equal(stepped, whole)}, "
          f"rel L2 {rel_l2(stepped, whole):.2e}")
    assert any(flags)
    assert rel_l2(stepped, whole) <= 1e-2


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_patched_vae_and_cudnn_conv_op():
    vae = _default_vae()
    z = torch.randn(1, 16, 2, 16, 16, device="cuda", dtype=torch.bfloat16)
    expected = fast.decode(vae, z)
    with vkern.patch(vae) as handle:
        assert torch.equal(vae.decode(z).sample, expected)  # CUDA: the fast loop by default
        assert handle.summary["WanCausalConv3d -> CachedCausalConv3d"] > 0
    conv = vae.decoder.conv_in
    x, cache = (torch.randn(1, 16, n, 16, 16, device="cuda", dtype=torch.bfloat16) for n in (4, 2))
    out = vkern.ops.causal_conv3d(x, *conv_args(conv), cache)
    assert vkern.ops._backend.last_choice["causal_conv3d"] == "cudnn"
    args64 = [t.double() if isinstance(t, torch.Tensor) else t for t in conv_args(conv)]
    oracle = ref_conv.causal_conv3d(x.double(), *args64, cache.double())
    assert_within_torch_error(out, oracle, ref_conv.causal_conv3d(x, *conv_args(conv), cache))


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_fp32_vae_decode_and_encode_match_diffusers(monkeypatch):
    """An fp32 VAE, as diffusers' Wan examples load it (torch_dtype=torch.float32), patched: decode and encode run
    vkern's loop and land within 1.25x of diffusers' own error against the same VAE with TF32 off (both run their
    convolutions in TF32, torch's default: the convs of CUDA_FASTER_TF32 on the CUDA kernel, of TRITON_FASTER_TF32 on
    the Triton kernel, the others on cuDNN; a kernel that rounded to bf16 on the way would be ~10x off). With TF32 off
    the patched VAE runs every conv on cuDNN, IEEE, within 1e-5 of the oracle. vkern's convs read inputs the norm pass
    rounded to TF32 (inputs_tf32); with VKERN_WAN_VAE_TF32_NORM=0 they round them themselves (Triton in its loop,
    CUDA into a copy): the same products, within 1e-6 (had nobody rounded, wgmma would truncate: 2.6x the conv's
    error, run 173). The decode peak is printed,
    not bounded: in fp32 vkern's loop measured 2-3% above diffusers' with every conv on cuDNN (run 172: 2.20 vs 2.15
    GiB here, 9.53 vs 9.26 at 480p), 3% below with the Triton TF32 conv (run 174: 8.96 vs 9.26 GiB at 480p); bf16
    asserts it (test_gpu_default_decode_matches_diffusers)."""
    from vkern.ops import causal_conv as cc

    torch.manual_seed(0)
    vae = models.build_wan_vae("default", torch.float32, "cuda")
    z = torch.randn(1, 16, 5, 32, 32, device="cuda")
    x = torch.rand(1, 3, 17, 256, 256, device="cuda") * 2 - 1

    def runs(v):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        decoded = v.decode(z).sample
        peak = torch.cuda.max_memory_allocated()
        return decoded, v.encode(x).latent_dist.parameters, peak

    def without_tf32(fn):
        flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return fn()
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags

    oracle = without_tf32(lambda: runs(vae))
    theirs = runs(vae)
    calls = _spy_kernel_convs(monkeypatch)
    with vkern.patch(vae) as handle:
        assert handle.summary["AutoencoderKLWan._decode -> vkern chunk loop"] == 1
        ours = runs(vae)
        kinds = {c[:4] for c in calls}
        assert kinds and all((C, O, k) in (cc.CUDA_FASTER_TF32 if b == "cuda" else cc.TRITON_FASTER_TF32)
                             for b, C, O, k in kinds), kinds
        # fp32: the 96 -> 96 conv1s apply norm2 in the epilogue and round it there (norm_tf32), no hand-off
        assert not any(c[7] for c in calls) and any(c[6] for c in calls)
        assert all(c[0] == "cuda" and c[1:3] == (96, 96) and c[11] for c in calls if c[6])
        # every 3x3x3 one fed by the norm pass or an epilogue, rounded there (the 2D upsampling convs: rounded copies)
        assert all(c[10] for c in calls if c[3] == (3, 3, 3)) and not any(c[10] for c in calls if c[3] != (3, 3, 3))
        n = len(calls)
        monkeypatch.setenv("VKERN_WAN_VAE_TF32_NORM", "0")
        in_conv = runs(vae)
        monkeypatch.delenv("VKERN_WAN_VAE_TF32_NORM")
        assert len(calls) == 2 * n and not any(c[10] or c[11] for c in calls[n:])
        monkeypatch.setenv("VKERN_WAN_VAE_TF32_EPILOGUE", "0")
        norm_pass = runs(vae)
        monkeypatch.delenv("VKERN_WAN_VAE_TF32_EPILOGUE")
        assert not any(c[6] for c in calls[2 * n:]) and all(c[10] for c in calls[2 * n:] if c[3] == (3, 3, 3))
        n = len(calls)
        ieee = without_tf32(lambda: runs(vae))
        assert len(calls) == n  # TF32 off: no conv on vkern's kernels
    for what, i in (("decode", 0), ("encode", 1)):
        print(f"fp32 {what} with TF32 off: patched vs unpatched {rel_l2(ieee[i], oracle[i]):.2e}")
        assert rel_l2(ieee[i], oracle[i]) <= 1e-5
        print(f"fp32 {what}: TF32 rounding in the norm pass vs in the conv {rel_l2(ours[i], in_conv[i]):.2e}")
        assert rel_l2(ours[i], in_conv[i]) <= 1e-6
    for what, i in (("decode", 0), ("encode", 1)):
        err_ours, err_theirs = rel_l2(ours[i], oracle[i]), rel_l2(theirs[i], oracle[i])
        err_pass = rel_l2(norm_pass[i], oracle[i])
        print(f"fp32 {what}: vs fp32 without TF32 ours {err_ours:.2e} diffusers {err_theirs:.2e}, norm2 in the norm "
              f"pass {err_pass:.2e} ({rel_l2(ours[i], norm_pass[i]):.2e} from ours)")
        assert ours[i].dtype == torch.float32 and err_ours <= 1.25 * max(err_theirs, 1e-6)
        assert err_pass <= 1.25 * max(err_theirs, 1e-6)
    print(f"fp32 decode peak: ours {ours[2] / 2**30:.2f} GiB, diffusers {theirs[2] / 2**30:.2f} GiB")


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_fp32_vae_on_the_cuda_conv(monkeypatch):
    """The fp32 VAE with every conv the CUDA kernel takes on it (VKERN_CONV_CUDA=all; TF32 products): within 1.25x
    diffusers' own TF32 error against the VAE with TF32 off, as the Triton path. Convs fed by the norm pass read its
    TF32-rounded values (inputs_tf32), the others (the upsampling convs, conv_in) rounded copies made by the op; the
    96 -> 96 conv1s' epilogues apply norm2 and round it (norm_tf32), no other epilogue applies or hands a norm. With
    VKERN_WAN_VAE_TF32_NORM=0 every conv gets rounded copies (the op's copy rounds as the epilogue does): the same
    operands, within 1e-6 (expected equal).
    """
    torch.manual_seed(0)
    vae = models.build_wan_vae("default", torch.float32, "cuda")
    z = torch.randn(1, 16, 5, 32, 32, device="cuda")
    x = torch.rand(1, 3, 17, 256, 256, device="cuda") * 2 - 1

    def runs(v):
        return v.decode(z).sample, v.encode(x).latent_dist.parameters

    flags = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        oracle = runs(vae)
    finally:
        torch.backends.cudnn.allow_tf32 = flags
    theirs = runs(vae)
    monkeypatch.setenv("VKERN_CONV_CUDA", "all")
    calls = _spy_kernel_convs(monkeypatch)
    with vkern.patch(vae):
        ours = runs(vae)
        n = len(calls)
        monkeypatch.setenv("VKERN_WAN_VAE_TF32_NORM", "0")
        copies = runs(vae)
    cuda = [c for c in calls[:n] if c[0] == "cuda"]
    assert {c[1:4] for c in cuda} >= {(96, 96, (3, 3, 3)), (384, 384, (3, 3, 3)), (192, 96, (1, 3, 3))}
    assert not any(c[7] for c in calls) and any(c[6] for c in calls)
    assert all(c[1:3] == (96, 96) and c[11] == (i < n) for i, c in enumerate(calls) if c[6])
    assert all(c[10] for c in cuda if c[1] == c[2] and c[3] == (3, 3, 3))  # residual convs: fed rounded values
    assert not any(c[10] for c in calls[n:])
    for what, i in (("decode", 0), ("encode", 1)):
        err_ours, err_theirs = rel_l2(ours[i], oracle[i]), rel_l2(theirs[i], oracle[i])
        print(f"fp32 {what} on the CUDA conv: vs fp32 without TF32 ours {err_ours:.2e} diffusers {err_theirs:.2e}; "
              f"rounded copies instead of the norm pass {rel_l2(ours[i], copies[i]):.2e}")
        assert err_ours <= 1.25 * max(err_theirs, 1e-6)
        assert rel_l2(ours[i], copies[i]) <= 1e-6
