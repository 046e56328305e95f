"""Ulysses all-to-all: sequence shards [B, S_local, H, D] <-> head shards [B, S_padded, H_local, D].

The layouts, padding included, are defined by vkern/reference/sequence_parallel.py. Each transform
is ONE torch.distributed.all_to_all_single: the send buffer is [world, ...] with chunk j the part
for rank j, which is the order all_to_all_single splits its input in; the received chunk j came
from rank j.

fp8 payload (fp8=True, q/k/v only): each tensor is quantized per token per head (vkern.ops.fp8_quantize,
granularity "row" over the head dim: scale = amax * fp32(1/448), saturating e4m3) before packing; the
send buffer carries the e4m3 bytes and the fp32 scales side by side in one byte buffer (D + 4 bytes
per token and head instead of 2 D), and the receiver dequantizes to the input dtype.

ulysses_attention does the whole sharded attention: q/k/v exchange, attention on this rank's heads,
output exchange. With chunks > 1 the local heads are split into groups whose exchanges are issued
asynchronously, so the attention of one group runs while the next group's q/k/v and the previous
group's output are on the wire.

Copies. The q/k/v send buffer is [world, B, S_local, n, width, D]: chunk j holds this rank's tokens of
rank j's heads, and per token the n tensors (q, k, v) side by side. So the receive buffer, [world, B,
S_local, n, width, D], is at B = 1 the same memory as [S_padded, n, width, D]: every received tensor
is a strided [1, S_padded, width, D] view (sequence stride n * width * D), which the attention kernels
read as is; no unpack copy. At B > 1 the batch index sits between the source rank and the token, so
the tensors are unpacked by one copy each (the fallback; unless S_local = 1). On the send side, QKVSendBuffer lets a
caller write q/k/v in place (the fused QK prologue writes its output straight into it, see
vkern.ops.qk_norm_rope(out=); QKVSendBuffer.linear writes a projection's GEMM output into it) and
ulysses_attention_packed exchanges it: no pack copy for what is written in place (the chunked and fp8
paths pack by copying). The tensors may be split over buffers exchanged one after the other (k and v,
started as soon as they are written, then q). The output send buffer, [world, B, S_local, width, D], is
at B = 1 the attention's own contiguous [1, S_padded, width, D] output, so it is sent as is; the output
receive buffer [world, B, S_local, width, D] -> [B, S_local, heads, D] (to_out's input) is one copy
(rank j's heads are a column block of every token's row, which no view can express, and to_out's GEMM
needs rows), unless the consumer takes the heads apart: HeadBlocks hands out rank j's block as the
[B * S_local, width * D] matrix it already is in the receive buffer, and this rank's own block from the
attention output before the exchange ends (an output projection split by input columns needs no copy).
CommTimer's pack/unpack spans (and bytes) cover exactly the copies that run.

Before exchanging, every rank shares a few ints (op, seq_len, heads, B, D, dtype, payload, input ok)
with one small all_gather, so ranks that disagree all raise the same clear error instead of some of
them waiting in a mismatched all-to-all. On CUDA that costs a tiny collective and a host sync per
call: pass check=False once the layout has been checked (the Wan patch checks once per step shape).
"""
import torch
import torch.distributed as dist

from ..ops._checks import check_tensor
from ..reference.sequence_parallel import ShardSpec, key_padding_mask
from . import timing

__all__ = ["seq_to_head", "seq_to_head_qkv", "head_to_seq", "ulysses_attention", "ulysses_attention_packed",
           "QKVSendBuffer", "HeadBlocks", "key_padding_mask", "ShardSpec", "head_chunks"]

_OPS = ("seq_to_head", "seq_to_head_qkv", "head_to_seq", "ulysses_attention")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64,
           torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8, torch.int32, torch.int64)
_FIELDS = ("op", "seq_len", "heads", "batch", "head_dim", "dtype", "payload")
_E4M3 = torch.float8_e4m3fn


def seq_to_head(x, spec, group=None, check=True, fp8=False):
    """x [B, S_local, heads, D], this rank's sequence shard (padded as shard_sequence does) ->
    [B, S_padded, H_local, D]: the whole sequence for this rank's heads (zero heads past spec.heads).
    group: a ProcessGroup, an SPGroup from init_from_env, or None for the default group.
    fp8: send e4m3 with per-token-per-head scales (lossy; see the module docstring)."""
    return _seq_to_head("seq_to_head", {"x": x}, spec, group, check, fp8)[0]


def seq_to_head_qkv(q, k, v, spec, group=None, check=True, fp8=False):
    """seq_to_head of q, k and v (same shape and dtype) in one packed all-to-all. Returns (q, k, v),
    each [B, S_padded, H_local, D]; keys at positions >= spec.seq_len are padding (slice them off,
    or mask them with key_padding_mask(spec))."""
    return _seq_to_head("seq_to_head_qkv", {"q": q, "k": k, "v": v}, spec, group, check, fp8)


def head_to_seq(x, spec, group=None, check=True):
    """The inverse of seq_to_head: x [B, S_padded, H_local, D] -> [B, S_local, heads, D], this
    rank's tokens for all real heads (padded heads are dropped; padded tokens are kept)."""
    pg, world, rank = _group(group)
    error = _local_error(lambda: _check_head_sharded(x, spec, world))
    _agree("head_to_seq", pg, spec, x, error, check, False)
    out = x.new_empty((x.shape[0], spec.local_seq_len, spec.heads, x.shape[3]))
    _finish_output(_start_output(x, spec, pg, world, 0), out, spec, 0, spec.local_heads)
    return out


def ulysses_attention(q, k, v, spec, attend, group=None, chunks=1, fp8=False, check=True):
    """Sequence-parallel attention: q, k, v [B, S_local, heads, D] (this rank's tokens, padded as
    shard_sequence does) -> [B, S_local, heads, D]. attend(q, k, v) gets [B, S_padded, h, D] queries
    and [B, seq_len, h, D] keys/values (padded keys sliced off, so no mask is needed) for a group of
    h of this rank's heads, and returns [B, S_padded, h, D]. chunks: how many head groups to split
    the exchanges into (1 = one q/k/v and one output all-to-all; more overlaps communication with
    attention; clamped to the number of local heads)."""
    pg, world, rank = _group(group)
    tensors = {"q": q, "k": k, "v": v}
    error = _local_error(lambda: _check_seq_sharded(tensors, spec, world))
    if error is None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
        error = ValueError(f"chunks: expected a positive int, got {chunks!r}")
    _agree("ulysses_attention", pg, spec, q, error, check, fp8)
    bounds = head_chunks(spec.local_heads, chunks)
    packed = _quantize(tensors.values(), q.device) if fp8 else list(tensors.values())
    # All q/k/v exchanges are issued first: they queue on the communication stream, each starting
    # as soon as its buffer is packed, and run while the attention of earlier groups computes.
    pending = [_start_qkv(packed, spec, pg, world, a, b, fp8) for a, b in bounds]
    return _attend_groups(pending, bounds, attend, spec, pg, world, q.dtype)


class QKVSendBuffer:
    """The send buffer of one exchange of ulysses_attention_packed, for a caller that writes q, k and v
    into it in place instead of handing over tensors that are then copied in:

        send = QKVSendBuffer(spec, batch, head_dim, dtype, device, group)
        vkern.ops.qk_norm_rope(query, w, eps, heads, cos, sin, out=send.slot(0))   # written in place
        send.fill(2, value)                                                        # or copied in
        out = ulysses_attention_packed(send, attend)

    n: how many tensors the buffer carries (3: q, k, v; or split over two buffers, e.g. v alone (n=1),
    started early with start() so its exchange overlaps the q/k projections, and q/k (n=2)).
    slot(i): tensor i as head groups [B, S_local, world, H_local, D]: global head h is
    slot[:, :, h // H_local, h % H_local]; heads >= spec.heads are head padding and must be zeros (the
    out= of vkern.ops.qk_norm_rope writes them so; fill and linear write them). Every element of every
    slot must be written. The model's dtype only: the fp8 payload and head-chunked overlap pack by
    copying (ulysses_attention)."""

    def __init__(self, spec, batch, head_dim, dtype, device, group=None, n=3):
        self.pg, self.world, _ = _group(group)
        _check_spec(spec, self.world)
        self.spec, self.dtype, self.n = spec, dtype, n
        self.shape = (batch, spec.local_seq_len, spec.heads, head_dim)  # what one tensor is per rank
        self.buffer = torch.empty((self.world, batch, spec.local_seq_len, n, spec.local_heads, head_dim),
                                  dtype=dtype, device=device)

    def slot(self, i):
        return self.buffer[:, :, :, i].permute(1, 2, 0, 3, 4)

    def fill(self, i, t):
        """Copy t [B, S_local, heads, D] (this rank's tokens, all real heads) into slot i, zeros in the
        padded heads: the pack copy, timed as such."""
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ValueError(f"t: expected {self.dtype} {list(self.shape)} ([B, S_local, heads, D]), "
                             f"got {t.dtype} {list(t.shape)}")
        token = timing.begin(t.device)
        _pack_heads(self.buffer[:, :, :, i], t, self.spec.heads, self.spec.local_heads, 0, self.spec.local_heads)
        timing.end(token, "pack", self.buffer[:, :, :, i].numel() * self.buffer.element_size())

    def linear(self, i, x, weight, bias=None):
        """Slot i <- x @ weight.T + bias (x [B, S_local, K], weight [heads * D, K]): one GEMM per
        destination rank writing its head columns straight into the buffer (at n = 1 each rank's chunk
        is a contiguous [B * S_local, H_local * D] matrix), so a projection lands with no pack copy.
        The same products as F.linear, in blocks of columns (GEMM blocking may differ, not the math)."""
        B, local, heads, D = self.shape
        if tuple(x.shape[:2]) != (B, local) or x.dim() != 3 or tuple(weight.shape) != (heads * D, x.shape[2]):
            raise ValueError(f"x, weight: expected [{B}, {local}, K] and [{heads * D}, K], got "
                             f"{list(x.shape)} and {list(weight.shape)}")
        rows, per_rank = x.reshape(B * local, x.shape[2]), self.spec.local_heads
        for j in range(self.world):
            lo, n = j * per_rank, min(max(heads - j * per_rank, 0), per_rank)
            dst = self.buffer[j, :, :, i].reshape(B * local, per_rank * D)  # a view (contiguous at n = 1)
            cols = slice(lo * D, (lo + n) * D)
            if n and bias is not None:
                torch.addmm(bias[cols], rows, weight[cols].T, out=dst[:, :n * D])
            elif n:
                torch.mm(rows, weight[cols].T, out=dst[:, :n * D])
            if n < per_rank:
                dst[:, n * D:].zero_()

    def start(self):
        """Start this buffer's all-to-all now (the buffer must be complete and is not written after):
        for ulysses_attention_packed's sends, so the exchange runs while the caller computes the rest."""
        B, local, _, D = self.shape
        return (*_all_to_all_start(self.buffer, self.pg), (self.n, B, local, self.spec.local_heads, D), False)


def ulysses_attention_packed(sends, attend, check=True, head_blocks=False):
    """ulysses_attention on filled QKVSendBuffers (no copy of what was written in place): sends is one
    buffer of q, k, v (n=3), or a sequence of buffers (or their start() results) holding q, k, v in
    that order, e.g. (qk, v.start()). Returns [B, S_local, heads, D] in the buffers' dtype, or with
    head_blocks=True a HeadBlocks (the output exchange in flight, consumed by head block). attend as
    for ulysses_attention. Collective over the buffers' group; check: as for ulysses_attention (every
    rank must fill its buffers the same way)."""
    sends = [sends] if isinstance(sends, QKVSendBuffer) else list(sends)
    first = next(s for s in sends if isinstance(s, QKVSendBuffer))
    spec, pg, world, dtype = first.spec, first.pg, first.world, first.dtype
    if sum(s.n if isinstance(s, QKVSendBuffer) else s[2][0] for s in sends) != 3:
        raise ValueError("sends: expected buffers holding q, k and v (3 tensors in all)")
    _agree("ulysses_attention", pg, spec, first.slot(0), None, check, False)
    exchanges = [s.start() if isinstance(s, QKVSendBuffer) else s for s in sends]
    q, k, v = [t for exchange in exchanges for t in _finish_qkv(exchange, dtype)]
    del exchanges  # the views keep the receive buffers alive as long as they are needed
    o = attend(q, k[:, :spec.seq_len], v[:, :spec.seq_len])
    del q, k, v
    blocks = HeadBlocks(o, _start_output(o, spec, pg, world, 0), spec, dist.get_rank(pg))
    return blocks if head_blocks else blocks.gather()


class HeadBlocks:
    """The attention output of ulysses_attention_packed(head_blocks=True), on its way back to the
    ranks that own its tokens: this rank's tokens for every rank's heads, as one row block per rank,
    [B * S_local, real_heads * D] (padded heads dropped). A consumer that takes the heads apart (an
    output projection split by input columns, vkern/modules/wan_sp_attention.py) needs no unpack copy,
    and can use this rank's own block, which never leaves the GPU, while the exchange is on the wire:
        local()   (heads, rows) of this rank's own heads, available at once
        remote()  [(heads, rows)] of the other ranks' heads (waits for the exchange; views into the
                  receive buffer); heads is the (lo, hi) range of global heads
        gather()  [B, S_local, heads, D], every head in order (the one unpack copy)."""

    def __init__(self, o, exchange, spec, rank):
        self.o, self.exchange, self.spec, self.rank = o, exchange, spec, rank
        self.B, self.D = o.shape[0], o.shape[3]

    def heads(self, j):
        lo = j * self.spec.local_heads
        return lo, min(max(self.spec.heads, lo), lo + self.spec.local_heads)

    def local(self):
        lo, hi = self.heads(self.rank)
        local, width = self.spec.local_seq_len, self.spec.local_heads
        rows = self.o[:, self.rank * local:(self.rank + 1) * local]
        if self.B > 1:  # the batch index sits between this rank's token blocks: one (small) copy
            token = timing.begin(rows.device)
            rows = rows.contiguous()
            timing.end(token, "unpack", rows[..., :hi - lo, :].numel() * rows.element_size())
        return (lo, hi), rows.view(self.B * local, width * self.D)[:, :(hi - lo) * self.D]

    def remote(self):
        recv, work = self.exchange
        _all_to_all_wait(work, recv.device)
        flat = recv.view(self.spec.world, self.B * self.spec.local_seq_len, -1)
        return [((lo, hi), flat[j, :, :(hi - lo) * self.D]) for j in range(self.spec.world)
                if j != self.rank for lo, hi in [self.heads(j)] if hi > lo]

    def gather(self):
        out = self.o.new_empty((self.B, self.spec.local_seq_len, self.spec.heads, self.D))
        _finish_output(self.exchange, out, self.spec, 0, self.spec.local_heads)
        self.o = None
        return out


def _attend_groups(pending, bounds, attend, spec, pg, world, dtype):
    """For each head group: wait for its q/k/v, attend, start its output exchange; then gather the
    outputs into [B, S_local, heads, D]."""
    out, outputs = None, []
    for i, (a, b) in enumerate(bounds):
        qh, kh, vh = _finish_qkv(pending[i], dtype)
        pending[i] = None  # drop this group's receive buffer once the views/copies are gone
        if out is None:
            out = qh.new_empty((qh.shape[0], spec.local_seq_len, spec.heads, qh.shape[3]))
        o = attend(qh, kh[:, :spec.seq_len], vh[:, :spec.seq_len])
        del qh, kh, vh
        outputs.append((a, b, _start_output(o, spec, pg, world, a)))
    for a, b, exchange in outputs:
        _finish_output(exchange, out, spec, a, b)
    return out


def head_chunks(local_heads, chunks):
    """[(a, b)]: local heads split into min(chunks, local_heads) contiguous, nearly equal groups."""
    n = max(1, min(chunks, local_heads))
    edges = [round(i * local_heads / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _seq_to_head(op, tensors, spec, group, check, fp8):
    pg, world, rank = _group(group)
    error = _local_error(lambda: _check_seq_sharded(tensors, spec, world))
    first = next(iter(tensors.values()))
    _agree(op, pg, spec, first, error, check, fp8)
    packed = _quantize(tensors.values(), first.device) if fp8 else list(tensors.values())
    return _finish_qkv(_start_qkv(packed, spec, pg, world, 0, spec.local_heads, fp8), first.dtype)


# ---------------------------------------------------------------- packing and exchanging

def _quantize(tensors, device):
    """[(e4m3 [B, S, H, D], fp32 scales [B, S, H, 1])], one scale per token and head."""
    from .. import ops

    token = timing.begin(device)
    out = [ops.fp8_quantize(t, "row") for t in tensors]
    timing.end(token, "pack", sum(v.numel() + 4 * s.numel() for v, s in out))
    return out


def _pack_heads(dst, src, heads, per_rank, a, b):
    """dst [world, B, S, b - a, D] <- src [B, S, heads, D]: chunk j gets global heads
    j * per_rank + [a, b); heads past `heads` (padding) are written as zeros."""
    world, width = dst.shape[0], b - a
    if heads == world * per_rank:
        dst.copy_(src.unflatten(2, (world, per_rank))[:, :, :, a:b].permute(2, 0, 1, 3, 4))
        return
    for j in range(world):
        lo = j * per_rank + a
        n = min(max(heads - lo, 0), width)
        if n:
            dst[j, :, :, :n].copy_(src[:, :, lo:lo + n])
        if n < width:
            dst[j, :, :, n:].zero_()


def _unpack_heads(dst, src, heads, per_rank, a, b):
    """The inverse of _pack_heads: dst [B, S, heads, D] <- src [world, B, S, b - a, D] (padded
    heads are dropped)."""
    world, width = src.shape[0], b - a
    if heads == world * per_rank:
        dst.unflatten(2, (world, per_rank))[:, :, :, a:b].copy_(src.permute(1, 2, 0, 3, 4))
        return
    for j in range(world):
        lo = j * per_rank + a
        n = min(max(heads - lo, 0), width)
        if n:
            dst[:, :, lo:lo + n].copy_(src[j, :, :, :n])


def _fp8_views(buf, n, B, S, width, D):
    """Views into a byte buffer [world, per_rank_bytes]: fp32 scales [world, B, S, n, width, 1] first
    (4-byte aligned), then the e4m3 values [world, B, S, n, width, D] (token-major like the native
    payload, so the dequantized tensor is viewable at B = 1)."""
    m = n * B * S * width
    scales = buf[:, :4 * m].view(torch.float32).unflatten(1, (B, S, n, width, 1))
    data = buf[:, 4 * m:4 * m + m * D].view(_E4M3).unflatten(1, (B, S, n, width, D))
    return scales, data


def _fp8_bytes(n, B, S, width, D):
    m = n * B * S * width
    return -(-(4 * m + m * D) // 16) * 16  # rows 16-byte aligned, so the next row's scales are too


def _start_qkv(packed, spec, pg, world, a, b, fp8):
    """Pack heads [a, b) of every rank's share of the tensors (or fp8 (values, scales) pairs) and
    start the all-to-all. Returns the pending exchange for _finish_qkv."""
    first = packed[0][0] if fp8 else packed[0]
    token = timing.begin(first.device)
    n, (B, local, _, D), width = len(packed), first.shape, b - a
    if fp8:
        send = torch.empty((world, _fp8_bytes(n, B, local, width, D)), dtype=torch.uint8, device=first.device)
        scales, data = _fp8_views(send, n, B, local, width, D)
        for i, (values, scale) in enumerate(packed):
            _pack_heads(data[:, :, :, i], values, spec.heads, spec.local_heads, a, b)
            _pack_heads(scales[:, :, :, i], scale, spec.heads, spec.local_heads, a, b)
    else:
        # Chunk j of the send buffer: this rank's tokens of rank j's heads, per token q/k/v side by side.
        send = first.new_empty((world, B, local, n, width, D))
        for i, t in enumerate(packed):
            _pack_heads(send[:, :, :, i], t, spec.heads, spec.local_heads, a, b)
    timing.end(token, "pack", send.numel() * send.element_size())
    recv, work = _all_to_all_start(send, pg)
    return recv, work, (n, B, local, width, D), fp8


def _finish_qkv(exchange, dtype):
    """Wait for a _start_qkv exchange; returns n tensors [B, world * S_local, width, D]: at B = 1 views
    into the receive buffer (sequence stride n * width * D), else contiguous copies."""
    recv, work, (n, B, local, width, D), fp8 = exchange
    _all_to_all_wait(work, recv.device)
    world = recv.shape[0]
    if fp8:
        from .. import ops

        token = timing.begin(recv.device)
        scales, data = _fp8_views(recv, n, B, local, width, D)
        recv = ops.fp8_dequantize(data, scales, dtype).contiguous()  # [world, B, S_local, n, width, D]
        timing.end(token, "unpack", recv.numel() * recv.element_size())
    # recv[j]: rank j's tokens of this rank's heads. Source rank next to its tokens gives the
    # sequence in order.
    ordered = recv.permute(3, 1, 0, 2, 4, 5)  # [n, B, world, S_local, width, D]
    if B == 1 or local == 1:  # (world, S_local) merge into one sequence stride: views, no copy
        return ordered.view(n, B, world * local, width, D).unbind(0)
    # Fallback: the batch index sits between the source rank and its tokens; one copy per tensor.
    token = timing.begin(recv.device)
    out = ordered.reshape(n, B, world * local, width, D)
    timing.end(token, "unpack", out.numel() * out.element_size())
    return out.unbind(0)


def _start_output(x, spec, pg, world, a):
    """x [B, S_padded, width, D], this rank's local heads [a, a + width) for the whole sequence:
    start sending rank j its tokens. Returns the pending exchange for _finish_output."""
    # Chunk j of the send buffer: rank j's tokens, for these heads.
    B, _, width, D = x.shape
    if B == 1 and x.is_contiguous():
        # The attention's own output is already the send buffer [world, 1, S_local, width, D].
        return _all_to_all_start(x.view(world, 1, spec.local_seq_len, width, D), pg)
    token = timing.begin(x.device)  # B > 1 (or a strided output): one copy
    send = x.unflatten(1, (world, spec.local_seq_len)).permute(1, 0, 2, 3, 4).contiguous()
    timing.end(token, "pack", send.numel() * send.element_size())
    return _all_to_all_start(send, pg)


def _finish_output(exchange, out, spec, a, b):
    recv, work = exchange  # recv[j]: this rank's tokens for rank j's heads [a, b)
    _all_to_all_wait(work, recv.device)
    # The one copy left on the output side: rank j's heads are a column block of each token's row
    # of to_out's input, which no view of the receive buffer can give.
    token = timing.begin(recv.device)
    _unpack_heads(out, recv, spec.heads, spec.local_heads, a, b)
    real = sum(min(max(spec.heads - (j * spec.local_heads + a), 0), b - a) for j in range(spec.world))
    timing.end(token, "unpack", out[:, :, 0].numel() * real * out.element_size())


def _all_to_all_start(send, pg):
    recv = torch.empty_like(send)
    # Sent as bytes: the exchange only moves data, and gloo rejects some dtypes (fp8).
    work = dist.all_to_all_single(recv.view(torch.uint8), send.view(torch.uint8), group=pg, async_op=True)
    return recv, work


def _all_to_all_wait(work, device):
    token = timing.begin(device)
    work.wait()  # on CUDA: the current stream waits for the collective (no host sync)
    timing.end(token, "all_to_all")


def _group(group):
    if not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialized; call "
                           "vkern.distributed.init_from_env() first (under torchrun)")
    pg = getattr(group, "group", group)  # an SPGroup carries its ProcessGroup
    return pg, dist.get_world_size(pg), dist.get_rank(pg)


def _check_spec(spec, world):
    if not isinstance(spec, ShardSpec):
        raise TypeError(f"spec: expected a ShardSpec (ShardSpec.create(seq_len, heads, world)), "
                        f"got {type(spec).__name__}")
    if spec.world != world:
        raise ValueError(f"spec: made for world={spec.world}, but the process group has {world} ranks")


def _check_seq_sharded(tensors, spec, world):
    _check_spec(spec, world)
    names = list(tensors)
    first = tensors[names[0]]
    check_tensor(names[0], first, ndim=4)
    B, local, heads, D = first.shape
    if (local, heads) != (spec.local_seq_len, spec.heads):
        raise ValueError(f"{names[0]}: expected [B, S_local={spec.local_seq_len}, heads={spec.heads}, D] "
                         f"(seq_len={spec.seq_len} padded to {spec.padded_seq_len} over world={world}; "
                         f"shard_sequence pads), got {tuple(first.shape)}")
    for name in names[1:]:
        check_tensor(name, tensors[name], dtypes=(first.dtype,), device=first.device)
        if tensors[name].shape != first.shape:
            raise ValueError(f"{name}: expected the shape of {names[0]} {tuple(first.shape)}, "
                             f"got {tuple(tensors[name].shape)}")


def _check_head_sharded(x, spec, world):
    _check_spec(spec, world)
    check_tensor("x", x, ndim=4)
    if tuple(x.shape[1:3]) != (spec.padded_seq_len, spec.local_heads):
        raise ValueError(f"x: expected [B, S_padded={spec.padded_seq_len}, H_local={spec.local_heads}, D] "
                         f"(heads={spec.heads} padded to {spec.padded_heads} over world={world}), "
                         f"got {tuple(x.shape)}")


def _local_error(checks):
    try:
        checks()
    except (TypeError, ValueError) as error:
        return error
    return None


def _agree(op, pg, spec, x, error, check, fp8):
    """Raise on every rank if any rank's input is bad or the ranks disagree on the layout."""
    if error is None and fp8 and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        error = TypeError(f"fp8: the fp8 payload quantizes float32/bfloat16/float16 tensors, got {x.dtype}")
    if not check:
        if error is not None:
            raise error
        return
    if error is None:
        dtype = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else 100 + x.element_size()
        mine = [_OPS.index(op), spec.seq_len, spec.heads, x.shape[0], x.shape[-1], dtype, int(bool(fp8)), 1]
    else:
        mine = [-1] * len(_FIELDS) + [0]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(pg) == "nccl" else "cpu"
    mine = torch.tensor(mine, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(rows, mine, group=pg)
    rows = torch.stack(rows).tolist()
    if error is not None:
        raise error
    bad = [rank for rank, row in enumerate(rows) if row[-1] == 0]
    if bad:
        raise ValueError(f"{op}: rank(s) {bad} rejected their input (their error says why); nothing was exchanged")
    for i, field in enumerate(_FIELDS):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {rank}: {_show(field, value)}" for rank, value in enumerate(values))
            raise ValueError(f"{op}: the ranks disagree on {field} ({shown}); every rank must pass the "
                             f"same spec, batch, head_dim and dtype")


def _show(field, value):
    if field == "op":
        return _OPS[value]
    if field == "payload":
        return "fp8" if value else "native"
    if field == "dtype":
        return str(_DTYPES[value]).replace("torch.", "") if value < len(_DTYPES) else f"{value - 100}-byte dtype"
    return value
