"""The Triton causal conv's launch configurations one by one, against the autotuner's pick, on a GPU.

For an fp32 VAE's convs (TF32 products, inputs rounded by their writer as the VAE loop feeds them) or bf16: each
(BLOCK_M, num_warps, num_stages) of vkern/triton/causal_conv.py's _configs() plus candidates outside it, timed on
the same inputs, so a change of the tuning space is decided by measurement. Rows (op "conv-config") to --out.

  python -m bench.conv_config_probe --out rows.jsonl [--dtype float32] [--shape dec-3x3x3-96ch-480x832,...]
"""
import argparse
import json
import time

import torch

from bench.bench import VAE_CONVS, _commit
from bench.timing import time_cuda

# Outside _configs(): deeper pipelines (an fp32 stage of 128 x 32 A and 32 x 128 B tiles is 32 KB) and 256-pixel tiles
# (two m64 wgmma per warpgroup at 8 warps: the B tile read once for twice the rows).
CANDIDATES = ((128, 8, 5), (128, 4, 5), (256, 8, 3), (256, 8, 2), (64, 4, 6))


def _fixed(kernel, block_m, warps, stages):
    """A stand-in for the autotuned launcher that always launches one configuration."""
    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: kernel[grid](*args, BLOCK_M=block_m, num_warps=warps, num_stages=stages,
                                                        **kwargs)
    return Launcher()


def probe(name, dtype, warmup, repeats):
    from vkern.reference.causal_conv import round_to_tf32
    from vkern.triton import causal_conv as conv

    cin, cout, k, frames, h, w = VAE_CONVS[name]
    cl = torch.channels_last_3d
    x = torch.randn(1, cin, frames, h, w, device="cuda").contiguous(memory_format=cl)
    cache = torch.randn(1, cin, 2, h, w, device="cuda").contiguous(memory_format=cl)
    tf32 = dtype == torch.float32
    if tf32:
        x, cache = (round_to_tf32(t).contiguous(memory_format=cl) for t in (x, cache))
    x, cache = x.to(dtype), cache.to(dtype)
    weight = (torch.randn(cout, cin, *k, device="cuda") / (cin * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
    bias = torch.randn(cout, device="cuda").to(dtype)
    padding = (2 if k[0] == 3 else 0, k[1] // 2, k[2] // 2)

    def run():
        return conv.causal_conv3d(x, weight, bias, (1, 1, 1), padding, cache, inputs_tf32=tf32)

    flops = 2 * cin * cout * k[0] * k[1] * k[2] * frames * h * w
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        expected = run()
        ms = time_cuda(run, warmup, repeats)[0]
        tuned = conv._causal_conv3d_tuned
        picked = list(tuned.cache.values())[-1] if tuned.cache else None
        timings = {str(c): t for c, t in (getattr(tuned, "configs_timings", None) or {}).items()}
        yield dict(shape=name, config="autotuned", picked=str(picked), tuning_ms=timings, ms=ms,
                   tflops=flops / ms / 1e9)
        configs = [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in conv._configs()] + list(CANDIDATES)
        try:
            for bm, warps, stages in configs:
                conv._causal_conv3d_tuned = _fixed(conv._causal_conv3d_kernel, bm, warps, stages)
                try:
                    out = run()
                    ms = time_cuda(run, warmup, repeats)[0]
                    err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
                    yield dict(shape=name, config=f"BLOCK_M {bm} warps {warps} stages {stages}", ms=ms,
                               tflops=flops / ms / 1e9, rel_l2_vs_autotuned=err)
                except Exception as e:  # (out of shared memory, a compile error): said, not fatal
                    yield dict(shape=name, config=f"BLOCK_M {bm} warps {warps} stages {stages}",
                               error=f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            conv._causal_conv3d_tuned = tuned
        ms = time_cuda(run, warmup, repeats)[0]  # the autotuned launch again, last: drift over the probe shows here
        yield dict(shape=name, config="autotuned, again", ms=ms, tflops=flops / ms / 1e9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--shape", default="dec-3x3x3-96ch-480x832,dec-out-96to3-480x832")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    with open(args.out, "a") as f:
        for name in args.shape.split(","):
            for row in probe(name, dtype, args.warmup, args.repeats):
                row = {"op": "conv-config", "dtype": args.dtype, **row, "gpu": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "commit": _commit(), "date": time.strftime("%Y-%m-%d")}
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
