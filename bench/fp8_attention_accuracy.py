"""fp8 attention accuracy (issue 3: cosine >= 0.9995 and rel L2 <= 0.02 vs an fp32 reference) per backend, on
random q/k/v and on q/k/v from a diffusers WanAttention (RMSNorm across heads, RoPE; self and cross), against a
float64 oracle on 512 sampled query rows. Prints a table and writes JSON lines (--out).
    python -m bench.fp8_attention_accuracy [--out rows.jsonl] [--providers fp8-cuda,int8pv-cuda,...]"""
import argparse
import json
import os

import torch

import vkern.ops
from vkern.reference import attention as ref

from .bench import _commit
from .wan_inputs import wan_qkv


def _wan_qkv(S, dim, heads, kind):
    return wan_qkv(1, S, dim, heads, torch.bfloat16, "cuda", kind)


def _unsmoothed(q, k, v, qk):
    """attention_8bit(qk=qk, pv="e4m3") with V quantized as it is (no value_offset)."""
    H = q.shape[2]
    q8, qs = vkern.ops.qk_norm_rope(q.flatten(2), None, 0.0, H, quant=qk)
    k8, ks = vkern.ops.k_to_8bit(k, qk)
    vt, vs = vkern.ops.v_to_e4m3(v)
    return vkern.ops.attention_prequantized(q8, qs, k8, ks, vt, vs, out_dtype=q.dtype)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--providers", default=None, help="comma-separated providers (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = {
        "random 32760x32760 D128 H12": lambda: tuple(torch.randn(1, 32760, 12, 128, device="cuda", dtype=torch.bfloat16)
                                                     for _ in range(3)),
        "WanAttention self 1.3B 480p": lambda: _wan_qkv(32760, 1536, 12, "self"),
        "WanAttention cross 1.3B 480p": lambda: _wan_qkv(32760, 1536, 12, "cross"),
        # 720p's sequence: 2.3x the keys
        "WanAttention self 1.3B 720p": lambda: _wan_qkv(75600, 1536, 12, "self"),
    }

    # "fp8": the fp8 mode's scheme (int8 Q/K, e4m3 P/V, V smoothed); "-e4m3qk": e4m3 Q/K; "-unsmoothed": V
    # quantized as it is; "int8pv": int8 Q/K with u8 P and int8 V (pv="int8").
    int8_e4m3 = ("int8", "e4m3")
    providers = {"fp8-e4m3qk-cuda": ("cuda", ("e4m3", "e4m3"), {}), "fp8-cuda": ("cuda", int8_e4m3, {}),
                 "fp8-cuda-unsmoothed": ("cuda", int8_e4m3, {"smooth": False}),
                 # session 20: the CUDA kernel's 192-key tile (O in the tensor cores)
                 "fp8-cuda-192": ("cuda", int8_e4m3, {"VKERN_FLASH_FP8_KEYS": "192"}),
                 "fp8-e4m3qk-cuda-192": ("cuda", ("e4m3", "e4m3"), {"VKERN_FLASH_FP8_KEYS": "192"}),
                 "fp8-triton": ("triton", int8_e4m3, {}), "fp8-reference": ("reference", int8_e4m3, {}),
                 "fp8-reference-unsmoothed": ("reference", int8_e4m3, {"smooth": False}),
                 "fp8-e4m3qk-reference": ("reference", ("e4m3", "e4m3"), {}),
                 "int8-triton": ("triton", ("int8", "bf16"), {}),
                 # session 21: int8 Q/K, u8 P against each 128-key block's row max, int8 V (smoothed)
                 "int8pv-cuda": ("cuda", ("int8", "int8"), {}), "int8pv-reference": ("reference", ("int8", "int8"), {})}
    rows = []
    for name, make in inputs.items():
        q, k, v = make()
        sample = torch.randperm(q.shape[1], device="cuda")[:512]
        oracle = ref.attention_lse(q[:, sample], k, v)[0].double()
        for provider, (backend, (qk, pv), env) in providers.items():
            if args.providers and provider not in args.providers.split(","):
                continue
            env = dict(env, VKERN_ATTENTION_8BIT_BACKEND=backend)
            smooth = env.pop("smooth", True)
            os.environ.update(env)
            try:
                qs = q[:, sample] if backend == "reference" else q  # the emulation on the sampled rows only
                out = vkern.ops.attention_8bit(qs, k, v, qk=qk, pv=pv) if smooth else _unsmoothed(qs, k, v, qk)
            finally:
                for variable in env:
                    del os.environ[variable]
            out = out if backend == "reference" else out[:, sample]
            err = ((out.double() - oracle).norm() / oracle.norm()).item()
            cos = torch.nn.functional.cosine_similarity(out.double().flatten(), oracle.flatten(), dim=0).item()
            rows.append(dict(op="attention-accuracy", shape=name, provider=provider, rel_l2=err, cos=cos, gpu=torch.cuda.get_device_name(), torch=torch.__version__, commit=_commit()))
            print(f"{name:32s} {provider:20s} rel L2 {err:.4f}  cos {cos:.6f}", flush=True)
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
