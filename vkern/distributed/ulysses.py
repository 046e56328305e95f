"""Ulysses all-to-all: sequence shards [B, S_local, H, D] <-> head shards [B, S_padded, H_local, D].

The layouts, padding included, are defined by vkern/reference/sequence_parallel.py. Each transform
is ONE torch.distributed.all_to_all_single: the send buffer is [world, ...] with chunk j the part
for rank j, which is the order all_to_all_single splits its input in; the received chunk j came
from rank j.

Before exchanging, every rank shares a few ints (op, seq_len, heads, B, D, dtype, input ok) with
one small all_gather, so ranks that disagree all raise the same clear error instead of some of them
waiting in a mismatched all-to-all. On CUDA that costs a tiny collective and a host sync per call:
pass check=False once the layout has been checked (e.g. after the first step).
"""
import torch
import torch.distributed as dist

from ..ops._checks import check_tensor
from ..reference.sequence_parallel import ShardSpec, key_padding_mask

__all__ = ["seq_to_head", "seq_to_head_qkv", "head_to_seq", "key_padding_mask", "ShardSpec"]

_OPS = ("seq_to_head", "seq_to_head_qkv", "head_to_seq")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64,
           torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8, torch.int32, torch.int64)
_FIELDS = ("op", "seq_len", "heads", "batch", "head_dim", "dtype")


def seq_to_head(x, spec, group=None, check=True):
    """x [B, S_local, heads, D], this rank's sequence shard (padded as shard_sequence does) ->
    [B, S_padded, H_local, D]: the whole sequence for this rank's heads (zero heads past spec.heads).
    group: a ProcessGroup, an SPGroup from init_from_env, or None for the default group."""
    return _seq_to_head("seq_to_head", {"x": x}, spec, group, check)[0]


def seq_to_head_qkv(q, k, v, spec, group=None, check=True):
    """seq_to_head of q, k and v (same shape and dtype) in one packed all-to-all. Returns (q, k, v),
    each [B, S_padded, H_local, D]; mask padded keys with key_padding_mask(spec)."""
    return _seq_to_head("seq_to_head_qkv", {"q": q, "k": k, "v": v}, spec, group, check)


def head_to_seq(x, spec, group=None, check=True):
    """The inverse of seq_to_head: x [B, S_padded, H_local, D] -> [B, S_local, heads, D], this
    rank's tokens for all real heads (padded heads are dropped; padded tokens are kept)."""
    pg, world, rank = _group(group)
    error = _local_error(lambda: _check_head_sharded(x, spec, world))
    _agree("head_to_seq", pg, spec, x, error, check)
    B, _, per_rank, D = x.shape
    local = spec.local_seq_len
    # Chunk j of the send buffer: rank j's tokens, for this rank's heads.
    send = x.unflatten(1, (world, local)).permute(1, 0, 2, 3, 4).contiguous()
    recv = _all_to_all(send, pg)  # recv[j]: this rank's tokens for rank j's heads
    out = x.new_empty((B, local, spec.heads, D))
    for chunks, heads in _same_heads(recv, out, spec.heads, per_rank):
        heads.copy_(chunks)
    return out


def _seq_to_head(op, tensors, spec, group, check):
    pg, world, rank = _group(group)
    error = _local_error(lambda: _check_seq_sharded(tensors, spec, world))
    first = next(iter(tensors.values()))
    _agree(op, pg, spec, first, error, check)
    B, local, _, D = first.shape
    per_rank = spec.local_heads
    # Chunk j of the send buffer: this rank's tokens of rank j's heads, q/k/v side by side.
    send = first.new_empty((world, len(tensors), B, local, per_rank, D))
    for i, t in enumerate(tensors.values()):
        _zero_padded_heads(send[:, i], spec.heads, per_rank)
        for chunks, heads in _same_heads(send[:, i], t, spec.heads, per_rank):
            chunks.copy_(heads)
    recv = _all_to_all(send, pg)  # recv[j]: rank j's tokens of this rank's heads
    # Source rank next to its tokens gives the sequence in order: [n, B, world * S_local, H_local, D].
    out = recv.permute(1, 2, 0, 3, 4, 5).reshape(len(tensors), B, world * local, per_rank, D)
    return out.unbind(0)


def _same_heads(chunked, flat, heads, per_rank):
    """Pairs of views of chunked [world, B, S, H_local, D] and flat [B, S, heads, D] holding the
    same real heads: global head h is local head h % H_local of chunk h // H_local."""
    full, rest = divmod(heads, per_rank)
    pairs = [(chunked[:full], flat[:, :, :full * per_rank].unflatten(2, (full, per_rank)).permute(2, 0, 1, 3, 4))]
    if rest:
        pairs.append((chunked[full, :, :, :rest], flat[:, :, full * per_rank:]))
    return pairs


def _zero_padded_heads(chunked, heads, per_rank):
    """Zero the heads of chunked [world, B, S, H_local, D] past the real ones (a partial last chunk,
    then whole chunks), so padded heads are exact zeros without padding the input first."""
    full, rest = divmod(heads, per_rank)
    if rest:
        chunked[full, :, :, rest:].zero_()
        full += 1
    chunked[full:].zero_()


def _all_to_all(send, pg):
    recv = torch.empty_like(send)
    # Sent as bytes: the exchange only moves data, and gloo rejects some dtypes (fp8).
    dist.all_to_all_single(recv.view(torch.uint8), send.view(torch.uint8), group=pg)
    return recv


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


def _agree(op, pg, spec, x, error, check):
    """Raise on every rank if any rank's input is bad or the ranks disagree on the layout."""
    if not check:
        if error is not None:
            raise error
        return
    if error is None:
        dtype = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else 100 + x.element_size()
        mine = [_OPS.index(op), spec.seq_len, spec.heads, x.shape[0], x.shape[3], dtype, 1]
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
    if field == "dtype":
        return str(_DTYPES[value]).replace("torch.", "") if value < len(_DTYPES) else f"{value - 100}-byte dtype"
    return value
