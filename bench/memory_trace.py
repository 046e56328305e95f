"""Which tensors are alive at the CUDA memory peak of one Wan transformer step: the allocator's trace of one
step replayed to its peak, the allocations live there grouped by the vkern / diffusers line that made them.

    python -m bench.memory_trace --size 14b --res 480p --providers vkern-chunked,vkern-fp8-compute-chunked-attn-fp8
"""
import argparse
import gc
import json
import re
from collections import defaultdict

import torch

# The last "vkern/", "bench/" or "diffusers/" directory in a path starts its short name (greedy prefix).
_OURS = re.compile(r"^(?:.*/)?((?:vkern|bench|diffusers)/.+)$")
MAX_ENTRIES = 1_000_000


def peak_live(events):
    """(peak bytes over the start of the trace, index of the peak event, [(size, frames)] live at the peak).

    "free_completed" is the free that counts (torch's _memory_viz.py does the same): "free_requested" comes first
    for the same block, and the block is only reusable once completed. Frees of blocks allocated before the
    recording began are not in the trace's sum, so they are skipped."""
    def replay(stop):
        live, total, peak, at = {}, 0, 0, -1
        for i, e in enumerate(events[:stop]):
            if e["action"] == "alloc":
                live[e["addr"]] = e
                total += e["size"]
            elif e["action"] == "free_completed" and e["addr"] in live:
                total -= live.pop(e["addr"])["size"]
            if total > peak:
                peak, at = total, i
        return live, peak, at

    _, peak, at = replay(len(events))
    live, _, _ = replay(at + 1)  # a second pass: copying the live set at every new high would be quadratic
    return peak, at, [(e["size"], e.get("frames", [])) for e in live.values()]


def short(frame):
    """`vkern/x.py:LINE function` for one of ours, None for anything else (torch, the standard library)."""
    m = _OURS.match(frame["filename"])
    return m and f"{m.group(1)}:{frame['line']} {frame['name']}"


def site(frames):
    """The line that made an allocation: the innermost vkern frame, else the innermost bench/diffusers one, else
    the innermost frame (frames are innermost first)."""
    ours = [s for s in map(short, frames) if s]
    if ours:
        return next((s for s in ours if s.startswith("vkern/")), ours[0])
    return f"{frames[0]['filename']}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"


def group(live):
    """[(site, bytes, count)], largest first, for the [(size, frames)] live at the peak."""
    sites = defaultdict(lambda: [0, 0])
    for size, frames in live:
        s = sites[site(frames)]
        s[0] += size
        s[1] += 1
    return sorted(((k, b, n) for k, (b, n) in sites.items()), key=lambda r: -r[1])


def report(events, top=25):
    """What memory_trace prints for one device's trace, as a dict (also the --json object)."""
    peak, at, live = peak_live(events)
    frames = events[at].get("frames", []) if at >= 0 else []
    return dict(
        peak_gib=peak / 2**30,
        peak_event=dict(size=events[at]["size"] if at >= 0 else 0, frames=[s for s in map(short, frames) if s][:8]),
        sites=[dict(site=s, mib=b / 2**20, count=n) for s, b, n in group(live)[:top]],
        live_mib=sum(size for size, _ in live) / 2**20,
        live_count=len(live),
    )


def trace_step(model, inputs):
    """(memory allocated before the step, the allocator's trace of one step on the current device)."""
    with torch.inference_mode():
        model(**inputs)  # warm-up: lazily made workspaces (cuBLAS, Triton) exist before recording
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")
    try:
        with torch.inference_mode():
            out = model(**inputs)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    del out
    return base, snap["device_traces"][torch.cuda.current_device()]


def show(provider, r):
    print(f"{provider}: peak {r['peak_gib']:.3f} GiB over base {r['base_gib']:.2f} GiB; "
          f"live at the peak {r['live_mib']:.0f} MiB in {r['live_count']} allocations", flush=True)
    for s in r["sites"]:
        print(f"  {s['mib']:9.1f} MiB {s['count']:5d}x  {s['site']}", flush=True)
    print(f"  {sum(s['mib'] for s in r['sites']):9.1f} MiB {sum(s['count'] for s in r['sites']):5d}x  "
          f"total of the top {len(r['sites'])}", flush=True)
    print(f"  peak reached allocating {r['peak_event']['size'] / 2**20:.1f} MiB at:", flush=True)
    for f in r["peak_event"]["frames"]:
        print(f"    {f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.memory_trace", description=__doc__)
    parser.add_argument("--size", default="14b")
    parser.add_argument("--res", default="480p")
    parser.add_argument("--providers", default="vkern-chunked,vkern-fp8-compute-chunked-attn-fp8")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="also write the report, one object per provider, to this path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("memory_trace needs a CUDA GPU (it reads the CUDA caching allocator's trace)")
    from vkern import models

    from .bench import _build_step_model

    out = []
    for provider in args.providers.split(","):
        model = _build_step_model(args.size, provider)
        inputs = models.transformer_inputs(model, args.res, torch.bfloat16, "cuda")
        base, events = trace_step(model, inputs)
        if len(events) >= MAX_ENTRIES:  # a full ring buffer has dropped the step's first events
            print(f"{provider}: warning: the trace filled its {MAX_ENTRIES} entries; its start is lost", flush=True)
        r = dict(provider=provider, base_gib=base / 2**30, events=len(events), **report(events, args.top))
        show(provider, r)
        out.append(r)
        del model, inputs, events
        gc.collect()  # the patch handle and the model refer to each other (as in memory_phases)
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
