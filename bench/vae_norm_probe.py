"""The Wan VAE's fused RMS norm + SiLU kernel at the decoder's feature-map shapes against a plain copy of
the same bytes (the bandwidth ceiling), with and without its SiLU, and its error against a float64
reference. Run 18 (b8002cd) measured the kernel that followed diffusers' eager roundings and per-element
IEEE divisions ("exact": 13% of the copy's bandwidth) beside the arithmetic the kernel has now ("fast":
65%, and half the error): bench/results/2026-11-22-h200-b8002cd-vae-norm-probe.md. Prints a table;
rows to --out.

    python -m bench.vae_norm_probe --out rows.jsonl
"""
import argparse
import json

import torch

from .bench import _commit
from .timing import time_cuda

SHAPES = [(96, 4, 480, 832), (192, 4, 240, 416), (384, 4, 120, 208), (384, 1, 60, 104)]  # C, T, H, W


def _oracle(x, gamma, silu=True):
    x = x.double()
    y = torch.nn.functional.normalize(x, dim=1) * x.shape[1] ** 0.5 * gamma.double().view(1, -1, 1, 1, 1)
    return torch.nn.functional.silu(y) if silu else y


def probe(C, T, H, W):
    from vkern.triton.vae_glue import rms_norm_silu

    cl = torch.channels_last_3d
    x = torch.randn(1, C, T, H, W, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    gamma = (1 + 0.1 * torch.randn(C, device="cuda")).to(torch.bfloat16)
    out = torch.empty_like(x, memory_format=cl)
    scale, eps = C ** 0.5, 1e-12

    def run(silu=True):
        return lambda: rms_norm_silu(x, gamma, None, scale, eps, silu, out)

    gb = 2 * x.numel() * x.element_size() / 1e9  # read + write
    row = {"op": "vae-norm-probe", "shape": f"C{C}-T{T}-{H}x{W}", "gb": gb}
    for name, fn in (("copy", lambda: out.copy_(x)), ("kernel", run()), ("kernel_nosilu", run(silu=False))):
        ms = time_cuda(fn, repeats=20)[0]
        row[f"{name}_ms"], row[f"{name}_gbs"] = ms, gb / ms * 1e3
    oracle = _oracle(x, gamma)
    run()()
    row["rel_l2"] = ((out.double() - oracle).norm() / oracle.norm()).item()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.vae_norm_probe", description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": _commit()}
    print("| shape | copy GB/s | kernel ms (GB/s) | kernel, no SiLU ms | rel L2 vs float64 |")
    print("| --- | --- | --- | --- | --- |")
    for shape in SHAPES:
        row = {**probe(*shape), **meta}
        print(f"| {row['shape']} | {row['copy_gbs']:.0f} | {row['kernel_ms']:.3f} ({row['kernel_gbs']:.0f}) | "
              f"{row['kernel_nosilu_ms']:.3f} | {row['rel_l2']:.2e} |", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
