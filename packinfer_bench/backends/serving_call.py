"""A backend's serving call measured at kernel level: a batch the continuous-batching scheduler produced, held in
the backend's own KV cache as a server would hold it before the iteration (each request's earlier tokens cached,
a shared prefix stored once where the backend shares prefixes), and the exact per-layer call the model makes -
write the new tokens' K/V, attend - timed; begin() (the iteration's plan) is the plan cost. So kernel-level and
end-to-end numbers describe the same code."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import packinfer
import torch

from packinfer_bench.backends.base import Backend, Inputs, NotApplicable, Step, add_scratch


def serving_call(backend: Backend, x: Inputs, variant: str) -> Callable[[], torch.Tensor]:
    """The timed callable: one layer's serving attention of the batch (new rows' K/V written, then attention)."""
    if backend.serving is None:
        raise NotApplicable(f"{backend.name} has no serving attention")
    s = x.shape
    attention = backend.serving(x.q.device, s.num_heads, s.num_kv_heads, s.head_dim,
                                **backend.serving_variants[variant])
    same = attention.variant_skip(x.batch)
    if same:
        raise NotApplicable(same)
    cache, slots, new = _cached(x, attention)
    b = x.batch
    attention.configure(max_rows=int(b.q_lens.sum()), max_seqs=len(b), max_kv_len=int(b.kv_lens.max()),
                        capacity_tokens=cache.capacity_tokens)
    attention.begin(Step(b, cache, None, slots, b.cu_seqlens()[0]))
    k, v = x.k[new], x.v[new]
    first = [True]

    def call() -> torch.Tensor:
        if not first[0]:
            return attention(0, x.q, k, v)
        first[0] = False  # the first call (the check, or warm-up): the call itself must store the new K/V
        poison = torch.full_like(k, float("nan"))
        cache.write(slots, poison, poison, layer=0)
        out = attention(0, x.q, k, v)
        if not (torch.equal(cache.k_pools[0][slots], k) and torch.equal(cache.v_pools[0][slots], v)):
            raise RuntimeError(f"{backend.name}:{variant} did not store the new tokens' K/V in its cache")
        return out

    return call


def _cached(x: Inputs, attention):
    """(cache, slots of the new rows, rows of x.k holding the new tokens) for the attention's layout, built once
    per batch and layout (kept in the inputs' scratch: the cache's state is not plan cost)."""
    key = ("serving-cache", attention.layout, attention.page_size, attention.share_prefixes)
    if key in x.scratch:
        return x.scratch[key]
    b = x.batch
    cu = x.cu_k_cpu.numpy().astype(np.int64)
    cached = b.kv_lens - b.q_lens
    shared: dict[int, tuple[int, int]] = {}  # member -> (prefix key, length)
    if attention.share_prefixes:
        for first, others, _ in b.shared_prefixes():
            members = [first, *others.tolist()]
            length = int(min(min(b.prefix_lens[m], cached[m]) for m in members))
            if length > 0:
                shared.update({m: (first, length) for m in members})
    capacity = int(b.kv_lens.sum()) + 2 * attention.page_size * (len(b) + 2) + 64 * len(b)
    # first fit: the batch is placed once, packed as after a re-layout (spread placement, made for requests that
    # grow, splits the free space so that this exact-size cache cannot hold the batch)
    cache = packinfer.make_cache(attention.layout, capacity, x.shape.num_kv_heads, x.shape.head_dim,
                                 dtype=x.k.dtype, device=x.k.device, block_size=attention.page_size, headroom=0,
                                 placement="first-fit")
    add_scratch(cache)
    for first, length in set(shared.values()):
        cache.add_prefix(first, x.k[cu[first]:cu[first] + length], x.v[cu[first]:cu[first] + length])
    slots, new = [], []
    for i, rid in enumerate(b.request_ids.tolist()):  # the serving call views the cache by request id
        pid, length = shared.get(i, (None, 0))
        cache.allocate(rid, pid, reserve=int(b.kv_lens[i]) - length)
        lo, mid = cu[i] + length, cu[i] + cached[i]
        if mid > lo:
            cache.append(rid, x.k[lo:mid], x.v[lo:mid])
        slots.append(cache.extend(rid, int(b.q_lens[i])))
        new.append(np.arange(mid, cu[i + 1]))
    result = (cache, torch.from_numpy(np.concatenate(slots)).to(x.q.device),
              torch.from_numpy(np.concatenate(new)).to(x.q.device))
    x.scratch[key] = result
    return result
