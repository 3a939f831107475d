"""KV caches for decode and append attention, in two layouts behind one interface: `PagedKVCache` (vLLM-style
blocks, the baseline) and `GroupedKVCache` (PackInfer's group-contiguous pool with re-layout). Modules: base
(view, stats, error, shared bookkeeping), paged, grouped, relayout (the GPU copy kernel that moves token ranges).
"""

from __future__ import annotations

import torch

from packinfer.kv_cache.base import CacheStats, KVCacheBase, KVCacheError, KVView
from packinfer.kv_cache.grouped import GroupedKVCache
from packinfer.kv_cache.paged import PagedKVCache

LAYOUTS = ("paged", "grouped")

__all__ = ["LAYOUTS", "CacheStats", "GroupedKVCache", "KVCacheBase", "KVCacheError", "KVView", "PagedKVCache",
           "make_cache"]


def make_cache(layout: str, capacity_tokens: int, num_kv_heads: int, head_dim: int, *, dtype=torch.bfloat16,
               device="cpu", block_size: int = 16, headroom: int = 64, num_layers: int = 1,
               placement: str = "spread", relayout_slack: float = 0.5,
               pools: tuple[torch.Tensor, torch.Tensor] | None = None):
    """A cache of `layout` ('paged' or 'grouped') holding capacity_tokens tokens in each of num_layers layers
    (grouped: `headroom` tokens of room per request, extents placed by `placement` (see PLACEMENTS), a share of
    the free space given out on re-layout (`relayout_slack`)). pools: the K and V memory to use instead of new
    tensors ([num_layers, capacity_tokens, num_kv_heads, head_dim] each; paged: capacity_tokens a multiple of
    block_size), e.g. another cache's k_pools / v_pools, so that caches used one at a time share one allocation."""
    if layout == "paged":
        if pools is not None and capacity_tokens % block_size:
            raise KVCacheError(f"pools: a paged cache over given pools needs capacity_tokens ({capacity_tokens}) "
                               f"to be a multiple of block_size ({block_size})")
        return PagedKVCache(-(-capacity_tokens // block_size), block_size, num_kv_heads, head_dim, dtype, device,
                            num_layers, pools)
    if layout == "grouped":
        return GroupedKVCache(capacity_tokens, num_kv_heads, head_dim, dtype, device, headroom, num_layers,
                              placement, relayout_slack, pools)
    raise KVCacheError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
