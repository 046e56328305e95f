"""Why do two timings of one attention call differ? Times providers at one shape by bench.timing's two methods
(synchronized after each call, and queued back to back), alternating, plus a synchronized call followed by an idle
pause, while nvidia-smi samples the SM clock and the board power; prints one JSON line per phase.

  python3 -m bench.timing_probe --shape wan1.3b-480p --providers cudnn,vkern-int8pv-cuda-kernel --rounds 3

(Session 27: queued timing read cuDNN 5% slower than synchronized timing at the 480p shapes, the int8pv kernel
faster; bench/NOTES.md. Session 31 added the bf16 CUDA kernel's two key tiles: vkern-cuda-k128, vkern-cuda-k176.)"""
import argparse
import datetime
import json
import statistics
import subprocess
import tempfile
import time

import torch

from . import shapes
from .timing import time_cuda, time_cuda_queued


def sampler(path):
    """nvidia-smi writing (timestamp, SM MHz, W) every 10 ms to path."""
    return subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader,nounits",
                             "-lms", "10"], stdout=open(path, "w"), stderr=subprocess.DEVNULL)


def samples(path):
    out = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        try:
            stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((stamp, float(parts[1]), float(parts[2])))
        except (ValueError, IndexError):
            continue
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="wan1.3b-480p")
    parser.add_argument("--providers", default="cudnn,vkern-int8pv-cuda-kernel")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import vkern.ops
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = shapes.ATTENTION[args.shape]
    q, k, v = (torch.randn(1, s.tokens, s.heads, s.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))

    fns = {"cudnn": cudnn}
    if "vkern-int8pv-cuda-kernel" in args.providers:
        q8, qs = vkern.ops.qk_norm_rope(q.flatten(2), None, 0.0, s.heads, quant="int8")
        k8, ks = vkern.ops.k_to_8bit(k, "int8")
        offset = vkern.ops.value_offset(v)
        vt, vs = vkern.ops.v_to_8bit(v, "u8", offset=offset)
        fns["vkern-int8pv-cuda-kernel"] = lambda: vkern.ops.attention_prequantized(
            q8, qs, k8, ks, vt, vs, out_dtype=q.dtype, v_offset=offset)
    # The bf16 CUDA kernel with each key tile (session 31: is it power-limited like cuDNN?).
    from .bench import with_env

    cuda = with_env(lambda: vkern.ops.attention(q, k, v), "VKERN_ATTENTION_BACKEND", "cuda")
    fns["vkern-cuda-k128"] = with_env(cuda, "VKERN_FLASH_KEYS", "128")
    fns["vkern-cuda-k176"] = with_env(cuda, "VKERN_FLASH_KEYS", "176")
    flops = s.flops(kv_tokens=s.tokens)
    log = tempfile.mktemp(suffix=".csv")
    proc = sampler(log)
    time.sleep(0.5)
    phases = []
    methods = {"sync": lambda fn: time_cuda(fn, 2, args.repeats)[0],
               "queued": lambda fn: time_cuda_queued(fn, 1, args.repeats)[0],
               "sync+pause10ms": lambda fn: time_cuda(fn, 2, args.repeats, pause_s=0.01)[0]}
    for r in range(args.rounds):
        for provider in args.providers.split(","):
            for method, timer in methods.items():
                begin = time.time()
                ms = timer(fns[provider])
                phases.append(dict(shape=args.shape, provider=provider, method=method, round=r, ms=ms,
                                   tflops=flops / ms / 1e9, begin=begin, end=time.time()))
    time.sleep(0.2)
    proc.terminate()
    proc.wait()
    trace = samples(log)
    for p in phases:
        inside = [(mhz, w) for t, mhz, w in trace if p["begin"] <= t <= p["end"]]
        p["samples"] = len(inside)
        if inside:
            p["sm_mhz"] = statistics.mean(m for m, _ in inside)
            p["watts"] = statistics.mean(w for _, w in inside)
        p["gpu"] = torch.cuda.get_device_name()
        del p["begin"], p["end"]
        print(json.dumps(p), flush=True)


if __name__ == "__main__":
    main()
