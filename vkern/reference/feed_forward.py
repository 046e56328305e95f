"""diffusers FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate") (Wan's FFN), the spec
for vkern's feed-forward kernels, plus the same computation over token chunks.

diffusers 0.42 on CPU/CUDA runs these torch ops, all in x's dtype (no upcast: GELU's fp32 branch is
for MPS before torch 2.0 only):
    h = F.linear(x, w1, b1)              bias fused into the GEMM: one rounding to x's dtype
    g = F.gelu(h, approximate="tanh")    fp32 math inside the kernel, rounded to x's dtype
    y = F.linear(g, w2, b2)              (the Dropout between them has p=0: identity)

Chunked: the same ops on at most `chunk_size` token rows at a time (all leading dimensions flattened
into rows), each result written into a preallocated output, so the [tokens, ffn_dim] intermediate
exists only as one [chunk_size, ffn_dim] buffer. Each chunk is bit-identical to the unchunked ops on
those rows. The whole is bit-identical to the unchunked result only where the BLAS runs the same GEMM
kernel for the chunk's row count: CPU MKL in fp32 uses another summation order for GEMMs of a few
rows (fewer than ~12, more with many threads), and cuBLAS picks kernels by shape; the difference is
GEMM rounding.
"""
import math

import torch
import torch.nn.functional as F


def feed_forward(x, w1, b1, w2, b2, approximate="tanh", chunk_size=None, out=None):
    """gelu(x @ w1^T + b1) @ w2^T + b2 on x [..., dim]; w1 [ffn_dim, dim], w2 [dim_out, ffn_dim], biases
    or None. chunk_size: at most this many token rows per chunk (None: all at once). out: optional
    contiguous [..., dim_out] tensor to write into (returned)."""
    tokens = math.prod(x.shape[:-1])
    if chunk_size is None or chunk_size >= tokens:
        y = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
        return y if out is None else out.copy_(y)

    # A view when x is contiguous; otherwise one copy of x (dim wide, not ffn_dim wide).
    rows = x.reshape(tokens, x.shape[-1])
    if out is None:
        out = x.new_empty((*x.shape[:-1], w2.shape[0]))
    out_rows = out.view(tokens, w2.shape[0])
    for start in range(0, tokens, chunk_size):
        end = min(start + chunk_size, tokens)
        h = _linear(rows[start:end], w1, b1)
        torch.ops.aten.gelu_(h, approximate=approximate)  # in place: one [chunk, ffn_dim] buffer, same bits
        _linear(h, w2, b2, out=out_rows[start:end])
    return out


def _linear(x, w, b, out=None):
    # What F.linear runs on a 2-D input (addmm: bias fused, one rounding; mm without bias), in the
    # out= form so the second GEMM writes straight into the output rows.
    if b is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(b, x, w.t(), out=out)


# GEMM-friendly chunk sizes: row counts that fill whole tiles on the GPU.
CHUNK_MULTIPLE = 64


def chunk_for_budget(tokens, ffn_dim, dtype, budget_bytes):
    """The largest chunk size (token rows) whose [chunk, ffn_dim] intermediate in `dtype` fits in
    budget_bytes, rounded down to a multiple of 64 rows once it is that large; `tokens` when all fit."""
    row_bytes = ffn_dim * torch.empty((), dtype=dtype).element_size()
    most = budget_bytes // row_bytes
    if most < 1:
        raise ValueError(f"budget_bytes: {budget_bytes} bytes cannot hold the intermediate of one token "
                         f"({ffn_dim} x {row_bytes // ffn_dim} bytes = {row_bytes} bytes)")
    if most >= tokens:
        return max(tokens, 1)
    return most - most % CHUNK_MULTIPLE if most >= CHUNK_MULTIPLE else most
