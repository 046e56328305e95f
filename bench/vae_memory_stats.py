"""Which memory statistic gives ANCHORS.md's 17.8 GiB for diffusers' 480p decode (81 frames, bf16,
default config)? Our bench rows measure torch.cuda.max_memory_allocated (4.6 GiB for diffusers). This
probe takes, for diffusers and vkern, the allocated and the reserved (caching allocator) peaks under
inference_mode, no_grad, and cuDNN benchmark mode (first call: cuDNN tries its algorithms and their
workspaces; then again). python -m bench.vae_memory_stats [--res 480p] (CUDA, a fresh process: cuDNN's
benchmark cache must not have seen the shapes)."""
import argparse
import gc
import json

import torch

from vkern import models
from vkern.modules import wan_vae as fast

from . import shapes
from .bench import _commit


def peaks(fn, grad_mode):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with grad_mode():
        out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--res", default="480p")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    name = f"wan-vae-{args.res}"
    torch.manual_seed(0)
    vae = models.build_wan_vae("default", torch.bfloat16, "cuda")
    z = torch.randn(models.latent_shape(shapes.VAE[name]), device="cuda", dtype=torch.bfloat16)
    runs = [
        ("diffusers", "cudnn.benchmark, first call", torch.inference_mode, True, lambda: vae.decode(z).sample),
        ("diffusers", "cudnn.benchmark, again", torch.inference_mode, True, lambda: vae.decode(z).sample),
        ("diffusers", "inference_mode", torch.inference_mode, False, lambda: vae.decode(z).sample),
        ("diffusers", "no_grad", torch.no_grad, False, lambda: vae.decode(z).sample),
        ("vkern", "inference_mode", torch.inference_mode, False, lambda: fast.decode(vae, z)),
        ("vkern", "inference_mode, again", torch.inference_mode, False, lambda: fast.decode(vae, z)),
        ("vkern", "output on the CPU", torch.inference_mode, False, lambda: fast.decode(vae, z, output_device="cpu")),
    ]
    weights = sum(p.numel() * p.element_size() for p in vae.parameters()) / 2**30
    for provider, mode, grad_mode, benchmark, fn in runs:
        torch.backends.cudnn.benchmark = benchmark
        allocated, reserved = peaks(fn, grad_mode)
        row = dict(op="vae-decode-memory", shape=name, provider=provider, mode=mode, weights_gib=weights,
                   peak_allocated_gib=allocated, peak_reserved_gib=reserved, gpu=torch.cuda.get_device_name(),
                   torch=torch.__version__, commit=_commit())
        print(f"{provider:10s} {mode:32s} allocated {allocated:6.2f} GiB  reserved {reserved:6.2f} GiB")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    main()
