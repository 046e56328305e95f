"""Side-by-side timing: CUDA events, warm-up first, median of repeats; peak memory per provider; the
bytes a model's own weights take."""
import itertools
import statistics
import time

import torch


def time_cuda(fn, warmup=3, repeats=10, min_warmup_s=0.3, pause_s=0.0):
    """Median milliseconds of fn() over `repeats` runs, each bracketed by CUDA events.
    Warm-up runs at least `warmup` times and at least min_warmup_s seconds: a few launches of a
    0.1 ms kernel right after an idle pause were timed before the clocks had ramped (run 2).
    pause_s: an idle pause before each timed run (bench/timing_probe.py: the GPU rested)."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < min_warmup_s:
        fn()
        torch.cuda.synchronize()
        done += 1
    times = []
    for _ in range(repeats):
        if pause_s:
            time.sleep(pause_s)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def time_cuda_queued(fn, warmup=3, repeats=10, min_warmup_s=0.3):
    """Median milliseconds of fn() with the launches queued back to back, as triton.testing.do_bench times:
    each run bracketed by CUDA events, no synchronization between runs, one call in flight before the first.
    So the host's time per call (Python, checks, dispatch) overlaps the previous call's kernel and only the
    device time is measured, for a kernel longer than that host time. time_cuda synchronizes after every run
    and so also counts the host time and the launch latency of each call."""
    time_cuda(fn, warmup, 1, min_warmup_s)
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    fn()  # in flight while the first timed call's host work runs
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) for start, end in pairs]
    return statistics.median(times), min(times), max(times)


def time_cuda_graph(fn, replays=20, repeats=10):
    """Median milliseconds of one fn() measured as CUDA-graph replays: `replays` captured calls per
    timed launch, so host overhead (Python, dispatch, launch latency) is out of the number. For
    sub-millisecond ops, where eager timing measured the host instead of the kernel (run 4)."""
    time_cuda(fn, 3, 1)  # compile, autotune, warm the allocator and the clocks outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()  # allocate the op's workspaces on the capture stream first
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(replays):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    ms, lo, hi = time_cuda(graph.replay, 2, repeats)
    return ms / replays, lo / replays, hi / replays


def time_micro(fn, warmup, repeats):
    """(graph-replay ms, min, max, eager ms, how): graph timing where the op can be captured."""
    eager = time_cuda(fn, warmup, repeats)[0]
    try:
        return (*time_cuda_graph(fn), eager, "graph")
    except RuntimeError as err:  # not capturable: keep the eager number and say so
        print(f"graph capture failed ({str(err).splitlines()[0][:120]}); eager timing", flush=True)
        torch.cuda.synchronize()
        return (*time_cuda(fn, warmup, repeats), eager, "eager")


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


def param_bytes(module):
    """Bytes of the storages behind `module`'s registered parameters and buffers (fp8 weights and their
    scales, biases, non-persistent buffers such as RoPE tables), each storage counted once: a tied weight,
    or tensors that view one storage, count its bytes once, and a storage counts whole even where its
    tensors use part of it. Unlike torch.cuda.memory_allocated() after building the model, it excludes
    the cuBLAS workspace (~36 MiB on an H200, taken from the caching allocator at the first GEMM and
    kept), the allocator's rounding and anything else allocated. Tensors held in plain attributes are
    not counted."""
    seen, total = set(), 0
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type == "meta":
            raise ValueError(f"module: has a tensor on the meta device ({tuple(t.shape)}); it holds no bytes to count")
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if storage.nbytes() and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total
