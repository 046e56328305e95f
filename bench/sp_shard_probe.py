"""How efficiently one GPU runs a sequence-parallel rank's share of a Wan step, without communication.

    python -m bench.sp_shard_probe --shape wan14b-720p --worlds 1,2,4,8 --out rows.jsonl

Under Ulysses over N ranks each rank attends to the whole sequence for H/N heads and runs the linears
on S/N tokens. Smaller problems can run at a lower rate (the last wave of tiles on 132 SMs, smaller
GEMMs), which shows up in the SP step as overhead that is not communication. Per world N this times,
on one GPU, the self-attention at [1, S, H/N, D] (vkern.ops.attention, the SP path's call) and the
block's GEMMs at M = S/N (q/k/v/out 5120x5120-like, the FFN's up and down), and reports each one's
rate and its "scaling efficiency": N x t(N) over t(1) (1.0: the share takes exactly 1/N of the time).
The per-layer sum (self-attention + 4 projections + FFN) over the world-1 sum gives the compute-only
speedup ceiling for N ranks. Rows: op "sp-shard", one per (world, part).
"""
import argparse
import datetime
import json

import torch

from . import shapes
from .bench import _commit
from .timing import time_cuda

DT = torch.bfloat16
FFN = {128 * 12: 8960, 128 * 40: 13824}  # Wan-1.3B, Wan-14B: inner dim -> FFN hidden


def _parts(S, H, D, world):
    """{part: (fn, flop)} for one rank's share of one transformer block at this world size."""
    from vkern import ops

    h, M, C = -(-H // world), -(-S // world), H * D  # heads padded up, as the SP path does
    q, k, v = (torch.randn(1, S, h, D, device="cuda", dtype=DT) for _ in range(3))
    x, xf = torch.randn(M, C, device="cuda", dtype=DT), torch.randn(M, FFN[C], device="cuda", dtype=DT)
    w, up, down = (torch.randn(o, i, device="cuda", dtype=DT) / i**0.5
                   for o, i in ((C, C), (FFN[C], C), (C, FFN[C])))
    lin = torch.nn.functional.linear
    return {"self-attn": (lambda: ops.attention(q, k, v), 4 * S * S * h * D),
            "proj x4": (lambda: [lin(x, w) for _ in range(4)], 4 * 2 * M * C * C),
            "ffn up": (lambda: lin(x, up), 2 * M * C * FFN[C]),
            "ffn down": (lambda: lin(xf, down), 2 * M * C * FFN[C])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wan14b-720p", choices=[s for s in shapes.ATTENTION if s.startswith("wan")])
    parser.add_argument("--worlds", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shape = shapes.ATTENTION[args.shape]
    S, H, D = shape.tokens, shape.heads, shape.head_dim
    meta = dict(op="sp-shard", shape=args.shape, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                commit=_commit(), date=datetime.date.today().isoformat())
    base = {}
    print(f"{'world':>5} {'part':10} {'ms':>9} {'TFLOP/s':>8} {'N t(N)/t(1)':>11}")
    for world in (int(w) for w in args.worlds.split(",")):
        total = 0.0
        for part, (fn, flop) in _parts(S, H, D, world).items():
            ms = time_cuda(fn, 2, args.repeats)[0]
            total += ms
            if world == 1:
                base[part] = ms
            eff = world * ms / base[part] if part in base else None
            row = dict(meta, world=world, part=part, ms=ms, tflops=flop / ms / 1e9, scaling=eff)
            print(f"{world:>5} {part:10} {ms:9.3f} {row['tflops']:8.1f} {eff if eff else float('nan'):11.4f}")
            _write(args.out, row)
        if world == 1:
            base["block"] = total
        eff = world * total / base["block"] if "block" in base else None
        _write(args.out, dict(meta, world=world, part="block", ms=total, scaling=eff,
                              speedup_ceiling=world / eff if eff else None))
        print(f"{world:>5} {'block':10} {total:9.3f} {'':8} {eff if eff else float('nan'):11.4f}"
              + (f"  -> compute-only speedup ceiling {world / eff:.3f}x" if eff else ""))
        torch.cuda.empty_cache()


def _write(path, row):
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
