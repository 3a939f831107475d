"""Each backend's attention inside a serving forward pass: the KV cache in the backend's own best layout, the
iteration's plan made once (CPU) and reused by every layer, and per layer: store the new tokens' K/V, then
attend over each request's cached tokens.

- reference: float32, one request at a time, K/V gathered from the cache (the correctness yardstick; slow).
- fa2: FlashAttention-2 varlen reading the cache in place: over 256-token pages through a block table when the
  flash-attn package is installed, else (PyTorch's built-in FA2 has no block table) over one contiguous extent
  per request through cu_seqlens_k / seqused_k; the replay's summary says which (`kv_access`).
- flashinfer: paged cache of 16-token pages; batch decode (tensor cores) for all-decode iterations, batch prefill
  over the paged cache for the rest (FlashInfer's plan per iteration, as serving engines use it).
- packinfer: grouped (group-contiguous) cache; fresh prompts longer than DECODE_MAX_Q rows go through the packed
  varlen kernel on their own new K/V, every other row (decode, prompt chunks over cached tokens, short prompts)
  through cache attention, prefix groups read once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import packinfer
import torch

from packinfer_bench.backends import fa2
from packinfer_bench.backends import flashinfer as flashinfer_backend
from packinfer_bench.backends import packinfer as packinfer_backend
from packinfer_bench.backends.kv_layouts import page_table
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
    share_prefixes = True  # requests of a prefix group read one stored copy of it

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
    """flash-attn installed: flash_attn_varlen_func over the paged cache (block table, 256-token pages). Else
    PyTorch's built-in FA2 (aten._flash_attention_forward, which has no block table): each request one contiguous
    extent of the grouped layout, read in place through cu_seqlens_k = its start and seqused_k = its length, no
    prefix sharing (FA2 reads one range per request)."""

    name = "fa2"

    def __init__(self, *args):
        super().__init__(*args)
        try:
            from flash_attn import flash_attn_varlen_func

            self._paged_fn = flash_attn_varlen_func
            self.layout, self.page_size, self.kv_access = "paged", FA2_PAGE, "paged"
        except ImportError:
            self._paged_fn = None
            self.layout, self.share_prefixes, self.kv_access = "grouped", False, "contiguous-slots"

    available = staticmethod(fa2.BACKEND.available)

    def begin(self, step):
        super().begin(step)
        b, dev = step.batch, self.device
        self._cu_q = torch.from_numpy(step.cu_q).to(dev)
        self._max = int(b.q_lens.max()), int(b.kv_lens.max())
        view = step.cache.view(self._request_order())
        if self._paged_fn is not None:
            self._cu_k = torch.from_numpy(b.cu_seqlens()[1]).to(dev)
            self._table = torch.from_numpy(view.block_table).to(dev)
        else:
            starts = np.concatenate([view.own_addr, [step.cache.capacity_tokens]]).astype(np.int32)
            self._cu_k = torch.from_numpy(starts).to(dev)
            self._used = torch.from_numpy(view.kv_lens.astype(np.int32)).to(dev)

    def attend(self, layer, q):
        c = self.step.cache
        if self._paged_fn is not None:
            shape = (-1, self.page_size, self.num_kv_heads, self.head_dim)
            return self._paged_fn(q, c.k_pools[layer].view(shape), c.v_pools[layer].view(shape), self._cu_q,
                                  self._cu_k, *self._max, causal=True, block_table=self._table)
        return torch.ops.aten._flash_attention_forward(
            q, c.k_pools[layer], c.v_pools[layer], self._cu_q, self._cu_k, *self._max, 0.0, True, False,
            seqused_k=self._used)[0]


class FlashInferAttention(ServingAttention):
    name = "flashinfer"

    def __init__(self, *args):
        super().__init__(*args)
        import flashinfer

        def workspace() -> torch.Tensor:
            return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)

        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", use_tensor_cores=True)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD", backend="fa2")

    available = staticmethod(flashinfer_backend.BACKEND.available)

    def begin(self, step):
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

    available = staticmethod(packinfer_backend.BACKEND.available)

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
