"""Each backend's attention inside a serving forward pass: the KV cache in the backend's own best layout, the
iteration's plan made once (CPU) and reused by every layer, and per layer: store the new tokens' K/V, then
attend over each request's cached tokens.

- reference: float32, one request at a time, K/V gathered from the cache (the correctness yardstick; slow).
- fa2: FlashAttention-2 varlen over a paged cache through its block table (PyTorch's built-in FA2 needs pages of
  256 tokens); where this torch has no paged varlen, K/V are gathered into a packed copy per layer, and the
  replay's summary says so (`kv_access`).
- flashinfer: paged cache of 16-token pages; batch decode (tensor cores) for all-decode iterations, batch prefill
  over the paged cache for the rest (FlashInfer's plan per iteration, as serving engines use it).
- packinfer: grouped (group-contiguous) cache; fresh prompts longer than DECODE_MAX_Q rows go through the packed
  varlen kernel on their own new K/V, every other row (decode, prompt chunks over cached tokens, short prompts)
  through cache attention, prefix groups read once.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass

import numpy as np
import packinfer
import torch

from packinfer_bench.backends.base import needs_cuda
from packinfer_bench.backends.packinfer import DECODE_MAX_Q
from packinfer_bench.workload import Batch

FLASHINFER_PAGE = 16
FA2_PAGE = 256  # FlashAttention-2's paged KV needs a multiple of 256 tokens per page
WORKSPACE_BYTES = 256 << 20


@dataclass
class Step:
    """One iteration as attention sees it: the batch, the cache, and which query rows store their K/V where."""

    batch: Batch
    cache: object
    rows: torch.Tensor | None  # query rows to store (None: all of them, in order)
    slots: torch.Tensor  # token addresses of those rows
    cu_q: np.ndarray  # int32 [B + 1]


class ServingAttention:
    """Base: stores each layer's new K/V at the step's slots; subclasses plan in begin() and attend in attend()."""

    name = ""
    layout = "paged"
    page_size = FLASHINFER_PAGE
    kv_access = "cache"

    def __init__(self, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int):
        self.device, self.num_heads, self.num_kv_heads, self.head_dim = device, num_heads, num_kv_heads, head_dim
        self.step: Step | None = None

    @staticmethod
    def available(device: torch.device) -> str | None:
        return None

    def begin(self, step: Step) -> None:
        self.step = step

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.step
        if s.rows is not None:
            k, v = k[s.rows], v[s.rows]
        s.cache.write(s.slots, k, v, layer=layer)
        return self.attend(layer, q)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _request_order(self) -> list[int]:
        return self.step.batch.request_ids.tolist()


class ReferenceAttention(ServingAttention):
    name, layout = "reference", "grouped"

    def begin(self, step: Step) -> None:
        super().begin(step)
        addr = [step.cache.addresses(r) for r in self._request_order()]
        self._gather = torch.from_numpy(np.concatenate(addr)).to(self.device)
        self._cu_k = np.concatenate([[0], np.cumsum([len(a) for a in addr])])

    def attend(self, layer, q):
        c = self.step.cache
        k, v = c.k_pools[layer][self._gather], c.v_pools[layer][self._gather]
        out = packinfer.reference_varlen_attention(q, k, v, self.step.cu_q, self._cu_k)
        return out.to(q.dtype)


class Fa2Attention(ServingAttention):
    name = "fa2"
    page_size = FA2_PAGE

    def __init__(self, *args):
        super().__init__(*args)
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        self._attn = varlen_attn
        self._kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "enable_gqa" in params:
            self._kwargs["enable_gqa"] = True
        self._group = 1 if "enable_gqa" in params else self.num_heads // self.num_kv_heads
        self.paged = "block_table" in params
        self.kv_access = "paged" if self.paged else "gathered"
        if not self.paged:
            self.page_size = FLASHINFER_PAGE

    @staticmethod
    def available(device):
        return needs_cuda(device, "torch.nn.attention.varlen",
                          missing="torch.nn.attention.varlen (torch >= 2.9) is not installed")

    def begin(self, step):
        super().begin(step)
        b, dev = step.batch, self.device
        self._cu_q = torch.from_numpy(step.cu_q).to(dev)
        self._cu_k = torch.from_numpy(np.concatenate([[0], np.cumsum(b.kv_lens)]).astype(np.int32)).to(dev)
        self._max = int(b.q_lens.max()), int(b.kv_lens.max())
        if self.paged:
            self._table = torch.from_numpy(step.cache.view(self._request_order()).block_table).to(dev)
        else:
            addr = [step.cache.addresses(r) for r in self._request_order()]
            self._gather = torch.from_numpy(np.concatenate(addr)).to(dev)

    def attend(self, layer, q):
        c = self.step.cache
        if self.paged:
            shape = (-1, self.page_size, self.num_kv_heads, self.head_dim)
            k, v = c.k_pools[layer].view(shape), c.v_pools[layer].view(shape)
            extra = {"block_table": self._table}
        else:
            k, v, extra = c.k_pools[layer][self._gather], c.v_pools[layer][self._gather], {}
            if self._group > 1:
                k, v = k.repeat_interleave(self._group, 1), v.repeat_interleave(self._group, 1)
        return self._attn(q, k, v, self._cu_q, self._cu_k, *self._max, **self._kwargs, **extra)


class FlashInferAttention(ServingAttention):
    name = "flashinfer"

    def __init__(self, *args):
        super().__init__(*args)
        import flashinfer

        ws = lambda: torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)  # noqa: E731
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws(), "NHD", use_tensor_cores=True)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws(), "NHD", backend="fa2")

    @staticmethod
    def available(device):
        return needs_cuda(device, "flashinfer",
                          missing="flashinfer is not installed (pip install packinfer-bench[flashinfer])")

    def begin(self, step):
        from packinfer_bench.backends.kv_layouts import page_table

        super().begin(step)
        view = step.cache.view(self._request_order())
        indptr, indices, last = page_table(view, device=self.device)
        h, hkv, d, dt = self.num_heads, self.num_kv_heads, self.head_dim, step.cache.dtype
        if int(step.batch.q_lens.max()) == 1:
            self._wrapper = self._decode
            self._decode.plan(indptr, indices, last, h, hkv, d, self.page_size, q_data_type=dt, kv_data_type=dt)
        else:
            self._wrapper = self._prefill
            self._prefill.plan(torch.from_numpy(step.cu_q).to(self.device), indptr, indices, last, h, hkv, d,
                               self.page_size, causal=True, q_data_type=dt, kv_data_type=dt)

    def attend(self, layer, q):
        c = self.step.cache
        shape = (-1, self.page_size, self.num_kv_heads, self.head_dim)
        return self._wrapper.run(q, (c.k_pools[layer].view(shape), c.v_pools[layer].view(shape)))


class PackinferAttention(ServingAttention):
    name, layout = "packinfer", "grouped"

    @staticmethod
    def available(device):
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "on the CPU Triton kernels need TRITON_INTERPRET=1 (set before triton is imported)"
        return None

    def begin(self, step):
        super().begin(step)
        b, dev = step.batch, self.device
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        fresh = (b.q_lens == b.kv_lens) & (b.q_lens > DECODE_MAX_Q)
        self._parts = []  # (query rows, plan, cu_seqlens or view, max_q or None)
        for mask, is_fresh in ((fresh, True), (~fresh, False)):
            if not mask.any():
                continue
            q_lens = b.q_lens[mask]
            idx = np.flatnonzero(np.repeat(mask, b.q_lens))
            where = slice(int(idx[0]), int(idx[-1]) + 1) if idx[-1] - idx[0] + 1 == len(idx) else \
                torch.from_numpy(idx).to(dev)
            if is_fresh:
                cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
                plan = packinfer.plan_for(cu, cu, h, hkv, d)
                self._parts.append((where, plan, torch.from_numpy(cu).to(dev), int(q_lens.max())))
            else:
                ids = b.request_ids[mask].tolist()
                view = step.cache.view(ids)
                plan = packinfer.plan_cache_attention(view, q_lens, h, num_sms=_num_sms(dev))
                self._parts.append((where, plan, view, None))

    def __call__(self, layer, q, k, v):
        self._k, self._v = k, v  # fresh prompts attend over this layer's new K/V directly
        return super().__call__(layer, q, k, v)

    def attend(self, layer, q):
        c = self.step.cache
        out = torch.empty_like(q)
        for where, plan, arg, max_q in self._parts:
            dst = out[where] if isinstance(where, slice) else torch.empty_like(q[where])
            if max_q is not None:  # arg: cu_seqlens of the fresh prompts
                packinfer.varlen_attention(q[where], self._k[where], self._v[where], arg, arg, max_q, max_q,
                                           plan=plan, out=dst, validate=False)
            else:  # arg: the view of the cached requests (layer 0; the plan serves every layer)
                view = dataclasses.replace(arg, k=c.k_pools[layer], v=c.v_pools[layer])
                packinfer.cache_attention(q[where], view, plan, out=dst, validate=False)
            if not isinstance(where, slice):
                out[where] = dst
        return out


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


ATTENTIONS = {a.name: a for a in (ReferenceAttention, Fa2Attention, FlashInferAttention, PackinferAttention)}
