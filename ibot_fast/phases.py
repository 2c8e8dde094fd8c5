"""Named phases of a training step: profiler ranges always, device timing on request.

    with phase("backward"):
        loss.backward()

Each phase is a `torch.profiler.record_function` range (a few microseconds when no
profiler runs). Inside `with PhaseTimer(device) as timer:` every phase is also timed with
CUDA events on the current stream (wall clock on the CPU), so work that the profiler
does not attribute to the range that launched it (the backward kernels, launched by
autograd's own thread) is still counted where it belongs. benchmarks/bench_train.py
reads the breakdown.
"""
import contextlib
import time
from collections import defaultdict

import torch

_timer = None  # the active PhaseTimer, if any


@contextlib.contextmanager
def phase(name: str):
    with torch.profiler.record_function(name):
        if _timer is None:
            yield
            return
        mark = _timer.start()
        try:
            yield
        finally:
            _timer.stop(name, mark)


class PhaseTimer:
    """Collects the time of every phase entered while it is active (not re-entrant)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.spans = []  # (name, start, end)

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, name, mark):
        self.spans.append((name, mark, self.start()))

    def __enter__(self):
        global _timer
        if _timer is not None:
            raise RuntimeError("a PhaseTimer is already active")
        _timer = self
        return self

    def __exit__(self, *exc):
        global _timer
        _timer = None

    def total_ms(self) -> dict:
        """Milliseconds per phase name, summed over every time it was entered."""
        if self.cuda:
            torch.cuda.synchronize()
        out = defaultdict(float)
        for name, start, end in self.spans:
            out[name] += start.elapsed_time(end) if self.cuda else (end - start) * 1e3
        return dict(out)
