"""Timing a callable the same way for every backend: warm-up, then repeats timed with CUDA events, L2 flushed
before each and the call queued before its start event fires (wall clock on the CPU, where timings are not
representative)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 << 20  # several times any current GPU's L2
#: GPU cycles (~0.3 ms) the stream idles before each timed call, so the CPU has queued the whole call before the
#: start event fires: kernel time, not Python launch overhead (which differs between backends' wrappers).
QUEUE_AHEAD_CYCLES = 500_000


class Timer:
    def __init__(self, device: torch.device, warmup: int, repeats: int, flush_l2: bool):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
                      if device.type == "cuda" and flush_l2 else None)

    @property
    def method(self) -> str:
        return "cuda-events" if self.device.type == "cuda" else "wall-clock-cpu"

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        """Milliseconds of each repeat."""
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for start, end in zip(starts, ends):
            if self.flush is not None:
                self.flush.zero_()
            torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
