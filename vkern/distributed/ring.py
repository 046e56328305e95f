"""Ring attention: queries stay, key/value blocks travel around a ring of ranks.

Rank i of an R-rank ring group holds the queries of sequence block i and the keys/values of the
same block. In R steps every rank sees every key block: at step s it attends to block (i - s) mod R
while sending the block it holds to rank i + 1 and receiving the next from rank i - 1 (the
transfer overlaps the attention). The partial results merge exactly through their log-sum-exp:

    lse = logaddexp(lse_a, lse_b),   out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

(in fp32). A block with no real key (all padding) contributes lse = -inf, i.e. nothing; a query
that has no real key at all gets out 0 (flash-attention's convention).

Padding is always the tail of the sequence, so a block's real keys are a prefix of it: each block
is attended as k[:, :n_real] with no mask, and a block with n_real = 0 is skipped.

The local attention with log-sum-exp (attention_lse) is vkern.ops.attention(..., return_lse=True)
(vkern's flash-attention kernel on CUDA, the reference on the CPU); should ops.attention lack
return_lse, the float32 reference (vkern.reference.attention.attention_lse; O(S^2) memory).
"""
import inspect
import warnings

import torch
import torch.distributed as dist

from ..reference import attention as ref
from . import timing

__all__ = ["attention_lse", "merge_lse", "ring_attention"]

_ops_lse = None  # cached: does vkern.ops.attention take return_lse?
_warned = set()


def _ops_attention_with_lse():
    global _ops_lse
    if _ops_lse is None:
        from .. import ops

        fn = getattr(ops, "attention", None)
        try:
            params = inspect.signature(fn).parameters
            _ops_lse = fn if "return_lse" in params and "backend" in params else False
        except (TypeError, ValueError):
            _ops_lse = False
    return _ops_lse


def attention_lse(q, k, v, backend="auto"):
    """Unmasked attention on [B, S, h, D] -> (out [B, Sq, h, D] (q's dtype, or float32 from the
    reference), lse float32 [B, h, Sq], natural log). backend: vkern.ops.attention's preference."""
    fn = _ops_attention_with_lse()
    if fn:
        out, lse = fn(q, k, v, return_lse=True, backend=backend)
        return out, lse.float()
    if q.is_cuda:
        _warn_once("reference", "vkern ring attention: vkern.ops.attention has no return_lse here; using the "
                                "O(S^2) float32 reference")
    return ref.attention_lse(q, k, v, dtype=torch.float32)


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def merge_lse(out, lse, block_out, block_lse):
    """Merge a block's (out [B, S, h, D], lse [B, h, S]) into the running (out, lse) (fp32, or fp64 in tests); returns
    the new pair. -inf lse (no key seen) on either side is handled: weights 0, never NaN."""
    new = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    w_old = torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)  # [B, S, h, 1]
    w_new = torch.exp(block_lse - safe).transpose(1, 2).unsqueeze(-1)
    return out * w_old + block_out.to(out.dtype) * w_new, new


def ring_attention(q, k, v, group, real_keys, attend_lse=attention_lse):
    """q [B, Sq, h, D]: this rank's queries; k, v [B, Skv, h, D]: this rank's key block (block
    index = this rank's place in group). real_keys[i]: how many leading keys of ring rank i's block
    are real (the rest is padding). Returns [B, Sq, h, D] in q's dtype. Collective over group."""
    pg = getattr(group, "group", group)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if len(real_keys) != world:
        raise ValueError(f"real_keys: expected one count per ring rank ({world}), got {len(real_keys)}")
    nxt, prv = dist.get_global_rank(pg, (rank + 1) % world), dist.get_global_rank(pg, (rank - 1) % world)
    B, Sq, h, D = q.shape
    out = torch.zeros((B, Sq, h, v.shape[3]), dtype=torch.float32, device=q.device)
    lse = torch.full((B, h, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    kv = torch.stack([k, v])  # one message per step: [2, B, Skv, h, D]
    for step in range(world):
        src = (rank - step) % world
        pending = None
        if step + 1 < world:  # the next block travels while this one is attended
            incoming = torch.empty_like(kv)
            ops = [dist.P2POp(dist.isend, kv.view(torch.uint8), nxt, pg),
                   dist.P2POp(dist.irecv, incoming.view(torch.uint8), prv, pg)]
            pending = (incoming, dist.batch_isend_irecv(ops))
        n = real_keys[src]
        if n > 0:
            block_out, block_lse = attend_lse(q, kv[0, :, :n], kv[1, :, :n])
            out, lse = merge_lse(out, lse, block_out, block_lse)
        if pending is not None:
            token = timing.begin(q.device)
            for work in pending[1]:
                work.wait()
            timing.end(token, "ring")
            kv = pending[0]
    return out.to(q.dtype)
