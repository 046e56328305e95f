"""AutoencoderKLWan's chunked encode/decode on vkern's fast path.

The same loop and cache rules as the spec (vkern/reference/wan_vae.py, which matches diffusers bit
for bit), with the copies taken out:
- activations stay channels-last-3d (cuDNN's native layout for bf16: no NCDHW<->NDHWC transposes);
- a cuDNN causal conv's input is one buffer [2 cached frames | chunk]: the fused RMS norm + SiLU kernel
  writes the chunk straight into it (no torch.cat, no separate norm/SiLU/cat outputs), the conv does
  the spatial zero padding itself (no F.pad), and the cache update copies only the 2 frames kept; a
  conv on vkern's CUDA or Triton kernel reads its cached frames and the chunk where they are (no buffer);
- residual adds are in place; the nearest 2x upsample is one bf16 copy (diffusers makes it in fp32:
  exact either way, nearest only copies values), fused with the time upsampling's frame interleave;
- decoded frames go into a preallocated output (optionally on the CPU), clamped chunk by chunk,
  instead of a torch.cat per chunk; intermediates are dropped as soon as the next op has read them.
- from the last time upsampling on (its spatial upsampling and 3x3 conv included), the decoder may run
  its (largest) stages a few frames at a time (`frames_per_step`): causal convs with a cache give the
  same frames for any chunking, and the working set shrinks with the step (the 720p memory target);
  each step's input is dropped as soon as it is read (run 27: 720p peak 5.58 GiB, diffusers 10.35).
- `latents_per_call` (2 by default, measured faster in run 72; diffusers decodes 1): after the first latent
  frame (which decodes alone: the first-chunk rules), several latent frames go through the decoder at once:
  the same frames (chunk-invariant causal convs; per-frame attention, upsampling and DupUp3D), larger convs
  and fewer launches, a larger working set (frames_per_step still bounds the largest stages).
- `pad_channels` (on by default for encode, run 21: 480p 633 -> 626 ms, 720p 1457 -> 1434; off for
  decode, where it measured within noise and its 8-channel conv_out output costs memory): the convs with 3
  or 12 channels (the encoder's input, the decoder's output) zero-padded to a multiple of 8 channels, which
  cuDNN's bf16 tensor-core kernels need.
- `fuse_bias` (on by default; run 21: decode 480p 933 -> 865 ms, encode 633 -> 591, error vs fp32
  0.83 -> 0.73x diffusers'): a residual block's two convs run without their biases (PyTorch adds a
  cuDNN conv's bias in a pass of its own); conv1's bias goes into the next norm's input, conv2's (plus
  the shortcut conv's) into the residual add, both in fp32.
- the convs where vkern's CUDA conv measured faster than cuDNN (vkern.ops.causal_conv.CUDA_FASTER: the 96 -> 96
  and 192 -> 192 3x3x3 convs, the 2D upsampling convs, taken as 1-frame causal convs of the
  frames, and the RGB output conv) run on it, the other 96-output 3x3x3 convs on the Triton conv
  (TRITON_FASTER), the rest on cuDNN. Where a residual block's convs run on the CUDA conv, its epilogue does
  the glue: conv1's applies norm2 + SiLU where its output fits one tile (96 channels; conv1's output is conv2's
  input: no norm pass, no bf16 rounding between), conv2's adds the biases and the shortcut (no add pass).
  Run 69: 480p decode 628 ms.
- a conv on the CUDA kernel keeps its input's last 2 frames where they are as the next chunk's cache (the kernel
  reads two frames of two tensors; no cache copy) when the input has at most KEEP_INPUT_FRAMES frames, and the
  2D upsampling convs read the nearest-upsampled frames on the fly (no upsampled copy, session 18).
- optionally (VKERN_WAN_VAE_HAND_NORM=1; off by default, HAND_NORM: measured no faster), a 96-channel conv2 or
  upsampling conv on the CUDA kernel also writes the next block's norm1 + SiLU (or norm_out) as a second output.
- per video, each conv's backend choice, its weight packed for the CUDA conv and fp32 copies of biases and
  norm weights are made once (Python and small kernels per call were ~20 ms of GPU idle per decode).
- fp32 VAEs (diffusers' Wan examples): the convs of CUDA_FASTER_TF32 run on the CUDA conv, those of
  TRITON_FASTER_TF32 on the Triton conv, both with TF32 products (while torch runs cuDNN's fp32 convs in TF32, its
  default) of operands rounded to TF32 as cuDNN's are. Where the fused norm + SiLU writes such a conv's input it
  rounds it there (VKERN_WAN_VAE_TF32_NORM=1, the default, TF32_NORM), so the conv reads TF32 values as they are
  (inputs_tf32): the same products, without a rounding of every A tile in the Triton conv's loop (21% of its
  96 -> 96 conv, run 174) or a rounded copy for the CUDA conv. A 96 -> 96 conv1 on the CUDA kernel applies norm2
  + SiLU in its epilogue in fp32 too, rounding its output to TF32 there (fuses_norm, norm_tf32;
  VKERN_WAN_VAE_TF32_EPILOGUE=0: the norm pass instead); no epilogue hands a norm to a TF32 conv (hands_norm).
Rounding: the same eager ops in the same order as diffusers, except the conv algorithms (cuDNN's pick
for channels-last, vkern's CUDA and Triton convs: fp32 accumulation, one rounding, epilogue glue in fp32) and the
fused RMS norm + SiLU, which rounds once instead of after each op (closer to float64 than diffusers' ops;
vkern/triton/vae_glue.py).
"""
import functools

import torch
import torch.nn.functional as F

from .. import ops
from ..reference import wan_vae as ref

CL = torch.channels_last_3d
CACHE_T = ref.CACHE_T
assert CACHE_T == 2, "_Chunks._conv_in_place's ring assumes diffusers' 2 cached frames"
# A conv on the CUDA kernel keeps its input's last CACHE_T frames where they are (the input stays alive until the next
# chunk) when the input has at most this many frames, instead of copying them into a cache: no copy, for (frames -
# CACHE_T) frames of memory per conv (480p decode: 4-frame chunks, 7 full-resolution convs, ~1 GB); longer inputs
# (latents_per_call > 1) copy their last frames, 1- and 2-frame ones (720p's steps) cost no memory either way.
KEEP_INPUT_FRAMES = 4
# fp32 keeps only inputs no longer than the cache (no extra memory): its 192/384-channel convs on the CUDA kernel kept
# 4-frame inputs at 120x208 and put the 480p decode's peak above diffusers' (H100, run 185: 9.58 vs 9.26 GiB; copying
# 9.22 GiB at +5 ms of 1078; encode 6.45 -> 5.45 GiB at +13 ms of 693).
KEEP_INPUT_FRAMES_FP32 = CACHE_T
# Decoded latent frames per call after the first (1: diffusers' chunking; the frames are the same for any value).
LATENTS_PER_CALL = 2
# _Chunks.hands_norm's default: off, measured no faster (run 72: 480p 603.3 ms with, 603.2 without; 720p 1442.5 vs
# 1430.8; +0.29 GiB at 480p, a normed output alive next to conv2's): the epilogue's norm and second store cost about
# what the norm pass they replace does (per 96 -> 96 call: + norm 0.11 ms, + normed output 0.29 ms over + residual).
HAND_NORM = False
# _Chunks.rounds_input's default (VKERN_WAN_VAE_TF32_NORM): the norm pass rounds a TF32 conv's input (Triton or
# CUDA).
TF32_NORM = True
# _Chunks.fuses_norm's fp32 default (VKERN_WAN_VAE_TF32_EPILOGUE): a 96 -> 96 conv1 on the CUDA kernel applies norm2 +
# SiLU in its epilogue for a conv2 with TF32 products too, rounding there where rounds_input (norm_tf32).
TF32_EPILOGUE = True
# Decoder default: whole chunks in 16 bits (FP32_FRAMES_PER_STEP in fp32) unless a decoded frame has more pixels
# than this; above it, 1 frame per step keeps the largest stages' working set ~4x smaller (720p: ~1 GB less).
LARGE_FRAME_PIXELS = 512 * 1024
# An fp32 decoder's default below LARGE_FRAME_PIXELS: 2 frames per step, measured faster than whole chunks and
# 2.57 GiB lower (run 188, H100, 480p, side by side: 1005.4 ms / 5.80 GiB vs 1016.9 / 8.37; 4 frames 1036.2 / 6.95;
# 1 frame 1023.8 / 5.37). 16-bit VAEs keep whole chunks (bf16 480p, 2 frames: 614.5 vs 606.9 ms, 2.78 vs 4.06 GiB).
FP32_FRAMES_PER_STEP = 2
PAD_TO = 8  # pad_channels: channel counts rounded up to this (cuDNN bf16 tensor-core convs)


def _cl(x):
    return x.contiguous(memory_format=CL)


class _Chunks:
    """One video's feature cache: for each causal conv the last CACHE_T frames of its input
    (zeros before the first chunk), and which time-upsampling convs have seen their first chunk."""

    def __init__(self, fuse_bias=True, pad_channels=True, hand_norm=True, tf32_norm=True, tf32_epilogue=True):
        self.hand_norm = hand_norm  # hands_norm's switch (VKERN_WAN_VAE_HAND_NORM)
        self.tf32_norm = tf32_norm  # rounds_input's switch (VKERN_WAN_VAE_TF32_NORM)
        self.tf32_epilogue = tf32_epilogue  # fuses_norm's switch for TF32 convs (VKERN_WAN_VAE_TF32_EPILOGUE)
        self.tf32_convs = {}  # conv -> tf32_conv(conv, ...), decided once per video
        self.tf32_cache = {}  # conv -> whether its cached frames (Triton ring) hold TF32 values
        self.frames = {}
        self.seen = set()
        self.fuse_bias = fuse_bias
        self.pad_channels = pad_channels
        self.padded = {}  # conv -> its weight and bias zero-padded to _channels() in and out
        self.reversed = {}  # conv -> its cached frames stored newest first (_conv_in_place's ring, Triton)
        # (norm, tensor, norm's SiLU(norm(tensor))): a conv epilogue's second output, handed to the next norm_into
        self.handoff = None
        self.packed = {}  # conv -> its weight as the CUDA conv kernel reads it (made once per video)
        # Made once per video, not per chunk (each a small kernel launch and Python per call): the conv backend
        # per (conv, weight shape, dtype, device), fp32 copies of biases and norm weights per (module, name).
        self.backends = {}
        self.floats = {}

    def backend(self, conv, x, weight, stride):
        """ops.causal_conv.conv_backend(x, weight, stride), chosen once per video for each conv."""
        key = (conv, tuple(weight.shape), x.dtype, x.device)
        if key not in self.backends:
            self.backends[key] = ops.causal_conv.conv_backend(x, weight, stride)
        return self.backends[key]

    def fp32(self, owner, name, make=None):
        """getattr(owner, name) (or make()) in fp32, contiguous, made once per video; None stays None."""
        key = (owner, name)
        if key not in self.floats:
            t = make() if make is not None else getattr(owner, name)
            self.floats[key] = None if t is None else t.float().contiguous()
        return self.floats[key]

    def _channels(self, n):
        return -(-n // PAD_TO) * PAD_TO if self.pad_channels else n

    def buffer(self, conv, x_shape, dtype, device, keep=CACHE_T):
        """A fresh input buffer [B, C', keep + T, H, W] for `conv` holding its cached frames (C' = C, or
        C padded by zero channels); returns (buffer, the chunk's slot in it, C channels)."""
        B, C, T, H, W = x_shape
        buf = torch.empty((B, self._channels(C), keep + T, H, W), dtype=dtype, device=device, memory_format=CL)
        prev = self.frames.get(conv)
        if prev is None:
            buf[:, :, :keep].zero_()
        else:
            buf[:, :, :keep].copy_(prev)
        if buf.shape[1] > C:  # pad_channels: the zero channels
            buf[:, C:, keep:].zero_()
        return buf, buf[:, :C, keep:]

    def _weights(self, conv, in_channels):
        """conv's weight and bias, zero-padded to `in_channels` inputs and _channels() outputs."""
        weight, bias = ref._conv_args(conv)[:2]
        O, C = weight.shape[:2]
        if (in_channels, self._channels(O)) == (C, O):
            return weight, bias
        if conv not in self.padded:
            w = weight.new_zeros((self._channels(O), in_channels, *weight.shape[2:]))
            w[:O, :C] = weight
            b = None if bias is None else torch.cat([bias, bias.new_zeros(w.shape[0] - O)])
            self.padded[conv] = (w, b)
        return self.padded[conv]

    def in_place(self, conv, x):
        """True when `conv` runs on one of vkern's conv kernels (Triton or CUDA), which read its cached frames
        and the chunk x where they are: then no [cache | chunk] buffer is built (a copy of the cached frames
        saved, and at 720p a 3-frame buffer per full-resolution conv)."""
        if x.stride(1) != 1 or not self.reads_in_place(conv, x):
            return False
        return self.backend(conv, x, conv.weight, ref._conv_args(conv)[2]) == "triton" or ops.causal_conv.pixel_rows(x)

    def reads_in_place(self, conv, like):
        """in_place(conv, x) for any channels-last x of conv's input shape (like: a tensor of its dtype and
        device)."""
        C = conv.weight.shape[1]
        _, _, stride, (t_pad, _, _) = ref._conv_args(conv)
        return (t_pad == CACHE_T and C > 1 and self._channels(C) == C
                and self.backend(conv, like, conv.weight, stride) in ops.causal_conv.IN_PLACE)

    def tf32_conv(self, conv, x):
        """True when `conv` (reading x in place) runs on the Triton or CUDA conv with TF32 products (fp32 CUDA input,
        torch running cuDNN's fp32 convs in TF32): operands rounded to TF32 by the norm pass (rounds_input) or by the
        conv. Decided once per video, as the backend is."""
        if conv not in self.tf32_convs:
            self.tf32_convs[conv] = (
                x.dtype == torch.float32 and x.is_cuda
                and self.backend(conv, x, conv.weight, ref._conv_args(conv)[2]) in ops.causal_conv.IN_PLACE
                and ops._backend.cudnn_conv_tf32())
        return self.tf32_convs[conv]

    def rounds_input(self, conv, x):
        """True when norm_into rounds `conv`'s input to TF32 as it writes it (tf32_conv, and the switch on), and the
        conv reads it as it is (inputs_tf32)."""
        return self.tf32_norm and self.tf32_conv(conv, x)

    def hands_norm(self, out_channels, like, next_):
        """True when a conv on the CUDA kernel with out_channels outputs (one output tile) can also write the input of
        next_ = (norm, the conv after it), SiLU(norm(its output)), as a second output (conv(..., normed=next_[0]))
        that norm_into(*next_, output) then takes instead of a norm pass. like: a tensor of the conv's dtype and
        device. Not where the next conv has TF32 products (tf32_conv): this opt-in hand-off (HAND_NORM, off: measured
        no faster in bf16) does not round its second output (norm_tf32 is fuses_norm's), so there the norm pass writes
        the next conv's rounded input."""
        O = out_channels
        return (self.hand_norm and next_ is not None and O == ops.causal_conv._cuda_block_n(O)
                and next_[1].weight.shape[1] == O and self.reads_in_place(next_[1], like)
                and not self.tf32_conv(next_[1], like))

    def on_cuda(self, conv, buf):
        """True when `conv` over `buf` (an _InPlace chunk) runs on vkern's CUDA conv kernel, whose epilogue can add
        a residual and an fp32 bias (conv(buf, residual=...): one residual-add pass less) and apply the next
        norm (fuses_norm)."""
        stride = ref._conv_args(conv)[2]
        return isinstance(buf, _InPlace) and self.backend(conv, buf.x, conv.weight, stride) == "cuda"

    def fuses_norm(self, conv, buf, next_conv):
        """True when `conv` over `buf` can end with the next conv's RMS norm + SiLU in its epilogue (conv(buf,
        norm=...)) and hand its output to `next_conv` as an _InPlace chunk: conv on the CUDA kernel with C -> C
        channels in one output tile (96 or 128), and next_conv reading its cache in place from such an output. A
        next_conv with TF32 products (tf32_conv) only with the switch on: the epilogue rounds its output where
        rounds_input (conv(..., norm_tf32=True)), else the conv rounds copies of it. The epilogue's norm
        arithmetic differs from the norm pass's in last bits (its fast SiLU), which a TF32 rounding may turn into
        2^-11 (see hands_norm): the output is not the norm pass's bits, its error the same."""
        C, O = conv.weight.shape[:2][::-1]
        return (C == O and O == ops.causal_conv._cuda_block_n(O) and self.on_cuda(conv, buf)
                and self.in_place(next_conv, buf.x)
                and (self.tf32_epilogue or not self.tf32_conv(next_conv, buf.x)))

    def conv(self, conv, buf, keep=CACHE_T, bias=True, residual=None, norm=None, normed=None, norm_tf32=False):
        """Run `conv` over its filled buffer (without its bias when not `bias`; bias may also be a tensor to add
        instead, fp32 allowed with a residual); keep the buffer's last frames for the next chunk. Padded output
        channels are cut off (a channel slice, no copy). `buf` may be an _InPlace chunk instead (see in_place).
        residual: added to the output (in the conv's epilogue where on_cuda, else by residual_add_).
        norm: a WanRMS_norm whose norm + SiLU of the output the CUDA kernel's epilogue applies (fuses_norm).
        normed: a WanRMS_norm whose norm + SiLU of the output the epilogue writes as a second output (hands_norm),
        left for norm_into in self.handoff. norm_tf32: the epilogue rounds norm's output to TF32 (rounds_input)."""
        if isinstance(buf, torch.Tensor) and (residual is not None or norm is not None or normed is not None):
            raise ValueError("residual, norm, normed: only for a conv reading its cache in place (an _InPlace chunk)")
        if isinstance(buf, _InPlace):
            b = bias if isinstance(bias, torch.Tensor) else (self.fp32(conv, "bias") if bias else None)
            out = self._conv_in_place(conv, buf.x, b, residual, self.epilogue(norm if norm is not None else normed),
                                      normed is not None, buf.tf32, norm_tf32)
            if normed is None:
                return out
            self.handoff = (normed, *out)
            return out[0]
        _, _, stride, (_, h_pad, w_pad) = ref._conv_args(conv)
        weight, b = self._weights(conv, buf.shape[1])
        b = bias if isinstance(bias, torch.Tensor) else (b if bias else None)
        backend = self.backend(conv, buf, weight, stride)  # vkern's kernels where they beat cuDNN
        if backend in ops.causal_conv.IN_PLACE:
            out = ops.causal_conv.conv3d_in_place(backend, buf, weight, b, stride, (0, h_pad, w_pad),
                                                  packed=self.cuda_packed(conv, weight, backend))
        else:
            out = F.conv3d(buf, weight, b, stride, (0, h_pad, w_pad))
        prev = self.frames.get(conv)
        if prev is None:
            prev = self.frames[conv] = torch.empty_like(buf[:, :, :keep], memory_format=CL)
        prev.copy_(buf[:, :, -keep:])
        return out[:, :conv.weight.shape[0]]

    def epilogue(self, norm):
        """The CUDA epilogue's (gamma, beta, SiLU) for a WanRMS_norm (None: none), in fp32, made once per video."""
        return None if norm is None else (
            self.fp32(norm, "gamma"), self.fp32(norm, "bias", lambda: _norm_bias(norm)), True)

    def cuda_packed(self, conv, weight, backend):
        """conv's weight (as given: padded or a 2D conv's unsqueezed) packed for the CUDA conv kernel, made on the
        first call of this video (None for another backend)."""
        if backend != "cuda":
            return None
        if conv not in self.packed:
            self.packed[conv] = ops.causal_conv.cuda_pack(weight)
        return self.packed[conv]

    def _conv_in_place(self, conv, x, bias, residual=None, norm=None, normed=False, tf32=False, norm_tf32=False):
        """vkern's conv kernel over [cached frames | x] read in place (zeros before the first chunk, as the
        buffer's), plus bias (a tensor or None) and residual (or None), then the cache becomes the last CACHE_T
        frames of [cache | x] (norm, normed: the CUDA epilogue's, see conv): the kernel is queued before any cached
        frame is overwritten, on the same stream. tf32: x holds TF32 values (rounds_input); the conv reads x and the
        cache as they are when the cached frames do too (self.tf32_cache), else rounds copies (CUDA) or rounds as it
        reads (Triton).
        On the CUDA kernel the cache is a list of frames wherever they are (_keep_frames). On Triton the 2-frame
        cache is a ring: a 1-frame chunk overwrites the oldest slot and flips the stored order (self.reversed; the
        kernel reads either order), one frame copied instead of two (the 1-frame steps of a 720p decode)."""
        weight, _, stride, padding = ref._conv_args(conv)
        backend = self.backend(conv, x, weight, stride)
        cache_tf32 = self.tf32_cache.get(conv, True)  # no cache yet: zeros
        # the next cache: x's last 2 frames, or the last cached frame and x's one
        self.tf32_cache[conv] = tf32 and (cache_tf32 or x.shape[2] >= CACHE_T)
        if backend == "cuda":
            frames = self.frames.get(conv, [])
            out = ops.causal_conv.conv3d_in_place(backend, x, weight, bias, stride, padding, cache=frames,
                                                  residual=residual, norm=norm, normed=normed,
                                                  packed=self.cuda_packed(conv, weight, backend),
                                                  inputs_tf32=tf32 and cache_tf32, norm_tf32=norm_tf32)
            self.frames[conv] = _keep_frames(frames, x)
            return out
        prev = self.frames.get(conv)
        reversed_ = self.reversed.get(conv, False)
        out = ops.causal_conv.conv3d_in_place(backend, x, weight, bias, stride, padding, cache=prev,
                                              cache_reversed=reversed_, residual=residual, norm=norm,
                                              packed=self.cuda_packed(conv, weight, backend),
                                              inputs_tf32=tf32 and cache_tf32)
        if prev is None:
            B, C, _, H, W = x.shape
            prev = self.frames[conv] = torch.empty((B, C, CACHE_T, H, W), dtype=x.dtype, device=x.device,
                                                   memory_format=CL).zero_()
        if x.shape[2] == 1:  # CACHE_T = 2: the new frame replaces the oldest slot
            prev[:, :, 1 if reversed_ else 0].copy_(x[:, :, 0])
            self.reversed[conv] = not reversed_
        else:
            prev.copy_(x[:, :, -CACHE_T:])
            self.reversed[conv] = False
        return out

    def norm_into(self, norm, conv, x, in_bias=None):
        """`conv`'s input with SiLU(norm(x + in_bias)) written straight into its chunk slot: the
        [cache | chunk] buffer, or an _InPlace chunk of its own where the conv reads the cache in place (or the
        one a conv's epilogue already wrote: self.handoff)."""
        handoff, self.handoff = self.handoff, None
        if handoff is not None and handoff[0] is norm and handoff[1] is x and in_bias is None:
            return _InPlace(handoff[2])
        tf32 = False
        if self.in_place(conv, x):
            slot = torch.empty_like(x, memory_format=CL)
            tf32 = self.rounds_input(conv, x)
            buf = _InPlace(slot, tf32)
        else:
            buf, slot = self.buffer(conv, x.shape, x.dtype, x.device)
        ops.causal_conv.rms_norm_silu(x, norm.gamma, _norm_bias(norm), True, out=slot, in_bias=in_bias, tf32=tf32)
        return buf

    def norm_conv(self, norm, conv, x, bias=True):
        return self.conv(conv, self.norm_into(norm, conv, x), bias=bias)

    def plain_conv(self, conv, x):
        """A causal conv on x as it is (conv_in, the time-upsampling conv)."""
        _, _, _, (t_pad, h_pad, w_pad) = ref._conv_args(conv)
        if t_pad == 0:
            weight, bias, stride, _ = ref._conv_args(conv)
            return F.conv3d(x, weight, bias, stride, (0, h_pad, w_pad))
        if t_pad != CACHE_T:
            raise NotImplementedError(f"causal conv with {t_pad} padding frames (Wan's have {CACHE_T})")
        if self.in_place(conv, x):
            return self._conv_in_place(conv, x, self.fp32(conv, "bias"))
        buf, slot = self.buffer(conv, x.shape, x.dtype, x.device)
        slot.copy_(x)
        return self.conv(conv, buf)


def _keep_frames(frames, x):
    """The last CACHE_T frames of [frames | x] (1-frame tensors, oldest first), the next chunk's cache on the CUDA
    conv: x's own frames where x may stay alive (at most KEEP_INPUT_FRAMES frames, KEEP_INPUT_FRAMES_FP32 in fp32; a
    storage of its own: not a view
    holding a larger tensor), else a copy of them (a new tensor: frames still cached are never overwritten). x is
    a conv input: nothing writes to it after the conv."""
    T = x.shape[2]
    n = min(T, CACHE_T)
    last = x[:, :, T - n:]
    keep = KEEP_INPUT_FRAMES_FP32 if x.dtype == torch.float32 else KEEP_INPUT_FRAMES
    if T > keep or x.untyped_storage().nbytes() != x.numel() * x.element_size():
        last = last.clone(memory_format=CL)
    return (list(frames) + [last[:, :, i:i + 1] for i in range(n)])[-CACHE_T:]


class _InPlace:
    """A conv's chunk whose cached frames stay in _Chunks.frames (the conv reads both in place); tf32: its values
    are rounded to TF32 (_Chunks.rounds_input)."""
    __slots__ = ("x", "tf32")

    def __init__(self, x, tf32=False):
        self.x = x
        self.tf32 = tf32


def _norm_bias(norm):
    if isinstance(norm.bias, torch.Tensor):
        return norm.bias
    if norm.bias != 0:
        raise ValueError(f"WanRMS_norm.bias: expected a tensor or 0.0, got {norm.bias!r}")
    return None


def _shortcut(block, x, bias=True):
    if isinstance(block.conv_shortcut, torch.nn.Identity):
        return x
    weight, b, stride, _ = ref._conv_args(block.conv_shortcut)
    return F.conv3d(x, weight, b if bias else None, stride)


def _sum_bias(*biases):
    """The biases left out of the convs feeding a residual add, summed in fp32 (None if there are none)."""
    biases = [b.float() for b in biases if b is not None]
    return sum(biases[1:], biases[0]) if biases else None


def residual_block(block, x, run, next_=None):
    """WanResidualBlock. next_: (norm, conv) that the output goes to next (the next block's norm1 and conv1, or the
    decoder's norm_out and conv_out), whose norm conv2's CUDA epilogue may write too (_Chunks.hands_norm)."""
    if block.training and block.dropout.p > 0:
        raise RuntimeError("vkern's Wan VAE path is for inference: put the VAE in eval mode")
    fuse = run.fuse_bias
    buf1 = run.norm_into(block.norm1, block.conv1, x)
    if fuse and run.fuses_norm(block.conv1, buf1, block.conv2):  # conv1 + bias, norm2 + SiLU in its epilogue
        tf32 = run.rounds_input(block.conv2, buf1.x)  # fp32: rounded there for conv2's TF32 products
        buf = _InPlace(run.conv(block.conv1, buf1, norm=block.norm2, norm_tf32=tf32), tf32)
    else:
        y = run.conv(block.conv1, buf1, bias=not fuse)
        buf = run.norm_into(block.norm2, block.conv2, y, in_bias=block.conv1.bias if fuse else None)
        del y  # conv1's output is read: free it before conv2 allocates its output
    del buf1
    conv_bias = getattr(block.conv_shortcut, "bias", None)  # None for Identity
    bias_sum = (lambda: run.fp32(block, "bias sum", lambda: _sum_bias(block.conv2.bias, conv_bias)))
    if fuse and run.on_cuda(block.conv2, buf):  # the add in conv2's epilogue: one pass less
        handed = next_[0] if run.hands_norm(block.conv2.weight.shape[0], x, next_) else None
        return run.conv(block.conv2, buf, bias=bias_sum(), residual=_shortcut(block, x, bias=False), normed=handed)
    y = run.conv(block.conv2, buf, bias=not fuse)
    del buf
    if not fuse:
        return y.add_(_shortcut(block, x))  # diffusers' x + h: the same one rounding, in place
    shortcut = _shortcut(block, x, bias=False)
    return ops.causal_conv.residual_add_(y, shortcut, bias_sum())


def attention_block(block, x, run):
    return _cl(block(x))  # per frame, at the lowest resolution: diffusers' module as it is


def mid_block(block, x, run):
    x = residual_block(block.resnets[0], x, run)
    for attn, resnet in zip(block.attentions, block.resnets[1:]):
        x = residual_block(resnet, attention_block(attn, x, run), run)
    return x


def _upsample_frames(src):
    """Nearest 2x upsampling of frames given as a [B, T, I, H, W, C] view (frame t * I + i), into a
    new channels-last [B * T * I, C, 2H, 2W] batch of frames: one copy."""
    B, T, I, H, W, C = src.shape
    out = torch.empty((B * T * I, C, 2 * H, 2 * W), dtype=src.dtype, device=src.device,
                      memory_format=torch.channels_last)
    dst = out.permute(0, 2, 3, 1).view(B, T, I, H, 2, W, 2, C)
    dst, src = _words(dst, src)  # the same bits, 8 bytes an element where the layout allows
    dst.copy_(src[:, :, :, :, None, :, None, :].expand(*dst.shape))
    return out


def _words(*ts):
    """ts viewed as int64 (4 bf16 channels an element) when every one allows it, else as they are. A
    strided copy (the upsampling's 8-dim gather) costs index math per element: 4x fewer elements."""
    ok = all(t.element_size() == 2 and t.stride(-1) == 1 and t.shape[-1] % 4 == 0 and t.storage_offset() % 4 == 0
             and all(s % 4 == 0 for s in t.stride()[:-1]) for t in ts)
    ts = tuple(t.view(torch.int64) for t in ts) if ok else ts
    return ts if len(ts) > 1 else ts[0]


def _time_upsampled(block, x, run):
    """WanResample upsample2d/upsample3d's frames before the spatial upsampling, as a [B, T, I, H, W, C]
    view of channels-last data (frame t * I + i): x itself, or the time conv's 2C channels (upsample3d
    after the first chunk: channel i * C + c of frame t becomes channel c of frame 2t + i)."""
    src = x.permute(0, 2, 3, 4, 1).unsqueeze(2)
    if block.mode == "upsample3d":
        conv = block.time_conv
        if conv not in run.seen:  # first chunk: no time upsampling ("Rep" in diffusers)
            run.seen.add(conv)
        else:  # later chunks; before the second the cache is zeros, as diffusers' "Rep" rule gives
            y = _cl(run.plain_conv(conv, x))  # (cuDNN's output is: a no-op on CUDA)
            src = y.permute(0, 2, 3, 4, 1).unflatten(-1, (2, x.shape[1])).permute(0, 1, 4, 2, 3, 5)
    return src


def _upsample_conv(block, src, run, next_=None):
    """Nearest 2x in space and the 3x3 conv of frames given as _time_upsampled's view: [B, C', T * I, 2H,
    2W] channels-last-3d. On vkern's CUDA conv the kernel reads the upsampled frames from src on the fly (no copy;
    next_: as residual_block's); else the interleave and the upsampling are one copy."""
    B, T, I = src.shape[:3]
    conv2d = block.resample[1]
    weight = conv2d.weight.unsqueeze(2)
    if (run.backend(conv2d, src, weight, (1, 1, 1)) == "cuda" and tuple(conv2d.stride) == (1, 1)
            and (B == 1 or src.stride(0) == T * src.stride(1)) and src.stride(-1) == 1):
        frames = src.flatten(0, 1).permute(0, 4, 1, 2, 3)  # [B * T, C, I, H, W]: a view (B == 1 or strides checked)
        if ops.causal_conv._pixel_grid(frames):
            return _upsample_conv_cuda(conv2d, weight, frames, B, run, next_)
    up = _upsample_frames(src)
    del src
    conv2d = block.resample[1]
    # [B*T, C', 2H, 2W] channels-last is [B, C', T, 2H, 2W] channels-last-3d in memory: the frames of a 1-frame-
    # kernel causal conv, which vkern's CUDA conv takes where it measured faster than cuDNN
    frames = up.unflatten(0, (B, T * I)).permute(0, 2, 1, 3, 4)
    weight = conv2d.weight.unsqueeze(2)
    backend = run.backend(conv2d, frames, weight, (1, 1, 1))
    if backend in ops.causal_conv.IN_PLACE and tuple(conv2d.stride) == (1, 1):
        return ops.causal_conv.conv3d_in_place(backend, frames, weight, run.fp32(conv2d, "bias"), (1, 1, 1),
                                               (0, *conv2d.padding),
                                               packed=run.cuda_packed(conv2d, weight, backend))
    y = F.conv2d(up, conv2d.weight, conv2d.bias, conv2d.stride, conv2d.padding)
    del up, frames
    return y.unflatten(0, (B, T * I)).permute(0, 2, 1, 3, 4)


def _upsample_conv_cuda(conv2d, weight, frames, B, run, next_):
    """_upsample_conv on the CUDA conv: _time_upsampled's [B, T, I, H, W, C] frames given as `frames`, a batch of B * T
    items of I frames each [B * T, C, I, H, W] (I = 2: the time conv's 2 frames a pixel, C channels apart), upsampled
    2x by the kernel's halo loads; the output [B * T, O, I, 2H, 2W] is [B, O, T * I, 2H, 2W] in memory."""
    T = frames.shape[0] // B
    O = weight.shape[0]
    handed = run.hands_norm(O, frames, next_)
    out = ops.causal_conv.conv3d_in_place(
        "cuda", frames, weight, run.fp32(conv2d, "bias"), (1, 1, 1), (0, *conv2d.padding),
        packed=run.cuda_packed(conv2d, weight, "cuda"), upsample=2, norm=run.epilogue(next_[0]) if handed else None,
        normed=handed)
    outs = [t.unflatten(0, (B, T)).permute(0, 2, 1, 3, 4, 5).flatten(2, 3) for t in (out if handed else [out])]
    if handed:
        run.handoff = (next_[0], *outs)
    return outs[0]


def upsample(block, x, run, next_=None):
    """WanResample upsample2d/upsample3d: [time conv to 2C channels, frames interleaved], nearest 2x in
    space, 3x3 conv."""
    src = _time_upsampled(block, x, run)
    del x
    return _upsample_conv(block, src, run, next_)


def upsample_steps(block, x, run, frames):
    """upsample(), its output yielded `frames` frames at a time (the spatial upsampling and the 3x3 conv
    are per frame, so they run step by step: the full output never exists at once). Steps follow the
    [T, I] frame grid: whole time-conv frames when I divides `frames`, else parts of one (one step of all
    frames when neither fits)."""
    src = _time_upsampled(block, x, run)
    del x
    T, I = src.shape[1:3]
    if frames % I == 0:
        n = frames // I
        steps = [src[:, t:t + n] for t in range(0, T, n)]
    elif I % frames == 0:
        steps = [src[:, t:t + 1, i:i + frames] for t in range(T) for i in range(0, I, frames)]
    else:
        steps = [src]
    del src
    while steps:
        yield _upsample_conv(block, steps.pop(0), run)


def resample(block, x, run, next_=None):
    if block.mode in ("upsample2d", "upsample3d"):
        return upsample(block, x, run, next_)
    x = _cl(ref._per_frame(block.resample, x))  # downsample: ZeroPad2d + strided conv (encoder)
    if block.mode != "downsample3d":
        return x
    conv = block.time_conv
    prev = run.frames.get(conv)
    if prev is None:  # first chunk passes through; its last frame is the next chunk's context
        run.frames[conv] = x[:, :, -1:].clone(memory_format=CL)
        return x
    buf, slot = run.buffer(conv, x.shape, x.dtype, x.device, keep=1)
    slot.copy_(x)
    del x, slot
    return run.conv(conv, buf, keep=1)  # kernel 3, stride 2, no padding over [last frame | chunk]


def residual_down_block(block, x, run):
    shortcut = block.avg_shortcut(x)
    for resnet in block.resnets:
        x = residual_block(resnet, x, run)
    if block.downsampler is not None:
        x = resample(block.downsampler, x, run)
    return x.add_(shortcut)


def _up_layers(block):
    """A WanUpBlock's layers in order, as (function, module) pairs."""
    layers = [(residual_block, resnet) for resnet in block.resnets]
    if block.upsamplers is not None:
        layers.append((resample, block.upsamplers[0]))
    return layers


def up_block(block, x, run, first_chunk):
    for fn, layer in _up_layers(block):
        x = fn(layer, x, run)
    return x


def residual_up_block(block, x, run, first_chunk):
    shortcut = None if block.avg_shortcut is None else block.avg_shortcut(x, first_chunk=first_chunk)
    for resnet in block.resnets:
        x = residual_block(resnet, x, run)
    if block.upsampler is not None:
        x = resample(block.upsampler, x, run)
    return x if shortcut is None else x.add_(shortcut)


_DOWN = {"WanResidualBlock": residual_block, "WanAttentionBlock": attention_block, "WanResample": resample,
         "WanResidualDownBlock": residual_down_block}
_UP = {"WanUpBlock": up_block, "WanResidualUpBlock": residual_up_block}


def _time_up_blocks(dec):
    """Indices of the decoder's up blocks that upsample in time."""
    def resampler(b):
        r = getattr(b, "upsampler", None) or (b.upsamplers[0] if getattr(b, "upsamplers", None) else None)
        return r
    return [i for i, b in enumerate(dec.up_blocks) if resampler(b) is not None and resampler(b).mode == "upsample3d"]


def up_block_steps(block, x, run, first_chunk, frames):
    """A time-upsampling up block (WanUpBlock, or WanResidualUpBlock with its shortcut) whose output is
    yielded `frames` frames at a time (its upsampler runs in steps: upsample_steps)."""
    residual = ref._block_fn(_UP, block) is residual_up_block
    shortcut = block.avg_shortcut(x, first_chunk=first_chunk) if residual and block.avg_shortcut is not None else None
    for resnet in block.resnets:
        x = residual_block(resnet, x, run)
    steps = upsample_steps(block.upsampler if residual else block.upsamplers[0], x, run, frames)
    del x
    t = 0
    for y in steps:
        if shortcut is not None:
            y.add_(shortcut[:, :, t:t + y.shape[2]])
        t += y.shape[2]
        handed = [y]
        del y
        yield handed.pop()  # no reference left in this frame while the caller works on the step


def _tail_layers(blocks, first_chunk):
    """The up blocks after the last time upsampling, which run per step, as [(layer(y, run, next_=...), (its first
    norm, the conv after it) or None)]: WanUpBlocks layer by layer (the block's input is dropped after its first
    layer; a call would hold it to the end), other blocks whole."""
    layers = []
    for block in blocks:
        fn = ref._block_fn(_UP, block)
        if fn is up_block:
            layers += [(functools.partial(f, layer), (layer.norm1, layer.conv1) if f is residual_block else None)
                       for f, layer in _up_layers(block)]
        else:
            layers.append((lambda y, run, next_=None, block=block, fn=fn: fn(block, y, run, first_chunk), None))
    return layers


def decoder_chunk(dec, x, run, first_chunk, frames_per_step=None):
    """Yield the decoded frames of one latent frame, `frames_per_step` at a time from the last time
    upsampling on (its upsampler included: up_block_steps; all at once when None)."""
    x = run.plain_conv(dec.conv_in, x)
    x = mid_block(dec.mid_block, x, run)
    split = max(_time_up_blocks(dec), default=-1) + 1
    stepped = frames_per_step is not None and split > 0
    for block in dec.up_blocks[:split - 1 if stepped else split]:
        x = ref._block_fn(_UP, block)(block, x, run, first_chunk)
    if stepped:
        steps = up_block_steps(dec.up_blocks[split - 1], x, run, first_chunk, frames_per_step)
    else:
        parts = [x] if frames_per_step is None else list(x.split(frames_per_step, dim=2))
        steps = (parts.pop(0) for _ in range(len(parts)))  # each part dropped once it is taken
    del x
    tail = _tail_layers(dec.up_blocks[split:], first_chunk)
    for y in steps:
        for i, (layer, _) in enumerate(tail):
            y = layer(y, run, next_=tail[i + 1][1] if i + 1 < len(tail) else (dec.norm_out, dec.conv_out))
        buf = run.norm_into(dec.norm_out, dec.conv_out, y)
        del y  # read into conv_out's input: free it before conv_out runs
        yield run.conv(dec.conv_out, buf)
        del buf


def encoder_chunk(enc, x, run):
    x = run.plain_conv(enc.conv_in, x)
    for block in enc.down_blocks:
        x = ref._block_fn(_DOWN, block)(block, x, run)
    x = mid_block(enc.mid_block, x, run)
    return run.norm_conv(enc.norm_out, enc.conv_out, x)


# --- entry points -------------------------------------------------------------------------------------

def _vae_dtype(vae):
    dtypes = {p.dtype for p in vae.parameters()}
    if len(dtypes) != 1:
        raise TypeError(f"vkern Wan VAE path: expected the VAE's parameters in one dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _check_input(name, t, vae, channels):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 5:
        raise ValueError(f"{name}: expected 5 dimensions (batch, channels, frames, height, width), got shape "
                         f"{tuple(t.shape)}")
    if t.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got shape {tuple(t.shape)}")
    dtype = _vae_dtype(vae)
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {str(dtype).replace('torch.', '')} (the VAE's), got "
                        f"{str(t.dtype).replace('torch.', '')}")
    device = next(vae.parameters()).device
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the VAE's device), got {t.device}")


def _auto_frames_per_step(H, W, dtype):
    """VKERN_WAN_VAE_FRAMES_PER_STEP (an int, or "all") if set; else 1 for large frames, and otherwise
    FP32_FRAMES_PER_STEP for an fp32 VAE, whole chunks for a 16-bit one. Smaller steps trade memory for
    cache copies and launches: each step copies 2 cached frames into and out of every conv's buffer, so
    1-frame steps copy 4x the frames of whole 4-frame chunks."""
    import os

    env = os.environ.get("VKERN_WAN_VAE_FRAMES_PER_STEP")
    if env:
        if env == "all":
            return None
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"VKERN_WAN_VAE_FRAMES_PER_STEP: expected a positive int or 'all', got {env!r}")
        return int(env)
    if H * W > LARGE_FRAME_PIXELS:
        return 1
    return FP32_FRAMES_PER_STEP if dtype == torch.float32 else None


def decode_defaults():
    """The decode's per-call and per-step defaults here, the environment included (vkern.info() shows them); a bad
    environment value is shown as its error."""
    def steps(frames):
        return "whole chunks" if frames is None else f"{frames} frame{'s' if frames > 1 else ''}"

    try:
        small16, small32 = (_auto_frames_per_step(1, 1, dtype) for dtype in (torch.bfloat16, torch.float32))
        large = _auto_frames_per_step(1, LARGE_FRAME_PIXELS + 1, torch.bfloat16)
        latents = _latents_per_call_default()
    except ValueError as e:
        return str(e)
    return (f"{latents} latent frame{'s' if latents > 1 else ''} per call; the last stages' steps: 16-bit "
            f"{steps(small16)}, fp32 {steps(small32)}, {steps(large)} above {LARGE_FRAME_PIXELS} pixels a frame")


def _env_switch(option, given, default=True):
    """`given` unless None, else VKERN_WAN_VAE_<OPTION>=1|0, else `default` (fuse_bias: on, measured faster
    on a GPU, run 21; pad_channels: on for encode, off for decode, where it measured no faster and its
    8-channel conv_out output raised a small decode's peak, run 22)."""
    if given is not None:
        return bool(given)
    import os

    name = f"VKERN_WAN_VAE_{option.upper()}"
    env = os.environ.get(name, "1" if default else "0")
    if env not in ("0", "1"):
        raise ValueError(f"{name}: expected 0 or 1, got {env!r}")
    return env == "1"


def _chunks(fuse_bias, pad_channels, pad_default):
    return _Chunks(_env_switch("fuse_bias", fuse_bias), _env_switch("pad_channels", pad_channels, pad_default),
                   _env_switch("hand_norm", None, HAND_NORM), _env_switch("tf32_norm", None, TF32_NORM),
                   _env_switch("tf32_epilogue", None, TF32_EPILOGUE))


def _latents_per_call_default():
    """VKERN_WAN_VAE_LATENTS_PER_CALL (a positive int; default 2: measured faster than diffusers' 1, run 72: 480p
    588.9 vs 603.2 ms at the same 4.06 GiB peak, 720p 1424.0 vs 1430.8 ms at 5.74 vs 5.58 GiB)."""
    import os

    env = os.environ.get("VKERN_WAN_VAE_LATENTS_PER_CALL", str(LATENTS_PER_CALL))
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"VKERN_WAN_VAE_LATENTS_PER_CALL: expected a positive int, got {env!r}")
    return int(env)


def decode(vae, z, output_device=None, frames_per_step="auto", fuse_bias=None, latents_per_call=None,
           pad_channels=None):
    """vae.decode(z).sample for an AutoencoderKLWan in eval mode: [B, C, 1 + 4 * (T - 1), H, W] in
    [-1, 1] from z [B, z_dim, T, h, w]. output_device: where the decoded video is allocated (e.g.
    "cpu": then only a chunk's frames are ever on the GPU; default z's device). frames_per_step:
    frames per step from the last time upsampling on ("auto": see _auto_frames_per_step;
    None: whole chunks). fuse_bias: residual blocks' conv biases added by the passes after the convs
    (None: VKERN_WAN_VAE_FUSE_BIAS, default on). latents_per_call: latent frames decoded together after
    the first (None: VKERN_WAN_VAE_LATENTS_PER_CALL, default 2; 1 is diffusers' chunking). pad_channels:
    conv_out's 3 or 12 output channels padded to a multiple of 8 (None: VKERN_WAN_VAE_PAD_CHANNELS, default off for
    decode)."""
    _check_input("z", z, vae, vae.config.z_dim)
    if latents_per_call is None:
        latents_per_call = _latents_per_call_default()
    if isinstance(latents_per_call, bool) or not isinstance(latents_per_call, int) or latents_per_call < 1:
        raise ValueError(f"latents_per_call: expected a positive int, got {latents_per_call!r}")
    B, _, T, h, w = z.shape
    p = vae.config.patch_size or 1
    up = vae.spatial_compression_ratio // p  # the decoder's own spatial factor
    H, W = h * up * p, w * up * p
    if frames_per_step == "auto":
        frames_per_step = _auto_frames_per_step(H, W, z.dtype)
    out_channels = vae.decoder.conv_out.weight.shape[0] // (p * p)
    device = torch.device(output_device) if output_device is not None else z.device
    pin = device.type == "cpu" and z.device.type == "cuda"
    out = torch.empty((B, out_channels, 1 + 4 * (T - 1), H, W), dtype=z.dtype, device=device, pin_memory=pin)
    x = ref.run_conv(vae.post_quant_conv, z)  # 1x1x1 over the latents: tiny
    run = _chunks(fuse_bias, pad_channels, pad_default=False)
    t = 0
    for i in [0, *range(1, T, latents_per_call)]:  # the first latent frame alone (first-chunk rules)
        n = 1 if i == 0 else latents_per_call
        for y in decoder_chunk(vae.decoder, _cl(x[:, :, i:i + n]), run, i == 0, frames_per_step):
            if p > 1:
                y = ref.unpatchify(y, p)
            n = y.shape[2]
            out[:, :, t:t + n].copy_(y.clamp_(-1.0, 1.0), non_blocking=pin)
            t += n
            del y
    if pin:
        torch.cuda.current_stream(z.device).synchronize()  # the last copies are asynchronous
    return out


def encode(vae, x, fuse_bias=None, pad_channels=None):
    """vae._encode(x) (= vae.encode(x).latent_dist.parameters) for an AutoencoderKLWan in eval mode:
    [B, 2 * z_dim, 1 + (T - 1) // 4, h, w] from x [B, C, T, H, W] with T = 4k + 1 frames (diffusers
    silently drops the frames past the last full chunk; here that is an error). fuse_bias: as for decode.
    pad_channels: conv_in's 3 or 12 input channels padded to a multiple of 8 (None: VKERN_WAN_VAE_PAD_CHANNELS,
    default on)."""
    p = vae.config.patch_size or 1
    _check_input("x", x, vae, vae.config.in_channels // (p * p))
    T = x.shape[2]
    if (T - 1) % ref.ENCODE_CHUNK:
        raise ValueError(f"x: expected 4k + 1 frames (1, 5, 9, ..., 81), got {T} (shape {tuple(x.shape)}); "
                         f"diffusers would drop the last {(T - 1) % ref.ENCODE_CHUNK}")
    if p > 1:
        x = ref.patchify(x, p)
    run = _chunks(fuse_bias, pad_channels, pad_default=True)
    starts = [0] + list(range(1, T, ref.ENCODE_CHUNK))
    outs = [encoder_chunk(vae.encoder, _cl(x[:, :, s:s + (1 if s == 0 else ref.ENCODE_CHUNK)]), run) for s in starts]
    out = torch.cat(outs, dim=2)  # latents: small
    return ref.run_conv(vae.quant_conv, out).contiguous()
