"""packinfer: packed attention for batches of requests with very different lengths (PackInfer).

plan_varlen / plan_for build a balanced tile list from the lengths (CPU, once per batch); varlen_attention runs
it in one launch with FlashAttention-varlen conventions. For serving over a KV cache (PagedKVCache, or the
group-contiguous GroupedKVCache) - decode rows, prompt chunks, fresh prompts, shared prefixes in any mix -
plan_cache_attention groups requests by shared prefix, splits long contexts where the wave is short and picks
the tile shape, and cache_attention runs it in one launch (split rows merged exactly by their last program);
PlanBuffers keep plans in fixed-capacity device buffers so that the launch can live in a CUDA graph. Both take
any head dim up to 256, a sliding window, a soft cap, ALiBi and return the log-sum-exp on request; code written
for FlashAttention 2 imports the same functions from packinfer.flash_attn_interface. The library stands alone:
it never imports the benchmark harness, so a serving stack can take it by itself.
"""

from packinfer.api import FA2_LIKE, KernelConfig, cache_attention, choose_config, plan_for, varlen_attention
from packinfer.cache_plan import CachePlan, CostModel, PlanBuffers, plan_cache_attention
from packinfer.device import num_sms
from packinfer.kv_cache import CacheStats, GroupedKVCache, KVCacheError, KVView, PagedKVCache, make_cache
from packinfer.plan import TILE_FIELDS, Plan, plan_varlen
from packinfer.reference import reference_varlen_attention
from packinfer.validate import HEAD_DIMS

__version__ = "0.1.0"
__all__ = ["FA2_LIKE", "HEAD_DIMS", "TILE_FIELDS", "CachePlan", "CacheStats", "CostModel", "PlanBuffers",
           "GroupedKVCache", "KVCacheError", "KVView", "KernelConfig", "PagedKVCache", "Plan", "cache_attention",
           "choose_config", "make_cache", "num_sms", "plan_cache_attention", "plan_for", "plan_varlen",
           "reference_varlen_attention", "varlen_attention"]
