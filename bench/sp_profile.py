"""Where one rank's step time goes under sequence parallelism: one profiled step's GPU timeline (kernel
intervals from torch.profiler), reduced to
  span_ms            first kernel start to last kernel end
  compute_ms         the union of the non-NCCL kernels (the GPU doing model work)
  nccl_alone_ms      NCCL kernel time with no compute kernel beside it (exposed communication)
  overlap_ms         NCCL kernel time with compute beside it (hidden, but sharing the SMs)
  idle_ms            span minus the union of every kernel (the GPU waiting on the host)
  <class>_ms         summed kernel time per class (attention, gemm, elementwise, other, nccl)
  nccl_kernels_us    every NCCL kernel in order: [time, time with no compute beside it] (us)
Used by bench/sp_run.py --profile: the world-1 row's classes divided by N are a rank's ideal share, so a
class that grows beyond it under SP (e.g. GEMMs slowed by NCCL's SMs) shows where the time goes."""
import torch

from .profile_step import classify

CLASSES = ("attention", "gemm", "elementwise", "other", "nccl")


def _union(intervals):
    """Total length of a union of (start, end) intervals, and the merged intervals."""
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return sum(e - s for s, e in merged), merged


def _intersection(a, b):
    """Length of the intersection of two merged (sorted, disjoint) interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, e - s)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def kernel_class(name):
    return "nccl" if "nccl" in name.lower() else classify(name)


def timeline_stats(kernels):
    """kernels: (name, start_us, end_us). Returns the dict described in the module docstring (ms)."""
    if not kernels:
        return {}
    per_class = dict.fromkeys(CLASSES, 0.0)
    nccl, compute = [], []
    for name, s, e in kernels:
        cls = kernel_class(name)
        per_class[cls] += (e - s) / 1e3
        (nccl if cls == "nccl" else compute).append((s, e))
    busy, _ = _union(nccl + compute)
    compute_ms, compute_m = _union(compute)
    nccl_ms, nccl_m = _union(nccl)
    overlap = _intersection(nccl_m, compute_m)
    span = max(e for _, _, e in kernels) - min(s for _, s, _ in kernels)
    # Each NCCL kernel in launch order: [its time, its time with no compute beside it] (us), so the exposed
    # time can be told apart per exchange of a layer (its position in the layer's sequence).
    per_nccl = [[round(e - s, 1), round(e - s - _intersection([[s, e]], compute_m), 1)] for s, e in sorted(nccl)]
    return dict(span_ms=span / 1e3, compute_ms=compute_ms / 1e3, nccl_alone_ms=(nccl_ms - overlap) / 1e3,
                overlap_ms=overlap / 1e3, idle_ms=(span - busy) / 1e3, **{f"{c}_ms": v for c, v in per_class.items()},
                nccl_kernels_us=per_nccl)


def profile_kernels(step):
    """One step under torch.profiler (CUDA): [(kernel name, start us, end us)]."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return [(e.key, e.time_range.start, e.time_range.end) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0]
