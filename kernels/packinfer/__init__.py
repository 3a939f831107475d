"""packinfer: packed attention for batches of requests with very different lengths (PackInfer).

plan_varlen / plan_for build a balanced tile list from the lengths (CPU, once per batch); varlen_attention runs
it in one launch with FlashAttention-varlen conventions. For decode and append over a KV cache (PagedKVCache,
or the group-contiguous GroupedKVCache), plan_cache_attention groups requests by shared prefix and splits long
contexts, and cache_attention runs it (one launch plus an exact merge). The library stands alone: it never
imports the benchmark harness, so a serving stack can take it by itself.
"""

from packinfer.api import FA2_LIKE, KernelConfig, cache_attention, choose_config, plan_for, varlen_attention
from packinfer.cache_plan import CachePlan, plan_cache_attention
from packinfer.device import num_sms
from packinfer.kv_cache import CacheStats, GroupedKVCache, KVCacheError, KVView, PagedKVCache, make_cache
from packinfer.plan import TILE_FIELDS, Plan, plan_varlen
from packinfer.reference import reference_varlen_attention
from packinfer.validate import HEAD_DIMS

__version__ = "0.1.0"
__all__ = ["FA2_LIKE", "HEAD_DIMS", "TILE_FIELDS", "CachePlan", "CacheStats", "GroupedKVCache", "KVCacheError",
           "KVView", "KernelConfig", "PagedKVCache", "Plan", "cache_attention", "choose_config", "make_cache",
           "num_sms", "plan_cache_attention", "plan_for", "plan_varlen", "reference_varlen_attention",
           "varlen_attention"]
