"""Launching a kernel many times with the same plan, cheaply. Triton's `kernel[grid](...)` re-derives the
specialisation of every argument on each call (tens of microseconds of host time per launch), and a serving step
launches each attention kernel once per layer with everything but the layer's tensors unchanged. A `Bound`
launch fixes the grid, constexprs, options and trailing arguments once (in the plan's cache) and, after a first
call through Triton (which compiles or finds the kernel), launches the compiled kernel directly with the new
leading tensors, as long as their 16-byte alignment (all Triton specialises pointers on) is unchanged.

The direct launch uses Triton internals: the call `JITFunction.run` makes, `compiled.run(grid0, grid1, grid2,
stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *every argument)` (Triton 3.3 to 3.9
at least). `direct_launch_supported()` checks once that the installed Triton still makes that call; where it does
not, or where a direct call fails (an attribute missing, a signature mismatch), every launch goes through the
public `kernel[grid](...)` from then on, with one warning. Under the interpreter every call goes through Triton.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import warnings

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

#: The call of the compiled kernel in Triton's own launch path that the direct launch repeats.
_TRITON_CALL = re.compile(r"kernel\.run\(\s*grid_0,\s*grid_1,\s*grid_2,\s*stream,\s*kernel\.function,\s*"
                          r"kernel\.packed_metadata,\s*launch_metadata,[^)]*\*bound_args\.values\(\)\s*\)")
_disabled: list[str] = []  # why direct launches are off in this process (empty: they are on)


@functools.cache
def direct_launch_supported() -> bool:
    """Whether this Triton launches compiled kernels the way the direct path does (asked once)."""
    if os.environ.get("PACKINFER_DIRECT_LAUNCH") == "0":
        return False
    try:
        from triton.runtime.jit import JITFunction

        source = inspect.getsource(JITFunction.run)
    except (ImportError, AttributeError, OSError, TypeError):
        return _disable("Triton's JITFunction.run cannot be read")
    if not _TRITON_CALL.search(source):
        return _disable("Triton's JITFunction.run no longer launches compiled kernels as expected")
    return True


def direct_launch_enabled() -> bool:
    """Direct launches are on: supported by this Triton, not disabled, not under the interpreter."""
    return not _disabled and os.environ.get("TRITON_INTERPRET") != "1" and direct_launch_supported()


def _disable(reason: str) -> bool:
    """Turn direct launches off for the process, with one warning; returns False."""
    if not _disabled:
        _disabled.append(reason)
        warnings.warn(f"packinfer: {reason}; launching every kernel through Triton's kernel[grid](...) (slower on "
                      f"the host, same results)", RuntimeWarning, stacklevel=3)
    return False


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
        if c is None or alignment != self.alignment or _disabled:
            self._through_triton(leading, alignment)
            return
        g = self._grid
        try:
            c.run(g[0], g[1], g[2], torch.cuda.current_stream().cuda_stream, c.function, c.packed_metadata, None,
                  None, None, *leading, *self._tail)
        except (AttributeError, TypeError) as e:  # raised before the launch: argument parsing, missing handles
            _disable(f"a direct kernel launch failed ({type(e).__name__}: {e})")
            self._through_triton(leading, alignment)

    def _through_triton(self, leading: tuple, alignment: tuple[bool, ...]) -> None:
        """The public launch; keeps the compiled kernel for direct calls where those are on."""
        c = self.kernel[self.grid](*leading, *self.rest, **self.constexprs, **self.options)
        self.compiled, self.alignment = None, ()
        if not direct_launch_enabled():
            return
        names = getattr(self.kernel, "arg_names", None)
        if not all(hasattr(c, a) for a in ("run", "function", "packed_metadata")) or names is None:
            _disable("Triton's compiled kernel lacks run / function / packed_metadata")
            return
        try:
            tail = names[len(leading) + len(self.rest):]
            self._tail = (*self.rest, *(self.constexprs[n] for n in tail))
        except KeyError as e:
            _disable(f"the kernel's parameters do not match the bound arguments (no value for {e})")
            return
        self._grid = (*self.grid, 1, 1)[:3]
        self.compiled, self.alignment = c, alignment
