"""Drop-in for diffusers' FeedForward(activation_fn="gelu-approximate"): the same parameters run through
vkern.ops.feed_forward, over token chunks so the [tokens, ffn_dim] intermediate never exists whole."""
import math

from torch import nn

from .. import ops
from ..reference.feed_forward import chunk_for_budget


class ChunkedFeedForward(nn.Module):
    """Build it with from_diffusers(ff, chunk_size=...) or from_diffusers(ff, budget_bytes=...): a fixed
    number of token rows per chunk, or the most rows whose intermediate fits in the budget (decided per
    call from the token count and dtype). Neither: one chunk, the plain FFN through vkern's op."""

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
        proj_in, proj_out = self.net[0].proj, self.net[2]
        chunk = self.chunk_size
        if self.budget_bytes is not None:
            tokens = math.prod(hidden_states.shape[:-1])
            chunk = chunk_for_budget(tokens, proj_in.out_features, hidden_states.dtype, self.budget_bytes)
        return ops.feed_forward(hidden_states, proj_in.weight, proj_in.bias, proj_out.weight, proj_out.bias,
                                chunk)

    def extra_repr(self):
        if self.budget_bytes is not None:
            return f"budget_bytes={self.budget_bytes}"
        return f"chunk_size={self.chunk_size}"


def _check_supported(ff):
    """Raise unless ff is exactly Linear -> tanh GELU -> Dropout -> Linear [-> Dropout] with nothing
    (LoRA layers, hooks) that the op would silently bypass."""
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
    for name, m in (("net[0].proj", act.proj), ("net[2]", net[2])):
        if type(m) is not nn.Linear:
            raise ValueError(f"ff.{name}: expected a plain torch.nn.Linear (LoRA or quantized layers are not "
                             f"supported), got {type(m).__name__}")
    if len(net) not in (3, 4) or not all(type(m) is nn.Dropout for m in list(net)[1::2]):
        raise ValueError(f"ff.net: expected [GELU, Dropout, Linear(, Dropout)], got "
                         f"{[type(m).__name__ for m in net]}")
    for name, m in ff.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_diffusers_hook"):
            raise ValueError(f"ff{'.' + name if name else ''}: has forward hooks (diffusers layerwise casting, "
                             f"offloading or user hooks) that ChunkedFeedForward would bypass")
