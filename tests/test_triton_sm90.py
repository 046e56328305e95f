"""Every Triton launch of the CPU tests compiles for sm_90 (tests/triton_sm90.py): the interpreter accepts code
the compiler rejects, and a GPU session is the wrong place to learn that. Runs last (tests/conftest.py)."""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the interpreted launches are recorded on the CPU; a GPU compiles its own", allow_module_level=True)

import vkern.triton  # noqa: E402
from tests import triton_sm90  # noqa: E402
from tests.sm90_sample_kernels import _fine_kernel, _interpreter_only_kernel  # noqa: E402
from vkern import ops  # noqa: E402
from vkern.triton.causal_conv import causal_conv3d as conv_kernel  # noqa: E402

BF16 = torch.bfloat16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch_each_kernel():
    """Small calls that reach every vkern Triton kernel and its main branches, so that this file alone checks each."""
    B, S, H = 1, 130, 2
    for D in (64, 128):
        q, k, v = (torch.randn(B, S, H, D, dtype=BF16) for _ in range(3))
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[:, -7:] = False
        ops.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend="triton")
        ops.attention_8bit(q, k, v, qk="e4m3", pv="e4m3")
        x = torch.randn(B, S, H * D, dtype=BF16)
        angles = torch.randn(1, S, 1, D // 2, dtype=torch.float64).repeat_interleave(2, -1)
        tables = (angles.cos(), angles.sin())
        ops.qk_norm_rope(x, torch.randn(H * D, dtype=BF16), 1e-6, H, *tables)
        ops.qk_norm_rope(x, torch.randn(D, dtype=BF16), 1e-6, H, *tables, rope_tables="per_element")
        per_head = tuple(t.expand(1, S, H, D).contiguous() for t in tables)  # (LTX's tables: a row per head)
        ops.qk_norm_rope(x, torch.randn(H * D, dtype=BF16), 1e-6, H, *per_head, rope_tables="per_element")
        pairs = tuple(t[..., ::2].expand(1, S, H, D // 2).contiguous() for t in tables)  # (Mochi's)
        ops.qk_norm_rope(x, torch.randn(D, dtype=BF16), 1e-6, H, *pairs, rope_tables="pairs")
        ops.qk_norm_rope(x, torch.randn(H * D, dtype=BF16), 1e-6, H, *pairs, rope_tables="split")  # (LTX-2's)
        ops.qk_norm_rope(x, torch.randn(D, dtype=BF16), 1e-6, H, *tables, rope_tables="per_element", norm="layer",
                         bias=torch.randn(D, dtype=BF16))  # (CogVideoX's)
        for quant in ("e4m3", "int8"):
            ops.qk_norm_rope(x, torch.randn(D, dtype=BF16), 1e-6, H, *tables, quant=quant)
            ops.qk_norm_rope(x, torch.randn(H * D, dtype=BF16), 1e-6, H, *tables, quant=quant, token_block=128,
                             key_padding_mask=mask)
    x = torch.randn(B, 9, 96, dtype=BF16)
    shift, scale, gate = (torch.randn(B, 1, 96, dtype=BF16) for _ in range(3))
    ops.layernorm_modulate(x, shift, scale, 1e-6)
    ops.layernorm_modulate(x, shift, scale, 1e-6, fp8=True)
    ops.gelu_tanh_fp8(torch.randn(9, 160, dtype=BF16))
    ops.gate_residual(x, torch.randn_like(x), gate)
    # the native-dtype glue (LTX's RMSNorm with table rows; CogVideoX's affine LayerNorm): dtype constexprs
    table = torch.randn(2, 96, dtype=BF16)
    ops.layernorm_modulate(x, shift, scale, 1e-6, shift_table=table[0], scale_table=table[1], rms=True,
                           native_dtypes=True)
    ops.layernorm_modulate(x, shift, scale, 1e-6, torch.randn(96, dtype=BF16), torch.randn(96, dtype=BF16),
                           native_dtypes=True)
    ops.gate_residual(x, torch.randn_like(x), gate, table[0], native_dtypes=True)
    # Mochi's glue: RMSNorm * (1 + scale) without a shift, and x + RMSNorm(y) * gate
    ops.layernorm_modulate(x, None, scale, 1e-6, rms=True)
    ops.rms_gate_residual(x, torch.randn_like(x), gate, 1e-6)
    video = torch.randn(1, 16, 3, 6, 6, dtype=BF16).to(memory_format=torch.channels_last_3d)
    cache = video[:, :, -2:]
    for pad_mode in ("zeros", "replicate"):  # (on the CPU the op takes the reference: the kernel itself here)
        conv_kernel(video, torch.randn(16, 16, 3, 3, 3, dtype=BF16), torch.randn(16, dtype=BF16), (1, 1, 1),
                    (2, 1, 1), cache=cache if pad_mode == "zeros" else None, pad_mode=pad_mode)
    video32 = video.float()  # fp32 (an fp32 VAE): TF32 products (torch's default) and IEEE ones
    for tf32 in (True, False):
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=tf32):
            conv_kernel(video32, torch.randn(16, 16, 3, 3, 3), torch.randn(16), (1, 1, 1), (2, 1, 1),
                        cache=video32[:, :, -2:])
    ops.rms_norm_silu(video, torch.rand(16, dtype=BF16), torch.randn(16, dtype=BF16))
    ops.causal_conv._tf32_copy(video32)  # the CUDA conv op's TF32 rounding copy
    ops.residual_add_(video.clone(), video, torch.randn(16, dtype=BF16))


def _vkern_kernels():
    """The launchable kernels (module-level JIT functions named _*_kernel) of vkern.triton."""
    names = set()
    for info in pkgutil.iter_modules(vkern.triton.__path__):
        module = importlib.import_module(f"vkern.triton.{info.name}")
        for name, value in vars(module).items():
            if name.startswith("_") and name.endswith("_kernel") and getattr(value, "fn", None) is not None:
                names.add((module.__name__, name))
    return names


def _failures(results):
    return [f"{r['name']} {r['constexprs']} {r['options']}: {r['error']}" for r in results if not r["ok"]]


def test_every_launch_compiles_for_sm90(tmp_path):
    _launch_each_kernel()
    specs = triton_sm90.recorded()
    launched = {(s["module"], s["name"]) for s in specs}
    assert _vkern_kernels() <= launched, f"never launched here: {sorted(_vkern_kernels() - launched)}"
    results = triton_sm90.compile_all(specs, str(tmp_path))
    assert len(results) == len(specs)
    assert not _failures(results), "\n".join(_failures(results))
    print(f"{len(specs)} launch specializations, {len(results)} sm_90 compiles")


def test_the_check_catches_what_only_the_interpreter_takes(tmp_path):
    """The check itself: a kernel that runs in the interpreter but does not compile fails it; one that compiles
    passes, with the launch specialized as the GPU would (16-byte divisibility, an interpreter switch off)."""
    x = torch.ones(16)
    _interpreter_only_kernel[(1,)](x, N=16)
    _fine_kernel[(1,)](x, 16, EMULATE_RNE=True, BLOCK=16, num_warps=2)
    torch.testing.assert_close(x, torch.full((16,), 4.0))  # (both ran)
    bad, good = (triton_sm90.spec_of(k.fn, args, kwargs) for k, args, kwargs in
                 ((_interpreter_only_kernel, (x,), dict(N=16)),
                  (_fine_kernel, (x, 16), dict(EMULATE_RNE=True, BLOCK=16, num_warps=2))))
    assert good["attrs"] == {"x_ptr": "D", "n": "D"} and good["constexprs"]["EMULATE_RNE"] is False
    assert good["options"] == {"num_warps": 2}
    results = {r["name"]: r for r in triton_sm90.compile_all([bad, good], str(tmp_path))}
    assert not results["_interpreter_only_kernel"]["ok"] and "break" in results["_interpreter_only_kernel"]["error"]
    assert results["_fine_kernel"]["ok"], results["_fine_kernel"]


@pytest.mark.parametrize("heads, head_dim, form", [(12, 128, "per_pair"), (40, 128, "per_pair"),
                                                    (32, 64, "per_element"), (32, 128, "split")])
def test_prologue_moves_16_byte_vectors_in_one_round_trip(heads, head_dim, form):
    """The QK prologue in Wan's form, in LTX-Video's (a fp32 table row per head, 4x the bytes of q) and in LTX-2's
    split form (a fp32 row of D / 2 per head), compiled for sm_90 as a real launch specializes it: q/k rows loaded
    and stored as 16-byte vectors, no 2-byte accesses (what its 2.7-3.0 TB/s on the H200 rests on), the table rows
    as 16-byte vectors too, and every global load issued before the first barrier (the norm's cross-warp
    reduction), so that a program waits on memory once."""
    code = ("import json; from bench.triton_ptx import qk_norm_rope_ptx, ptx_memory_ops, loads_before_first_barrier;"
            f"ptx = qk_norm_rope_ptx({heads}, {head_dim}, {form!r})[1];"
            "print(json.dumps([ptx_memory_ops(ptx), loads_before_first_barrier(ptx)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # (compiled, not interpreted)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ops, (early, loads) = json.loads(done.stdout.splitlines()[-1])
    assert ops.get("ld.global.v4.b32", 0) >= heads // 8 and ops.get("st.global.v4.b32", 0) >= 2, ops
    assert not any(op.endswith(".b16") for op in ops), ops
    if form == "per_element":  # x, weight, cos, sin: 2 x 16 B each per thread at 32 x 64 over 4 warps
        assert ops == {"ld.global.v4.b32": 12, "st.global.v4.b32": 2}, ops
    if form == "split":  # x, weight, cos, sin: 2 x 16 B each per thread at 32 x 128 over 8 warps
        assert ops == {"ld.global.v4.b32": 8, "st.global.v4.b32": 2}, ops
    assert early == loads > 0, (early, loads)


@pytest.mark.parametrize("C, O, warps, stages, inputs_tf32", [(96, 96, 4, 3, False), (96, 96, 8, 4, False),
                                                              (96, 3, 4, 3, False), (96, 96, 4, 3, True)])
def test_fp32_conv_runs_tf32_wgmma_on_16_byte_copies(C, O, warps, stages, inputs_tf32):
    """The causal conv in fp32 with TF32 products, compiled for sm_90 as a real launch specializes it: tl.dot becomes
    TF32 wgmma on A tiles rounded by cvt.rna, and both tiles reach shared memory as 16-byte cp.async copies. The
    weight is packed K-major in fp32 for this: with its N contiguous Triton copied the B tile 4 bytes at a time (96
    copies a thread and stage). With inputs_tf32 (the input rounded by its writer) no cvt, and wgmma reads A from
    shared memory (a descriptor) instead of registers: the point of rounding at the writer."""
    code = ("import json, re; from bench.triton_ptx import conv_ptx, ptx_memory_ops;"
            f"ptx = conv_ptx({C}, {O}, 'fp32', {warps}, {stages}, {inputs_tf32});"
            "print(json.dumps([ptx_memory_ops(ptx), re.findall(r'wgmma\\.mma_async[\\w.]*', ptx),"
            "                  len(re.findall(r'cvt\\.rna\\.tf32\\.f32', ptx)),"
            "                  re.findall(r'wgmma\\.mma_async[^{]*\\{[^}]*\\}, (\\{|%rd)', ptx)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # (compiled, not interpreted)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ops, wgmma, rounds, a_operands = json.loads(done.stdout.splitlines()[-1])
    assert wgmma and all(w.endswith(".f32.tf32.tf32") for w in wgmma), wgmma
    # A rounded to TF32 in the loop, in registers (the weight is rounded when packed), or as it is, from shared memory
    assert (rounds == 0 and set(a_operands) == {"%rd"}) if inputs_tf32 else (rounds > 0 and set(a_operands) == {"{"})
    copies = {op: n for op, n in ops.items() if op.startswith("cp.async")}
    assert list(copies) == ["cp.async.16B"], ops
