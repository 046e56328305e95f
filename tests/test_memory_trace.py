"""bench/memory_trace.py: the trace replay to the peak and the grouping by site, on synthetic allocator traces."""
from bench import memory_trace

MiB = 2**20
TORCH = {"filename": "/venv/lib/python3.11/site-packages/torch/nn/functional.py", "line": 10, "name": "linear"}
BLOCK = {"filename": "/repo/vkern/modules/wan_block.py", "line": 42, "name": "forward"}
ATTN = {"filename": "/home/u/vkern/vkern/attention.py", "line": 7, "name": "attention"}
DIFF = {"filename": "/venv/lib/python3.11/site-packages/diffusers/models/wan.py", "line": 99, "name": "forward"}
BENCH = {"filename": "/repo/bench/memory_trace.py", "line": 5, "name": "trace_step"}


def alloc(addr, mib, *frames):
    return {"action": "alloc", "addr": addr, "size": mib * MiB, "frames": list(frames)}


def free(addr, mib, requested=True):
    # The allocator logs a free twice: requested, then completed (later, if other streams still use the block).
    done = {"action": "free_completed", "addr": addr, "size": mib * MiB, "frames": []}
    return [{"action": "free_requested", "addr": addr, "size": mib * MiB, "frames": []}, done][not requested:]


def test_peak_and_live_allocations_at_it():
    events = [
        {"action": "segment_alloc", "addr": 0, "size": 64 * MiB, "frames": []},
        alloc(1, 10, TORCH, BLOCK),
        alloc(2, 20, TORCH, ATTN, BLOCK),
        *free(1, 10),
        alloc(3, 15, DIFF),                 # 35 MiB: the peak (index 5)
        *free(2, 20),
        alloc(4, 5, BLOCK),                 # 20 MiB
        {"action": "snapshot", "addr": 0, "size": 0, "frames": []},
    ]
    peak, at, live = memory_trace.peak_live(events)
    assert peak == 35 * MiB
    assert at == 5 and events[at]["addr"] == 3
    assert sorted(size for size, _ in live) == [15 * MiB, 20 * MiB]


def test_frees_of_blocks_allocated_before_the_trace_are_ignored():
    # Block 9 was allocated before recording: freeing it must not lower the sum below the trace's own allocations.
    events = [*free(9, 100), alloc(1, 10, BLOCK), *free(8, 50), alloc(2, 4, BLOCK)]
    peak, at, live = memory_trace.peak_live(events)
    assert (peak, at) == (14 * MiB, 5)
    assert len(live) == 2


def test_free_requested_is_not_counted_as_a_second_free():
    # Each free is logged twice (requested, completed); the block's size comes off the sum once.
    events = [alloc(1, 10, BLOCK), *free(1, 10), alloc(2, 8, BLOCK), alloc(3, 3, BLOCK)]
    peak, at, live = memory_trace.peak_live(events)
    assert (peak, at) == (11 * MiB, 4)
    # A block whose free was requested but not yet completed is still live (another stream may use it).
    events = [alloc(1, 10, BLOCK), free(1, 10)[0], alloc(2, 8, BLOCK), free(1, 10)[1]]
    peak, at, live = memory_trace.peak_live(events)
    assert (peak, at, len(live)) == (18 * MiB, 2, 2)


def test_an_address_reused_after_its_free_is_a_new_allocation():
    events = [alloc(1, 10, BLOCK), *free(1, 10), alloc(1, 6, ATTN), alloc(2, 1, BLOCK)]
    peak, at, live = memory_trace.peak_live(events)
    assert (peak, at) == (10 * MiB, 0)
    assert live == [(10 * MiB, [BLOCK])]


def test_empty_trace():
    assert memory_trace.peak_live([]) == (0, -1, [])


def test_site_prefers_the_innermost_vkern_frame():
    assert memory_trace.site([TORCH, ATTN, BLOCK]) == "vkern/attention.py:7 attention"
    assert memory_trace.site([TORCH, DIFF, BLOCK, BENCH]) == "vkern/modules/wan_block.py:42 forward"
    assert memory_trace.site([TORCH, DIFF, BENCH]) == "diffusers/models/wan.py:99 forward"
    assert memory_trace.site([TORCH]) == TORCH["filename"] + ":10 linear"
    assert memory_trace.site([]) == "?"


def test_group_sums_by_site_largest_first():
    live = [(10 * MiB, [TORCH, BLOCK]), (20 * MiB, [TORCH, ATTN, BLOCK]), (5 * MiB, [BLOCK]), (1 * MiB, [TORCH])]
    assert memory_trace.group(live) == [
        ("vkern/attention.py:7 attention", 20 * MiB, 1),
        ("vkern/modules/wan_block.py:42 forward", 15 * MiB, 2),
        (TORCH["filename"] + ":10 linear", 1 * MiB, 1),
    ]


def test_report():
    events = [alloc(1, 10, TORCH, BLOCK), alloc(2, 20, TORCH, ATTN, DIFF, BENCH), *free(1, 10), alloc(3, 1, BLOCK)]
    r = memory_trace.report(events, top=1)
    assert r["peak_gib"] == 30 / 1024
    assert r["peak_event"] == dict(size=20 * MiB, frames=["vkern/attention.py:7 attention", "diffusers/models/wan.py:99 forward",
                                                          "bench/memory_trace.py:5 trace_step"])
    assert r["sites"] == [dict(site="vkern/attention.py:7 attention", mib=20.0, count=1)]
    assert (r["live_mib"], r["live_count"]) == (30.0, 2)
