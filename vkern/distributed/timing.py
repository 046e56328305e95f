"""Opt-in timing of sequence parallelism's own work, per category, summed over a forward:

    from vkern.distributed.timing import CommTimer
    with CommTimer() as timer:
        model(**inputs)
    timer.ms()   # {"all_to_all": ..., "pack": ..., "unpack": ..., "all_gather": ..., "ring": ...}
    timer.bytes  # {"pack": bytes the pack copies wrote, "unpack": ..., ...}; timer.counts: spans

Categories:
  all_to_all  the time the compute stream waits for an all-to-all: from just before the wait to
              when the collective's data is there. With one exchange per transform (the default)
              that is the whole collective, including waiting for the slowest rank to arrive; with
              overlap (SPConfig.overlap_chunks > 1) only the part not hidden behind attention.
  pack        copies into send buffers (head gather, zero heads, fp8 quantization). Work that writes
              its own output straight into a send buffer (the fused QK prologue on the zero-copy
              path, an attention output that already is the send buffer) is compute, not pack:
              no span is recorded where no copy runs.
  unpack      copies out of receive buffers (and fp8 dequantization); none where the received data
              is used in place (q/k/v views at B = 1)
  all_gather  the gather of proj_out's tokens at the end of the forward
  ring        exposed wait for the ring's key/value blocks (SPConfig.ring_degree > 1)

Off by default: with no CommTimer active the hooks cost one global lookup. On CUDA a span is a
pair of events on the current stream (no host sync while recording; ms() synchronizes); on the
CPU it is wall-clock time around the blocking call (only meaningful for smoke tests).
"""
import time

import torch

__all__ = ["CommTimer", "begin", "end"]

CATEGORIES = ("all_to_all", "pack", "unpack", "all_gather", "ring")
_active = None


class CommTimer:
    """A context manager that collects spans while active. One at a time per process."""

    def __init__(self):
        self._spans = []  # (category, start, stop): CUDA events, or perf_counter seconds
        self.counts = dict.fromkeys(CATEGORIES, 0)
        self.bytes = dict.fromkeys(CATEGORIES, 0)  # bytes written by the copies of each category

    def __enter__(self):
        global _active
        if _active is not None:
            raise RuntimeError("CommTimer: another CommTimer is already active in this process")
        _active = self
        return self

    def __exit__(self, *exc):
        global _active
        _active = None

    def _begin(self, device):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _end(self, start, category, nbytes=0):
        stop = start.__class__(enable_timing=True) if isinstance(start, torch.cuda.Event) else time.perf_counter()
        if isinstance(stop, torch.cuda.Event):
            stop.record()
        self._spans.append((category, start, stop))
        self.counts[category] += 1
        self.bytes[category] += nbytes

    def ms(self):
        """Milliseconds per category, summed over the spans recorded (synchronizes on CUDA)."""
        total = dict.fromkeys(CATEGORIES, 0.0)
        for category, start, stop in self._spans:
            if isinstance(start, torch.cuda.Event):
                stop.synchronize()
                total[category] += start.elapsed_time(stop)
            else:
                total[category] += (stop - start) * 1e3
        return total


def begin(device):
    """Start a span on device; returns a token for end(), or None when no CommTimer is active."""
    timer = _active
    if timer is None:
        return None
    return timer, timer._begin(device)


def end(token, category, nbytes=0):
    """End a span; nbytes: what it wrote (pack/unpack copies), summed in CommTimer.bytes."""
    if token is not None:
        timer, start = token
        timer._end(start, category, nbytes)
