"""Helpers shared by the attention tests (test_attention_kernel.py: the exact kernel; test_attention_fp8.py:
the 8-bit one): inputs as diffusers' processors hand them over, key-padding masks, PyTorch's own
attention, poisoned outputs, and the torch.compile-equals-eager and fake-tensor checks."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from vkern.ops import _backend

ON_GPU = torch.cuda.is_available()
cpu_interpreter = pytest.mark.skipif(ON_GPU, reason="Triton-interpreter test; the gpu tests run the compiled kernel")


@contextlib.contextmanager
def poisoned():
    """Inside, torch.empty and friends return NaN-filled memory (ints: their max), so an output or
    lse element the kernel never writes cannot pass the finiteness checks."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


def make_qkv(B, Sq, Skv, H, D, dtype, device="cpu", layout="contiguous", sharpness=1.0):
    """Random q [B, Sq, H, D], k, v [B, Skv, H, D] in `dtype`, laid out as a diffusers processor may
    hand them over. sharpness multiplies q (score std ~ sharpness): > 1 gives peaked softmax rows.
      contiguous   three separate contiguous tensors
      fused        slices of one fused QKV projection [B, S, 3, H, D] (self-attention only)
      kv_fused     q separate, k and v slices of a fused KV projection [B, Skv, 2, H, D]
      heads_first  [B, H, S, D] storage seen through transpose(1, 2)
      strided_d    every other element of [B, S, H, 2D] (last-dim stride 2)
      batch_bcast  k and v expanded over the batch (batch stride 0)"""
    def rand(*shape):
        return torch.randn(*shape, device=device)

    if layout == "fused":
        assert Sq == Skv
        qkv = rand(B, Sq, 3, H, D)
        qkv[:, :, 0] *= sharpness
        q, k, v = qkv.to(dtype).unbind(2)
    elif layout == "kv_fused":
        q = (rand(B, Sq, H, D) * sharpness).to(dtype)
        k, v = rand(B, Skv, 2, H, D).to(dtype).unbind(2)
    elif layout == "heads_first":
        q = (rand(B, H, Sq, D) * sharpness).to(dtype).transpose(1, 2)
        k, v = (rand(B, H, Skv, D).to(dtype).transpose(1, 2) for _ in range(2))
    elif layout == "strided_d":
        q = (rand(B, Sq, H, 2 * D) * sharpness).to(dtype)[..., ::2]
        k, v = (rand(B, Skv, H, 2 * D).to(dtype)[..., 1::2] for _ in range(2))
    elif layout == "batch_bcast":
        q = (rand(B, Sq, H, D) * sharpness).to(dtype)
        k, v = (rand(1, Skv, H, D).to(dtype).expand(B, -1, -1, -1) for _ in range(2))
    else:
        assert layout == "contiguous"
        q = (rand(B, Sq, H, D) * sharpness).to(dtype)
        k, v = (rand(B, Skv, H, D).to(dtype) for _ in range(2))
    return q, k, v


def make_padding(B, Skv, pattern, device="cpu"):
    """Key-padding masks [B, Skv], True = attend."""
    if pattern == "none":
        return None
    if pattern == "all_true":
        return torch.ones(B, Skv, dtype=torch.bool, device=device)
    if pattern == "random":  # ~30% of keys masked, scattered across blocks
        return torch.rand(B, Skv, device=device) > 0.3
    if pattern == "prefix":  # padded text: each batch row keeps a different number of leading tokens
        lengths = torch.randint(1, Skv + 1, (B,), device=device)
        lengths[0] = 1 if Skv > 1 else lengths[0]  # one row keeps a single key
        return torch.arange(Skv, device=device)[None, :] < lengths[:, None]
    if pattern == "dead_row":  # batch row 1 attends to nothing: its queries get out 0 and lse -inf
        mask = torch.rand(B, Skv, device=device) > 0.5
        mask[1] = False
        return mask
    if pattern == "dead_then_short":  # batch row 0 attends to nothing, the others to their first 300 keys only
        mask = torch.zeros(B, Skv, dtype=torch.bool, device=device)
        mask[1:, :300] = True
        return mask
    raise ValueError(pattern)


def tail_split_cases(keys=128):
    """(B, H, Sq, Skv, mask pattern) launches whose last wave the CUDA kernel splits on this GPU
    (csrc/flash_attention.cu, split_shape: a tail of at most half the SMs' tiles, parts of >= 16 key blocks of `keys`
    keys): sms + 5 tiles (a full wave, then 5 tail tiles in 2 parts), 7 tiles alone (8 parts of 16-17 blocks) and
    2 x 3 tiles (4 parts; batch row 0 attends to nothing, row 1 to its first 300 keys only, so that its later parts
    have no attended key). The tests check that each call did split (fused_attention.last_tail_split_floats)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if ON_GPU else 132
    return [(1, 1, (sms + 5) * 128 - 3, 32 * keys + 17, "random"), (1, 1, 7 * 128 - 60, 128 * keys + 50, "none"),
            (2, 3, 128 - 5, 64 * keys + 100, "dead_then_short")]


def torch_attention(q, k, v, key_padding_mask=None, scale=None):
    """PyTorch doing the same op in the inputs' dtype: SDPA as diffusers calls it."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def sampled_rows(S, n=256, device="cuda"):
    """n query positions: the first and last (edge tiles) and random ones between."""
    return torch.cat([torch.tensor([0, S - 1]), torch.randperm(S - 2)[: n - 2] + 1]).sort().values.to(device)


def assert_compiled_equals_eager(fn, inputs, op, backend):
    """fn through torch.compile(fullgraph=True, backend="aot_eager") (the custom ops' fake impls, fake-tensor
    tracing, functionalization) on each argument tuple of `inputs`: `op` ran on `backend`, and every output
    equals eager fn's bit for bit."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for args in inputs:
        got, expected = compiled(*args), fn(*args)
        assert _backend.last_choice[op] == backend
        assert len(got) == len(expected) and all(torch.equal(g, e) for g, e in zip(got, expected))


def assert_fake_shapes(attend, dtype, Skv):
    """Under FakeTensorMode (the custom ops' fake impls, no data): attend(q, k, k, key_padding_mask=mask,
    return_lse=True) on q [2, 113, 3, 128], k [2, Skv, 3, 128] in `dtype` gives out like q and lse fp32
    [2, 3, 113]."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 113, 3, 128, dtype=dtype)
        k = torch.empty(2, Skv, 3, 128, dtype=dtype)
        mask = torch.empty(2, Skv, dtype=torch.bool)
        out, lse = attend(q, k, k, key_padding_mask=mask, return_lse=True)
    assert out.shape == (2, 113, 3, 128) and out.dtype == dtype
    assert lse.shape == (2, 3, 113) and lse.dtype == torch.float32
