"""Shared by the packinfer and flashinfer backends: a batch's K/V laid out as a serving system would hold it before
the attention call: in packinfer's paged (vLLM-style blocks) or grouped (group-contiguous) KV cache, a shared prefix
stored once. Built once per batch and kept in the inputs' scratch, so it is neither kernel time nor plan cost (the
layout is the cache's state)."""

from __future__ import annotations

import numpy as np
import packinfer
import torch

from packinfer_bench.backends.base import PAGE_SIZE, Inputs


def cache_for(x: Inputs, layout: str) -> tuple[object, packinfer.KVView]:
    """(cache, view of all requests in batch order) of the inputs in `layout`."""
    key = ("kv-cache", layout)
    if key not in x.scratch:
        x.scratch[key] = _build(x, layout)
    return x.scratch[key]


def _build(x: Inputs, layout: str):
    batch, cu = x.batch, x.cu_k_cpu.tolist()
    prefix_of: dict[int, tuple[int, int]] = {}  # request -> (prefix key, shared length)
    for first, others, length in batch.shared_prefixes():
        for m in [first, *others.tolist()]:
            prefix_of[m] = (first, length)
    tokens = int(batch.kv_lens.sum()) - batch.dedup_kv_tokens()
    capacity = tokens + 2 * PAGE_SIZE * (len(batch) + len(batch.shared_prefixes()) + 1)  # partly filled blocks
    cache = packinfer.make_cache(layout, capacity, x.shape.num_kv_heads, x.shape.head_dim, dtype=x.k.dtype,
                                 device=x.k.device, block_size=PAGE_SIZE, headroom=0)
    for first, _, length in batch.shared_prefixes():
        cache.add_prefix(first, x.k[cu[first]:cu[first] + length], x.v[cu[first]:cu[first] + length])
    for i in range(len(batch)):
        pid, length = prefix_of.get(i, (None, 0))
        cache.allocate(i, pid, reserve=cu[i + 1] - cu[i] - length)
        cache.append(i, x.k[cu[i] + length:cu[i + 1]], x.v[cu[i] + length:cu[i + 1]])
    return cache, cache.view(range(len(batch)))


def page_table(view: packinfer.KVView, first_page: np.ndarray | None = None,
               device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's paged-KV description (indptr, indices, last_page_len; int32) of a paged view, each request
    from its page first_page[i] on (0: the whole request)."""
    ps = view.page_size
    pages = -(-view.kv_lens // ps)
    first = np.zeros(len(pages), np.int64) if first_page is None else first_page
    cols = np.arange(view.block_table.shape[1])
    indices = view.block_table[(cols >= first[:, None]) & (cols < pages[:, None])]  # row by row, in order
    indptr = np.concatenate([[0], np.cumsum(pages - first)])
    last = view.kv_lens - (pages - 1) * ps
    return tuple(torch.from_numpy(a.astype(np.int32)).to(device) for a in (indptr, indices, last))


def contiguous_extents(cache, view: packinfer.KVView) -> tuple[np.ndarray, np.ndarray]:
    """(cu_seqlens_k, seqused_k), int32 host arrays, that make FlashAttention's varlen call read each request of
    a grouped cache in place: request i's keys start at cu_seqlens_k[i] (its extent's first address) and number
    seqused_k[i]; the last entry is the pool's end."""
    starts = np.concatenate([view.own_addr, [cache.capacity_tokens]]).astype(np.int32)
    return starts, view.kv_lens.astype(np.int32)
