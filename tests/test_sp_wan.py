"""vkern.patch(model, PatchConfig(sp=SPConfig(...))): the Wan transformer (and Wan Animate's and Wan VACE's:
animate-fp32, vace-fp32; ChronoEdit's: chronoedit-fp32) run sequence-parallel on 2 and 4 gloo ranks against the same model unpatched in one process.

The ranks come from tests/sp_harness.py (one fork-server spawn per world size, every rank runs
every case, each test reads its case's verdict). Models: "tiny" (2 heads,
12 tokens: both divide 2 and 4) and "odd" (3 heads: head padding on 2 and 4 ranks; 45 tokens and
then 3 tokens: sequence padding, and on 4 ranks a rank holding only padding).

Tolerances. fp32: the sharded model does the same fp32 math on the same values, except that
attention runs over a padded key set (masked keys add exact zeros) and GEMMs/SDPA see other row
counts, so only summation order and blocking change: ~1e-7 relative per op, ~1e-6 after the
layers; 1e-5 bounds that with room and would catch any wrong token, head or RoPE position (those
are O(1) errors). bf16: 1e-2 relative to the unpatched bf16 model, and the house rule: error
against an fp32 copy of the model at most 2x the unpatched bf16 model's own error.
"""
import copy
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from .sp_harness import CountCalls, check, check_all, expect_error, results_fixture, run, spawn
from .tolerance import rel_l2

FAST_TIMEOUT = timedelta(seconds=5)  # the group of the rank-failure case: its hang ends this soon
MODELS = {  # name: (heads, latent shapes [B, C, F, H, W] run one after the other on one patched model)
    "tiny": (2, [(1, 16, 3, 4, 4)]),
    "odd": (3, [(2, 16, 3, 6, 10), (1, 16, 1, 2, 6)]),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MATCH_CASES = [f"match-{m}-{d}" for m in MODELS for d in DTYPES] + ["ti2v-odd-fp32", "undo-tiny", "animate-fp32",
                                                                     "vace-fp32", "chronoedit-fp32"]
# Wan Animate (tiny: 3 latent frames, so 3 motion frames): 12 tokens (4 a frame), then 45 (15 a frame) at B = 2, so
# ranks' slices start and end inside frames and, at 45 tokens, end in padding.
ANIMATE_SHAPES = [(1, 3, 4, 4), (2, 3, 6, 10)]  # [B, F, H, W]
# ChronoEdit: 2 latent frames (its own RoPE rows) at 8 tokens, then 30 at B = 2 (padding on 4 ranks), then 3 frames
CHRONOEDIT_SHAPES = [(1, 2, 4, 4), (2, 2, 6, 10), (1, 3, 6, 10)]  # [B, F, H, W]
# SPConfig variants, each run like match-*: name -> (model, dtype, SPConfig kwargs). ring_degree
# "world" means every rank is its own ring position (pure ring); 2 on 4 ranks is Ulysses x ring.
VARIANTS = {
    "overlap2-odd-fp32": ("odd", "fp32", dict(overlap_chunks=2)),
    "fp8-tiny-bf16": ("tiny", "bf16", dict(fp8_payload=True)),
    "fp8-odd-bf16": ("odd", "bf16", dict(fp8_payload=True, overlap_chunks=2)),
    "ring-tiny-fp32": ("tiny", "fp32", dict(ring_degree="world")),
    "ring-odd-fp32": ("odd", "fp32", dict(ring_degree="world")),
    "ring2-tiny-fp32": ("tiny", "fp32", dict(ring_degree=2)),
    "ring2-odd-fp32": ("odd", "fp32", dict(ring_degree=2)),
    "ring2-odd-bf16": ("odd", "bf16", dict(ring_degree=2)),
}
# Run only where the world size allows them (8 GPUs: Ulysses 2 x ring 4, and Ulysses 4 x ring 2 above).
WIDE_VARIANTS = {"ring4-odd-bf16": ("odd", "bf16", dict(ring_degree=4))}
# fp8 payload at model output: the patched bf16 model's error against the fp32 model must stay
# within 2x the unpatched bf16 model's own error plus the payload's share. The e4m3 round trip of
# q/k/v is ~2.7% rms per tensor (31.5 dB); through attention, to_out and the residual stream of
# the 2-layer tiny models it measured 0.3-1% at the output. Bound: rel L2 <= 2x torch's + 0.03, and
# cosine >= 0.999 against the unpatched bf16 model (a wrong scale or head gives ~0.1-1 rel L2).
FP8_MODEL_EXTRA = 0.03
FP8_MODEL_COS = 0.999
# SPConfig.zero_copy=True (q/k written into the send buffer by the prologue, v by to_v's GEMM, to_out split
# by heads over the receive buffer) with each SPConfig.qkv_exchange, against zero_copy=False (packed by copying):
# name -> (model, dtype, fused prologue, fp8 weights). "odd" runs B = 2 (received q/k/v copied) and B = 1
# (used in place), both with head padding and uneven token counts. With plain nn.Linear to_v/to_out the
# products are grouped by head blocks, so fp32 is held to 1e-5 and bf16 to the house rule; with Fp8Linear
# to_v/to_out (applied whole, copied in / fed the gathered output) the bits must be the copying path's.
# (bf16 with B = 1 and B = 2 and head padding: tests/test_sequence_parallel.py zero-copy-*; the
# interpreted bf16 prologue is too slow on the CI CPU for the "odd" model twice.)
ZERO_COPY_CASES = {
    "zero-copy-odd-fp32": ("odd", "fp32", True, None),
    "zero-copy-odd-fp32-lean": ("odd", "fp32", False, None),
    "zero-copy-odd-fp32-fp8-storage": ("odd", "fp32", False, "storage"),
    "zero-copy-tiny-bf16": ("tiny", "bf16", True, None),
}
ERROR_CASES = ["config-mismatch", "sp-config-mismatch", "bad-ring-degree", "model-mismatch", "weights-mismatch",
               "input-mismatch", "one-rank-bad-input", "rank-raises"]  # rank-raises last: it breaks its own group


def _build(name, dtype, device, seed=0):
    from diffusers import WanTransformer3DModel

    from vkern import models

    torch.manual_seed(seed)  # the same weights on every rank
    config = {**models.WAN_TRANSFORMERS["tiny"], "num_attention_heads": MODELS[name][0]}
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    return models.cast_like_from_pretrained(model, dtype)


def _inputs(shape, dtype, device, seed=1, per_token_timestep=False):
    g = torch.Generator().manual_seed(seed)
    B, _, F, H, W = shape
    tokens = F * (H // 2) * (W // 2)
    timestep = torch.randint(0, 1000, (B, tokens) if per_token_timestep else (B,), generator=g)
    return dict(hidden_states=torch.randn(shape, generator=g).to(device, dtype), timestep=timestep.to(device),
                encoder_hidden_states=torch.randn(B, 16, 64, generator=g).to(device, dtype))


def _forward(model, inputs):
    with torch.inference_mode():
        return model(**inputs).sample


def _patch(model, sp, sp_kwargs=None, **config):
    import vkern
    from vkern.distributed import SPConfig

    return vkern.patch(model, vkern.PatchConfig(sp=SPConfig(group=sp, **(sp_kwargs or {})), **config))


def _unpatched(model):
    """True when nothing of vkern is left on model: original processors, no hooks, no mark."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from vkern.patch import patched_handle

    hooks = [model._forward_pre_hooks, model._forward_hooks, model.rope._forward_hooks,
             model.blocks[0]._forward_pre_hooks, model.proj_out._forward_hooks]
    return (patched_handle(model) is None and not any(hooks)
            and all(type(b.attn1.processor) is WanAttnProcessor for b in model.blocks))


# ---------------------------------------------------------------- cases (run on every rank)

# The SPConfig variants test the sharding, not the other kernels (tested with sp in match-*): without
# the fused block/prologue kernels they skip the Triton interpreter, which is slow on a CI CPU.
LEAN = dict(fused_block=False, fused_qk_norm_rope=False)


def _match_case(name, dt, sp, per_token_timestep=False, sp_kwargs=None):
    from vkern.distributed import ShardSpec, head_chunks

    sp_kwargs = dict(sp_kwargs or {})
    if sp_kwargs.get("ring_degree") == "world":
        sp_kwargs["ring_degree"] = sp.world
    ring_degree, fp8 = sp_kwargs.get("ring_degree", 1), sp_kwargs.get("fp8_payload", False)
    dtype, device = DTYPES[dt], sp.device
    model = _build(name, dtype, device)
    oracle_model = copy.deepcopy(model).float()  # the bf16 weights, computed in fp32
    shapes = MODELS[name][1]
    inputs = [_inputs(s, dtype, device, per_token_timestep=per_token_timestep) for s in shapes]
    want = [_forward(model, i) for i in inputs]  # one process, the whole sequence
    _patch(model, sp, sp_kwargs=sp_kwargs, **(LEAN if sp_kwargs else {}))
    heads, layers = model.config.num_attention_heads, model.config.num_layers
    if ring_degree == 1:
        groups = len(head_chunks(ShardSpec.create(1, heads, sp.world).local_heads, sp_kwargs.get("overlap_chunks", 1)))
        expected_calls = 2 * groups * layers
        if groups == 1 and not fp8 and sp_kwargs.get("zero_copy", True) and sp_kwargs.get("qkv_exchange") != "one":
            expected_calls += layers  # the zero-copy path's early exchange (SPConfig.qkv_exchange)
    else:  # Ulysses inside groups of world / ring_degree ranks: none when that is 1
        expected_calls = 0 if ring_degree == sp.world else 2 * layers
    for shape, inp, w in zip(shapes, inputs, want):
        with CountCalls() as count:
            got = _forward(model, inp)
        if count.calls != expected_calls:
            raise AssertionError(f"{shape}: {count.calls} all-to-alls, expected {expected_calls} "
                                 f"({layers} layers, {sp_kwargs})")
        if got.shape != w.shape or not torch.isfinite(got).all():
            raise AssertionError(f"{shape}: output {tuple(got.shape)} (want {tuple(w.shape)}) or non-finite")
        err = rel_l2(got.cpu(), w.cpu())
        if dtype == torch.float32:
            if err > 1e-5:
                raise AssertionError(f"{shape}: rel L2 {err:.3g} vs the unpatched model > 1e-5")
            continue
        oracle = _forward(oracle_model, {k: v.float() if v.is_floating_point() else v for k, v in inp.items()})
        mine, torch_own = rel_l2(got.float().cpu(), oracle.cpu()), rel_l2(w.float().cpu(), oracle.cpu())
        if fp8:
            cos = torch.nn.functional.cosine_similarity(got.double().flatten(), w.double().flatten(), 0).item()
            if mine > 2 * torch_own + FP8_MODEL_EXTRA or cos < FP8_MODEL_COS:
                raise AssertionError(f"{shape}: fp8 payload: rel L2 vs fp32 {mine:.3g} (bound 2 x {torch_own:.3g} + "
                                     f"{FP8_MODEL_EXTRA}), cosine vs unpatched bf16 {cos:.5f} (floor {FP8_MODEL_COS})")
            continue
        if err > 1e-2 or mine > 2 * torch_own:
            raise AssertionError(f"{shape}: rel L2 {err:.3g} vs unpatched bf16 (bound 1e-2); vs fp32 {mine:.3g}, "
                                 f"more than 2x the unpatched model's {torch_own:.3g}?")


def _zero_copy_case(name, dt, fused, fp8, sp):
    """The zero-copy path (each qkv_exchange) against the copying path: the same output within the SP
    tolerances (bit for bit where to_v/to_out are applied whole), the expected number of exchanges, and
    CommTimer's pack/unpack bytes are exactly the copies each path runs per layer. Copying path: pack,
    the q/k/v send buffer (3 tensors) plus the attention output at B > 1; unpack, the output (to_out's
    input) plus q/k/v at B > 1 (with more than one token per rank). Zero-copy: pack, q/k only with the
    reference prologue, v only when to_v is not a plain nn.Linear, plus the output at B > 1; unpack,
    the output only when to_out is not a plain nn.Linear (else this rank's own head block at B > 1),
    plus q/k/v at B > 1."""
    from vkern.distributed import CommTimer, ShardSpec

    dtype, device = DTYPES[dt], sp.device
    model = _build(name, dtype, device)
    inputs = [_inputs(shape, dtype, device) for shape in MODELS[name][1]]
    unpatched = [_forward(model, inp) for inp in inputs]
    oracle_model = copy.deepcopy(model).float()
    config = dict(fused_qk_norm_rope=fused, fused_block=False, fp8=fp8)
    heads, layers = model.config.num_attention_heads, model.config.num_layers
    D, el = model.config.attention_head_dim, dtype.itemsize
    variants = {"copying": dict(zero_copy=False), "zero-copy": dict(), "zero-copy-v-first": dict(qkv_exchange="v-first"),
                "zero-copy-one-exchange": dict(qkv_exchange="one")}
    runs = {}
    for label, kwargs in variants.items():
        handle = _patch(model, sp, sp_kwargs=kwargs, **config)
        runs[label] = []
        for inp in inputs:
            with CommTimer() as timer, CountCalls() as count:
                out = _forward(model, inp)
            runs[label].append((out, dict(timer.bytes), count.calls))
        handle.undo()
    for i, (shape, inp) in enumerate(zip(MODELS[name][1], inputs)):
        want = runs["copying"][i][0]
        B, _, F, H, W = shape
        spec = ShardSpec.create(F * (H // 2) * (W // 2), heads, sp.world)
        tensor = B * spec.local_seq_len * spec.padded_heads * D * el  # one of q/k/v in the send buffer
        out_pack = (B > 1) * B * spec.padded_seq_len * spec.local_heads * D * el
        qkv_unpack = 3 * B * spec.padded_seq_len * spec.local_heads * D * el if B > 1 and spec.local_seq_len > 1 else 0
        own_heads = min(max(heads - sp.rank * spec.local_heads, 0), spec.local_heads)
        own_block = (B > 1) * B * spec.local_seq_len * own_heads * D * el
        gathered = B * spec.local_seq_len * heads * D * el
        for label, (got, got_bytes, calls) in ((k, v[i]) for k, v in runs.items()):
            if label == "copying":
                want_bytes = {"pack": layers * (3 * tensor + out_pack), "unpack": layers * (gathered + qkv_unpack)}
                want_calls = 2 * layers
            else:
                packed = (0 if fused else 2) + (1 if fp8 else 0)  # q/k by the reference prologue, v when not plain
                want_bytes = {"pack": layers * (packed * tensor + out_pack),
                              "unpack": layers * ((gathered if fp8 else own_block) + qkv_unpack)}
                want_calls = (2 if label == "zero-copy-one-exchange" else 3) * layers
            if {k: got_bytes[k] for k in want_bytes} != want_bytes or calls != want_calls:
                raise AssertionError(f"{shape} {label}: CommTimer bytes {got_bytes}, expected {want_bytes}; "
                                     f"{calls} all-to-alls, expected {want_calls}")
            if label == "copying":
                continue
            if fp8:
                if not torch.equal(got, want):
                    raise AssertionError(f"{shape} {label}: output differs from the copying path's "
                                         f"(rel L2 {rel_l2(got.float().cpu(), want.float().cpu()):.3g})")
                continue
            err = rel_l2(got.float().cpu(), want.float().cpu())
            if dtype == torch.float32:
                if err > 1e-5:
                    raise AssertionError(f"{shape} {label}: rel L2 {err:.3g} vs the copying path > 1e-5")
                continue
            oracle = _forward(oracle_model, {k: v.float() if v.is_floating_point() else v for k, v in inp.items()})
            mine, torch_own = rel_l2(got.float().cpu(), oracle.cpu()), rel_l2(unpatched[i].float().cpu(), oracle.cpu())
            if err > 1e-2 or mine > 2 * torch_own:
                raise AssertionError(f"{shape} {label}: rel L2 {err:.3g} vs the copying path (bound 1e-2); vs fp32 "
                                     f"{mine:.3g}, more than 2x the unpatched model's {torch_own:.3g}?")


def _check_fp32_outputs(label, model, shapes, inputs, want):
    """The patched model's output for each of inputs within 1e-5 of want (the unpatched model's, fp32)."""
    for shape, inp, w in zip(shapes, inputs, want):
        got = _forward(model, inp)
        err = rel_l2(got.cpu(), w.cpu()) if got.shape == w.shape else None
        if err is None or err > 1e-5:
            raise AssertionError(f"{label} {shape}: output {tuple(got.shape)} (want {tuple(w.shape)}), rel L2 {err} "
                                 f"vs unpatched > 1e-5")


def _animate_inputs(shape, device, seed=1):
    from vkern import models

    B, F, H, W = shape
    g = torch.Generator().manual_seed(seed)
    cfg = models.WAN_ANIMATE_TRANSFORMERS["tiny"]
    face = cfg["motion_encoder_size"]
    randn = lambda *size: torch.randn(size, generator=g).to(device)  # noqa: E731
    return dict(hidden_states=randn(B, 2 * cfg["latent_channels"] + 4, F, H, W),
                timestep=torch.tensor([500] * B, device=device),
                encoder_hidden_states=randn(B, 16, cfg["text_dim"]), encoder_hidden_states_image=randn(B, 5, 32),
                pose_hidden_states=randn(B, cfg["latent_channels"], F - 1, H, W),
                face_pixel_values=randn(B, 3, 4 * (F - 1), face, face))  # 4 face frames a latent frame


def _animate_case(sp):
    """Wan Animate sequence-parallel (default PatchConfig, fp32) against the unpatched model: every face adapter
    runs on this rank's tokens per frame (a wrong frame for a token is an O(1) error); ranks given different face
    videos are refused before any exchange; undo() gives diffusers' processors back."""
    from diffusers.models.transformers import transformer_wan_animate as animate

    from vkern import models

    torch.manual_seed(0)
    model = models.build_wan_animate_transformer("tiny", torch.float32, sp.device)
    inputs = [_animate_inputs(shape, sp.device) for shape in ANIMATE_SHAPES]
    want = [_forward(model, i) for i in inputs]
    handle = _patch(model, sp)
    _check_fp32_outputs("Animate", model, ANIMATE_SHAPES, inputs, want)
    other = _animate_inputs((1, 3, 4, 6), sp.device)  # a shape not agreed on yet (check_inputs="per-shape")
    other["face_pixel_values"] = other["face_pixel_values"] + sp.rank  # rank 1's face video differs
    with CountCalls() as count:
        expect_error(lambda: _forward(model, other), ValueError, "WanAnimateTransformer3DModel forward",
                     "disagree on face_pixel_values checksum")
    if count.calls:
        raise AssertionError(f"{count.calls} all-to-alls after a rejected input; expected none")
    handle.undo()
    if not all(type(a.processor) is animate.WanAnimateFaceBlockAttnProcessor for a in model.face_adapter):
        raise AssertionError("undo() left a face adapter processor of vkern's")


def _chronoedit_case(sp):
    """ChronoEdit sequence-parallel (default PatchConfig, fp32) against the unpatched model: its RoPE table's rows
    sharded with the tokens (a wrong position is an O(1) error at 2 frames, where its table is not Wan's); undo()
    gives diffusers' processors back."""
    from diffusers.models.transformers import transformer_chronoedit as chronoedit

    from vkern import models

    torch.manual_seed(0)
    model = models.build_chronoedit_transformer("tiny", torch.float32, sp.device)
    g = torch.Generator().manual_seed(1)
    inputs = [dict(hidden_states=torch.randn(B, 36, F, H, W, generator=g).to(sp.device),
                   timestep=torch.tensor([500] * B, device=sp.device),
                   encoder_hidden_states=torch.randn(B, 16, 64, generator=g).to(sp.device),
                   encoder_hidden_states_image=torch.randn(B, 5, 32, generator=g).to(sp.device))
              for B, F, H, W in CHRONOEDIT_SHAPES]
    want = [_forward(model, i) for i in inputs]
    handle = _patch(model, sp)
    _check_fp32_outputs("ChronoEdit", model, CHRONOEDIT_SHAPES, inputs, want)
    handle.undo()
    if not all(type(b.attn1.processor) is chronoedit.WanAttnProcessor for b in model.blocks):
        raise AssertionError("undo() left a self-attention processor of vkern's")


def _vace_case(sp):
    """Wan VACE sequence-parallel (fp32) against the unpatched model, with vkern's forward (hints where used: VACE
    blocks get the whole embedded input, the control states whole first and sharded after) and with diffusers'
    (fused_block=False: every VACE block first); ranks given different control videos are refused."""
    from vkern import models

    torch.manual_seed(0)
    model = models.build_wan_vace_transformer("tiny", torch.float32, sp.device)
    inputs = []
    for name in MODELS:  # 12 tokens, then 45 (B = 2) and 3: padding, and on 4 ranks a rank of padding only
        for shape in MODELS[name][1]:
            g = torch.Generator().manual_seed(2)
            control = torch.randn(shape[0], model.config.vace_in_channels, *shape[2:], generator=g)
            inputs.append({**_inputs(shape, torch.float32, sp.device), "control_hidden_states": control.to(sp.device)})
    want = [_forward(model, i) for i in inputs]
    for config in ({}, LEAN):
        handle = _patch(model, sp, **config)
        for inp, w in zip(inputs, want):
            got = _forward(model, inp)
            err = rel_l2(got.cpu(), w.cpu()) if got.shape == w.shape else None
            if err is None or err > 1e-5:
                raise AssertionError(f"VACE {tuple(inp['hidden_states'].shape)} {config}: output {tuple(got.shape)} "
                                     f"(want {tuple(w.shape)}), rel L2 {err} vs unpatched > 1e-5")
        handle.undo()
    _patch(model, sp)
    other = {**inputs[0], "hidden_states": inputs[0]["hidden_states"][..., :2]}  # a shape not agreed on yet
    other["control_hidden_states"] = inputs[0]["control_hidden_states"][..., :2] + sp.rank
    with CountCalls() as count:
        expect_error(lambda: _forward(model, other), ValueError, "WanVACETransformer3DModel forward",
                     "disagree on control_hidden_states checksum")
    if count.calls:
        raise AssertionError(f"{count.calls} all-to-alls after a rejected input; expected none")


def _check_modes_case(sp):
    """check_inputs: "per-shape" agrees on the first forward of each input signature only,
    "every-step" on every forward, "off" never (counted as all_gather_object calls)."""
    small, other = MODELS["odd"][1][1], MODELS["odd"][1][0]
    want = {"per-shape": [1, 0, 1, 0], "every-step": [1, 1, 1, 1], "off": [0, 0, 0, 0]}
    for mode, expected in want.items():
        model = _build("odd", torch.float32, sp.device)
        _patch(model, sp, sp_kwargs=dict(check_inputs=mode), **LEAN)
        calls = []
        for shape in (small, small, other, small if mode != "per-shape" else other):
            with CountCalls("all_gather_object") as count:
                _forward(model, _inputs(shape, torch.float32, sp.device))
            calls.append(count.calls)
        if calls != expected:
            raise AssertionError(f"check_inputs={mode!r}: {calls} input agreements over 4 forwards, "
                                 f"expected {expected}")


def _undo_case(sp):
    model = _build("tiny", torch.float32, sp.device)
    inputs = _inputs(MODELS["tiny"][1][0], torch.float32, sp.device)
    want = _forward(model, inputs)
    handle = _patch(model, sp)
    _forward(model, inputs)
    handle.undo()
    with CountCalls() as count:
        again = _forward(model, inputs)
    if not _unpatched(model) or count.calls or not torch.equal(again, want):
        raise AssertionError(f"after undo: unpatched={_unpatched(model)}, {count.calls} all-to-alls, "
                             f"bit-identical={torch.equal(again, want)}")


def _error_case(name, sp, fast_group):
    rank, device = sp.rank, sp.device
    tiny = MODELS["tiny"][1][0]
    if name in ("config-mismatch", "sp-config-mismatch", "bad-ring-degree", "model-mismatch", "weights-mismatch"):
        if name == "config-mismatch":
            model = _build("tiny", torch.float32, device)
            fn = lambda: _patch(model, sp, attention="reference" if rank else "auto")  # noqa: E731
            fragments = ("disagree on PatchConfig.attention", "rank 0: 'auto'", "rank 1: 'reference'")
        elif name == "sp-config-mismatch":
            model = _build("tiny", torch.float32, device)
            fn = lambda: _patch(model, sp, sp_kwargs=dict(fp8_payload=bool(rank)))  # noqa: E731
            fragments = ("disagree on SPConfig.fp8_payload", "rank 0: False", "rank 1: True")
        elif name == "bad-ring-degree":  # 3 does not divide 2 ranks; only rank 1 asks for it
            model = _build("tiny", torch.float32, device)
            fn = lambda: _patch(model, sp, sp_kwargs=dict(ring_degree=3 if rank else 1))  # noqa: E731
            fragments = (("SPConfig.ring_degree: expected a divisor of the world size 2, got 3",) if rank
                         else ("vkern.patch(sp=...)", "rank(s) [1] failed", "ring_degree"))
        elif name == "model-mismatch":
            model = _build("odd" if rank else "tiny", torch.float32, device)
            fn = lambda: _patch(model, sp)  # noqa: E731
            fragments = ("disagree on num_attention_heads", "rank 0: 2", "rank 1: 3")
        else:
            model = _build("tiny", torch.float32, device, seed=rank)  # an unseeded random model per rank
            fn = lambda: _patch(model, sp)  # noqa: E731
            fragments = ("disagree on weights checksum", "same weights")
        if name != "bad-ring-degree":
            fragments = ("vkern.patch(sp=...)", *fragments)
        expect_error(fn, ValueError, *fragments)
        if not _unpatched(model):
            raise AssertionError("a patch that failed left vkern's changes on the model")
    elif name == "input-mismatch":
        model = _build("tiny", torch.float32, device)
        _patch(model, sp)
        other = (1, 16, 3, 4, 6) if rank else tiny
        with CountCalls() as count:
            expect_error(lambda: _forward(model, _inputs(other, torch.float32, device)), ValueError,
                    "disagree on hidden_states shape", "rank 0: [1, 16, 3, 4, 4]", "rank 1: [1, 16, 3, 4, 6]")
            expect_error(lambda: _forward(model, _inputs(tiny, torch.float32, device, seed=1 + rank)), ValueError,
                    "disagree on hidden_states checksum", "seed the latents")
        if count.calls:
            raise AssertionError(f"{count.calls} all-to-alls after a rejected input; expected none")
        got = _forward(model, _inputs(tiny, torch.float32, device))  # the group still works
        want = _forward(_build("tiny", torch.float32, device), _inputs(tiny, torch.float32, device))
        if rel_l2(got.cpu(), want.cpu()) > 1e-5:
            raise AssertionError("the forward after the rejected inputs is wrong")
    elif name == "one-rank-bad-input":
        model = _build("tiny", torch.float32, device)
        _patch(model, sp)
        inputs = _inputs(tiny, torch.float32, device)
        if rank:
            inputs["hidden_states"] = inputs["hidden_states"][0]
        expected = ("hidden_states: expected a [B, C, F, H, W]",) if rank else ("rank(s) [1] failed", "[B, C, F, H, W]")
        expect_error(lambda: _forward(model, inputs), ValueError, *expected)
        grad = _inputs(tiny, torch.float32, device)
        model.requires_grad_(True)  # and gradients wanted on every rank: refused before any exchange
        expect_error(lambda: model(**grad), RuntimeError, "inference-only")
    elif name == "rank-raises":
        # Rank 1 fails between two collectives and stays alive (a process that exits closes its
        # sockets, which gloo peers notice at once); rank 0, waiting in the next collective, must
        # get an error from the group's timeout instead of hanging.
        model = _build("tiny", torch.float32, device)
        _patch(model, fast_group)

        def boom(*args):
            raise RuntimeError("injected failure")
        if rank:
            model.blocks[1].ffn.register_forward_pre_hook(boom)
        start = time.monotonic()
        error = expect_error(lambda: _forward(model, _inputs(tiny, torch.float32, device)), RuntimeError,
                        *(("injected failure",) if rank else ()))
        waited = time.monotonic() - start
        dist.barrier(group=sp.group)  # rank 1 waits here, alive, until rank 0 is out
        if not rank and waited > FAST_TIMEOUT.total_seconds() + 20:
            raise AssertionError(f"rank 0 waited {waited:.1f} s (timeout {FAST_TIMEOUT}): {error}")


def _sp_cases(sp, seed, results):
    """The cases of this module, for tests/test_sequence_parallel.py's _worker."""
    for case in MATCH_CASES:
        kind, name, *dt = case.split("-")
        if kind == "match":
            results[case] = run(_match_case, name, dt[0], sp)
        elif kind == "ti2v":
            results[case] = run(_match_case, name, dt[0], sp, True)
        elif kind == "animate":
            results[case] = run(_animate_case, sp)
        elif kind == "vace":
            results[case] = run(_vace_case, sp)
        elif kind == "chronoedit":
            results[case] = run(_chronoedit_case, sp)
        else:
            results[case] = run(_undo_case, sp)
    for case, (name, dt, kwargs) in VARIANTS.items():
        if case == "ring2-tiny-fp32" and sp.world == 2:
            continue  # the same as ring-tiny-fp32 on 2 ranks
        results[case] = run(_match_case, name, dt, sp, False, kwargs)
    if sp.world >= 8:
        for case, (name, dt, kwargs) in WIDE_VARIANTS.items():
            results[case] = run(_match_case, name, dt, sp, False, kwargs)
    results["check-modes"] = run(_check_modes_case, sp)
    for case, args in ZERO_COPY_CASES.items():
        results[case] = run(_zero_copy_case, *args, sp)
    if sp.world == 2:
        # The NCCL watchdog aborts a process whose collective timed out (that ends the job instead of
        # hanging it, but kills the worker before it can report): rank-raises runs on gloo only.
        gloo = sp.backend == "gloo"
        fast = dist.new_group(timeout=FAST_TIMEOUT) if gloo else None
        for name in ERROR_CASES:
            if name != "rank-raises" or gloo:
                results[f"error-{name}"] = run(_error_case, name, sp, fast)


sp_results = results_fixture(_sp_cases, budget_s=400,
                             preload=["diffusers.models.transformers.transformer_wan",
                                      "diffusers.models.transformers.transformer_wan_animate",
                                      "diffusers.models.transformers.transformer_chronoedit",
                                      "diffusers.models.transformers.transformer_wan_vace", "vkern.patch", __name__])


@pytest.mark.parametrize("case", MATCH_CASES + [f"error-{n}" for n in ERROR_CASES])
def test_sp_gloo_world2(sp_results, case):
    check(sp_results(2), case)


# On 2 ranks ring_degree=2 is the pure ring, which ring-tiny-fp32 already runs.
@pytest.mark.parametrize("case", [c for c in VARIANTS if c != "ring2-tiny-fp32"] + ["check-modes", *ZERO_COPY_CASES])
def test_sp_variants_gloo_world2(sp_results, case):
    check(sp_results(2), case)


@pytest.mark.parametrize("case", list(VARIANTS) + ["check-modes", *ZERO_COPY_CASES])
def test_sp_variants_gloo_world4(sp_results, case):
    check(sp_results(4), case)


@pytest.mark.parametrize("case", MATCH_CASES)
def test_sp_gloo_world4(sp_results, case):
    check(sp_results(4), case)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 8])
def test_sp_nccl(world, tmp_path_factory):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA GPUs for NCCL")
    check_all(spawn(world, "nccl", tmp_path_factory, _sp_cases, budget_s=400))


# ---------------------------------------------------------------- one process

def test_config_types_are_checked():
    import vkern
    from vkern.distributed import SPConfig

    with pytest.raises(TypeError, match="PatchConfig.sp: expected None or a vkern.distributed.SPConfig"):
        vkern.PatchConfig(sp={"group": None})
    with pytest.raises(TypeError, match="SPConfig.group"):
        SPConfig(group="world")
    with pytest.raises(TypeError, match="SPConfig.check_inputs"):
        SPConfig(check_inputs=1)
    with pytest.raises(ValueError, match="SPConfig.check_inputs"):
        SPConfig(check_inputs="sometimes")
    assert SPConfig(check_inputs=True).check_inputs == "every-step"
    assert SPConfig(check_inputs=False).check_inputs == "off"
    assert SPConfig().check_inputs == "per-shape"
    for name in ("fp8_payload", "zero_copy"):
        with pytest.raises(TypeError, match=f"SPConfig.{name}"):
            SPConfig(**{name: "yes"})
    for name in ("overlap_chunks", "ring_degree"):
        with pytest.raises(ValueError, match=f"SPConfig.{name}"):
            SPConfig(**{name: 0})
    with pytest.raises(ValueError, match="overlap_chunks > 1 needs ring_degree=1"):
        SPConfig(overlap_chunks=2, ring_degree=2)
    with pytest.raises(ValueError, match="SPConfig.qkv_exchange: expected one of"):
        SPConfig(qkv_exchange="two")
    assert SPConfig().qkv_exchange == "kv-first"


def test_sp_without_a_process_group_fails_and_leaves_the_model_unpatched():
    model = _build("tiny", torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="init_from_env"):
        _patch(model, None)
    assert _unpatched(model)


def test_sharded_processor_outside_the_model_forward_says_so():
    from vkern.distributed.sp_wan import SPContext
    from vkern.modules.wan_sp_attention import VkernWanSPAttnProcessor

    model = _build("tiny", torch.float32, "cpu")
    model.blocks[0].attn1.set_processor(VkernWanSPAttnProcessor(SPContext(None, 2, 0, 2)))
    with pytest.raises(RuntimeError, match="outside the patched WanTransformer3DModel's forward"):
        model.blocks[0].attn1(torch.randn(1, 4, 64), None, None, None)
