"""packinfer: packed attention for batches of requests with very different lengths (PackInfer).

plan_varlen / plan_for build a balanced tile list from the lengths (CPU, once per batch); varlen_attention runs
it in one launch with FlashAttention-varlen conventions. The library stands alone: it never imports the
benchmark harness, so a serving stack can take it by itself.
"""

from packinfer.api import FA2_LIKE, KernelConfig, choose_config, plan_for, varlen_attention
from packinfer.plan import TILE_FIELDS, Plan, plan_varlen
from packinfer.reference import reference_varlen_attention

__version__ = "0.1.0"
__all__ = ["FA2_LIKE", "TILE_FIELDS", "KernelConfig", "Plan", "choose_config", "plan_for", "plan_varlen",
           "reference_varlen_attention", "varlen_attention"]
