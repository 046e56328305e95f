"""The Wan VAE loop's CUDA-conv branch on the CPU: its plumbing (cached frames kept where they are, the normed
second output handed to the next norm, the 2D upsampling conv reading the upsampled frames on the fly, the packed
weights) with the CUDA kernel replaced by an emulation of its contract in plain PyTorch. The kernel itself is tested
against the reference on the GPU (tests/test_causal_conv_cuda.py); here a plumbing mistake (a cached frame
overwritten before the next chunk reads it, a normed output handed to the wrong norm, a wrong frame order after the
upsampling) shows as a decode that differs from diffusers'."""
import pytest
import torch

from vkern import models
from vkern.modules import wan_vae as fast
from vkern.ops import causal_conv as cc
from vkern.reference import causal_conv as ref_conv
from vkern.reference import wan_vae as ref_vae

from .tolerance import rel_l2

CL = torch.channels_last_3d
FP32_TOL = 1e-5  # as tests/test_wan_vae.py: summation order only


def _emulated_cuda_conv(calls, tf32=False):
    """causal_conv3d_cuda's contract in PyTorch (fp32 math, one rounding), recording each call's features. tf32: as
    the fp32 kernel's TF32 operands: inputs_tf32 ones must hold TF32 values, others are rounded here (the op's
    copies), norm_tf32 rounds the norm's output; else (CPU tensors: the loop rounds nothing) neither may be set."""
    def conv(x, weight, bias, padding, cache=None, cache_reversed=False, persistent=None, residual=None,
             block_n=None, norm=None, packed=None, normed=False, upsample=1, inputs_tf32=False, norm_tf32=False):
        assert cc._pixel_grid(x), x.stride()
        assert tf32 or not (inputs_tf32 or norm_tf32)
        assert packed is not None and torch.equal(packed, cc.cuda_pack(weight))  # made once per video, right conv
        frames = list(cache) if isinstance(cache, (list, tuple)) else None
        if frames:
            assert cc._frames_arg(frames, x) is not None  # the kernel's cache argument can be built
        if tf32:
            operands = [x] + (frames if frames is not None else [] if cache is None else [cache])
            if inputs_tf32:
                assert all(torch.equal(ref_conv.round_to_tf32(t), t) for t in operands)
            x = ref_conv.round_to_tf32(x)
            frames = None if frames is None else [ref_conv.round_to_tf32(f) for f in frames]
            cache = cache if frames is not None or cache is None else ref_conv.round_to_tf32(cache)
        calls.append(dict(C=weight.shape[1], O=weight.shape[0], k=tuple(weight.shape[2:]), upsample=upsample,
                          frames=len(frames or []), apart=len(frames or []) == 2 and
                          frames[0].untyped_storage().data_ptr() != frames[1].untyped_storage().data_ptr(),
                          residual=residual is not None, norm=norm is not None, normed=normed,
                          norm_tf32=norm_tf32, inputs_tf32=inputs_tf32))
        if frames is not None:
            cache = torch.cat(frames, dim=2) if frames else None
        up = (lambda t: t if upsample == 1 or t is None else t.repeat_interleave(2, 3).repeat_interleave(2, 4))
        out = ref_conv.causal_conv3d(up(x).float(), weight.float(), None, (1, 1, 1), padding,
                                     None if cache is None else up(cache).float())
        if bias is not None:
            out = out + bias.float().reshape(-1, 1, 1, 1)
        if residual is not None:
            out = out + residual.float()
        if norm is not None:
            gamma, beta, silu = norm
            if normed:
                y = out.to(x.dtype)
                n = ref_vae.rms_norm_silu(y.float(), gamma.reshape(-1), beta, silu).to(x.dtype)
                return y.contiguous(memory_format=CL), n.contiguous(memory_format=CL)
            # (channels-last as the norm pass's input: F.normalize's sums in the same order)
            out = ref_vae.rms_norm_silu(out.contiguous(memory_format=CL), gamma.reshape(-1), beta, silu)
            out = ref_conv.round_to_tf32(out) if norm_tf32 else out
        return out.to(x.dtype).contiguous(memory_format=CL)
    return conv


def _kernel_backend(x, weight, stride):
    """conv_backend as on an H100/H200 with VKERN_CONV_CUDA=all, any dtype: "cuda" for every conv the kernel takes."""
    O, C, _, kh, kw = weight.shape
    takes = tuple(stride) == (1, 1, 1) and (kh, kw) == (3, 3) and C % 32 == 0 and cc._cuda_block_n(O) is not None
    return "cuda" if takes else "reference"


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", "reference")
    monkeypatch.setenv("VKERN_WAN_VAE_HAND_NORM", "1")  # the optional hand-off's plumbing too
    calls = []
    monkeypatch.setattr(cc, "conv_backend", _kernel_backend)
    monkeypatch.setattr(cc, "causal_conv3d_cuda", _emulated_cuda_conv(calls))
    return calls


@pytest.fixture(scope="module")
def vae():
    """The default (Wan 2.1) config, fp32, random weights; norms away from ones so they matter."""
    torch.manual_seed(0)
    v = models.build_wan_vae("default", torch.float32, "cpu").eval()
    for m in v.modules():
        if type(m).__name__ == "WanRMS_norm":
            m.gamma.data.uniform_(0.5, 1.5)
    return v


@pytest.mark.parametrize("T,frames_per_step,latents_per_call", [(3, None, 1), (3, 1, 1), (4, None, 2), (3, 2, 1)])
@torch.no_grad()
def test_cuda_branch_decodes_as_diffusers(vae, emulated, T, frames_per_step, latents_per_call):
    z = torch.randn(1, 16, T, 2, 2)
    expected = vae.decode(z).sample
    out = fast.decode(vae, z, frames_per_step=frames_per_step, latents_per_call=latents_per_call)
    assert out.shape == expected.shape and rel_l2(out, expected) < FP32_TOL
    calls = emulated
    assert any(c["upsample"] == 2 for c in calls)  # the 2D upsampling convs read the upsampled frames on the fly
    assert any(c["normed"] and c["residual"] for c in calls)  # a conv2 handed the next block its norm1
    assert any(c["normed"] and c["upsample"] == 2 for c in calls)  # the upsampling conv handed the next norm1
    # 2 cached frames read from two tensors: 1-frame chunks or steps keep each input's frame where it is (8-frame
    # chunks, latents_per_call 2, copy their last 2 frames into one tensor)
    assert any(c["apart"] for c in calls) == (latents_per_call == 1)
    assert all(c["O"] == 96 for c in calls if c["normed"])


# The 96-channel stage's steps in a decode of 2 latent frames by an fp32 VAE: the first latent frame alone, then its
# 4 frames in FP32_FRAMES_PER_STEP-frame steps (the fp32 default).
FP32_STEPS = 1 + 4 // fast.FP32_FRAMES_PER_STEP


@pytest.mark.parametrize("handed", [True, False])
@torch.no_grad()
def test_handed_norms_skip_their_norm_pass(vae, emulated, monkeypatch, handed):
    """Each normed output an epilogue hands over replaces one norm pass (over 96 channels: the full-resolution
    stage), and the decode is the same as with the hand-off off."""
    if not handed:
        monkeypatch.setattr(fast._Chunks, "hands_norm", lambda self, *a: False)
    run, passes = cc.rms_norm_silu, []
    monkeypatch.setattr(cc, "rms_norm_silu", lambda x, *a, **k: passes.append(x.shape[1]) or run(x, *a, **k))
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    out = fast.decode(vae, z)
    handoffs = sum(c["normed"] for c in emulated)
    assert (handoffs > 0) == handed
    # Per step the 96-channel stage has 4 norm1/norm_out inputs (3 residual blocks, conv_out): handed or passes.
    assert passes.count(96) + handoffs == 4 * FP32_STEPS
    assert rel_l2(out, vae.decode(z).sample) < FP32_TOL


@torch.no_grad()
def test_fp32_tf32_epilogue_norm(vae, monkeypatch):
    """fp32 with TF32 convs (as on a GPU): each 96 -> 96 conv1 on the CUDA kernel applies norm2 + SiLU in its epilogue
    and rounds it to TF32 there (norm_tf32), conv2 reads it as it is (inputs_tf32; the emulation asserts the values
    are TF32), one norm pass less per block; the decode is bit for bit the one with the switch off (the norm pass
    rounding: the emulation's norm is the reference's, so equal bits here; on the GPU the epilogue's arithmetic
    differs in last bits)."""
    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", "reference")
    monkeypatch.setattr(cc, "conv_backend", _kernel_backend)
    monkeypatch.setattr(fast._Chunks, "tf32_conv", lambda self, conv, x: self.backend(
        conv, x, conv.weight, ref_vae._conv_args(conv)[2]) == "cuda")
    run, passes = cc.rms_norm_silu, []
    monkeypatch.setattr(cc, "rms_norm_silu", lambda x, *a, **k: passes.append(x.shape[1]) or run(x, *a, **k))
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    outs, calls, counts = [], [], []
    for switch in ("1", "0"):
        monkeypatch.setenv("VKERN_WAN_VAE_TF32_EPILOGUE", switch)
        calls.append([])
        monkeypatch.setattr(cc, "causal_conv3d_cuda", _emulated_cuda_conv(calls[-1], tf32=True))
        passes.clear()
        outs.append(fast.decode(vae, z))
        counts.append(passes.count(96))
    fused = [c for c in calls[0] if c["norm"]]
    assert len(fused) == 3 * FP32_STEPS and all(c["norm_tf32"] and (c["C"], c["O"]) == (96, 96) for c in fused)
    assert not any(c["norm"] for c in calls[1])
    assert counts[1] - counts[0] == 3 * FP32_STEPS  # per step norm2 of the 96-channel stage's 3 residual blocks
    assert any(c["inputs_tf32"] for c in calls[0]) and torch.equal(outs[0], outs[1])


def test_keep_frames_holds_no_longer_fp32_input():
    """A 4-frame input's last 2 frames stay in it as the next cache in 16 bits (KEEP_INPUT_FRAMES: no copy) and are
    copied in fp32 (KEEP_INPUT_FRAMES_FP32: the kept input raised the fp32 decode's peak above diffusers'); a 2-frame
    input is kept in both (no extra memory); the frames are x's last two either way."""
    for dtype, kept in ((torch.bfloat16, True), (torch.float32, False)):
        x = torch.randn(1, 32, 4, 2, 3).to(dtype).contiguous(memory_format=CL)
        frames = fast._keep_frames([], x)
        assert len(frames) == 2 and torch.equal(torch.cat(frames, dim=2), x[:, :, 2:])
        assert all((f.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()) == kept for f in frames)
        two = x[:, :, :2].clone(memory_format=CL)
        assert all(f.untyped_storage().data_ptr() == two.untyped_storage().data_ptr()
                   for f in fast._keep_frames(frames, two))
