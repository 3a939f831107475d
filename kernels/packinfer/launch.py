"""Launching a kernel many times with the same plan, cheaply. Triton's `kernel[grid](...)` re-derives the
specialisation of every argument on each call (tens of microseconds of host time per launch), and a serving step
launches each attention kernel once per layer with everything but the layer's tensors unchanged. A `Bound`
launch fixes the grid, constexprs, options and trailing arguments once (in the plan's cache) and, after a first
call through Triton (which compiles or finds the kernel), launches the compiled kernel directly with the new
leading tensors, as long as their 16-byte alignment (all Triton specialises pointers on) is unchanged. Under the
interpreter every call goes through Triton."""

from __future__ import annotations

import os

import torch
from triton.tools.tensor_descriptor import TensorDescriptor


def _aligned(arg) -> bool:
    base = arg.base if isinstance(arg, TensorDescriptor) else arg
    return base.data_ptr() % 16 == 0


class Bound:
    """kernel[grid](*leading, *rest, **constexprs, **options), callable with new `leading` tensors (or tensor
    descriptors of the same shape). The caller keys a Bound by whatever the trailing arguments derive from
    (strides, dtypes), so they stay right for every call."""

    def __init__(self, kernel, grid: tuple, rest: tuple, constexprs: dict, options: dict) -> None:
        self.kernel, self.grid, self.rest = kernel, grid, rest
        self.constexprs, self.options = constexprs, options
        self.compiled = None
        self.alignment: tuple[bool, ...] = ()

    def __call__(self, *leading) -> None:
        alignment = tuple(map(_aligned, leading))
        c = self.compiled
        if c is None or alignment != self.alignment:
            c = self.kernel[self.grid](*leading, *self.rest, **self.constexprs, **self.options)
            direct = hasattr(c, "run") and hasattr(c, "packed_metadata") and os.environ.get("TRITON_INTERPRET") != "1"
            self.compiled, self.alignment = (c, alignment) if direct else (None, ())
            if direct:
                names = self.kernel.arg_names[len(leading) + len(self.rest):]
                self._tail = (*self.rest, *(self.constexprs[n] for n in names))
                self._grid = (*self.grid, 1, 1)[:3]
            return
        g = self._grid
        c.run(g[0], g[1], g[2], torch.cuda.current_stream().cuda_stream, c.function, c.packed_metadata, None, None,
              None, *leading, *self._tail)
