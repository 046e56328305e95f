"""Side-by-side timing: CUDA events, warm-up first, median of repeats; peak memory per provider."""
import statistics
import time

import torch


def time_cuda(fn, warmup=3, repeats=10, min_warmup_s=0.3):
    """Median milliseconds of fn() over `repeats` runs, each bracketed by CUDA events.
    Warm-up runs at least `warmup` times and at least min_warmup_s seconds: a few launches of a
    0.1 ms kernel right after an idle pause were timed before the clocks had ramped (run 2)."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < min_warmup_s:
        fn()
        torch.cuda.synchronize()
        done += 1
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def peak_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30, base / 2**30


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
