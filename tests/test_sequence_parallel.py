"""Ulysses all-to-all (vkern.distributed) against the single-process reference.

The multi-process tests run on tests/sp_harness.py (2 and 4 gloo ranks, each world size started
once; every rank runs all the cases and each pytest test reads its own case's verdict).
Uninitialized memory is NaN in the workers (deterministic mode), so a padded head or token that the
transform forgets to write cannot equal the reference's zeros.
"""
import pytest
import torch
import torch.nn.functional as F

from .sp_harness import CountCalls, check, check_all, expect_error, results_fixture, run, spawn
from .tolerance import assert_within_torch_error, rel_l2
from vkern.reference import fp8 as fp8_reference
from vkern.reference import sequence_parallel as ref
from vkern.reference.attention import attention_math

# (B, S, H, D) per world size: heads divisible by world or not (3 on 4 pads past the count,
# 1 on 4 leaves three ranks only zero heads), S divisible or not (5 on 4 leaves rank 3 only padding).
# B = 1 (received q/k/v used in place) and B = 2 (unpacked by copying) both with head padding.
CASES = {
    2: [(2, 13, 5, 8), (2, 1, 5, 8), (2, 8, 12, 4), (1, 6, 2, 16), (1, 13, 5, 8)],
    4: [(2, 13, 12, 8), (2, 13, 3, 8), (2, 16, 12, 8), (2, 5, 1, 4), (1, 13, 3, 8)],
    # 8 ranks: Wan-1.3B's 12 heads (padded to 16), Wan-14B's 40 (5 per
    # rank), fewer heads and tokens than ranks, uneven token counts
    8: [(1, 13, 12, 8), (2, 21, 40, 8), (1, 5, 3, 4), (2, 16, 8, 8), (1, 37, 12, 16)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUT_KINDS = ("seq_to_head", "qkv", "qkv_fp8", "head_to_seq", "round_trip")
CHUNKS = (1, 2, 3)  # ulysses_attention head groups (3 leaves groups of unequal size, or is clamped)
# fp8 payload: the sharded attention must equal attention on the e4m3 round trip of q, k, v (per
# token and head) within the house rule; and, as a sanity floor, its SQNR against the unquantized
# float64 oracle must stay above this. e4m3 keeps 3 mantissa bits (31.5 dB for Gaussian data, ~2.7%
# rms per tensor); the scores see both the q and the k errors, and with few keys (S = 6) softmax
# can sharpen them: measured 25-35 dB on these shapes. A missing or swapped scale is an O(1) error
# (< 10 dB), so 20 dB still catches a broken payload.
FP8_ATTENTION_SQNR_DB = 20.0
ERROR_CASES = ("seq_len_mismatch", "dtype_mismatch", "op_mismatch", "bad_shape_one_rank",
               "wrong_world", "works_after_errors")


def _case_id(B, S, H, D):
    return f"B{B}-S{S}-H{H}-D{D}"


def _layout_ids(world):
    return [f"{kind}-{_case_id(*case)}-{dt}" for case in CASES[world] for dt in DTYPES for kind in LAYOUT_KINDS]


def _attention_ids(world):
    return ([f"attention-{_case_id(*case)}" for case in CASES[world]]
            + [f"ulysses-c{c}-{_case_id(*case)}" for case in CASES[world] for c in CHUNKS]
            + [f"ulysses-fp8-{_case_id(*case)}" for case in CASES[world]]
            + [f"ring-{_case_id(*case)}" for case in CASES[world]]
            + [f"zero-copy-{_case_id(*case)}-{dt}" for case in CASES[world] for dt in DTYPES]
            + ["comm-timer-b1", "comm-timer-b2"])


# ---------------------------------------------------------------- single process: the reference

def test_shard_spec_pads_to_multiples_of_world():
    spec = ref.ShardSpec.create(13, 3, 4)
    assert (spec.padded_seq_len, spec.padded_heads, spec.local_seq_len, spec.local_heads) == (16, 4, 4, 1)
    assert [spec.real_tokens(r) for r in range(4)] == [4, 4, 4, 1]
    assert [ref.ShardSpec.create(5, 1, 4).real_tokens(r) for r in range(4)] == [2, 2, 1, 0]
    with pytest.raises(ValueError, match="seq_len"):
        ref.ShardSpec.create(0, 3, 4)
    with pytest.raises(ValueError, match="padded_heads"):
        ref.ShardSpec(13, 16, 3, 3, 4)


def test_shard_sequence_round_trips_and_pads_with_zeros():
    x = torch.randn(2, 13, 3, 4)
    shards = [ref.shard_sequence(x, 4, r) for r in range(4)]
    assert all(s.shape == (2, 4, 3, 4) for s in shards)
    assert torch.equal(shards[3][:, 1:], torch.zeros(2, 3, 3, 4))
    assert torch.equal(ref.unshard_sequence(shards, 13), x)
    with pytest.raises(ValueError, match="rank"):
        ref.shard_sequence(x, 4, 4)


def test_pad_heads_and_key_padding_mask():
    x = torch.randn(1, 2, 5, 3)
    padded = ref.pad_heads(x, 4)
    assert padded.shape == (1, 2, 8, 3) and torch.equal(padded[:, :, :5], x) and not padded[:, :, 5:].any()
    assert ref.key_padding_mask(ref.ShardSpec.create(13, 5, 4)).tolist() == [True] * 13 + [False] * 3


def test_references_are_inverse_layouts():
    # Rank r's head shard, for every r, side by side along heads is the padded full tensor, and
    # head_to_seq_reference of that gives back each rank's sequence shard.
    x = torch.randn(2, 13, 5, 4)
    world = 4
    full = torch.cat([ref.seq_to_head_reference(x, world, r) for r in range(world)], 2)
    assert full.shape == (2, 16, 8, 4) and torch.equal(full[:, :13, :5], x) and not full[:, 13:].any()
    for r in range(world):
        assert torch.equal(ref.head_to_seq_reference(full, world, r, 5), ref.shard_sequence(x, world, r))


def test_init_from_env_names_missing_variables(monkeypatch):
    from vkern.distributed import init_from_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.*torchrun"):
        init_from_env()


def test_ops_need_an_initialized_group():
    from vkern.distributed import seq_to_head

    with pytest.raises(RuntimeError, match="init_from_env"):
        seq_to_head(torch.zeros(1, 1, 1, 1), ref.ShardSpec.create(1, 1, 1))


# ---------------------------------------------------------------- the workers

def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)  # the same on every rank


def _non_contiguous(t):
    return t.transpose(1, 2).contiguous().transpose(1, 2)  # same values, sequence-major strides


def _expect_equal(got, want, what):
    got = got.cpu()
    if got.shape != want.shape or not torch.equal(got, want):
        diff = "shape" if got.shape != want.shape else f"{(got != want).sum().item()} elements"
        raise AssertionError(f"{what}: got {tuple(got.shape)}, want {tuple(want.shape)}; differ in {diff}")


def _layout_case(kind, B, S, H, D, dtype, sp, seed, device):
    from vkern.distributed import ShardSpec, head_to_seq, seq_to_head, seq_to_head_qkv

    world, rank = sp.world, sp.rank
    spec = ShardSpec.create(S, H, world)
    if kind == "head_to_seq":
        # Arbitrary values in the padded heads and tokens too: the padded heads must be dropped.
        full_y = _random((B, spec.padded_seq_len, spec.padded_heads, D), dtype, seed)
        mine = full_y[:, :, rank * spec.local_heads:(rank + 1) * spec.local_heads]
        with CountCalls() as count:
            got = head_to_seq(mine.to(device), spec, sp)
        _expect_equal(got, ref.head_to_seq_reference(full_y, world, rank, H), "head_to_seq")
    elif kind in ("qkv", "qkv_fp8"):
        fp8 = kind == "qkv_fp8"
        full = [_random((B, S, H, D), dtype, seed + i) for i in range(3)]
        shards = [_non_contiguous(ref.shard_sequence(t, world, rank)).to(device) for t in full]
        with CountCalls() as count:
            got = seq_to_head_qkv(*shards, spec, sp, fp8=fp8)
        for name, g, t in zip("qkv", got, full):
            if fp8:  # per token and head, so exactly the full tensor's round trip, laid out
                t = fp8_reference.fp8_dequantize(*fp8_reference.fp8_quantize(t, "row"), dtype)
            _expect_equal(g, ref.seq_to_head_reference(t, world, rank), f"seq_to_head_qkv {name}")
    else:
        full = _random((B, S, H, D), dtype, seed)
        x = ref.shard_sequence(full, world, rank).to(device)
        with CountCalls() as count:
            got = seq_to_head(x, spec, sp)
        if kind == "round_trip":
            # Every collective before any comparison: a rank that failed early would leave the
            # others waiting in the next one.
            back = head_to_seq(got, spec, sp, check=False)
            real = spec.real_tokens(rank)
            _expect_equal(back[:, :real], x[:, :real].cpu(), "head_to_seq(seq_to_head(x)) on real tokens")
        _expect_equal(got, ref.seq_to_head_reference(full, world, rank), "seq_to_head")
    if count.calls != 1:
        raise AssertionError(f"{kind}: {count.calls} all_to_all_single calls, expected 1")


def _attention_case(B, S, H, D, sp, seed, device):
    """Head-sharded SDPA with the key padding mask, gathered back, vs SDPA on the full sequence.
    Both are fp32 SDPA over the same real keys (a masked key adds an exact zero to the softmax), so
    they differ only in reduction order and blocking. The house rule (tests/tolerance.py): error
    against a float64 oracle at most 2x that of single-process fp32 SDPA, plus a 1e-6 floor for a
    lucky reference; fp32 rounding over S <= 16 keys and D <= 16 terms is ~1e-6 on unit data."""
    from vkern.distributed import ShardSpec, head_to_seq, key_padding_mask, seq_to_head_qkv

    world, rank = sp.world, sp.rank
    spec = ShardSpec.create(S, H, world)
    q, k, v = (_random((B, S, H, D), torch.float32, seed + i) for i in range(3))
    shards = [ref.shard_sequence(t, world, rank).to(device) for t in (q, k, v)]
    qh, kh, vh = (t.transpose(1, 2) for t in seq_to_head_qkv(*shards, spec, sp))  # [B, H_local, S_padded, D]
    mask = key_padding_mask(spec, device=device).view(1, 1, 1, -1)
    out = head_to_seq(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2), spec, sp)
    real = spec.real_tokens(rank)
    # PyTorch's own fp32 error on this device is the yardstick.
    single = F.scaled_dot_product_attention(*(t.to(device).transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    oracle = attention_math(q, k, v)
    if not torch.isfinite(out).all():  # padded queries too: they still see every real key
        raise AssertionError("sharded attention: non-finite output")
    if real == 0:  # this rank holds only padding
        return
    mine = slice(rank * spec.local_seq_len, rank * spec.local_seq_len + real)
    assert_within_torch_error(out[:, :real].cpu(), oracle[:, mine], single[:, mine].cpu(), what="sharded attention")


def _sdpa(q, k, v):
    """[B, S, h, D] attention through torch SDPA (the local attention the sharded paths call)."""
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def _sharded_inputs(B, S, H, D, sp, seed, device, dtype=torch.float32):
    full = [_random((B, S, H, D), dtype, seed + i) for i in range(3)]
    return full, [ref.shard_sequence(t, sp.world, sp.rank).to(device) for t in full]


def _mine(spec, rank):
    real = spec.real_tokens(rank)
    return real, slice(rank * spec.local_seq_len, rank * spec.local_seq_len + real)


def _ulysses_case(chunks, fp8, B, S, H, D, sp, seed, device):
    """ulysses_attention (q/k/v exchange, attention per head group, output exchange; several groups
    overlap) against the float64 oracle. fp32: within 2x single-process fp32 SDPA's error (heads
    are independent, so grouping changes nothing but blocking). fp8 payload: bf16 inputs, SQNR
    against the oracle above FP8_ATTENTION_SQNR_DB."""
    from vkern.distributed import ShardSpec, head_chunks, ulysses_attention

    spec = ShardSpec.create(S, H, sp.world)
    dtype = torch.bfloat16 if fp8 else torch.float32
    full, shards = _sharded_inputs(B, S, H, D, sp, seed, device, dtype)
    seen = []

    def attend(q, k, v):
        seen.append((q.shape[2], k.shape[1]))
        return _sdpa(q, k, v)
    with CountCalls() as count:
        out = ulysses_attention(*shards, spec, attend, sp, chunks=chunks, fp8=fp8)
    groups = len(head_chunks(spec.local_heads, chunks))
    if count.calls != 2 * groups or [h for h, _ in seen] != [b - a for a, b in head_chunks(spec.local_heads, chunks)]:
        raise AssertionError(f"{count.calls} all-to-alls and head groups {seen}; expected {2 * groups} and "
                             f"{head_chunks(spec.local_heads, chunks)}")
    if any(kv != S for _, kv in seen):
        raise AssertionError(f"attend saw {seen} keys; expected the {S} real ones (padding sliced off)")
    real, mine = _mine(spec, sp.rank)
    if out.shape != (B, spec.local_seq_len, H, D) or not torch.isfinite(out).all():
        raise AssertionError(f"output {tuple(out.shape)} or non-finite")
    if real == 0:  # this rank holds only padding (its outputs were checked finite above)
        return
    oracle = attention_math(*full)[:, mine]
    if not fp8:
        single = _sdpa(*(t.to(device) for t in full))[:, mine].cpu()
        assert_within_torch_error(out[:, :real].cpu(), oracle, single, what="ulysses_attention")
        return
    rounded = [fp8_reference.fp8_dequantize(*fp8_reference.fp8_quantize(t, "row"), dtype) for t in full]
    single = _sdpa(*(t.to(device) for t in rounded))[:, mine].cpu()
    assert_within_torch_error(out[:, :real].cpu(), attention_math(*rounded)[:, mine], single,
                              what="ulysses_attention with the fp8 payload vs attention on the e4m3 round trip")
    err = (out[:, :real].cpu().double() - oracle).norm() / oracle.norm()
    sqnr = -20 * torch.log10(err).item()
    if sqnr < FP8_ATTENTION_SQNR_DB:
        raise AssertionError(f"fp8 payload: SQNR {sqnr:.1f} dB < {FP8_ATTENTION_SQNR_DB} dB")


def _ring_case(B, S, H, D, sp, seed, device):
    """ring_attention over the whole group (block i = rank i's tokens; padded keys counted out)
    against the float64 oracle: within 2x single-process fp32 SDPA's error; the merge is exact math."""
    from vkern.distributed import ShardSpec
    from vkern.distributed.ring import ring_attention

    spec = ShardSpec.create(S, H, sp.world)
    full, shards = _sharded_inputs(B, S, H, D, sp, seed, device)
    with CountCalls() as count:
        out = ring_attention(*shards, sp, [spec.real_tokens(r) for r in range(sp.world)])
    real, mine = _mine(spec, sp.rank)
    if count.calls or out.shape != shards[0].shape or not torch.isfinite(out).all():
        raise AssertionError(f"{count.calls} all-to-alls (expected none), output {tuple(out.shape)} or non-finite")
    if real == 0:
        return
    single = _sdpa(*(t.to(device) for t in full))[:, mine].cpu()
    assert_within_torch_error(out[:, :real].cpu(), attention_math(*full)[:, mine], single, what="ring attention")


def _contiguous_attend(q, k, v):
    """The local attention as the Wan processor runs it (vkern.ops.attention: a contiguous output)."""
    from vkern import ops

    return ops.attention(q, k, v)


def _timer_case(B, sp, seed, device):
    """CommTimer records a pack/unpack span (and its bytes) for each copy that runs, and only those:
    ulysses_attention packs q/k/v by copying (one span per head group); the received q/k/v are views
    at B = 1 and copies at B > 1; the attention's output is the send buffer at B = 1 and copied at
    B > 1; the output is always unpacked by one copy. Nothing is recorded with no timer active."""
    from vkern.distributed import ShardSpec, head_chunks, ulysses_attention
    from vkern.distributed.timing import CommTimer

    S, H, D = 13, 5, 8
    spec = ShardSpec.create(S, H, sp.world)
    _, shards = _sharded_inputs(B, S, H, D, sp, seed, device)
    ulysses_attention(*shards, spec, _contiguous_attend, sp)  # no timer: must not fail or record
    with CommTimer() as timer:
        ulysses_attention(*shards, spec, _contiguous_attend, sp, chunks=2)
    groups = len(head_chunks(spec.local_heads, 2))
    el = shards[0].element_size()
    qkv_send = 3 * B * spec.local_seq_len * spec.padded_heads * D * el  # all groups together
    copies_out = B > 1
    want_counts = {"all_to_all": 2 * groups, "pack": groups * (1 + copies_out), "unpack": groups * (1 + (B > 1))}
    want_bytes = {"pack": qkv_send + copies_out * B * spec.padded_seq_len * spec.local_heads * D * el,
                  "unpack": B * spec.local_seq_len * H * D * el
                  + (B > 1) * 3 * B * spec.padded_seq_len * spec.local_heads * D * el}
    ms = timer.ms()
    if (any(timer.counts[k] != n for k, n in want_counts.items()) or any(v < 0 for v in ms.values())
            or any(timer.bytes[k] != n for k, n in want_bytes.items())):
        raise AssertionError(f"CommTimer counts {timer.counts}, bytes {timer.bytes}, ms {ms}; expected "
                             f"{want_counts}, {want_bytes}")


def _rope_tables(S, D, seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand((1, S, 1, D // 2), generator=g, dtype=torch.float64).repeat_interleave(2, -1) * 6.3
    return theta.cos(), theta.sin()


def _zero_copy_case(B, S, H, D, dtype, sp, seed, device):
    """QKVSendBuffer + ulysses_attention_packed, q/k written in place by vkern.ops.qk_norm_rope(out=)
    and v copied in, against ulysses_attention on the prologue's own outputs (the copying path): the
    same bits. And the copies really are gone: at B = 1 the attention reads q/k/v inside the q/k/v
    receive buffer and its output is the output send buffer; at B > 1 (the fallback) it reads copies."""
    from vkern import ops
    from vkern.distributed import QKVSendBuffer, ShardSpec, ulysses_attention
    from vkern.distributed.ulysses import ulysses_attention_packed

    spec = ShardSpec.create(S, H, sp.world)
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn((B, S, H * D), generator=g).to(dtype) for _ in range(3)]  # q/k/v projections
    w = [(1 + 0.1 * torch.randn(H * D, generator=g)).to(dtype) for _ in range(2)]
    cos, sin = (ref.shard_sequence(t, sp.world, sp.rank).contiguous().to(device) for t in _rope_tables(S, D, seed))
    xq, xk, xv = (ref.shard_sequence(t, sp.world, sp.rank).to(device) for t in x)
    wq, wk = (t.to(device) for t in w)
    seen = []

    def attend(q, k, v):
        o = _contiguous_attend(q, k, v)
        seen.append(((q.data_ptr(), k.data_ptr(), v.data_ptr()), o.data_ptr()))
        return o
    q = ops.qk_norm_rope(xq, wq, 1e-6, H, cos, sin)
    k = ops.qk_norm_rope(xk, wk, 1e-6, H, cos, sin)
    want = ulysses_attention(q, k, xv.unflatten(2, (H, D)), spec, attend, sp)
    send = QKVSendBuffer(spec, B, D, dtype, device, sp)
    send.buffer.fill_(float("nan"))  # every element must be written (padded heads with zeros)
    with CountCalls() as count:
        ops.qk_norm_rope(xq, wq, 1e-6, H, cos, sin, out=send.slot(0))
        ops.qk_norm_rope(xk, wk, 1e-6, H, cos, sin, out=send.slot(1))
        send.fill(2, xv.unflatten(2, (H, D)))
        if send.buffer.isnan().any():
            raise AssertionError("elements of the send buffer (padded heads?) were left unwritten")
        got = ulysses_attention_packed(send, attend, check=True)
    _expect_equal(got, want.cpu(), "zero-copy ulysses_attention_packed vs the copying ulysses_attention")
    (recv, recv_bytes), (send_ptr, _) = count.buffers[0]
    inputs, out_ptr = seen[-1]
    inside = [recv <= p < recv + recv_bytes for p in inputs]
    if send_ptr != send.buffer.data_ptr():
        raise AssertionError("the q/k/v all-to-all did not send the QKVSendBuffer itself")
    # (With one token per rank the received sequence is a view at any B.)
    in_place, sent_as_is = B == 1 or spec.local_seq_len == 1, B == 1
    if inside != [in_place] * 3 or (count.buffers[1][1][0] == out_ptr) != sent_as_is:
        raise AssertionError(f"B={B}: q/k/v inside the receive buffer {inside} (expected {in_place}), output "
                             f"sent as is {count.buffers[1][1][0] == out_ptr} (expected {sent_as_is})")

    # Split exchanges (SPConfig.qkv_exchange="v-first"): v written by QKVSendBuffer.linear into its own buffer and sent
    # first, q/k in a second buffer; the output as HeadBlocks. Reassembled from local() + remote() it is
    # the gathered output bit for bit (the same attention on the same q/k/v), and the remote blocks are
    # read inside the output's receive buffer.
    x_in = ref.shard_sequence(torch.randn((B, S, 3 * D), generator=g).to(dtype), sp.world, sp.rank).to(device)
    w_v = (torch.randn((H * D, 3 * D), generator=g) / D).to(dtype).to(device)
    b_v = torch.randn(H * D, generator=g).to(dtype).to(device)
    v_send = QKVSendBuffer(spec, B, D, dtype, device, sp, n=1)
    v_send.buffer.fill_(float("nan"))
    v_send.linear(0, x_in, w_v, b_v)
    v_written = v_send.slot(0).flatten(2, 3)[:, :, :H].clone()
    v_err = rel_l2(v_written.float().cpu(), F.linear(x_in, w_v, b_v).unflatten(2, (H, D)).float().cpu())
    if v_send.buffer.isnan().any() or v_err > (1e-6 if dtype == torch.float32 else 8e-3):
        raise AssertionError(f"QKVSendBuffer.linear: unwritten elements or rel L2 {v_err:.3g} vs F.linear")
    qk_send = QKVSendBuffer(spec, B, D, dtype, device, sp, n=2)
    with CountCalls() as count:
        v_exchange = v_send.start()
        ops.qk_norm_rope(xq, wq, 1e-6, H, cos, sin, out=qk_send.slot(0))
        ops.qk_norm_rope(xk, wk, 1e-6, H, cos, sin, out=qk_send.slot(1))
        blocks = ulysses_attention_packed((qk_send, v_exchange), attend, check=True, head_blocks=True)
        got = torch.full((B, spec.local_seq_len, H, D), float("nan"), dtype=dtype, device=device)
        remote = blocks.remote()
        for (lo, hi), rows in [blocks.local(), *remote]:
            got[:, :, lo:hi] = rows.view(B, spec.local_seq_len, hi - lo, D)
    want = ulysses_attention(q, k, v_written, spec, attend, sp)
    _expect_equal(got, want.cpu(), "HeadBlocks local() + remote() vs ulysses_attention")
    (recv, recv_bytes), _ = count.buffers[-1]
    if count.calls != 3 or any(not recv <= r.data_ptr() < recv + recv_bytes for _, r in remote):
        raise AssertionError(f"{count.calls} all-to-alls (expected 3: v, q/k, output), or a remote block "
                             "outside the output's receive buffer")


def _error_case(name, sp, device):
    """Ranks that disagree must all raise, not hang. Only for world 2."""
    from vkern.distributed import ShardSpec, head_to_seq, seq_to_head

    rank = sp.rank
    spec = ShardSpec.create(13, 5, 2)
    x = torch.ones(2, spec.local_seq_len, 5, 8, device=device)
    if name == "seq_len_mismatch":
        mine = ShardSpec.create(13 - rank, 5, 2)  # 13 tokens on rank 0, 12 on rank 1
        expect_error(lambda: seq_to_head(x[:, :mine.local_seq_len], mine, sp), ValueError, "disagree on seq_len",
                      "rank 0: 13", "rank 1: 12")
    elif name == "dtype_mismatch":
        expect_error(lambda: seq_to_head(x.to(torch.bfloat16) if rank else x, spec, sp), ValueError,
                      "disagree on dtype", "rank 0: float32", "rank 1: bfloat16")
    elif name == "op_mismatch":
        y = torch.ones(2, spec.padded_seq_len, spec.local_heads, 8, device=device)
        expect_error(lambda: head_to_seq(y, spec, sp) if rank else seq_to_head(x, spec, sp), ValueError,
                      "disagree on op", "rank 0: seq_to_head", "rank 1: head_to_seq")
    elif name == "bad_shape_one_rank":
        # Only rank 1's input is wrong; rank 0 must hear of it instead of waiting in the all-to-all.
        expected = ("x: expected [B, S_local=7", "got (2, 6, 5, 8)") if rank else ("rank(s) [1] rejected",)
        expect_error(lambda: seq_to_head(x[:, :6] if rank else x, spec, sp), ValueError, *expected)
    elif name == "wrong_world":
        expect_error(lambda: seq_to_head(x, ShardSpec.create(13, 5, 3), sp), ValueError, "spec: made for world=3")
    elif name == "works_after_errors":
        full = torch.arange(2 * 13 * 5 * 8, dtype=torch.float32).view(2, 13, 5, 8)
        got = seq_to_head(ref.shard_sequence(full, 2, rank).to(device), spec, sp)
        _expect_equal(got, ref.seq_to_head_reference(full, 2, rank), "seq_to_head after the errors")


def _layout_cases(sp, seed, results):
    """This module's cases, run by every rank; fills results {case: failure or None}."""
    world, device = sp.world, sp.device
    for i, (B, S, H, D) in enumerate(CASES[world]):
        for dt_name, dtype in DTYPES.items():
            for kind in LAYOUT_KINDS:
                case = f"{kind}-{_case_id(B, S, H, D)}-{dt_name}"
                results[case] = run(_layout_case, kind, B, S, H, D, dtype, sp, seed + 10 * i, device)
        cid = _case_id(B, S, H, D)
        results[f"attention-{cid}"] = run(_attention_case, B, S, H, D, sp, seed + 10 * i, device)
        for c in CHUNKS:
            results[f"ulysses-c{c}-{cid}"] = run(_ulysses_case, c, False, B, S, H, D, sp, seed + 10 * i, device)
        results[f"ulysses-fp8-{cid}"] = run(_ulysses_case, 1, True, B, S, H, D, sp, seed + 10 * i, device)
        results[f"ring-{cid}"] = run(_ring_case, B, S, H, D, sp, seed + 10 * i, device)
        for dt_name, dtype in DTYPES.items():
            results[f"zero-copy-{cid}-{dt_name}"] = run(_zero_copy_case, B, S, H, D, dtype, sp, seed + 10 * i, device)
    for B in (1, 2):
        results[f"comm-timer-b{B}"] = run(_timer_case, B, sp, seed, device)
    if world == 2:
        for name in ERROR_CASES:
            results[f"error-{name}"] = run(_error_case, name, sp, device)


gloo_results = results_fixture(_layout_cases, preload=[__name__])


@pytest.mark.parametrize("case", _layout_ids(2) + _attention_ids(2) + [f"error-{n}" for n in ERROR_CASES])
def test_gloo_world2(gloo_results, case):
    check(gloo_results(2), case)


@pytest.mark.parametrize("case", _layout_ids(4) + _attention_ids(4))
def test_gloo_world4(gloo_results, case):
    check(gloo_results(4), case)


@pytest.mark.parametrize("case", _layout_ids(8) + _attention_ids(8))
def test_gloo_world8(gloo_results, case):
    check(gloo_results(8), case)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 8])
def test_nccl(world, tmp_path_factory):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs for NCCL")
    check_all(spawn(world, "nccl", tmp_path_factory, _layout_cases, preload=[__name__]))
