"""Shared by the fused blocks whose glue runs in the tensors' own dtypes (LTX-Video, LTX-2, CogVideoX)."""
import torch

from .. import ops
from ..ops.block_glue import gate_rounding


def modulation_pairs(table, temb, x):
    """diffusers' (table[None, None] + temb.reshape(B, T, rows, D)).unbind(2) (LTX's modulation) as (temb chunk, table
    row) pairs of views, added inside the kernels; None if temb does not have that layout (temb [B, 1 | tokens,
    rows * D] for x [B, tokens, D], table [rows, D])."""
    if temb is None or temb.dim() != 3 or x.dim() != 3 or table.dim() != 2:
        return None
    B, S, D = x.shape
    rows = table.shape[0]
    if table.shape[1] != D or temb.shape[0] != B or temb.shape[1] not in (1, S) or temb.shape[2] != rows * D:
        return None
    if table.device != x.device:  # diffusers moves it per call (.to(temb.device)); so do we
        table = table.to(x.device)
    # (two unbinds, not 2 * rows indexing ops: each view costs host time, and a block makes ~30 of these pairs)
    return list(zip(temb.reshape(B, temb.shape[1], rows, D).unbind(2), table.unbind(0)))


def add_(x, y):
    """diffusers' x + y (one rounding either way): into x (a tensor the caller owns) when that keeps x's dtype."""
    return x.add_(y) if torch.promote_types(x.dtype, y.dtype) == x.dtype else x + y


def add_gated_(x, y, gate, table=None):
    """diffusers' x + y * (table + gate) in eager PyTorch's dtypes: written into x (a tensor the caller owns) when the
    result keeps x's dtype (a bf16 model), else a new tensor."""
    if gate_rounding(x, y, gate, table, True)[2] == x.dtype:
        return ops.gate_residual_(x, y, gate, table, native_dtypes=True)
    return ops.gate_residual(x, y, gate, table, native_dtypes=True)
