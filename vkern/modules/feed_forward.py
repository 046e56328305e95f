"""The one feed-forward implementation of vkern's modules, for diffusers' FeedForward(activation_fn=
"gelu-approximate") (Wan's FFN): feed_forward_rows runs the FeedForward's own layers on one chunk of
token rows, and both users chunk with it:
  - ChunkedFeedForward, the drop-in for a FeedForward (PatchConfig(fused_block=False, ffn_chunk_size=N)),
    over chunks of its flattened tokens;
  - the fused Wan block (vkern/modules/wan_block.py), whose chunks also carry norm3 before the FFN and
    gate + residual after it.
The layers are called as modules, so whatever they are (nn.Linear, Fp8Linear, a LoRA layer, with their
hooks) they run as they would in diffusers. What it changes: the GELU runs in place on the up
projection's output (one [chunk, ffn_dim] buffer instead of two, same bits as F.gelu), and when the
down projection is an fp8 compute-mode layer the GELU and its per-token quantization are one kernel
(vkern.ops.block_glue.gelu_tanh_fp8), so the bf16 GELU output is never written.
"""
import math

import torch
from torch import nn

from ..ops import block_glue
from ..reference.feed_forward import chunk_for_budget
from ._hooks import hooked
from .fp8_linear import Fp8Activation
from .fp8_linear import takes_fp8_input as _layer_takes_fp8


class ChunkedFeedForward(nn.Module):
    """Build it with from_diffusers(ff, chunk_size=...) or from_diffusers(ff, budget_bytes=...): a fixed
    number of token rows per chunk, or the most rows whose intermediate fits in the budget (decided per
    call from the token count and dtype). Neither: one chunk."""

    def __init__(self, net, chunk_size=None, budget_bytes=None):
        super().__init__()
        # The original ModuleList itself: same Parameter objects and the same state_dict keys
        # (net.0.proj.weight, net.2.weight, ...), so checkpoints and undo see no difference.
        self.net = net
        self.chunk_size = chunk_size
        self.budget_bytes = budget_bytes

    @classmethod
    def from_diffusers(cls, ff, chunk_size=None, budget_bytes=None):
        _check_supported(ff)
        if chunk_size is not None and budget_bytes is not None:
            raise ValueError("chunk_size, budget_bytes: pass one or neither, not both")
        for name, v in (("chunk_size", chunk_size), ("budget_bytes", budget_bytes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name}: expected a positive int or None, got {v!r}")
        return cls(ff.net, chunk_size, budget_bytes)

    def forward(self, hidden_states, *args, **kwargs):
        # Extra args: diffusers' deprecated `scale`, which FeedForward ignores too.
        if self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.net):
            raise RuntimeError("ChunkedFeedForward: dropout p > 0 in training mode is not supported "
                               "(call .eval(), or keep diffusers' FeedForward for training)")
        tokens = math.prod(hidden_states.shape[:-1])
        chunk = self.chunk_size
        if self.budget_bytes is not None:
            chunk = chunk_for_budget(tokens, self.net[0].proj.out_features, hidden_states.dtype, self.budget_bytes)
        if chunk is None or chunk >= tokens:
            return _net_rows(self.net, hidden_states)
        rows = hidden_states.reshape(tokens, hidden_states.shape[-1])  # a view when contiguous
        out = None
        for start in range(0, tokens, chunk):
            y = _net_rows(self.net, rows[start:start + chunk])
            if out is None:
                out = y.new_empty((tokens, y.shape[-1]))
            out[start:start + chunk] = y
        return out.view(*hidden_states.shape[:-1], out.shape[-1])

    def extra_repr(self):
        if self.budget_bytes is not None:
            return f"budget_bytes={self.budget_bytes}"
        return f"chunk_size={self.chunk_size}"


def feed_forward_rows(ff, x):
    """ff (diffusers' FeedForward or a ChunkedFeedForward) on one chunk of rows x: a tensor [..., dim], or
    an Fp8Activation when ffn_takes_fp8_input(ff). Returns [..., dim_out] in x's dtype. The GELU runs in place
    (or fused with the down projection's fp8 quantization); anything this does not know (other
    activations, hooks on the FeedForward or its GELU module, MPS) is called as it is."""
    if isinstance(ff, ChunkedFeedForward) or _fast_net(ff) is None:
        if isinstance(x, Fp8Activation):  # not reachable through ffn_takes_fp8_input; correct, not fast
            x = x.dequantize()
        return ff(x)
    return _net_rows(ff.net, x)


def ffn_takes_fp8_input(ff):
    """True when feed_forward_rows(ff, x) uses an Fp8Activation x as is (its up projection is an fp8
    compute-mode layer on the fast path), so a fused producer may emit one."""
    net = _fast_net(ff)
    return net is not None and not isinstance(ff, ChunkedFeedForward) and _layer_takes_fp8(net[0].proj)


def _net_rows(net, x):
    if not _fast(net) or (not isinstance(x, Fp8Activation) and x.device.type == "mps"):
        h = x
        for m in net:  # diffusers' own order, e.g. its GELU upcasting fp16 on MPS
            h = m(h)
        return h
    gelu = net[0]
    h = gelu.proj(x)
    if gelu.approximate == "tanh" and _layer_takes_fp8(net[2]):
        h = Fp8Activation(*block_glue.gelu_tanh_fp8(h), h.dtype)  # one pass: GELU + per-token quantization
    else:
        torch.ops.aten.gelu_(h, approximate=gelu.approximate)  # same kernel as F.gelu, same bits
    for m in list(net)[2:]:  # the Dropouts are identities (checked): Linear [, Dropout]
        if not isinstance(m, nn.Dropout):
            h = m(h)
    return h


def _fast_net(ff):
    net = getattr(ff, "net", None)
    if net is None or hooked(ff) or not _fast(net):
        return None
    return net


def _fast(net):
    """net is [GELU, Dropout, Linear-like(, Dropout)] with identity Dropouts and no hooks on the GELU
    wrapper (whose forward the fast path replaces) or the Dropouts (which it skips)."""
    from diffusers.models.activations import GELU

    if not isinstance(net, nn.ModuleList) or len(net) not in (3, 4) or type(net[0]) is not GELU:
        return False
    drops = [net[1]] + ([net[3]] if len(net) == 4 else [])
    return (not hooked(net[0]) and not hooked(net)
            and all(type(d) is nn.Dropout and (d.p == 0 or not d.training) and not hooked(d) for d in drops))


def _check_supported(ff):
    """Raise unless ff is a diffusers FeedForward Linear -> tanh GELU -> Dropout -> Linear [-> Dropout]
    with no hooks on what ChunkedFeedForward replaces (the FeedForward itself and its GELU wrapper). The
    Linears may be anything Linear-like (nn.Linear, Fp8Linear, LoRA): they are called as modules."""
    from diffusers.models.activations import GELU
    from diffusers.models.attention import FeedForward

    if not isinstance(ff, FeedForward):
        raise TypeError(f"ff: expected a diffusers FeedForward, got {type(ff).__name__}")
    net = ff.net
    act = net[0]
    if type(act) is not GELU or act.approximate != "tanh":
        what = f"GELU(approximate={act.approximate!r})" if isinstance(act, GELU) else type(act).__name__
        raise ValueError(f"ff: only activation_fn='gelu-approximate' (GELU with approximate='tanh') is "
                         f"supported, got {what}")
    if len(net) not in (3, 4) or not all(type(m) is nn.Dropout for m in list(net)[1::2]):
        raise ValueError(f"ff.net: expected [GELU, Dropout, Linear(, Dropout)], got "
                         f"{[type(m).__name__ for m in net]}")
    for name, m in (("", ff), (".net", net), (".net[0]", act)):
        if hooked(m):
            raise ValueError(f"ff{name}: has forward hooks (diffusers offloading or user hooks) that "
                             f"ChunkedFeedForward would bypass")
