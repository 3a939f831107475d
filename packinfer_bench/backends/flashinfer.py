"""FlashInfer, an optional extra. Variants: fa2 / fa3 = batch prefill over ragged K/V (any batch); decode =
batch decode over a paged KV cache with tensor cores, shared prefix pages referenced by every member (decode
batches); cascade = two-level cascade attention, the shared prefix level read once per group (decode batches
whose requests all belong to a prefix group, members adjacent). wrapper.plan() is the plan cost; FlashInfer
JIT-compiles each module on first use (excluded: the runner prepares once before timing)."""

from __future__ import annotations

import numpy as np
import torch

from packinfer_bench.backends.base import PAGE_SIZE, Backend, Inputs, NotApplicable, ServingAttention, needs_cuda
from packinfer_bench.backends.kv_layouts import cache_for, page_table

WORKSPACE_BYTES = 256 << 20


def _available(device: torch.device) -> str | None:
    return needs_cuda(device, "flashinfer",
                      missing="flashinfer is not installed (pip install packinfer-bench[flashinfer])")


def _workspace(x: Inputs) -> torch.Tensor:
    return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=x.q.device)


def _paged_kv(x: Inputs):
    cache, view = cache_for(x, "paged")
    shape = (-1, PAGE_SIZE, x.shape.num_kv_heads, x.shape.head_dim)
    return view, (cache.k.view(shape), cache.v.view(shape))


def _prepare(x: Inputs, variant: str):
    import flashinfer

    s = x.shape
    if variant in ("fa2", "fa3"):
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_workspace(x), "NHD", backend=variant)
        wrapper.plan(x.cu_q, x.cu_k, s.num_heads, s.num_kv_heads, s.head_dim, causal=True, q_data_type=x.q.dtype)
        return lambda: wrapper.run(x.q, x.k, x.v)
    if int(x.batch.q_lens.max()) != 1:
        raise NotApplicable(f"FlashInfer {variant} takes one query row per request (decode batches)")
    view, kv = _paged_kv(x)
    if variant == "decode":
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(_workspace(x), "NHD", use_tensor_cores=True)
        wrapper.plan(*page_table(view, device=x.q.device), s.num_heads, s.num_kv_heads, s.head_dim, PAGE_SIZE,
                     q_data_type=x.q.dtype, kv_data_type=x.k.dtype)
        return lambda: wrapper.run(x.q, kv)
    # cascade: level 0 = each group's shared full prefix pages, for all its members' queries; level 1 = the rest
    groups = x.batch.shared_prefixes()
    members = [np.concatenate([[first], others]) for first, others, _ in groups]
    if not groups or sum(len(m) for m in members) != len(x.batch) or any(
            (np.diff(m) != 1).any() for m in members):
        raise NotApplicable("cascade needs every request in a prefix group, each group's requests adjacent")
    shared_pages = np.zeros(len(x.batch), np.int64)
    for m, (_, _, length) in zip(members, groups):
        shared_pages[m] = length // PAGE_SIZE
    if (shared_pages == 0).any():
        raise NotApplicable(f"a shared prefix shorter than one page ({PAGE_SIZE} tokens)")
    firsts = np.array([m[0] for m in members])
    level0_indices = np.concatenate([view.block_table[f, :shared_pages[f]] for f in firsts])
    level0 = (torch.tensor(np.concatenate([[0], np.cumsum(shared_pages[firsts])]), dtype=torch.int32),
              torch.tensor(level0_indices, dtype=torch.int32),
              torch.full((len(firsts),), PAGE_SIZE, dtype=torch.int32))
    level1 = page_table(view, first_page=shared_pages)
    qo = [torch.tensor(np.concatenate([[0], np.cumsum([len(m) for m in members])]), dtype=torch.int32),
          torch.arange(len(x.batch) + 1, dtype=torch.int32)]
    dev = x.q.device
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, _workspace(x), "NHD")
    wrapper.plan([t.to(dev) for t in qo], [level0[0].to(dev), level1[0].to(dev)],
                 [level0[1].to(dev), level1[1].to(dev)], [level0[2].to(dev), level1[2].to(dev)],
                 s.num_heads, s.num_kv_heads, s.head_dim, PAGE_SIZE, q_data_type=x.q.dtype)
    return lambda: wrapper.run(x.q, kv)


class FlashInferAttention(ServingAttention):
    """Serving: a paged cache of PAGE_SIZE-token pages; batch decode (tensor cores) for all-decode iterations,
    batch prefill over the paged cache for the rest, FlashInfer's plan once per iteration."""

    name = "flashinfer"

    def __init__(self, *args):
        super().__init__(*args)
        import flashinfer

        def workspace() -> torch.Tensor:
            return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)

        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD", use_tensor_cores=True)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD", backend="fa2")

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


BACKEND = Backend("flashinfer", ("fa2", "fa3", "decode", "cascade"), _available, _prepare,
                  serving=FlashInferAttention)
