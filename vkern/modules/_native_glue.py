"""Shared by the fused blocks whose glue runs in the tensors' own dtypes (LTX-Video, CogVideoX)."""
from .. import ops
from ..ops.block_glue import gate_rounding


def add_gated_(x, y, gate, table=None):
    """diffusers' x + y * (table + gate) in eager PyTorch's dtypes: written into x (a tensor the caller owns) when the
    result keeps x's dtype (a bf16 model), else a new tensor."""
    if gate_rounding(x, y, gate, table, True)[2] == x.dtype:
        return ops.gate_residual_(x, y, gate, table, native_dtypes=True)
    return ops.gate_residual(x, y, gate, table, native_dtypes=True)
