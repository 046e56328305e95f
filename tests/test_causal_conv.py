"""Causal 3D conv with feature cache: the reference against diffusers' causal convs (Wan, HunyuanVideo,
CogVideoX, Mochi, LTX), the reference Wan VAE loop against AutoencoderKLWan, the op's contract, and
the drop-in module swapped into a VAE. All on the CPU in fp32, where the reference runs the same
torch ops on the same inputs as diffusers, so the comparisons are bit-exact unless stated."""
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import CogVideoXCausalConv3d
from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoCausalConv3d
from diffusers.models.autoencoders.autoencoder_kl_ltx import LTXVideoCausalConv3d
from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanCausalConv3d, WanRMS_norm

from vkern import ops
from vkern.modules.causal_conv import CachedCausalConv3d
from vkern.reference import causal_conv as ref
from vkern.reference import wan_vae

from .tolerance import rel_l2


def wan_padding(conv):
    w_pad, _, h_pad, _, t_pad, _ = conv._padding
    return (t_pad, h_pad, w_pad)


def conv_args(conv):
    return conv.weight, conv.bias, conv.stride, wan_padding(conv)


# Every WanCausalConv3d shape the Wan VAE uses, at odd sizes: 3x3x3 (also spatially strided),
# upsample3d's time conv, downsample3d's stride-2 time conv (no padding), the 1x1x1 shortcut.
WAN_CONVS = {
    "3x3x3": dict(kernel_size=3, padding=1),
    "3x3x3-stride-1,2,2": dict(kernel_size=3, padding=1, stride=(1, 2, 2)),
    "time-up": dict(kernel_size=(3, 1, 1), padding=(1, 0, 0)),
    "time-down": dict(kernel_size=(3, 1, 1), stride=(2, 1, 1)),
    "1x1x1": dict(kernel_size=1),
}


@pytest.mark.parametrize("cache_frames", [None, 1, 2, 3])
@pytest.mark.parametrize("kind", list(WAN_CONVS))
@torch.no_grad()
def test_reference_matches_wan_causal_conv(kind, cache_frames):
    conv = WanCausalConv3d(5, 7, **WAN_CONVS[kind])
    x = torch.randn(2, 5, 3, 13, 11)
    cache = None if cache_frames is None else torch.randn(2, 5, cache_frames, 13, 11)
    # 3 cached frames exceed the 2 padding frames: Wan's F.pad then crops the oldest.
    expected = conv(x, cache)
    assert torch.equal(ref.causal_conv3d(x, *conv_args(conv), cache), expected)
    assert torch.equal(ops.causal_conv3d(x, *conv_args(conv), cache), expected)


@pytest.mark.parametrize("pad_mode", ref.PAD_MODES)
@pytest.mark.parametrize("chunks", [(1, 4, 4), (1, 1, 2, 3, 1)])
def test_chunks_with_cache_equal_whole_video(pad_mode, chunks):
    x = torch.randn(1, 6, sum(chunks), 9, 10)
    w, b = torch.randn(8, 6, 3, 3, 3) / 13, torch.randn(8)
    args = (w, b, (1, 2, 2), (2, 1, 1))
    whole = ops.causal_conv3d(x, *args, pad_mode=pad_mode)
    outs, cache = [], None
    for chunk in x.split(chunks, dim=2):
        outs.append(ops.causal_conv3d(chunk, *args, cache=cache, pad_mode=pad_mode))
        cache = ref.next_cache(chunk, cache)
    chunked = torch.cat(outs, dim=2)
    assert chunked.shape == whole.shape
    # Same inputs to every output element; only the conv's blocking over T may change the sum order.
    assert rel_l2(chunked, whole) < 1e-6


def small_vae(wan22):
    """Tiny AutoencoderKLWan with every block type of the real configs: 3 spatial and 2 time
    resamples, attention in the mid blocks; Wan 2.2 adds residual up/down blocks and patch_size 2."""
    cfg = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    if wan22:
        cfg.update(decoder_base_dim=12, is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                   scale_factor_spatial=16)
    vae = AutoencoderKLWan(**cfg).eval()
    for m in vae.modules():  # norms start at ones; make them matter
        if isinstance(m, WanRMS_norm):
            m.gamma.data.uniform_(0.5, 1.5)
    return vae


@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
@pytest.mark.parametrize("B,T", [(1, 1), (1, 3), (2, 2)])
@torch.no_grad()
def test_reference_decode_matches_diffusers(wan22, B, T):
    vae = small_vae(wan22)
    z = torch.randn(B, 4, T, 2, 2)
    expected = vae.decode(z).sample
    out = wan_vae.decode(vae, z)
    assert out.shape == expected.shape == (B, 3, 1 + 4 * (T - 1), 16 * (1 + wan22), 16 * (1 + wan22))
    # The clamp to [-1, 1] must not hide the comparison: most outputs are inside it (0.89-1.0 over
    # 20 seeds per case; the bit-exact check below is what tests the reference).
    assert (expected.abs() < 1).float().mean() > 0.75
    # The reference calls the same torch ops on the same shapes in the same order, so even on
    # another CPU both sides round alike: bit-exact, no tolerance needed. (A wrong cache rule gives
    # rel L2 ~0.01-0.4 here.)
    assert torch.equal(out, expected), f"rel L2 {rel_l2(out, expected):.3g}"


@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 6), (1, 9)])
@torch.no_grad()
def test_reference_encode_matches_diffusers(wan22, B, T):
    vae = small_vae(wan22)
    x = torch.randn(B, 3, T, 32, 32) if wan22 else torch.randn(B, 3, T, 16, 16)
    expected = vae.encode(x).latent_dist.parameters
    out = wan_vae.encode(vae, x)
    assert out.shape == expected.shape == (B, 8, 1 + (T - 1) // 4, 2, 2)
    assert torch.equal(out, expected), f"rel L2 {rel_l2(out, expected):.3g}"  # as for decode
    if T % 4 != 1:  # frames past the last chunk of 4 are dropped, in diffusers as here
        assert torch.equal(wan_vae.encode(vae, x[:, :, : T - (T - 1) % 4]), out)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 2, 8, 6)
    p = wan_vae.patchify(x, 2)
    assert torch.equal(wan_vae.unpatchify(p, 2), x)
    # channel c*4 + 2*i + j holds pixel (row 2h + j, column 2w + i): column offset first
    assert torch.equal(p[:, 1 * 4 + 2 * 1 + 0], x[:, 1, :, 0::2, 1::2])


@pytest.mark.parametrize("stride", [1, (1, 2, 2)])
@torch.no_grad()
def test_replicate_matches_hunyuan_and_mochi(stride):
    x = torch.randn(2, 5, 4, 9, 7)
    hunyuan = HunyuanVideoCausalConv3d(5, 7, 3, stride)
    expected = hunyuan(x)
    out = ops.causal_conv3d(x, hunyuan.conv.weight, hunyuan.conv.bias, stride, (2, 1, 1), pad_mode="replicate")
    assert torch.equal(out, expected)
    # Mochi's CogVideoXCausalConv3d(pad_mode="replicate"), including its (2, 2, 2) strided down conv
    # whose single padding frame Wan's 2*p convention cannot express.
    for kernel, mochi_stride, padding in ((3, stride, (2, 1, 1)), ((2, 2, 2), (2, 2, 2), (1, 0, 0))):
        mochi = CogVideoXCausalConv3d(5, 7, kernel, stride=mochi_stride, pad_mode="replicate")
        expected, _ = mochi(x)
        out = ops.causal_conv3d(x, mochi.conv.weight, mochi.conv.bias, mochi.conv.stride, padding, pad_mode="replicate")
        assert torch.equal(out, expected)


@torch.no_grad()
def test_first_frame_padding_matches_cogvideox_and_ltx():
    x1, x2 = torch.randn(1, 5, 3, 9, 7), torch.randn(1, 5, 1, 9, 7)
    cog = CogVideoXCausalConv3d(5, 7, 3)  # pad_mode="first" in CogVideoX's VAE: the "constant" branch
    args = (cog.conv.weight, cog.conv.bias, 1, (2, 1, 1))
    expected1, cog_cache = cog(x1)
    expected2, _ = cog(x2, conv_cache=cog_cache)
    out1 = ops.causal_conv3d(x1, *args, pad_mode="first")
    out2 = ops.causal_conv3d(x2, *args, cache=cog_cache, pad_mode="first")
    # CogVideoX zero-pads inside nn.Conv3d, we with F.pad first: same sums, maybe another order.
    assert rel_l2(out1, expected1) < 1e-6 and rel_l2(out2, expected2) < 1e-6
    assert torch.equal(cog_cache, ref.next_cache(x1))  # its conv_cache is our next_cache

    ltx = LTXVideoCausalConv3d(5, 7, 3)
    out = ops.causal_conv3d(x1, ltx.conv.weight, ltx.conv.bias, 1, (2, 1, 1), pad_mode="first")
    assert rel_l2(out, ltx(x1)) < 1e-6


OP_CASES = [  # (x shape, weight shape, stride, padding, cache frames, pad_mode)
    ((2, 5, 3, 13, 11), (7, 5, 3, 3, 3), (1, 2, 2), (2, 1, 1), 2, "zeros"),
    ((1, 4, 1, 8, 8), (8, 4, 3, 1, 1), (1, 1, 1), (2, 0, 0), 1, "zeros"),
    ((1, 4, 5, 8, 8), (4, 4, 3, 1, 1), (2, 1, 1), (0, 0, 0), None, "zeros"),
    ((1, 3, 4, 7, 9), (6, 3, 3, 3, 3), (1, 1, 1), (2, 1, 1), 3, "replicate"),
    ((1, 3, 4, 7, 9), (6, 3, 2, 2, 2), (2, 2, 2), (1, 0, 0), None, "first"),
]


def op_inputs(xs, ws, cache_frames):
    x, w, b = torch.randn(xs), torch.randn(ws), torch.randn(ws[0])
    cache = None if cache_frames is None else torch.randn(xs[0], xs[1], cache_frames, *xs[3:])
    return x, w, b, cache


@pytest.mark.parametrize("case", OP_CASES)
def test_fake_impl_and_opcheck(case):
    xs, ws, stride, padding, cache_frames, pad_mode = case
    x, w, b, cache = op_inputs(xs, ws, cache_frames)
    args = (x, w, b, list(stride), list(padding), cache, pad_mode)
    real = torch.ops.vkern.causal_conv3d(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.vkern.causal_conv3d(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert fake.shape == real.shape and fake.dtype == real.dtype
    torch.library.opcheck(torch.ops.vkern.causal_conv3d, args)


def test_compile_fullgraph():
    xs, ws, stride, padding, cache_frames, pad_mode = OP_CASES[0]
    x, w, b, cache = op_inputs(xs, ws, cache_frames)

    def two_chunks(x, cache):
        y1 = ops.causal_conv3d(x, w, b, stride, padding, cache)
        y2 = ops.causal_conv3d(x, w, b, stride, padding, ref.next_cache(x, cache))
        return torch.cat([y1, y2], dim=2)

    fn = torch.compile(two_chunks, fullgraph=True, backend="aot_eager")  # aot_eager: runs the fake impl
    assert torch.equal(fn(x, cache), two_chunks(x, cache))


def test_bad_inputs_name_the_argument():
    x, w, b = torch.randn(1, 4, 3, 8, 8), torch.randn(6, 4, 3, 3, 3), torch.randn(6)
    good = dict(stride=1, padding=(2, 1, 1))
    with pytest.raises(ValueError, match="x: expected 5 dimensions"):
        ops.causal_conv3d(x[0], w, b, **good)
    with pytest.raises(TypeError, match="x: expected dtype"):
        ops.causal_conv3d(x.int(), w, b, **good)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        ops.causal_conv3d(x.bfloat16(), w, b, **good)
    with pytest.raises(ValueError, match=r"x: expected 5 channels \(weight's in_channels\)"):
        ops.causal_conv3d(x, torch.randn(6, 5, 3, 3, 3), b, **good)
    with pytest.raises(ValueError, match=r"bias: expected shape \(6\)"):
        ops.causal_conv3d(x, w, b[:5], **good)
    with pytest.raises(ValueError, match=r"cache: expected shape \(1, 4, \*, 8, 8\)"):
        ops.causal_conv3d(x, w, b, cache=torch.randn(1, 4, 2, 8, 7), **good)
    with pytest.raises(TypeError, match="cache: expected dtype"):
        ops.causal_conv3d(x, w, b, cache=torch.randn(1, 4, 2, 8, 8).half(), **good)
    with pytest.raises(ValueError, match="cache: expected a tensor on cpu"):
        ops.causal_conv3d(x, w, b, cache=torch.randn(1, 4, 2, 8, 8, device="meta"), **good)
    with pytest.raises(ValueError, match="weight: expected a tensor on cpu"):
        ops.causal_conv3d(x, w.to("meta"), b, **good)
    with pytest.raises(ValueError, match="pad_mode: expected one of"):
        ops.causal_conv3d(x, w, b, pad_mode="reflect", **good)
    with pytest.raises(ValueError, match="stride: expected an int or 3 ints >= 1"):
        ops.causal_conv3d(x, w, b, stride=(1, 0, 1), padding=(2, 1, 1))
    with pytest.raises(ValueError, match="padding: expected an int or 3 ints >= 0"):
        ops.causal_conv3d(x, w, b, stride=1, padding=(2, 1))
    with pytest.raises(ValueError, match=r"x: padded size \(T, H, W\) = \(1, 8, 8\) is smaller than the kernel"):
        ops.causal_conv3d(x[:, :, :1], w, b)


def swap_wan_convs(model):
    """Replace every WanCausalConv3d in `model` by a CachedCausalConv3d; returns how many."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, WanCausalConv3d):
                new = CachedCausalConv3d.from_wan(child)
                assert new.weight is child.weight and new.bias is child.bias  # shared, not copied
                setattr(parent, name, new)
                swapped.append(new)
    return len(swapped)


@pytest.mark.parametrize("wan22", [False, True], ids=["wan2.1", "wan2.2"])
def test_drop_in_module_in_vae_is_bit_exact(wan22):
    vae = small_vae(wan22)
    z = torch.randn(1, 4, 3, 2, 2)
    x = torch.randn(1, 3, 5, 32, 32) if wan22 else torch.randn(1, 3, 5, 16, 16)
    with torch.no_grad():
        expected_dec, expected_enc = vae.decode(z).sample, vae.encode(x).latent_dist.parameters
    n_params = sum(p.numel() for p in vae.parameters())
    n = swap_wan_convs(vae)
    assert n == vae._cached_conv_counts["encoder"] + vae._cached_conv_counts["decoder"] + 2  # + (post_)quant_conv
    assert sum(p.numel() for p in vae.parameters()) == n_params
    ops._backend.last_choice.pop("causal_conv3d", None)
    with torch.inference_mode():
        assert torch.equal(vae.decode(z).sample, expected_dec)
        assert torch.equal(vae.encode(x).latent_dist.parameters, expected_enc)
        assert torch.equal(wan_vae.decode(vae, z), expected_dec)  # the reference also drives a swapped VAE
    assert ops._backend.last_choice["causal_conv3d"] == "reference"  # the swapped modules ran the op
