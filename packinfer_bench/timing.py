"""Timing a callable the same way for every backend: warm-up, then repeats timed with CUDA events, L2 flushed
before each and the call queued before its start event fires; optionally the call is captured once into a CUDA
graph and the graph replayed (no launch overhead at all). Wall clock on the CPU, where timings are not
representative."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 << 20  # several times any current GPU's L2
#: GPU cycles (~0.3 ms) the stream idles before each timed call, so the CPU has queued the whole call before the
#: start event fires: kernel time, not Python launch overhead (which differs between backends' wrappers).
QUEUE_AHEAD_CYCLES = 500_000


class GraphCaptureError(RuntimeError):
    """The timed call cannot be captured into a CUDA graph (it synchronises, allocates on the host, ...)."""


class Timer:
    def __init__(self, device: torch.device, warmup: int, repeats: int, flush_l2: bool, cuda_graphs: bool = False):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
                      if device.type == "cuda" and flush_l2 else None)
        self.graphs = cuda_graphs and device.type == "cuda"

    @property
    def method(self) -> str:
        if self.device.type != "cuda":
            return "wall-clock-cpu"
        return "cuda-graph" if self.graphs else "cuda-events"

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        """Milliseconds of each repeat."""
        if self.graphs:
            fn = self._capture(fn)
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

    def _capture(self, fn: Callable[[], object]) -> Callable[[], object]:
        """The call captured into a CUDA graph (after warm-up calls on a side stream, as capture requires);
        returns the graph's replay."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as e:
            torch.cuda.synchronize(self.device)
            raise GraphCaptureError(f"cuda graph capture failed: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}") from e
        return graph.replay
