"""FlashAttention-3 forward (Hopper), an optional extra: the official build's `flash_attn_interface` when
installed, else PyPI's `fa3-fwd` (`fa3_fwd_interface`: the same entry points, bf16, forward only, no paged KV).
Run at its best configuration: FA3's own split and GQA-packing heuristics (num_splits=0, pack_gqa=None).

Serving: no paged KV in fa3-fwd, so each request is one contiguous extent of the grouped layout, read in place
through cu_seqlens_k = its start and seqused_k = its length (as fa2 without flash-attn), no prefix sharing."""

from __future__ import annotations

import importlib
import inspect

import torch

from packinfer_bench.backends.base import Backend, Inputs, NotApplicable, ServingAttention, needs_cuda
from packinfer_bench.backends.kv_layouts import contiguous_extents

MODULES = ("flash_attn_interface", "fa3_fwd_interface")


def _available(device: torch.device) -> str | None:
    why = needs_cuda(device, *MODULES, missing="FlashAttention-3 is not installed (flash_attn_interface or fa3-fwd)")
    if why:
        return why
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "FlashAttention-3 needs a Hopper GPU (compute capability 9.x)"
    return None


def _varlen():
    for name in MODULES:
        try:
            return importlib.import_module(name).flash_attn_varlen_func
        except ImportError:
            continue
    raise ImportError("FlashAttention-3 is not installed")


def _call(fn, q, k, v, cu_q, cu_k, max_q, max_k, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = fn(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, num_splits=0, pack_gqa=None, **kw)
    return out[0] if isinstance(out, tuple) else out


def _prepare(x: Inputs, variant: str):
    if x.q.dtype != torch.bfloat16:
        raise NotApplicable("the FlashAttention-3 forward wheel is built for bf16 only")
    fn = _varlen()
    return lambda: _call(fn, x.q, x.k, x.v, x.cu_q, x.cu_k, x.max_q, x.max_k)


class Fa3Attention(ServingAttention):
    """FA3 over the serving cache's contiguous extents (see the module's docstring), attention eager between the
    model's graph pieces: fa3-fwd's varlen call takes no fixed scheduler buffers to capture. Where the installed
    build offers get_scheduler_metadata and flash_attn_varlen_func takes it, the scheduler metadata is computed
    once per iteration (begin) and reused by every layer."""

    name, layout, kv_access, share_prefixes = "fa3", "grouped", "contiguous-slots", False
    kernel = "FlashAttention-3 varlen forward, contiguous extents"

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self._fn = _varlen()
        module = importlib.import_module(self._fn.__module__)
        takes = "scheduler_metadata" in inspect.signature(self._fn).parameters
        self._metadata_fn = getattr(module, "get_scheduler_metadata", None) if takes else None
        self.launches_per_layer = 3
        self._extra: dict = {}

    def begin(self, step):
        super().begin(step)
        b = step.batch
        self._cu_q = self.staging.to_device(step.cu_q)
        self._max = int(b.q_lens.max()), int(b.kv_lens.max())
        starts, used = contiguous_extents(step.cache, step.cache.view(self._request_order()))
        self._cu_k, self._used = self.staging.to_device(starts), self.staging.to_device(used)
        self._extra = {}
        if self._metadata_fn is not None:
            try:
                self._extra = {"scheduler_metadata": self._metadata_fn(
                    len(b), self._max[0], self._max[1], self.num_heads, self.num_kv_heads, self.head_dim,
                    self._used, step.cache.dtype, cu_seqlens_q=self._cu_q, cu_seqlens_k=self._cu_k, causal=True)}
            except TypeError:  # another signature: run without precomputed metadata
                self._metadata_fn = None

    def attend(self, layer, q):
        c = self.step.cache
        return _call(self._fn, q, c.k_pools[layer], c.v_pools[layer], self._cu_q, self._cu_k, *self._max,
                     seqused_k=self._used, **self._extra)


BACKEND = Backend("fa3", ("varlen",), _available, _prepare, serving=Fa3Attention)
