"""AutoencoderKLWan's chunked encode/decode (diffusers 0.42, Wan 2.1 and 2.2 configs), rewritten
with an explicit feature cache; the spec for vkern's VAE path.

It drives the VAE's own weights and calls its leaf modules (nn.Conv2d, WanRMS_norm, SiLU,
WanAttentionBlock, and the parameter-free AvgDown3D/DupUp3D reshapes); every causal conv goes
through `causal_conv3d`, and the chunk loops and cache rules are written out here:

- encode: the video is cut into a first chunk of 1 frame, then chunks of 4. Frames past the
  last full chunk are dropped (diffusers does the same: T frames give 1 + (T-1)//4 latent frames).
- decode: one latent frame at a time; the first gives 1 frame, each later one 4.
- every causal conv with time padding caches the last CACHE_T=2 input frames of each chunk.
- time upsampling (upsample3d) skips its time conv on the first chunk ("Rep" in diffusers) and
  sees zeros, not the first chunk, as the frames before the second chunk.
- time downsampling (downsample3d) passes the first chunk through; later chunks are convolved
  (kernel 3, stride 2, no padding) behind the last frame of the previous chunk.
Tiling and slicing (use_tiling/use_slicing) are not modeled: this is the plain path.
"""
import torch
import torch.nn.functional as F

from .causal_conv import causal_conv3d, next_cache

CACHE_T = 2
ENCODE_CHUNK = 4  # frames per encoder chunk after the first (the VAE's time compression)


class FeatureCache:
    """What each causal conv remembers between chunks, keyed by the conv module. Missing = no chunk
    seen yet. A time-upsampling conv holds REP after the first chunk (it ran no conv then)."""
    REP = "Rep"

    def __init__(self):
        self.frames = {}

    def get(self, conv):
        return self.frames.get(conv)

    def put(self, conv, value):
        self.frames[conv] = value


def _conv_args(conv):
    """(weight, bias, stride, padding) of a WanCausalConv3d, or of a drop-in that has .causal_padding."""
    if hasattr(conv, "causal_padding"):
        padding = conv.causal_padding
    else:
        w_pad, _, h_pad, _, t_pad, _ = conv._padding  # Wan keeps its F.pad tuple here
        padding = (t_pad, h_pad, w_pad)
    return conv.weight, conv.bias, tuple(conv.stride), tuple(padding)


def run_conv(module, x, cache=None):
    """One causal conv, outside the cache bookkeeping."""
    return causal_conv3d(x, *_conv_args(module), cache=cache)


def cached_conv(module, x, cache):
    """A causal conv inside the chunk loop: read this conv's cache, then keep the last 2 frames."""
    prev = cache.get(module)
    out = run_conv(module, x, prev)
    cache.put(module, next_cache(x, prev, CACHE_T))
    return out


def rms_norm_silu(x, gamma, bias=None, silu=True, eps=1e-12):
    """WanRMS_norm (channel_first) followed by SiLU, with diffusers' ops: F.normalize over the channels
    (in fp32 for bf16/fp16 x), rounded to x's dtype, then * sqrt(C), * gamma, + bias, SiLU, each an
    op of its own. gamma, bias: C values (any shape)."""
    shape = (-1,) + (1,) * (x.dim() - 2)
    up = x.dtype in (torch.float16, torch.bfloat16)
    y = F.normalize(x.float() if up else x, dim=1, eps=eps).to(x.dtype) * x.shape[1] ** 0.5 * gamma.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return F.silu(y) if silu else y


def residual_add(y, shortcut, bias=None):
    """y + shortcut (+ bias [C]) in fp32, rounded once to y's dtype: the arithmetic of vkern's fused
    residual add (diffusers rounds the conv's output + bias first, then the sum)."""
    z = y.float() + shortcut.float()
    if bias is not None:
        z = z + bias.float().reshape(-1, 1, 1, 1)
    return z.to(y.dtype)


def residual_block(block, x, cache):
    shortcut = x if isinstance(block.conv_shortcut, torch.nn.Identity) else run_conv(block.conv_shortcut, x)
    x = cached_conv(block.conv1, block.nonlinearity(block.norm1(x)), cache)
    x = block.dropout(block.nonlinearity(block.norm2(x)))
    x = cached_conv(block.conv2, x, cache)
    return x + shortcut


def attention_block(block, x, cache):
    return block(x)  # per frame, no time context


def mid_block(block, x, cache):
    x = residual_block(block.resnets[0], x, cache)
    for attn, resnet in zip(block.attentions, block.resnets[1:]):
        x = residual_block(resnet, attention_block(attn, x, cache), cache)
    return x


def _per_frame(fn, x):
    """Apply a 2D module to each frame of [B, C, T, H, W]."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


def time_upsample(time_conv, x, cache):
    """upsample3d's time step: a conv to 2C channels whose halves become frames 2i and 2i+1."""
    prev = cache.get(time_conv)
    if prev is None:  # first chunk: no time upsampling at all
        cache.put(time_conv, FeatureCache.REP)
        return x
    if prev is FeatureCache.REP:  # second chunk: zeros stand for the frames before it
        out = run_conv(time_conv, x)
        prev = torch.zeros_like(x[:, :, :1])
    else:
        out = run_conv(time_conv, x, prev)
    cache.put(time_conv, next_cache(x, prev, CACHE_T))
    b, c, t, h, w = x.shape
    return out.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)


def time_downsample(time_conv, x, cache):
    """downsample3d's time step: stride 2 over [last frame of the previous chunk, this chunk]."""
    prev = cache.get(time_conv)
    cache.put(time_conv, x[:, :, -1:].clone())
    if prev is None:  # first chunk: passed through
        return x
    return run_conv(time_conv, torch.cat([prev, x], dim=2))  # no time padding: Wan's conv ignores a cache here


def resample(block, x, cache):
    """WanResample: optional time upsampling, the per-frame 2D resample, optional time downsampling."""
    if block.mode == "upsample3d":
        x = time_upsample(block.time_conv, x, cache)
    x = _per_frame(block.resample, x)
    if block.mode == "downsample3d":
        x = time_downsample(block.time_conv, x, cache)
    return x


def residual_down_block(block, x, cache):
    """Wan 2.2 encoder block: residual blocks and resample, plus a reshape-and-average shortcut
    (AvgDown3D zero-pads each chunk in front to a multiple of its time factor)."""
    shortcut = block.avg_shortcut(x)
    for resnet in block.resnets:
        x = residual_block(resnet, x, cache)
    if block.downsampler is not None:
        x = resample(block.downsampler, x, cache)
    return x + shortcut


def up_block(block, x, cache, first_chunk):
    """Wan 2.1 decoder block: residual blocks, then an optional resample."""
    for resnet in block.resnets:
        x = residual_block(resnet, x, cache)
    if block.upsamplers is not None:
        x = resample(block.upsamplers[0], x, cache)
    return x


def residual_up_block(block, x, cache, first_chunk):
    """Wan 2.2 decoder block: as up_block, plus a duplicate-and-reshape shortcut (DupUp3D), which on
    the first chunk drops its leading frames to match the un-upsampled first frame."""
    shortcut = None if block.avg_shortcut is None else block.avg_shortcut(x, first_chunk=first_chunk)
    for resnet in block.resnets:
        x = residual_block(resnet, x, cache)
    if block.upsampler is not None:
        x = resample(block.upsampler, x, cache)
    return x if shortcut is None else x + shortcut


_DOWN = {"WanResidualBlock": residual_block, "WanAttentionBlock": attention_block, "WanResample": resample,
         "WanResidualDownBlock": residual_down_block}
_UP = {"WanUpBlock": up_block, "WanResidualUpBlock": residual_up_block}


def _block_fn(table, block):
    try:
        return table[type(block).__name__]
    except KeyError:
        raise TypeError(f"vkern.reference.wan_vae: unknown Wan VAE block {type(block).__name__}") from None


def head(norm, act, conv_out, x, cache):
    return cached_conv(conv_out, act(norm(x)), cache)


def encoder(enc, x, cache):
    x = cached_conv(enc.conv_in, x, cache)
    for block in enc.down_blocks:
        x = _block_fn(_DOWN, block)(block, x, cache)
    x = mid_block(enc.mid_block, x, cache)
    return head(enc.norm_out, enc.nonlinearity, enc.conv_out, x, cache)


def decoder(dec, x, cache, first_chunk):
    x = cached_conv(dec.conv_in, x, cache)
    x = mid_block(dec.mid_block, x, cache)
    for block in dec.up_blocks:
        x = _block_fn(_UP, block)(block, x, cache, first_chunk)
    return head(dec.norm_out, dec.nonlinearity, dec.conv_out, x, cache)


def patchify(x, p):
    """Wan 2.2: [B, C, T, H, W] -> [B, C*p*p, T, H/p, W/p]. Channel order (c, column offset, row
    offset): the transpose of pixel_unshuffle's (c, row, column)."""
    y = F.pixel_unshuffle(x.transpose(1, 2), p)
    y = y.unflatten(2, (-1, p, p)).transpose(3, 4).flatten(2, 4)
    return y.transpose(1, 2).contiguous()


def unpatchify(x, p):
    y = x.transpose(1, 2).unflatten(2, (-1, p, p)).transpose(3, 4).flatten(2, 4)
    return F.pixel_shuffle(y, p).transpose(1, 2).contiguous()


def encode(vae, x):
    """What vae._encode(x) returns (= vae.encode(x).latent_dist.parameters): [B, 2*z_dim, T', h, w],
    mean then log-variance, T' = 1 + (T-1)//4."""
    p = vae.config.patch_size
    if p is not None:
        x = patchify(x, p)
    T = x.shape[2]
    chunks = [x[:, :, :1]] + [x[:, :, i:i + ENCODE_CHUNK] for i in range(1, T - ENCODE_CHUNK + 1, ENCODE_CHUNK)]
    cache = FeatureCache()
    out = torch.cat([encoder(vae.encoder, chunk, cache) for chunk in chunks], dim=2)
    return run_conv(vae.quant_conv, out)


def decode(vae, z):
    """What vae.decode(z).sample returns: [B, C, 1 + 4*(T-1), H, W] in [-1, 1]."""
    x = run_conv(vae.post_quant_conv, z)
    cache = FeatureCache()
    out = torch.cat([decoder(vae.decoder, x[:, :, i:i + 1], cache, first_chunk=i == 0) for i in range(x.shape[2])],
                    dim=2)
    p = vae.config.patch_size
    if p is not None:
        out = unpatchify(out, p)
    return out.clamp(-1.0, 1.0)
