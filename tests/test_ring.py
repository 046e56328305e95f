"""Ring attention's merge (vkern.distributed.ring), single process: partial results over key blocks
merged by log-sum-exp equal attention over all keys; blocks with no key never produce NaN. The
multi-rank ring itself runs in tests/test_sequence_parallel.py (ring-*) and tests/test_sp_wan.py
(ring*-*, including Ulysses x ring on 4 ranks)."""
import torch

from vkern.distributed.ring import attention_lse, merge_lse
from vkern.reference.attention import attention_lse as reference_lse
from vkern.reference.attention import attention_math


def _qkv(B=2, Sq=7, Skv=11, H=3, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g, dtype=dtype) for S in (Sq, Skv, Skv))


def _start(q):
    B, S, H, D = q.shape
    return torch.zeros(B, S, H, D, dtype=q.dtype), torch.full((B, H, S), float("-inf"), dtype=q.dtype)


def test_merging_key_blocks_in_any_order_equals_attention_over_all_keys():
    q, k, v = _qkv()
    want = attention_math(q, k, v)
    for order in ([(0, 4), (4, 5), (5, 11)], [(5, 11), (0, 4), (4, 5)]):
        out, lse = _start(q)
        for a, b in order:
            out, lse = merge_lse(out, lse, *reference_lse(q, k[:, a:b], v[:, a:b]))
        # float64 throughout: only rounding differs from the one-shot softmax
        assert (out - want).abs().max() < 1e-12
        assert (lse - reference_lse(q, k, v)[1]).abs().max() < 1e-12


def test_blocks_without_keys_contribute_nothing_and_never_nan():
    q, k, v = _qkv(Skv=5)
    out, lse = _start(q)
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    out, lse = merge_lse(out, lse, empty_out, empty_lse)  # nothing seen yet, nothing added
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse = merge_lse(out, lse, *reference_lse(q, k, v))
    out, lse = merge_lse(out, lse, empty_out, empty_lse)
    assert torch.isfinite(out).all() and (out - attention_math(q, k, v)).abs().max() < 1e-12


def test_local_attention_lse_matches_the_reference_in_fp32():
    q, k, v = _qkv(dtype=torch.float32, seed=3)
    out, lse = attention_lse(q, k, v)  # on the CPU: the fp32 reference (or vkern's kernel if it has lse)
    want_out, want_lse = reference_lse(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 7)
    assert (out.double() - want_out).abs().max() < 1e-5 and (lse.double() - want_lse).abs().max() < 1e-5
