"""FlashAttention-3 forward (Hopper), an optional extra: the official build's `flash_attn_interface` when
installed, else PyPI's `fa3-fwd` (`fa3_fwd_interface`: the same entry points, bf16, forward only, no paged KV).
Run at its best configuration: FA3's own split and GQA-packing heuristics (num_splits=0, pack_gqa=None).

Serving: no paged KV in fa3-fwd, so each request is one contiguous extent of the grouped layout, read in place
through cu_seqlens_k = its start and seqused_k = its length (as fa2 without flash-attn), no prefix sharing."""

from __future__ import annotations

import importlib

import numpy as np
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
    """FA3 over the serving cache's contiguous extents, attention eager between the model's graph pieces.
    Where the build's flash_attn_with_kvcache reads a pool through cache_batch_idx / cache_leftpad (checked
    once against the varlen call on the first iteration), it runs that with the scheduler metadata computed once
    per iteration (get_scheduler_metadata) and reused by every layer; else flash_attn_varlen_func with
    cu_seqlens_k = each extent's start and seqused_k = its length (see the module's docstring)."""

    name, layout, kv_access, share_prefixes = "fa3", "grouped", "contiguous-slots", False

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self._fn = _varlen()
        module = importlib.import_module(self._fn.__module__)
        self._kvcache = getattr(module, "flash_attn_with_kvcache", None)
        self._metadata = getattr(module, "get_scheduler_metadata", None)
        self._mode = "probe" if self._kvcache is not None and self._metadata is not None else "varlen"
        self.launches_per_layer = 3
        self._set_kernel()

    def _set_kernel(self) -> None:
        self.kernel = ("FlashAttention-3 " + ("flash_attn_with_kvcache + per-iteration scheduler metadata"
                                              if self._mode == "kvcache" else "varlen forward") +
                       ", contiguous extents")

    def begin(self, step):
        super().begin(step)
        b = step.batch
        self._cu_q = self.staging.to_device(step.cu_q)
        self._max = int(b.q_lens.max()), int(b.kv_lens.max())
        starts, used = contiguous_extents(step.cache, step.cache.view(self._request_order()))
        self._cu_k, self._used = self.staging.to_device(starts), self.staging.to_device(used)
        if self._mode != "varlen":
            self._left = self._cu_k[:-1]
            self._ends = self.staging.to_device((starts[:-1] + used).astype(np.int32))
            self._batch_idx = torch.zeros(len(b), dtype=torch.int32, device=self.device)
            try:
                self._meta = self._metadata(len(b), self._max[0], self._max[1], self.num_heads, self.num_kv_heads,
                                            self.head_dim, self._ends, step.cache.dtype, cu_seqlens_q=self._cu_q,
                                            cache_leftpad=self._left, causal=True)
            except Exception:  # noqa: BLE001 -- this build cannot: the varlen call from now on
                self._mode = "varlen"
                self._set_kernel()

    def attend(self, layer, q):
        if self._mode == "varlen":
            return self._varlen_call(layer, q)
        out = self._kvcache_call(layer, q)
        if self._mode == "probe":  # the first call: the pool read through leftpad must equal the varlen call
            ok = out is not None and torch.allclose(out.float(), self._varlen_call(layer, q).float(), atol=2e-2)
            self._mode = "kvcache" if ok else "varlen"
            self._set_kernel()
            if not ok:
                return self._varlen_call(layer, q)
        return out

    def _varlen_call(self, layer, q):
        c = self.step.cache
        return _call(self._fn, q, c.k_pools[layer], c.v_pools[layer], self._cu_q, self._cu_k, *self._max,
                     seqused_k=self._used)

    def _kvcache_call(self, layer, q):
        c = self.step.cache
        pool = (1, c.capacity_tokens, self.num_kv_heads, self.head_dim)
        try:
            with torch.no_grad():
                return self._kvcache(q, c.k_pools[layer].view(pool), c.v_pools[layer].view(pool),
                                     cache_seqlens=self._ends, cache_batch_idx=self._batch_idx,
                                     cache_leftpad=self._left, cu_seqlens_q=self._cu_q, max_seqlen_q=self._max[0],
                                     causal=True, scheduler_metadata=self._meta, num_splits=0, pack_gqa=None)
        except Exception:  # noqa: BLE001 -- not built for this: the probe falls back to the varlen call
            if self._mode != "probe":
                raise
            return None


BACKEND = Backend("fa3", ("varlen",), _available, _prepare, serving=Fa3Attention)
