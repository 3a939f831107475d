"""Kernel launches with less host time. Triton's `kernel[grid](...)` re-derives the specialisation of every
argument on every call (about 40-75 us for our kernels on an H100 host), which a serving step pays once per layer
and kernel; a decode step's attention is then bound by the host, not the GPU. `launch` keeps the compiled kernel
of each specialisation under a key it computes cheaply (argument dtypes, 16-byte pointer alignment, integers
equal to 1 or divisible by 16, descriptor shapes, constexprs, launch options: a superset of what Triton
specialises on) and calls it directly; a key seen for the first time goes through Triton's own path (compile,
cache, launch). Under the interpreter, or with PACKINFER_TRITON_LAUNCH=1, every call takes Triton's path."""

from __future__ import annotations

import os

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

_compiled: dict = {}


def _spec(arg) -> tuple:
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool) or arg is None:
        return (arg,)
    if isinstance(arg, int):
        return (int, arg == 1, arg % 16 == 0)
    if isinstance(arg, float):
        return (float,)
    if isinstance(arg, TensorDescriptor):
        return ("desc", arg.base.dtype, arg.base.data_ptr() % 16 == 0, tuple(arg.block_shape),
                tuple(s % 16 == 0 for s in arg.shape), tuple(s % 16 == 0 for s in arg.strides))
    return (type(arg), arg)  # anything else: keyed by value


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, options: dict) -> None:
    """kernel[grid](*args, **constexprs, **options), where args are the kernel's leading (runtime) parameters in
    order and constexprs the rest, by name."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("PACKINFER_TRITON_LAUNCH") == "1":
        kernel[grid](*args, **constexprs, **options)
        return
    key = (kernel, *map(_spec, args), *constexprs.items(), *options.items())
    compiled = _compiled.get(key)
    if compiled is None:  # first call of this specialisation (or the direct call failed): Triton's path
        compiled = kernel[grid](*args, **constexprs, **options)
        if key not in _compiled and hasattr(compiled, "run") and hasattr(compiled, "packed_metadata"):
            _compiled[key] = compiled
        return
    values = (*args, *(constexprs[name] for name in kernel.arg_names[len(args):]))
    g = (*grid, 1, 1)
    try:
        compiled.run(g[0], g[1], g[2], torch.cuda.current_stream().cuda_stream, compiled.function,
                     compiled.packed_metadata, None, None, None, *values)
    except TypeError:  # a Triton whose launcher takes other arguments: use its own path from now on
        _compiled[key] = None
        kernel[grid](*args, **constexprs, **options)
