"""Peak memory of the first and a repeated fast-path Wan VAE decode (17 frames, 256x256, random weights),
per conv backend and option: the first call includes one-time costs (Triton autotuning) that the
steady state does not. python -m bench.vae_first_call_peak (CUDA)."""
import os

import torch

from vkern import models
from vkern.modules import wan_vae as fast


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    torch.manual_seed(0)
    vae = models.build_wan_vae("default", torch.bfloat16, "cuda")
    z = torch.randn(1, 16, 5, 32, 32, device="cuda", dtype=torch.bfloat16)
    print(f"diffusers: {peak_mib(lambda: vae.decode(z).sample):.2f} MiB")
    for backend in ("default", "cudnn"):
        if backend != "default":
            os.environ["VKERN_CAUSAL_CONV3D_BACKEND"] = backend
        for fuse_bias in (True, False):
            def decode():
                return fast.decode(vae, z, fuse_bias=fuse_bias)
            print(f"convs {backend}, fuse_bias={fuse_bias}: first {peak_mib(decode):.2f} MiB, "
                  f"again {peak_mib(decode):.2f} MiB")


if __name__ == "__main__":
    main()
