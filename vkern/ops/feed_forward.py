"""Feed-forward as diffusers' FeedForward(activation_fn="gelu-approximate") computes it: linear,
tanh-GELU, linear, optionally over token chunks so the [tokens, ffn_dim] intermediate never exists
whole, as a functional op on plain weights. Backends: reference (vkern/reference/feed_forward.py).

vkern's modules do not call it: ChunkedFeedForward and the fused Wan block share one implementation,
vkern/modules/feed_forward.py, which calls the FeedForward's own layers (nn.Linear, Fp8Linear, LoRA)
and fuses the GELU with fp8 quantization where the down projection computes in fp8.
"""
import torch

from ..reference import feed_forward as ref
from . import _backend
from ._checks import FLOATS, check_shape, check_tensor
from ._custom_op import custom_op


@_backend.register("feed_forward")
def _candidates(device, dtype):
    return {"reference": None}


def feed_forward(x, w1, b1, w2, b2, chunk_size=None):
    """gelu_tanh(x @ w1^T + b1) @ w2^T + b2 on x [..., dim] with w1 [ffn_dim, dim], b1 [ffn_dim] or None,
    w2 [dim_out, ffn_dim], b2 [dim_out] or None, all in x's dtype and on x's device. chunk_size: at most
    this many token rows (leading dimensions flattened) per chunk; None: all at once. Returns [..., dim_out]."""
    check_tensor("x", x, dtypes=FLOATS)
    if x.dim() == 0:
        raise ValueError("x: expected shape (..., dim), got a 0-dim tensor")
    check_tensor("w1", w1, dtypes=(x.dtype,), ndim=2, device=x.device)
    check_shape("w1", w1, (None, x.shape[-1]))
    check_tensor("w2", w2, dtypes=(x.dtype,), ndim=2, device=x.device)
    check_shape("w2", w2, (None, w1.shape[0]))
    for name, b, size in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if b is not None:
            check_tensor(name, b, dtypes=(x.dtype,), device=x.device)
            check_shape(name, b, (size,))
    # SymInt: a chunk size derived from x's shape under torch.compile(dynamic=True).
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, torch.SymInt))
                                   or chunk_size <= 0):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    return _feed_forward(x, w1, b1, w2, b2, chunk_size)


@custom_op("vkern::feed_forward", mutates_args=())
def _feed_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  b2: torch.Tensor | None, chunk_size: int | None) -> torch.Tensor:
    _backend.choose("feed_forward", _candidates(x.device, x.dtype))
    return ref.feed_forward(x, w1, b1, w2, b2, "tanh", chunk_size)


@_feed_forward.register_fake
def _(x, w1, b1, w2, b2, chunk_size):
    return x.new_empty((*x.shape[:-1], w2.shape[0]))
