"""vkern benchmarks, side by side in one process, one JSON object per line.

    python -m bench.bench --op attention --shape wan1.3b-480p,wan14b-720p --providers all --out rows.jsonl

ops: attention | wan-self-attn | attn-module | qk-norm-rope | family-prologue | fp8-quantize | gemm | step | vae-decode | vae-encode | vae-conv. Rows carry gpu, torch, commit and
date; providers are anchors (cudnn, fa2, efficient, flash-attn where installed, diffusers, diffusers-compile) and vkern.
"""
import argparse
import contextlib
import datetime
import functools
import gc
import inspect
import json
import os
import re
import subprocess
import time

import torch

from . import shapes
from vkern.patch.handle import assign_processor

from .timing import param_bytes, peak_gib, rel_l2, time_cuda, time_cuda_graph, time_cuda_queued, time_micro

DT = torch.bfloat16
DEVICE = "cuda"  # the attention-module setups' device (tests/test_bench_families.py runs them on the CPU)


ATTENTION_8BIT = {"vkern-int8": ("int8", "bf16"), "vkern-int8-fp8pv": ("int8", "e4m3"),
                  "vkern-fp8": ("e4m3", "e4m3"), "vkern-fp8-bf16pv": ("e4m3", "bf16"), "vkern-int8pv": ("int8", "int8")}


def _attention(name, providers, args):
    """SDPA backends, vkern's exact kernel (vkern-bf16) and its 8-bit schemes (quantization of bf16 q, k,
    v included in the time), vkern's default choice (vkern); error vs a float32 SDPA-math oracle on a
    sample of query rows, and the kernel's autotuned config."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vkern.ops
    from vkern.ops import fused_attention
    from vkern.reference import attention as ref

    # "<shape>-cross": keys are the text tokens; "<shape>-joint": queries and keys are the video then the text tokens,
    # the text padded (HunyuanVideo: a key-padding mask; here the prompt fills half its text tokens).
    joint = name.endswith("-joint")
    s = shapes.ATTENTION[name.removesuffix("-cross").removesuffix("-joint")]
    q_tokens = s.tokens + (s.text_tokens if joint else 0)
    kv_tokens = s.text_tokens if name.endswith("-cross") else q_tokens
    q = torch.randn(1, q_tokens, s.heads, s.head_dim, device="cuda", dtype=DT)
    k, v = (torch.randn(1, kv_tokens, s.heads, s.head_dim, device="cuda", dtype=DT) for _ in range(2))
    mask = None
    if joint:
        mask = torch.ones(1, kv_tokens, dtype=torch.bool, device="cuda")
        mask[:, s.tokens + s.text_tokens // 2:] = False
    flops = 4 * s.heads * q_tokens * kv_tokens * s.head_dim  # (masked keys included: the kernels compute them)
    sdpa = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}

    def run_sdpa(backend):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=None if mask is None else mask[:, None, None]
            ).transpose(1, 2)

    def forced(backend):
        return with_env(lambda: vkern.ops.attention(q, k, v, key_padding_mask=mask), "VKERN_ATTENTION_BACKEND",
                        backend)

    run_kernel = forced("triton")

    def with_variant(fn, variant):  # the kernel's main loop (vkern/triton/attention.py, VARIANTS)
        return with_env(fn, "VKERN_ATTENTION_VARIANT", variant)

    fns = {p: (lambda b=b: run_sdpa(b)) for p, b in sdpa.items()}
    fns["vkern-bf16"] = run_kernel
    fns["vkern-cuda"] = forced("cuda")  # csrc/flash_attention.cu (head dims 64 and 128)
    fns["vkern-cuda-nosplit"] = with_env(fns["vkern-cuda"], "VKERN_FLASH_TAIL_SPLIT", "0")  # (session 27)
    fns["vkern-cuda-k176"] = with_env(fns["vkern-cuda"], "VKERN_FLASH_KEYS", "176")  # the wide tile (session 31)
    fns["vkern-cuda-k128"] = with_env(fns["vkern-cuda"], "VKERN_FLASH_KEYS", "128")
    fns["vkern-cuda-k224"] = with_env(fns["vkern-cuda"], "VKERN_FLASH_KEYS", "224")  # head dim 64 (session 33)
    # flash-attn's package (FA3 on Hopper, else FA2) where it is installed; elsewhere the row is left out, said once
    flash_attn_missing = fused_attention.flash_attn_backend.reason(q.device, q.dtype, s.head_dim, s.head_dim, False)
    if flash_attn_missing is None:
        fns["flash-attn"] = forced("flash_attn")
    elif providers and "flash-attn" in providers:
        print(f"bench: no flash-attn row ({flash_attn_missing})")
    for p, (qk, pv) in ATTENTION_8BIT.items():
        fns[p] = lambda qk=qk, pv=pv: vkern.ops.attention_8bit(q, k, v, qk=qk, pv=pv, key_padding_mask=mask)
    fns["vkern-bf16-pipe"] = with_variant(run_kernel, "pipe")
    fns["vkern-fp8-pipe"] = with_variant(fns["vkern-fp8"], "pipe")

    def fp8_backend(backend, fn):
        return with_env(fn, "VKERN_ATTENTION_8BIT_BACKEND", backend)

    fns["vkern-fp8-cuda"] = fp8_backend("cuda", fns["vkern-fp8"])  # csrc/flash_attention.cu, e4m3 form (D 128)
    fns["vkern-int8-fp8pv-cuda"] = fp8_backend("cuda", fns["vkern-int8-fp8pv"])  # its int8 form: attention="fp8"
    fns["vkern-int8pv-cuda"] = fp8_backend("cuda", fns["vkern-int8pv"])  # session 21: int8 Q/K, u8 P, int8 V
    fns["vkern-fp8-triton"] = fp8_backend("triton", fns["vkern-fp8"])
    # The kernels alone, on Q/K/V already in e4m3 (as the Wan processor has them: its fused norm/RoPE prologue
    # quantizes Q and K; V takes v_to_e4m3, ~3% of these calls' bytes).
    kernel_rows = ["vkern-fp8-cuda-kernel", "vkern-int8-fp8pv-cuda-kernel", "vkern-int8pv-cuda-kernel",
                   "vkern-fp8-triton-kernel"]
    wanted = providers or list(fns) + kernel_rows
    if s.head_dim == 128 and mask is None and any("-kernel" in p for p in wanted):  # (also -kernel-fma*-turns*)
        q8, qs = vkern.ops.qk_norm_rope(q.flatten(2), None, 0.0, s.heads, quant="e4m3")
        k8, ks = vkern.ops.k_to_e4m3(k)  # one scale per 128-key block (the CUDA kernel's form)
        offset = vkern.ops.value_offset(v)  # smoothed V, as attention_8bit and the Wan processor quantize it
        vt, vs = vkern.ops.v_to_e4m3(v, offset=offset)
        prequant = lambda: vkern.ops.attention_prequantized(q8, qs, k8, ks, vt, vs, out_dtype=q.dtype,
                                                            v_offset=offset)
        fns["vkern-fp8-cuda-kernel"] = fp8_backend("cuda", prequant)
        fns["vkern-fp8-triton-kernel"] = fp8_backend("triton", prequant)
        # Session 14: int8 Q/K (S exact in int32) with e4m3 P/V, the fp8 mode's scheme.
        q8i, qsi = vkern.ops.qk_norm_rope(q.flatten(2), None, 0.0, s.heads, quant="int8")
        k8i, ksi = vkern.ops.k_to_8bit(k, "int8")
        prequant_int8 = lambda: vkern.ops.attention_prequantized(q8i, qsi, k8i, ksi, vt, vs, out_dtype=q.dtype,
                                                                 v_offset=offset)
        fns["vkern-int8-fp8pv-cuda-kernel"] = fp8_backend("cuda", prequant_int8)
        # Session 21: int8 P/V (u8 P against each block's row max, int8 V per 128-key block, smoothed as e4m3 V).
        # (V as "u8", the form the Wan processor and attention_8bit hand the kernel: an "int8" V^T costs the
        # wrapper a sign-flip pass per call, which rows before session 27 included.)
        vt8, vs8 = vkern.ops.v_to_8bit(v, "u8", offset=offset)
        prequant_int8pv = lambda: vkern.ops.attention_prequantized(q8i, qsi, k8i, ksi, vt8, vs8, out_dtype=q.dtype,
                                                                   v_offset=offset)
        fns["vkern-int8pv-cuda-kernel"] = fp8_backend("cuda", prequant_int8pv)
        # Session 22: the int8 P/V kernel's schedules (exponentials on the FMA pipe, 0 or 2 of each 8; the
        # consumers' products in turns or not; the default: vkern.ops.fused_attention.FLASH_EXP_FMA / _FP8_TURNS).
        for fma in ("0", "2"):
            for turns in ("0", "1", "2"):
                fns[f"vkern-int8pv-cuda-kernel-fma{fma}-turns{turns}"] = with_env(
                    with_env(fns["vkern-int8pv-cuda-kernel"], "VKERN_FLASH_EXP_FMA", fma), "VKERN_FLASH_FP8_TURNS",
                    turns)
        # Session 24: O's rescale slack (0: the running max; 8: the reference max moves by more than 2^8 only).
        for slack in ("0", "8"):
            fns[f"vkern-int8pv-cuda-kernel-slack{slack}"] = with_env(fns["vkern-int8pv-cuda-kernel"],
                                                                     "VKERN_FLASH_RESCALE_SLACK", slack)
        # Session 27: without the tail split (VKERN_FLASH_TAIL_SPLIT=0).
        fns["vkern-int8pv-cuda-kernel-nosplit"] = with_env(fns["vkern-int8pv-cuda-kernel"], "VKERN_FLASH_TAIL_SPLIT", "0")
        # Session 20: the 192-key tile (O in the tensor cores), the same quantized inputs.
        wide = lambda fn: with_env(fn, "VKERN_FLASH_FP8_KEYS", "192")
        fns["vkern-fp8-cuda-kernel-192"] = wide(fns["vkern-fp8-cuda-kernel"])
        fns["vkern-int8-fp8pv-cuda-kernel-192"] = wide(fns["vkern-int8-fp8pv-cuda-kernel"])
        fns["vkern-int8-fp8pv-cuda-192"] = wide(fns["vkern-int8-fp8pv-cuda"])
    fns["vkern"] = lambda: vkern.ops.attention(q, k, v, key_padding_mask=mask)
    rows = torch.randperm(q_tokens, device="cuda")[:256]  # oracle on sampled queries: O(256 * S) memory
    oracle = ref.attention_lse(q[:, rows], k, v, mask, dtype=torch.float32)[0]
    for provider in providers or list(fns):
        if provider not in fns:
            continue
        # ms: device time, launches queued (session 27 on); ms_sync: synchronized after each call (rows before
        # session 27: it also counts each call's host time and launch latency).
        ms_sync = time_cuda(fns[provider], args.warmup, args.repeats)[0]
        ms, lo, hi = time_cuda_queued(fns[provider], 1, args.repeats)
        fused_attention.last_tail_split_floats = 0
        out = fns[provider]()[:, rows]
        split = "on" if fused_attention.last_tail_split_floats else "off"  # (this call's launch: split or not)
        cos = torch.nn.functional.cosine_similarity(out.double().flatten(), oracle.double().flatten(), dim=0).item()
        row = dict(op="attention", shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi, ms_sync=ms_sync,
                   timing="queued", tflops=flops / ms / 1e9, tflops_sync=flops / ms_sync / 1e9,
                   rel_l2=rel_l2(out, oracle), cos=cos)
        if mask is not None:
            row["mask"] = f"keys {kv_tokens}, the last {int((~mask).sum())} padded"
        if provider.startswith(("vkern-fp8-cuda", "vkern-int8-fp8pv-cuda", "vkern-int8pv-cuda")):
            keys = 192 if provider.endswith("-192") else 128  # (int8 P/V: 128-key tiles only)
            row["config"] = f"cuda sm90a 8-bit: 128x{keys} tiles, 2 consumer warpgroups, 3-stage TMA ring"
            if provider.startswith("vkern-int8pv-cuda"):
                from vkern.ops.fused_attention import _flash_exp_fma, _flash_fp8_turns, _flash_rescale_slack

                fma, turns = ((provider.split("-fma")[1][0], int(provider[-1])) if "-fma" in provider
                              else (str(_flash_exp_fma()), _flash_fp8_turns()))
                slack = provider.split("-slack")[1] if "-slack" in provider else _flash_rescale_slack()
                turns = ("off", "on (passed when issued)", "on (passed when done)")[turns]
                row["config"] += (f", {fma} of 8 exponentials on FMA, turns {turns}, P V added after the next softmax"
                                  f", rescale slack {slack}, tail split {split}")
        elif provider in ("vkern-cuda", "vkern-cuda-nosplit", "vkern-cuda-k176", "vkern-cuda-k128", "vkern-cuda-k224"):
            keys = fused_attention.last_flash_keys  # (this call's launch)
            stages = fused_attention._flash_stages_for(keys, s.head_dim)
            row["config"] = (f"cuda sm90a: 128x{keys} tiles, 2 consumer warpgroups, {stages}-stage TMA ring, "
                             f"tail split {split}")
        elif provider.startswith("vkern-"):
            from vkern.triton.attention import _attention_tuned

            row["config"] = str(_attention_tuned.best_config)
        yield row


# --op qk-norm-rope runs Wan's form of the prologue (its norm across heads, its RoPE tables): Wan's shapes only (the
# other families' forms: --op family-prologue and the attention-module rows)
WAN_PROLOGUE_SHAPES = {name: s for name, s in shapes.ATTENTION.items() if name.startswith("wan")}


def _qk_norm_rope(name, providers, args):
    import vkern.ops
    from vkern.reference import attention as ref

    s = shapes.ATTENTION[name]
    row = s.heads * s.head_dim
    x = torch.randn(1, s.tokens, 3 * row, device="cuda", dtype=DT)[..., :row]  # q slice of a fused QKV
    w = (1 + 0.1 * torch.randn(row, device="cuda")).to(DT)
    from vkern.models import wan_rope_tables

    cos, sin = (t.cuda() for t in wan_rope_tables(s.tokens, s.head_dim))
    args_ = (x, w, 1e-6, s.heads, cos, sin)
    compiled = torch.compile(ref.qk_norm_rope)
    fns = {"diffusers": lambda: ref.qk_norm_rope(*args_), "diffusers-compile": lambda: compiled(*args_),
           "vkern": lambda: vkern.ops.qk_norm_rope(*args_),
           # fp8 attention's prologue: e4m3 out, per-(token, head) scales (queries) or per 128-token block (keys)
           "vkern-e4m3": lambda: vkern.ops.qk_norm_rope(*args_, quant="e4m3"),
           "vkern-e4m3-keys": lambda: vkern.ops.qk_norm_rope(*args_, quant="e4m3", token_block=128)}
    oracle = ref.qk_norm_rope(x.double(), w.double(), 1e-6, s.heads, cos, sin)
    for provider in providers or list(fns):
        ms, lo, hi, eager_ms, how = time_micro(fns[provider], args.warmup, args.repeats)
        out = fns[provider]()
        if isinstance(out, tuple):  # e4m3 and scales: read bf16 once, write one byte per value
            scales = ref.key_scales_per_token(out[1], s.tokens).transpose(1, 2)[..., None]
            out, min_bytes = (out[0].double() * scales), s.tokens * row * 3
        else:
            min_bytes = 2 * s.tokens * row * 2  # read the bf16 row once, write it once
        yield dict(op="qk-norm-rope", shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi, eager_ms=eager_ms,
                   timing=how, gbps=min_bytes / ms / 1e6, rel_l2=rel_l2(out, oracle))
    del oracle


def _ltx_prologue_setup(family, res):
    """(x, norm, heads, tables, diffusers_step, vkern_step) of an LTX-Video / LTX-2 block's query prologue at `res`:
    the projection [1, S, H * D], the model's own norm_q, fp32 (cos, sin) tables in the form the released checkpoints
    use (LTX-Video: diffusers' apply_rotary_emb over the whole inner dim; LTX-2: the split RoPE, [1, H, S, D / 2]
    views, as the attention-module rows), and the two ways to run it (each step(x, norm, heads, tables))."""
    from diffusers.models.transformers.transformer_ltx import LTXAttention
    from diffusers.models.transformers.transformer_ltx2 import LTX2Attention

    from vkern import models
    from vkern.modules.ltx2_attention import fused_ltx2_norm_rope
    from vkern.modules.ltx_attention import fused_norm_rope
    from vkern.reference import ltx2_attention, ltx_attention

    if family == "ltx":
        heads, head_dim, (frames, height, width) = 32, 64, models.LTX_LATENTS[res]
        attn_class, steps = LTXAttention, (ltx_attention.norm_rope, fused_norm_rope)
    else:
        heads, head_dim, ((frames, height, width), _) = 32, 128, models.LTX2_LATENTS[res]
        attn_class = LTX2Attention
        steps = tuple(functools.partial(f, rope_type="split") for f in (ltx2_attention.norm_rope, fused_ltx2_norm_rope))
    tokens, dim = frames * height * width, heads * head_dim
    norm = attn_class(dim, heads=heads, kv_heads=heads, dim_head=head_dim).norm_q.to(DEVICE, DT).requires_grad_(False)
    norm.weight.copy_(1 + 0.1 * torch.randn(dim))  # (a trained weight, not the init's ones)
    if family == "ltx":
        angles = torch.randn(1, tokens, dim, device=DEVICE)
        tables = (angles.cos(), angles.sin())
    else:
        angles = torch.randn(1, tokens, heads, head_dim // 2, device=DEVICE)
        tables = (angles.cos().transpose(1, 2), angles.sin().transpose(1, 2))
    x = torch.randn(1, tokens, dim, device=DEVICE, dtype=DT)
    return (x, norm, heads, tables, *steps)


# shape -> (family, resolution): the LTX families' q prologue (RMSNorm across heads, then RoPE: LTX-Video's over the
# whole inner dim, LTX-2's split)
FAMILY_PROLOGUES = {"ltx-512p": ("ltx", "512p"), "ltx2-512p": ("ltx2", "512p")}


def _family_prologue(name, providers, args, setup=None):
    """One q prologue of an LTX-Video / LTX-2 attention: diffusers' ops (its norm, then its RoPE) vs vkern's one kernel
    pass (rope_tables "per_element", a table row per head, or LTX-2's "split"); gbps over the bytes it must move (the
    bf16 row in and out, the fp32 cos and sin tables in)."""
    x, norm, heads, tables, diffusers_step, vkern_step = _ltx_prologue_setup(*(setup or FAMILY_PROLOGUES[name]))
    fns = {"diffusers": lambda: diffusers_step(x, norm, heads, tables),
           "vkern": lambda: vkern_step(x, norm, heads, tables)}
    min_bytes = x.numel() * (2 + 2) + 2 * tables[0].numel() * 4
    want = fns["diffusers"]()
    for provider in providers or list(fns):
        ms, lo, hi, eager_ms, how = time_micro(fns[provider], args.warmup, args.repeats)
        yield dict(op="family-prologue", shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi,
                   eager_ms=eager_ms, timing=how, gbps=min_bytes / ms / 1e6,
                   rel_l2_vs_diffusers=rel_l2(fns[provider](), want))


FP8_SHAPES = {"wan14b-ffn-weight": ((13824, 5120), "row"), "wan14b-480p-tokens": ((32760, 5120), "row"),
              "wan14b-ffn-weight-tensor": ((13824, 5120), "tensor")}


def _fp8_quantize(name, providers, args):
    import vkern.ops
    from vkern.reference import fp8 as ref

    shape, gran = FP8_SHAPES[name]
    x = torch.randn(shape, device="cuda", dtype=DT)
    compiled = torch.compile(ref.fp8_quantize)
    fns = {"torch": lambda: ref.fp8_quantize(x, gran), "torch-compile": lambda: compiled(x, gran),
           "vkern": lambda: vkern.ops.fp8_quantize(x, gran)}
    expected = ref.fp8_quantize(x, gran)[0].view(torch.uint8)
    min_bytes = x.numel() * 3  # bf16 in, e4m3 out
    for provider in providers or list(fns):
        ms, lo, hi, eager_ms, how = time_micro(fns[provider], args.warmup, args.repeats)
        q = fns[provider]()[0]
        yield dict(op="fp8-quantize", shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi, eager_ms=eager_ms,
                   timing=how,
                   gbps=min_bytes / ms / 1e6, bit_exact=bool(torch.equal(q.view(torch.uint8), expected)))


def _in_sdpa_backend(backend, fn):
    """fn() under inference mode, with SDPA held to `backend` (None: PyTorch's own choice)."""
    from torch.nn.attention import sdpa_kernel

    with torch.inference_mode(), (sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()):
        return fn()


def _wan_attention_module(name):
    """Wan self-attention at shape `name` (q/k/v projections, RMSNorm across heads, RoPE, attention, output
    projection), hidden states [1, tokens, heads * head_dim]; diffusers' processor on cuDNN ("diffusers-cudnn", the
    issue's baseline, first) and on PyTorch's own SDPA choice, vs VkernWanAttnProcessor per attention mode."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    from vkern.models import wan_rope_tables
    from vkern.modules.wan_attention import VkernWanAttnProcessor

    s = shapes.ATTENTION[name]
    dim = s.heads * s.head_dim
    attn = WanAttention(dim, heads=s.heads, dim_head=s.head_dim, eps=1e-6, processor=WanAttnProcessor())
    x = torch.randn(1, s.tokens, dim, dtype=DT)
    rope = tuple(t.to(torch.get_default_device()) for t in wan_rope_tables(s.tokens, s.head_dim))
    return (attn, lambda: (attn(x, rotary_emb=rope),), WanAttnProcessor, VkernWanAttnProcessor,
            dict(heads=s.heads, head_dim=s.head_dim, tokens=s.tokens),
            ("diffusers-cudnn", "diffusers"), ("auto", "bf16", "fp8", "int8pv", "int8"))


# the other families' anchors (diffusers on PyTorch's SDPA choice first, then held to one backend) and vkern's modes:
# at head dim 64 no int8pv (no CUDA kernel there: its reference would hold the whole score matrix), the Triton 8-bit ones
FAMILY_ANCHORS = ("diffusers", "diffusers-efficient", "diffusers-cudnn")
FAMILY_MODES = {128: ("auto", "bf16", "int8pv"), 64: ("auto", "bf16", "int8", "fp8")}


def _text(res):
    """The text-token table's entry for a resolution: "tiny" for the CPU test's, "real" for every other."""
    return "tiny" if res == "tiny" else "real"


def _hunyuan_attention_module(res):
    """A HunyuanVideo dual-stream block's attention at `res` and its call: the video with RoPE, then the prompt padded
    to 256 tokens (200 real), masked by diffusers' [1, 1, 1, N] bool mask."""
    from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoAttnProcessor2_0,
                                                                         HunyuanVideoRotaryPosEmbed,
                                                                         HunyuanVideoTransformerBlock)

    from vkern import models
    from vkern.modules.hunyuan_attention import VkernHunyuanVideoAttnProcessor

    heads, head_dim, (text, real) = 24, 128, models.HUNYUAN_TEXT_TOKENS[_text(res)]
    frames, height, width = models.HUNYUAN_RESOLUTIONS[res]
    attn = HunyuanVideoTransformerBlock(heads, head_dim, mlp_ratio=1.0, qk_norm="rms_norm").attn
    rope = HunyuanVideoRotaryPosEmbed(2, 1, [16, 56, 56], 256.0)(
        torch.empty((1, 16, 1 + (frames - 1) // 4, height // 8, width // 8)))
    video = rope[0].shape[0]
    x, context = (torch.randn(1, n, heads * head_dim, dtype=DT) for n in (video, text))
    mask = torch.ones(1, 1, 1, video + text, dtype=torch.bool)
    mask[..., video + real:] = False
    return (attn, lambda: attn(x, context, mask, image_rotary_emb=rope), HunyuanVideoAttnProcessor2_0,
            VkernHunyuanVideoAttnProcessor, dict(heads=heads, head_dim=head_dim, tokens=video + text, real_text=real),
            FAMILY_ANCHORS, FAMILY_MODES[head_dim])


def _hunyuan15_attention_module(res):
    """A HunyuanVideo 1.5 block's attention at `res` and its call: the video with RoPE, then the text as the model
    orders it (image, ByT5 and MLLM tokens, the real ones first: text-to-video keeps 200 of 1985), masked by the
    model's [1, text] mask, from which diffusers' processor builds a [1, 1, S, S] mask per call."""
    from diffusers.models.transformers.transformer_hunyuan_video15 import (HunyuanVideo15AttnProcessor2_0,
                                                                           HunyuanVideo15RotaryPosEmbed,
                                                                           HunyuanVideo15TransformerBlock)

    from vkern import models
    from vkern.modules.hunyuan15_attention import VkernHunyuanVideo15AttnProcessor

    heads, head_dim = 16, 128
    text_tokens = models.HUNYUAN15_TEXT_TOKENS[_text(res)]
    text = text_tokens["mllm"][0] + text_tokens["byt5"][0] + text_tokens["image"]
    real = text_tokens["mllm"][1] + text_tokens["byt5"][1]
    attn = HunyuanVideo15TransformerBlock(heads, head_dim, mlp_ratio=1.0).attn
    rope = HunyuanVideo15RotaryPosEmbed(1, 1, [16, 56, 56], 256.0)(
        torch.empty((1, 16, *models.HUNYUAN15_LATENTS[res])))
    video = rope[0].shape[0]
    x, context = (torch.randn(1, n, heads * head_dim, dtype=DT) for n in (video, text))
    mask = torch.zeros(1, text, dtype=torch.bool)
    mask[:, :real] = True
    return (attn, lambda: attn(x, context, mask, image_rotary_emb=rope), HunyuanVideo15AttnProcessor2_0,
            VkernHunyuanVideo15AttnProcessor, dict(heads=heads, head_dim=head_dim, tokens=video + text, real_text=real),
            FAMILY_ANCHORS, FAMILY_MODES[head_dim])


def _cogvideox_attention_module(res):
    """A CogVideoX-5B block's attention at `res` and its call: the prompt's 226 tokens, then the video with RoPE."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    from vkern import models
    from vkern.modules.cogvideox_attention import VkernCogVideoXAttnProcessor

    # tiny (the CPU tests): 4 heads, not 48, since the interpreter's time grows with the heads (237 s a test at 48)
    heads, head_dim, text = (48, 64, 226) if res != "tiny" else (4, 64, 16)
    frames, height, width = models.COGVIDEOX_RESOLUTIONS[res]
    video = (1 + (frames - 1) // 4) * (height // 16) * (width // 16)
    attn = CogVideoXBlock(heads * head_dim, heads, head_dim, time_embed_dim=512).attn1
    angles = torch.randn(video, head_dim)
    rope = (angles.cos(), angles.sin())
    x, context = (torch.randn(1, n, heads * head_dim, dtype=DT) for n in (video, text))
    return (attn, lambda: attn(x, context, image_rotary_emb=rope), CogVideoXAttnProcessor2_0,
            VkernCogVideoXAttnProcessor, dict(heads=heads, head_dim=head_dim, tokens=video + text),
            FAMILY_ANCHORS, FAMILY_MODES[head_dim])


def _ltx_attention_module(res):
    """An LTX-Video block's self-attention (attn1) at `res` and its call: RoPE tables over the whole inner dim."""
    from diffusers.models.transformers.transformer_ltx import LTXAttention, LTXVideoAttnProcessor

    from vkern import models
    from vkern.modules.ltx_attention import VkernLTXVideoAttnProcessor

    heads, head_dim = 32, 64
    frames, height, width = models.LTX_LATENTS[res]
    tokens, dim = frames * height * width, heads * head_dim
    attn = LTXAttention(dim, heads=heads, kv_heads=heads, dim_head=head_dim)
    angles = torch.randn(1, tokens, dim)
    rope = (angles.cos(), angles.sin())
    x = torch.randn(1, tokens, dim, dtype=DT)
    return (attn, lambda: (attn(x, image_rotary_emb=rope),), LTXVideoAttnProcessor, VkernLTXVideoAttnProcessor,
            dict(heads=heads, head_dim=head_dim, tokens=tokens), FAMILY_ANCHORS, FAMILY_MODES[head_dim])


def _skyreels_attention_module(res):
    """A SkyReels-V2 14B block's self-attention under diffusion forcing's block-causal mask at `res` (540p x 97
    frames: 25 latent frames of 34 x 60 tokens in 5 blocks of 5 frames), as the model builds the [1, 1, S, S] mask."""
    from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2Attention, SkyReelsV2AttnProcessor

    from vkern.models import wan_rope_tables
    from vkern.modules.skyreels_attention import VkernSkyReelsV2AttnProcessor

    heads, head_dim, (frames, per_frame, per_block) = 40, 128, SKYREELS_DF[res]
    tokens, dim = frames * per_frame, heads * head_dim
    attn = SkyReelsV2Attention(dim, heads=heads, dim_head=head_dim, eps=1e-6, processor=SkyReelsV2AttnProcessor())
    block = torch.arange(frames).repeat_interleave(per_frame) // per_block
    mask = (block[None, :] <= block[:, None])[None, None]
    rope = tuple(t.to(torch.get_default_device()) for t in wan_rope_tables(tokens, head_dim))
    x = torch.randn(1, tokens, dim, dtype=DT)
    return (attn, lambda: (attn(x, None, mask, rope),), SkyReelsV2AttnProcessor, VkernSkyReelsV2AttnProcessor,
            dict(heads=heads, head_dim=head_dim, tokens=tokens, frame_blocks=frames // per_block), FAMILY_ANCHORS,
            FAMILY_MODES[head_dim])


SKYREELS_DF = {"540p": (25, 34 * 60, 5), "tiny": (4, 6, 2)}  # (latent frames, tokens per frame, frames per causal block)


def _ltx2_attention_module(res):
    """An LTX-2 block's video self-attention (attn1) at `res` and its call, with the released checkpoints' split
    RoPE: diffusers' (cos, sin) tables [1, heads, tokens, head_dim / 2] (fp32 views of [1, tokens, heads, D / 2])."""
    from diffusers.models.transformers.transformer_ltx2 import LTX2Attention, LTX2AudioVideoAttnProcessor

    from vkern import models
    from vkern.modules.ltx2_attention import VkernLTX2AttnProcessor

    heads, head_dim = 32, 128
    (frames, height, width), _ = models.LTX2_LATENTS[res]
    tokens, dim = frames * height * width, heads * head_dim
    attn = LTX2Attention(dim, heads=heads, kv_heads=heads, dim_head=head_dim, rope_type="split")
    angles = torch.randn(1, tokens, heads, head_dim // 2)
    rope = (angles.cos().transpose(1, 2), angles.sin().transpose(1, 2))
    x = torch.randn(1, tokens, dim, dtype=DT)
    return (attn, lambda: (attn(x, query_rotary_emb=rope),), LTX2AudioVideoAttnProcessor, VkernLTX2AttnProcessor,
            dict(heads=heads, head_dim=head_dim, tokens=tokens), FAMILY_ANCHORS, FAMILY_MODES[head_dim])


def _mochi_attention_module(res):
    """A Mochi block's joint attention at `res` and its call: the video with RoPE, the prompt padded to 256 tokens
    (200 real) by its own projections, diffusers' per-row gather of the real tokens vs vkern's key-padding mask."""
    from diffusers.models.attention_processor import MochiAttention, MochiAttnProcessor2_0

    from vkern import models
    from vkern.modules.mochi_attention import VkernMochiAttnProcessor

    heads, head_dim, (text, real) = 24, 128, models.MOCHI_TEXT_TOKENS[_text(res)]
    frames, height, width = models.MOCHI_LATENTS[res]
    video, dim = frames * (height // 2) * (width // 2), heads * head_dim
    attn = MochiAttention(query_dim=dim, heads=heads, dim_head=head_dim, bias=False, added_kv_proj_dim=1536,
                          added_proj_bias=False, out_dim=dim, out_context_dim=1536, processor=MochiAttnProcessor2_0(),
                          eps=1e-5)  # (as MochiTransformerBlock builds its attn1)
    angles = torch.randn(video, heads, head_dim // 2)
    rope = (angles.cos(), angles.sin())
    x, context = torch.randn(1, video, dim, dtype=DT), torch.randn(1, text, 1536, dtype=DT)
    mask = torch.zeros(1, text, dtype=torch.int64)
    mask[:, :real] = 1
    return (attn, lambda: attn(x, context, mask, image_rotary_emb=rope), MochiAttnProcessor2_0,
            VkernMochiAttnProcessor, dict(heads=heads, head_dim=head_dim, tokens=video + text, real_text=real),
            FAMILY_ANCHORS, FAMILY_MODES[head_dim])


# shape -> (module setup, resolution): an attention module of HunyuanVideo (1.0, 1.5), CogVideoX, Mochi (joint) and LTX-Video
# (1.0, 2)
ATTENTION_MODULES = {"hunyuan-720p": (_hunyuan_attention_module, "720p"),
                     "hunyuan-720p-33f": (_hunyuan_attention_module, "720p-33f"),
                     "hunyuan15-480p": (_hunyuan15_attention_module, "480p"),
                     "cogvideox-5b": (_cogvideox_attention_module, "480p"),
                     "ltx-512p": (_ltx_attention_module, "512p"),
                     "ltx2-512p": (_ltx2_attention_module, "512p"),
                     "skyreels-540p-df": (_skyreels_attention_module, "540p"),
                     "mochi-480p": (_mochi_attention_module, "480p")}


def _attention_module(name, providers, args, op="attn-module", setup=None):
    """An attention module call (q/k/v projections, norms, RoPE, attention, output projections; the joint ones over
    video and text), made by setup(arg) (ATTENTION_MODULES): diffusers' processor on PyTorch's own SDPA choice
    ("diffusers") or with SDPA held to one backend ("diffusers-efficient", "diffusers-cudnn"), vs vkern's processor
    per attention mode ("vkern-<mode>"; "vkern-auto-unfused": its q/k norm + RoPE as diffusers' ops); rel_l2 against
    the first provider's output."""
    from torch.nn.attention import SDPBackend

    setup, arg = setup or ATTENTION_MODULES[name]
    torch.manual_seed(0)
    with torch.device(DEVICE):  # (the setups make their tensors on the default device)
        attn, call, diffusers_processor, vkern_processor, dims, anchors, modes = setup(arg)
    attn.to(DT).eval().requires_grad_(False)
    forced = {"diffusers-efficient": SDPBackend.EFFICIENT_ATTENTION, "diffusers-cudnn": SDPBackend.CUDNN_ATTENTION}
    processors = {**{p: diffusers_processor() for p in anchors}, **{f"vkern-{m}": vkern_processor(m) for m in modes}}
    if "fused_qk_norm_rope" in inspect.signature(vkern_processor).parameters:  # the fused q/k prologue's share
        processors["vkern-auto-unfused"] = vkern_processor("auto", fused_qk_norm_rope=False)
    heads, head_dim, tokens = dims["heads"], dims["head_dim"], dims["tokens"]
    dim = heads * head_dim
    flops = 4 * heads * tokens * tokens * head_dim + 4 * 2 * tokens * dim * dim
    reference = None
    for provider in providers or list(processors):
        if provider not in processors:
            continue
        assign_processor(attn, processors[provider])

        def run():
            return _in_sdpa_backend(forced.get(provider), lambda: torch.cat([t.flatten(1) for t in call()], dim=1))

        try:
            ms, lo, hi = time_cuda(run, args.warmup, args.repeats)
        except RuntimeError as err:  # (a backend SDPA cannot hold to for this call, e.g. with a mask)
            yield dict(op=op, shape=name, provider=provider, error=str(err).splitlines()[0][:200])
            continue
        out = run()
        reference = out if reference is None else reference
        yield dict(op=op, shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi,
                   tflops=flops / ms / 1e9, **dims, rel_l2_vs_first=rel_l2(out, reference))
        del out


STEP_PROVIDERS = ("diffusers", "diffusers-fp8-layerwise", "vkern", "vkern-chunked", "vkern-fp8-storage",
                  "vkern-fp8-compute")
CHUNK = 4096  # -chunked: FFN and attention token chunks


def vkern_config(provider, allowed_suffixes=()):
    """The PatchConfig of a step provider
    vkern[-fp8-storage|-fp8-compute][-cross-bf16][-chunked][-diffusers-blocks|-fused-blocks][-unfused-prologue][suffix]
    [-attn-<mode>] (-cross-bf16: with fp8, the Wan blocks' cross-attention Linears (".attn2.") left in bf16;
    -chunked: FFN and attention queries in CHUNK-token chunks; -diffusers-blocks: fused_block=False, the blocks'
    glue as diffusers runs it; -fused-blocks: fused_block=True, for a family where it is not the default; neither:
    each family's default; -unfused-prologue: fused_qk_norm_rope=False, q/k norm and RoPE by diffusers' ops);
    returns (config, the suffixes present)."""
    import vkern

    rest, _, attention = provider.partition("-attn-")
    fp8 = next((m for m in ("storage", "compute") if f"-fp8-{m}" in rest), None)
    chunk = CHUNK if "-chunked" in rest else None
    fused_block = False if "-diffusers-blocks" in rest else True if "-fused-blocks" in rest else None
    fused_prologue = "-unfused-prologue" not in rest
    cross_bf16 = "-cross-bf16" in rest
    if cross_bf16 and fp8 is None:
        raise SystemExit(f"--providers: {provider!r}: -cross-bf16 needs -fp8-storage or -fp8-compute")
    rest = rest.replace("-diffusers-blocks", "").replace("-fused-blocks", "").replace("-unfused-prologue", "")
    rest = rest.replace("-cross-bf16", "")
    suffixes = [x for x in allowed_suffixes if x in rest]
    base = rest.replace(f"-fp8-{fp8}", "").replace("-chunked", "")
    for x in suffixes:
        base = base.replace(x, "")
    if base != "vkern":
        raise SystemExit(f"--providers: unknown {provider!r}")
    return vkern.PatchConfig(fp8=fp8, fp8_keep_original="drop", ffn_chunk_size=chunk, attention_chunk_size=chunk,
                             attention=attention or "auto", fused_block=fused_block,
                             fused_qk_norm_rope=fused_prologue,
                             filter_fn=_keep_cross_linears if cross_bf16 else None), suffixes


def _keep_cross_linears(module, fqn):
    """filter_fn of -cross-bf16: every module but the nn.Linears under a block's attn2 (its processor stays vkern's)."""
    return not (isinstance(module, torch.nn.Linear) and ".attn2." in f".{fqn}.")


def _step_models():
    from vkern import models

    return {"wan": (models.build_wan_transformer, models.transformer_inputs),
            "hunyuan": (models.build_hunyuan_transformer, models.hunyuan_transformer_inputs),
            "hunyuan15": (models.build_hunyuan15_transformer, models.hunyuan15_transformer_inputs),
            "cogvideox": (models.build_cogvideox_transformer, models.cogvideox_transformer_inputs),
            "cogvideox15": (models.build_cogvideox15_transformer, models.cogvideox_transformer_inputs),
            "ltx": (models.build_ltx_transformer, models.ltx_transformer_inputs),
            "ltx2": (models.build_ltx2_transformer, models.ltx2_transformer_inputs),
            "mochi": (models.build_mochi_transformer, models.mochi_transformer_inputs),
            "skyreels": (models.build_skyreels_transformer, models.skyreels_transformer_inputs),
            "skyreels-df": (models.build_skyreels_transformer,
                            functools.partial(models.skyreels_transformer_inputs, diffusion_forcing=True)),
            "wan-vace": (models.build_wan_vace_transformer, models.wan_vace_transformer_inputs),
            "framepack": (models.build_framepack_transformer, models.framepack_transformer_inputs),
            "wan22-ti2v": (models.build_wan22_ti2v_transformer, models.wan22_ti2v_transformer_inputs),
            "wan-animate": (models.build_wan_animate_transformer, models.wan_animate_transformer_inputs),
            "chronoedit": (models.build_chronoedit_transformer, models.chronoedit_transformer_inputs)}


def _build_step_model(family, size, provider):
    """A fresh model (same seed, so the same weights) set up the way `provider` runs it; "-lora<rank>" anywhere in
    it adds bench.lora's random LoRA (unfused) before any patch ("-peftlora<rank>": run by PEFT's forward); a "-compile"
    suffix adds diffusers' regional compilation (`compile_repeated_blocks(fullgraph=True)`, inductor), after the
    patch for vkern's (its first call, the warm-up, compiles)."""
    import vkern

    compiled = provider.endswith("-compile")
    # "-lora<rank>": a random LoRA on the blocks, loaded before the patch; "-peftlora<rank>": the same, left to PEFT's
    # own forward (vkern's LoRA forward filtered out: the A/B of modules/lora_linear.py)
    lora = re.search(r"-(peft)?lora(\d+)", provider)
    base = provider.removesuffix("-compile").replace(lora[0], "") if lora else provider.removesuffix("-compile")
    config = vkern_config(base)[0] if base.startswith("vkern") else None
    if config is not None and lora and lora[1]:
        kept = config.filter_fn or (lambda module, fqn: True)
        config.filter_fn = lambda module, fqn: not hasattr(module, "lora_A") and kept(module, fqn)
    if config is None and base not in ("diffusers", "diffusers-fp8-layerwise"):
        raise SystemExit(f"--providers: unknown {provider!r}")
    torch.manual_seed(0)
    model = _step_models()[family][0](size, DT, "cuda")
    if lora:
        from .lora import add_random_lora

        add_random_lora(model, int(lora[2]))
    if base == "diffusers-fp8-layerwise":
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=DT)
    elif config is not None:
        vkern.patch(model, config)
    if compiled:
        torch._dynamo.reset()  # (each provider's model compiled afresh)
        model.compile_repeated_blocks(fullgraph=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return model


def _graph_timing(step):
    """{graph_ms, graph_ms_min, graph_ms_max}: the step captured once in a CUDA graph and replayed, or
    {graph_error} when it cannot be captured (a host synchronization inside the forward, say)."""
    try:
        ms, lo, hi = time_cuda_graph(step, replays=1, repeats=5)
    except Exception as e:  # noqa: BLE001 -- a step that cannot be captured is a result to record, not a crash
        torch.cuda.synchronize()
        return dict(graph_error=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return dict(graph_ms=ms, graph_ms_min=lo, graph_ms_max=hi)


def _step(name, providers, args):
    family, size, res = shapes.STEPS[name]
    make_inputs = _step_models()[family][1]
    reference = None
    for provider in providers or STEP_PROVIDERS:
        model = _build_step_model(family, size, provider)
        allocated = torch.cuda.memory_allocated() / 2**30  # weights + whatever else is allocated (cuBLAS workspace)
        inputs = make_inputs(model, res, DT, "cuda")

        def step():
            with torch.inference_mode():
                return model(**inputs).sample

        started = time.perf_counter()
        step()  # (the first call: with -compile, the compilation)
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - started
        ms, lo, hi = time_cuda(step, 1, args.step_repeats)
        peak, _ = peak_gib(step)
        graph = _graph_timing(step) if args.step_graph else {}
        out = step()
        reference = out if reference is None else reference
        # param_gib: the model's parameter and buffer bytes exactly (the FP8 target "weight memory <= 52% of
        # bf16" is a ratio of these); allocated_gib: torch.cuda.memory_allocated() after the build.
        yield dict(op="step", shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi,
                   first_call_s=first_call_s, param_gib=param_bytes(model) / 2**30, allocated_gib=allocated,
                   peak_gib=peak, activation_gib=peak - allocated, rel_l2_vs_first=rel_l2(out, reference),
                   cos_vs_first=torch.nn.functional.cosine_similarity(out.double().flatten(),
                                                                     reference.double().flatten(), dim=0).item(),
                   **graph)
        del model, inputs, out, step
        torch._dynamo.reset()  # (a compiled provider's code cache refers to its model)
        gc.collect()  # the patch handle and the model refer to each other: free the cycle now
        torch.cuda.empty_cache()


# (tokens M, in K, out N): the Wan-14B 480p FFN up/down projections and one attention projection.
GEMM_SHAPES = {"wan14b-ffn-up": (32760, 5120, 13824), "wan14b-ffn-down": (32760, 13824, 5120),
               "wan14b-attn-proj": (32760, 5120, 5120)}


def _gemm(name, providers, args):
    import vkern.ops

    m, k, n = GEMM_SHAPES[name]
    x = torch.randn(m, k, device="cuda", dtype=DT)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(DT)
    bias = torch.randn(n, device="cuda", dtype=DT)
    qw, sw = vkern.ops.fp8_quantize(w, "row")
    w_e4m3 = w.to(torch.float8_e4m3fn)  # diffusers' layerwise casting stores a plain cast
    xq, sx = vkern.ops.fp8_quantize(x, "row")
    fns = {
        "cublas": lambda: torch.nn.functional.linear(x, w, bias),
        "diffusers-fp8-layerwise": lambda: torch.nn.functional.linear(x, w_e4m3.to(DT), bias),
        "vkern-fp8-storage": lambda: vkern.ops.fp8_linear(x, qw, sw, bias),
        "vkern-fp8-compute": lambda: vkern.ops.fp8_linear_compute(x, qw, sw, bias),
        "vkern-dequant-only": lambda: vkern.ops.fp8_dequantize(qw, sw, DT),  # storage mode's overhead
        # cuBLASLt's fast accumulation (fp8 products accumulated at lower precision between promotions)
        "scaled-mm-fast-accum": lambda: torch._scaled_mm(xq, qw.t(), scale_a=sx, scale_b=sw.reshape(1, -1), bias=bias,
                                                         out_dtype=DT, use_fast_accum=True),
        "scaled-mm-only": lambda: torch._scaled_mm(xq, qw.t(), scale_a=sx, scale_b=sw.reshape(1, -1), bias=bias,
                                                   out_dtype=DT),
    }
    exact = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    for provider in providers or list(fns):
        if provider == "vkern-dequant-only":
            ms, lo, hi, eager_ms, how = time_micro(fns[provider], args.warmup, args.repeats)
            yield dict(op="gemm", shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi, eager_ms=eager_ms,
                       timing=how,
                       gbps=3 * n * k / ms / 1e6)  # e4m3 read + bf16 written
            continue
        ms, lo, hi = time_cuda(fns[provider], args.warmup, args.repeats)
        out = fns[provider]()
        err = (out.float() - exact).pow(2).sum()
        yield dict(op="gemm", shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi,
                   tflops=2 * m * k * n / ms / 1e9, sqnr_db=(10 * torch.log10(exact.pow(2).sum() / err)).item())


# --- Wan VAE (issue 6) ----------------------------------------------------------------------------
# vkern: the defaults (fused biases, padded 3/12-channel convs, the Triton conv where it beat cuDNN);
# vkern-cudnn: the same with every conv on cuDNN (the A/B of the Triton dispatch); vkern-unfused: cuDNN
# convs, no fused biases, no padding (the default path of runs 19-21); vkern-2-latents: latents_per_call=2
# (decode); vkern-cpu-output: decoded frames go to pinned CPU memory (decode); vkern-cuda: vkern's CUDA conv on
# every conv it takes; vkern-cuda-s16: the CUDA conv on the 96 -> 96 convs only (CUDA_FASTER of session 16);
# vkern-cuda-s58: the routing before session 59 (192 -> 192 on cuDNN; run 197 ran the new one as vkern-cuda-192);
# vkern-cuda-tf32-s51 (fp32): the CUDA conv on the convs of TRITON_FASTER_TF32; vkern-cuda-tf32-up (fp32): the
# routing plus the 2D upsampling convs (the default since session 52); vkern-copied-cache: the CUDA conv's cache
# copied from inputs of more than 2 frames (KEEP_INPUT_FRAMES 2; fp32's default since session 52);
# vkern-tf32-norm-pass (fp32): norm2 of the 96 -> 96 blocks in the norm pass, not conv1's epilogue (session 53).
# vkern-frames-1|2|4|all (decode): frames_per_step 1, 2, 4 or whole chunks instead of the default ("auto").
VAE_PROVIDERS = ("diffusers", "vkern", "vkern-cudnn", "vkern-cuda", "vkern-cuda-s16", "vkern-cuda-s58", "vkern-unfused",
                 "vkern-2-latents", "vkern-cpu-output")


def with_env(fn, name, value):
    """fn with the environment variable name = value while it runs."""
    def run(*args, **kwargs):
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(*args, **kwargs)
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
    return run


def cudnn_convs(fn):
    """fn with every causal conv on cuDNN."""
    return with_env(fn, "VKERN_CAUSAL_CONV3D_BACKEND", "cudnn")


def no_handoff(fn):
    """fn without the CUDA conv epilogue's second, normed output (VKERN_WAN_VAE_HAND_NORM=0): a norm pass instead."""
    return with_env(fn, "VKERN_WAN_VAE_HAND_NORM", "0")


def tf32_in_conv(fn):
    """fn with an fp32 VAE's TF32 Triton convs rounding their inputs themselves (VKERN_WAN_VAE_TF32_NORM=0; session
    49's path) instead of reading them as the norm pass rounded them."""
    return with_env(fn, "VKERN_WAN_VAE_TF32_NORM", "0")


def tf32_norm_pass(fn):
    """fn with an fp32 VAE's 96 -> 96 conv1s leaving norm2 to the norm pass (VKERN_WAN_VAE_TF32_EPILOGUE=0)."""
    return with_env(fn, "VKERN_WAN_VAE_TF32_EPILOGUE", "0")


def cuda_convs(fn):
    """fn with vkern's CUDA conv kernel wherever it takes the conv (VKERN_CONV_CUDA=all)."""
    return with_env(fn, "VKERN_CONV_CUDA", "all")


def with_attr(fn, module, name, value):
    """fn with module.name = value while it runs (an A/B of a module-level setting)."""
    def run(*args, **kwargs):
        before = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn(*args, **kwargs)
        finally:
            setattr(module, name, before)
    return run


def with_cuda_table(fn, table, name="CUDA_FASTER"):
    """fn with vkern.ops.causal_conv.<name> (CUDA_FASTER, or CUDA_FASTER_TF32 for fp32) = table while it runs (an
    A/B of the CUDA conv's routing)."""
    from vkern.ops import causal_conv

    return with_attr(fn, causal_conv, name, set(table))


def copied_cache(fn):
    """fn with the CUDA conv's cache copied out of any input with more frames than the cache (wan_vae.KEEP_INPUT_FRAMES
    = CACHE_T, fp32's default since session 52: keeping frames then holds no extra memory): the peak-memory A/B of
    keeping 4-frame 16-bit inputs."""
    from vkern.modules import wan_vae

    return with_attr(fn, wan_vae, "KEEP_INPUT_FRAMES", wan_vae.CACHE_T)


# CUDA_FASTER as session 16 left it (the 96 -> 96 convs only): the A/B of run 66's wider routing
CUDA_TABLE_S16 = {(96, 96, (3, 3, 3))}
# 16 bits: CUDA_FASTER before session 59 (192 -> 192 on cuDNN; run 197's A/B, vkern-cuda-192 there = the default now)
CUDA_TABLE_S58 = {(96, 96, (3, 3, 3)), (96, 3, (3, 3, 3)), (192, 96, (1, 3, 3)), (384, 192, (1, 3, 3))}
# fp32: the CUDA conv (TF32) on the convs the Triton kernel runs by default (session 51's A/B)
CUDA_TABLE_TF32_S51 = {(96, 96, (3, 3, 3)), (96, 3, (3, 3, 3))}
# fp32: session 51's routing plus the 2D upsampling convs (the op rounding copies of their inputs in one pass, s52)
CUDA_TABLE_TF32_UP = {(96, 96, (3, 3, 3)), (96, 3, (3, 3, 3)), (192, 192, (3, 3, 3)), (384, 384, (3, 3, 3)),
                      (192, 96, (1, 3, 3)), (384, 192, (1, 3, 3))}


def _psnr(a, b):
    return (10 * torch.log10(4 / (a.double() - b.double()).pow(2).mean())).item()


def _vae_fp32_reference(vae, inp, fn):
    """fn run by an fp32 copy of the VAE (diffusers' loop, TF32 off) on the same input upcast: the oracle every
    provider is measured against (an fp32 VAE's providers run cuDNN in TF32, torch's default). Kept in CPU memory, so
    no provider's peak sees it. VKERN_BENCH_VAE_FP32=0 skips it (returns None)."""
    import copy

    if os.environ.get("VKERN_BENCH_VAE_FP32", "1") == "0":
        return None
    vae32 = copy.deepcopy(vae).float()  # bf16 -> fp32 is exact: the same weights (an fp32 VAE: a copy)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            out = fn(vae32, inp.float()).cpu()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        del vae32
        gc.collect()
        torch.cuda.empty_cache()
    return out


def _errors_vs_fp32(out, oracle, frames=8):
    """(rel L2, PSNR over [-1, 1] in dB) of out (GPU) against the CPU-resident fp32 oracle, in float64,
    a few frames at a time on the GPU (the oracle never whole on the GPU)."""
    import math

    diff2 = ref2 = 0.0
    for t in range(0, out.shape[2], frames):
        o = out[:, :, t:t + frames].double()
        r = oracle[:, :, t:t + frames].to(out.device, torch.float64)
        diff2 += (o - r).pow(2).sum().item()
        ref2 += r.pow(2).sum().item()
        del o, r
    mse = diff2 / out.numel()
    return (diff2 / ref2) ** 0.5, (10 * math.log10(4 / mse) if mse > 0 else float("inf"))


def _vae_rows(op, name, providers, args, make_input, runners):
    """Time and peak memory of each provider's run of the same random-weight VAE, output compared with
    diffusers' and, both carrying bf16 error, with an fp32 run of the same weights (rel_l2_vs_fp32,
    psnr_db_vs_fp32 for decode; err_ratio_vs_diffusers: this provider's error vs fp32 over diffusers').
    Peak = torch.cuda.max_memory_allocated during one call, weights included."""
    import vkern
    from vkern import models

    torch.manual_seed(0)
    vae = models.build_wan_vae("default", shapes.vae_dtype(name), "cuda")
    allocated = torch.cuda.memory_allocated() / 2**30
    params = param_bytes(vae) / 2**30
    inp = make_input()
    unknown = [p for p in providers or () if p not in runners and p not in ("diffusers", "vkern")]
    if unknown:  # else they would run diffusers' path under their name
        raise SystemExit(f"--providers: unknown {unknown} for {op}; known: diffusers, vkern, {list(runners)}")
    oracle = _vae_fp32_reference(vae, inp, runners["default"])
    reference = None
    fp32_err = {}
    for provider in providers or VAE_PROVIDERS:
        handle = vkern.patch(vae) if provider == "vkern" else None
        fn = runners[provider] if provider in runners else runners["default"]

        def run():
            with torch.inference_mode():
                return fn(vae, inp)

        ms, lo, hi = time_cuda(run, 1, args.step_repeats)
        gc.collect()
        torch.cuda.empty_cache()
        peak, _ = peak_gib(run)
        out = run().to("cuda")
        if handle:
            handle.undo()
        # The first provider's output (diffusers by default) is kept in CPU memory: on the GPU it would sit in
        # every later provider's peak (rows up to ddc9609 carried it: +0.18 GiB at 480p, +0.42 at 720p).
        first = reference is None
        out_cpu = out.cpu()  # one copy for both comparisons (0.42 GiB at 720p)
        reference = out_cpu if first else reference
        row = dict(op=op, shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi, param_gib=params,
                   allocated_gib=allocated, peak_gib=peak, activation_gib=peak - allocated,
                   rel_l2_vs_diffusers=rel_l2(out_cpu, reference))
        if provider.startswith("vkern") and os.environ.get("VKERN_WAN_VAE_FRAMES_PER_STEP"):
            row["frames_per_step"] = os.environ["VKERN_WAN_VAE_FRAMES_PER_STEP"]
        if op == "vae-decode":
            row["psnr_db"] = None if first else _psnr(out_cpu, reference)
        if oracle is not None:
            err, psnr = _errors_vs_fp32(out, oracle)
            fp32_err[provider] = err
            row["rel_l2_vs_fp32"] = err
            if op == "vae-decode":
                row["psnr_db_vs_fp32"] = psnr
            if "diffusers" in fp32_err:
                row["err_ratio_vs_diffusers"] = err / fp32_err["diffusers"] if fp32_err["diffusers"] > 0 else None
        yield row
        del out, out_cpu
        gc.collect()
        torch.cuda.empty_cache()


def _vae_decode(name, providers, args):
    from vkern import models
    from vkern.modules import wan_vae

    shape = models.latent_shape(shapes.VAE[name])
    runners = {"default": lambda vae, z: vae.decode(z).sample,
               "vkern-cpu-output": lambda vae, z: wan_vae.decode(vae, z, output_device="cpu"),
               "vkern-cudnn": cudnn_convs(wan_vae.decode),
               "vkern-cuda": cuda_convs(wan_vae.decode),
               "vkern-cuda-s16": with_cuda_table(wan_vae.decode, CUDA_TABLE_S16),
               "vkern-cuda-s58": with_cuda_table(wan_vae.decode, CUDA_TABLE_S58),
               "vkern-cuda-tf32-s51": with_cuda_table(wan_vae.decode, CUDA_TABLE_TF32_S51, "CUDA_FASTER_TF32"),
               "vkern-cuda-tf32-up": with_cuda_table(wan_vae.decode, CUDA_TABLE_TF32_UP, "CUDA_FASTER_TF32"),
               "vkern-copied-cache": copied_cache(wan_vae.decode),
               "vkern-unfused": cudnn_convs(lambda vae, z: wan_vae.decode(vae, z, fuse_bias=False, pad_channels=False)),
               "vkern-2-latents": lambda vae, z: wan_vae.decode(vae, z, latents_per_call=2),
               "vkern-no-handoff": no_handoff(wan_vae.decode),
               "vkern-tf32-in-conv": tf32_in_conv(wan_vae.decode),
               "vkern-tf32-norm-pass": tf32_norm_pass(wan_vae.decode),
               "vkern-2-latents-no-handoff": no_handoff(lambda vae, z: wan_vae.decode(vae, z, latents_per_call=2))}
    for steps in (1, 2, 4):  # the peak-vs-time A/B of frames_per_step, side by side with the default
        runners[f"vkern-frames-{steps}"] = lambda vae, z, steps=steps: wan_vae.decode(vae, z, frames_per_step=steps)
    runners["vkern-frames-all"] = lambda vae, z: wan_vae.decode(vae, z, frames_per_step=None)
    yield from _vae_rows("vae-decode", name, providers, args,
                         lambda: torch.randn(shape, device="cuda", dtype=shapes.vae_dtype(name)), runners)


def _vae_encode(name, providers, args):
    from vkern import models

    frames, height, width = models.RESOLUTIONS[shapes.VAE[name]]
    from vkern.modules import wan_vae

    runners = {"default": lambda vae, x: vae.encode(x).latent_dist.parameters,
               "vkern-cudnn": cudnn_convs(wan_vae.encode),
               "vkern-cuda": cuda_convs(wan_vae.encode),
               "vkern-cuda-s16": with_cuda_table(wan_vae.encode, CUDA_TABLE_S16),
               "vkern-cuda-s58": with_cuda_table(wan_vae.encode, CUDA_TABLE_S58),
               "vkern-cuda-tf32-s51": with_cuda_table(wan_vae.encode, CUDA_TABLE_TF32_S51, "CUDA_FASTER_TF32"),
               "vkern-cuda-tf32-up": with_cuda_table(wan_vae.encode, CUDA_TABLE_TF32_UP, "CUDA_FASTER_TF32"),
               "vkern-copied-cache": copied_cache(wan_vae.encode),
               "vkern-unfused": cudnn_convs(lambda vae, x: wan_vae.encode(vae, x, fuse_bias=False, pad_channels=False)),
               "vkern-tf32-in-conv": tf32_in_conv(wan_vae.encode),
               "vkern-tf32-norm-pass": tf32_norm_pass(wan_vae.encode)}
    providers = [p for p in (providers or VAE_PROVIDERS) if p not in ("vkern-cpu-output", "vkern-2-latents")]
    yield from _vae_rows("vae-encode", name, providers, args,
                         lambda: torch.rand(1, 3, frames, height, width, device="cuda",
                                            dtype=shapes.vae_dtype(name)) * 2 - 1, runners)


# One Wan VAE conv per layer class at 480p, in the time chunk it sees (decoder: 4 frames past the
# time upsamplings): (C_in, C_out, kernel, frames, H, W).
VAE_CONVS = {
    "dec-3x3x3-96ch-480x832": (96, 96, (3, 3, 3), 4, 480, 832),
    "dec-3x3x3-192ch-240x416": (192, 192, (3, 3, 3), 4, 240, 416),
    "dec-3x3x3-384ch-120x208": (384, 384, (3, 3, 3), 2, 120, 208),
    "dec-3x3x3-384ch-60x104": (384, 384, (3, 3, 3), 1, 60, 104),
    "dec-up-conv2d-192to96-480x832": (192, 96, (1, 3, 3), 4, 480, 832),
    "dec-up-conv2d-384to192-240x416": (384, 192, (1, 3, 3), 4, 240, 416),
    "dec-time-up-384to768-120x208": (384, 768, (3, 1, 1), 2, 120, 208),
    "dec-out-96to3-480x832": (96, 3, (3, 3, 3), 4, 480, 832),
    "dec-out-96to3-480x832-2f": (96, 3, (3, 3, 3), 2, 480, 832),  # an fp32 decode's 2-frame steps
    "enc-in-3to96-480x832": (3, 96, (3, 3, 3), 4, 480, 832),
}


def _vae_conv(name, providers, args):
    """diffusers' way (torch.cat of cache and chunk, F.pad, NCDHW conv; per-frame NCHW Conv2d for the
    upsampling conv) vs vkern's (one channels-last buffer [cache | chunk], spatial padding in the conv), and
    vkern-triton: vkern/triton/causal_conv.py's kernel (weight repacked per call, inside the timing); in fp32
    vkern-triton-tf32-inputs: the same on inputs rounded to TF32 beforehand (inputs_tf32, as the VAE loop feeds it);
    vkern-cuda-tf32-inputs likewise for csrc/causal_conv.cu (vkern-cuda rounds copies of x and the cache per call)."""
    import torch.nn.functional as F

    from vkern.ops.causal_conv import _cuda_block_n as cuda_block_n
    from vkern.ops.causal_conv import causal_conv3d_cuda, conv3d_zeros_buffered, cuda_unsupported
    from vkern.reference.causal_conv import round_to_tf32
    from vkern.reference.wan_vae import rms_norm_silu
    from vkern.triton.causal_conv import causal_conv3d as triton_conv

    cin, cout, k, frames, h, w = VAE_CONVS[name]
    tp, hp, wp = (2 if k[0] == 3 else 0), k[1] // 2, k[2] // 2
    x = torch.randn(1, cin, frames, h, w, device="cuda", dtype=DT)
    cache = torch.randn(1, cin, 2, h, w, device="cuda", dtype=DT)
    weight = (torch.randn(cout, cin, *k, device="cuda") / (cin * k[0] * k[1] * k[2]) ** 0.5).to(DT)
    bias = torch.randn(cout, device="cuda", dtype=DT)
    x_cl, cache_cl = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, cache))
    residual = None
    if k[0] == 1:  # the 2D upsampling conv, frames as a batch
        frames2d = x[0].transpose(0, 1).contiguous()
        frames2d_cl = frames2d.contiguous(memory_format=torch.channels_last)
        fns = {"diffusers": lambda: F.conv2d(frames2d, weight[:, :, 0], bias, 1, (hp, wp)),
               "vkern": lambda: F.conv2d(frames2d_cl, weight[:, :, 0], bias, 1, (hp, wp)),
               # the same conv as a 1x3x3 causal conv of the frames: [1, O, F, H, W] -> diffusers' [F, O, H, W]
               "vkern-triton": lambda: triton_conv(x_cl, weight, bias, (1, 1, 1), (0, hp, wp))[0].transpose(0, 1)}
        if cuda_unsupported(x_cl, weight, (1, 1, 1)) is None:  # csrc/causal_conv.cu, as the Wan VAE loop runs it
            fns["vkern-cuda"] = lambda: causal_conv3d_cuda(x_cl, weight, bias, (0, hp, wp))[0].transpose(0, 1)
    else:
        def diffusers():
            xx = torch.cat([cache, x], dim=2) if tp else x
            return F.conv3d(F.pad(xx, (wp, wp, hp, hp, 0, 0)), weight, bias)

        fns = {"diffusers": diffusers,
               "vkern": lambda: conv3d_zeros_buffered(x_cl, weight, bias, (1, 1, 1), (tp, hp, wp), cache_cl),
               # vkern's Triton implicit-GEMM conv (the op's opt-in "triton" backend): cache read in place, bias fused
               "vkern-triton": lambda: triton_conv(x_cl, weight, bias, (1, 1, 1), (tp, hp, wp), cache_cl)}
        if DT == torch.float32:  # the input as the VAE loop's norm pass writes it for a TF32 conv: rounded already
            x_tf32, cache_tf32 = (round_to_tf32(t).contiguous(memory_format=torch.channels_last_3d)
                                  for t in (x, cache))
            fns["vkern-triton-tf32-inputs"] = lambda: triton_conv(x_tf32, weight, bias, (1, 1, 1), (tp, hp, wp),
                                                                  cache_tf32, inputs_tf32=True)
        if cuda_unsupported(x_cl, weight, (1, 1, 1)) is None:  # csrc/causal_conv.cu (weight repacked per call)
            fns["vkern-cuda"] = lambda: causal_conv3d_cuda(x_cl, weight, bias, (tp, hp, wp), cache_cl)
            if DT == torch.float32:  # fp32: rounded copies of x and the cache in vkern-cuda; here rounded already
                fns["vkern-cuda-tf32-inputs"] = lambda: causal_conv3d_cuda(x_tf32, weight, bias, (tp, hp, wp),
                                                                           cache_tf32, inputs_tf32=True)
            # one CTA per tile instead of persistent CTAs
            fns["vkern-cuda-grid"] = lambda: causal_conv3d_cuda(x_cl, weight, bias, (tp, hp, wp), cache_cl,
                                                                persistent=False)
            if cout % 96 == 0 and cout % 128 == 0:  # the narrower output-channel tile (more tiles per layer)
                fns["vkern-cuda-n96"] = lambda: causal_conv3d_cuda(x_cl, weight, bias, (tp, hp, wp), cache_cl,
                                                                   block_n=96)
            if cout == cin:  # a residual block's conv2: + the shortcut in the epilogue (expected: + it, below)
                residual = True  # made below, from the output's shape (no kernel launch before the timed ones: ncu)
                fns["vkern-cuda-residual"] = lambda: causal_conv3d_cuda(x_cl, weight, bias, (tp, hp, wp), cache_cl,
                                                                        residual=residual)
            if cout == cin == cuda_block_n(cout):  # the epilogue's norm: instead of the output, or a second one
                ones = torch.ones(cout, device="cuda", dtype=DT)
                fns["vkern-cuda-norm"] = lambda: causal_conv3d_cuda(x_cl, weight, bias, (tp, hp, wp), cache_cl,
                                                                    residual=residual, norm=(ones, None, True))
                fns["vkern-cuda-normed"] = lambda: causal_conv3d_cuda(
                    x_cl, weight, bias, (tp, hp, wp), cache_cl, residual=residual, norm=(ones, None, True),
                    normed=True)[0]
    # Probes of the vkern conv: without its bias (what a bias fused into the next op leaves), and with
    # cuDNN's autotuner (benchmark mode, trying 10 / all engines) instead of its heuristics' first pick.
    vkern = fns["vkern"]
    fns["vkern-no-bias"] = (lambda: F.conv2d(frames2d_cl, weight[:, :, 0], None, 1, (hp, wp))) if k[0] == 1 else \
        (lambda: conv3d_zeros_buffered(x_cl, weight, None, (1, 1, 1), (tp, hp, wp), cache_cl))
    for label, limit in (("vkern-cudnn-autotune", 10), ("vkern-cudnn-autotune-all", 0)):
        def tuned(limit=limit):
            with torch.backends.cudnn.flags(enabled=True, benchmark=True, benchmark_limit=limit):
                return vkern()
        fns[label] = tuned
    flops = 2 * cin * cout * k[0] * k[1] * k[2] * frames * h * w
    expected = fns["diffusers"]()
    if residual is not None:
        residual = torch.randn_like(expected).contiguous(memory_format=torch.channels_last_3d)
    for provider in providers or list(fns):
        if provider not in fns:  # vkern-cuda: only the convs the kernel takes
            continue
        ms, lo, hi = time_cuda(fns[provider], args.warmup, args.repeats)
        want = expected + residual if provider in ("vkern-cuda-residual", "vkern-cuda-normed") else expected
        if provider == "vkern-cuda-norm":
            want = rms_norm_silu((expected + residual).float(), torch.ones(cout, device="cuda"))
        yield dict(op="vae-conv", shape=name, provider=provider, ms=ms, ms_min=lo, ms_max=hi, tflops=flops / ms / 1e9,
                   rel_l2_vs_diffusers=None if provider == "vkern-no-bias" else rel_l2(fns[provider](), want))


def _wan_self_attention(name, providers, args):
    return _attention_module(name, providers, args, "wan-self-attn", (_wan_attention_module, name))


OPS = {"attention": (_attention, shapes.ATTENTION), "wan-self-attn": (_wan_self_attention, shapes.ATTENTION),
       "attn-module": (_attention_module, ATTENTION_MODULES),
       "qk-norm-rope": (_qk_norm_rope, WAN_PROLOGUE_SHAPES), "family-prologue": (_family_prologue, FAMILY_PROLOGUES),
       "gemm": (_gemm, GEMM_SHAPES),
       "fp8-quantize": (_fp8_quantize, FP8_SHAPES), "step": (_step, shapes.STEPS),
       "vae-decode": (_vae_decode, shapes.VAE), "vae-encode": (_vae_encode, shapes.VAE),
       "vae-conv": (_vae_conv, VAE_CONVS)}


def _commit():
    if os.environ.get("VKERN_COMMIT"):
        return os.environ["VKERN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", required=True, choices=list(OPS))
    parser.add_argument("--shape", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--providers", default="all", help="comma-separated, or 'all'")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--step-graph", action="store_true",
                        help="also time each step replayed as one CUDA graph (graph_ms: the step without its host "
                             "time, the ceiling of every per-call trim; graph_error if the step cannot be captured)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="the inputs' (and the 8-bit kernels' output) dtype; rows other than bf16 say it; float32: "
                             "vae-conv only (an fp32 VAE's convs, TF32 as torch's default runs them)")
    args = parser.parse_args(argv)
    if args.dtype == "float32" and args.op != "vae-conv":
        raise SystemExit(f"--dtype float32: vae-conv only (got --op {args.op}; fp32 VAEs: the -fp32 vae shapes)")
    global DT
    DT = getattr(torch, args.dtype)
    if not torch.cuda.is_available():
        raise SystemExit("bench needs a CUDA GPU")
    fn, table = OPS[args.op]
    names = list(table) if args.shape == "all" else args.shape.split(",")
    unknown = [n for n in names if n not in table and not (
        args.op == "attention" and n.removesuffix("-cross").removesuffix("-joint") in table)]
    if unknown:
        raise SystemExit(f"--shape: unknown {unknown}; known for {args.op}: {list(table)}")
    providers = None if args.providers == "all" else args.providers.split(",")
    meta = dict(world=1, gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=_commit(),
                date=datetime.date.today().isoformat(), **({} if DT == torch.bfloat16 else {"dtype": args.dtype}))
    rows = []
    for name in names:
        for row in fn(name, providers, args):
            row = {**row, **meta}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
