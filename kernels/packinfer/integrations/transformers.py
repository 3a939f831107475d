"""packinfer as an attention implementation of Hugging Face transformers' continuous batching (`generate_batch`,
the engine behind `transformers serve`):

    from packinfer.integrations.transformers import register
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.bfloat16, attn_implementation=register())
    outputs = model.generate_batch(prompts, generation_config=GenerationConfig(max_new_tokens=64, do_sample=False))

Supported transformers: >= 5.17, < 6 (SUPPORTED; register() raises UnsupportedTransformersVersion naming the
installed release otherwise). Tested on 5.17 and 5.24. The two API shapes of that range are both handled:
- up to the 5.1x releases the attention function receives the paged cache (`cache=`) with the step's read/write
  indices and stores the new K/V itself (`cache.update(...)`), and paged implementations are named "paged|<x>";
- later releases store and gather K/V in the model (`cache.update(..., kwargs=...)`) before the attention call,
  dropped the "paged|" prefix (it is stripped with a FutureWarning) and admit only "sdpa", "paged|eager" and
  flash implementations into continuous batching; register() therefore wraps that admission check
  (`ContinuousBatchingManager.switch_to_cb_friendly_attn`) to let packinfer's own names through unchanged,
  and leaves every other implementation to the original check.
register() returns the name the installed release expects: "paged|packinfer" on the first, "packinfer" on the
second (both names are registered either way).

Why the varlen path (packinfer.varlen_attention over the K/V transformers hands over) and not cache_attention over
a KVView of transformers' paged cache read in place: on the later releases the model gathers every request's K/V
out of the cache (index_select over per-token read indices) before the attention function runs, so the copy is
made whatever the attention does and reading the pages again would only add work; on 5.17 the read indices are
per token, not per page (a block table would have to be rebuilt from them on the host every step), and the cache
pages of both releases are laid out per allocator sector, not as one [blocks, page, heads, dim] pool per layer.
The gathered K/V are exactly FlashAttention's varlen operands (k/v [total_k, Hkv, D], int32 cu_seqlens, causal
masks aligned bottom-right for the q_len new rows of each request), which is what packinfer's planner takes.

One plan per generation step serves every layer: the plan is built (one host read of cu_seqlens) when a forward
pass starts, i.e. at its first layer, or when the step's lengths tensors change, and reused without any host
sync by the following layers. stats() counts kernel launches, plans built and the layers each plan served, so a
test can prove the packinfer path ran. Requirements: fp16/bf16 models, head_dim <= 256, full (not
sliding-window) attention (a logit softcap is passed on), no attention sinks, CUDA graphs off for the varlen path
(transformers' default for implementations that are not flash: planning reads lengths on the host).
"""

from __future__ import annotations

import functools
import inspect
import re
import threading
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

import packinfer

#: Supported transformers releases: (lowest included, first excluded) as (major, minor).
SUPPORTED = ((5, 17), (6, 0))
#: The attention implementation names registered with transformers.
NAMES = ("paged|packinfer", "packinfer")


class UnsupportedTransformersVersion(RuntimeError):
    """The installed transformers release is outside SUPPORTED (or transformers is not installed)."""


@dataclass
class Stats:
    """What the packinfer path did since the last reset_stats(): kernel launches (one per layer call), plans built
    (one per generation step) and, per plan in order, how many layer calls it served."""

    launches: int = 0
    plans: int = 0
    layers_per_plan: list[int] = field(default_factory=list)


@dataclass
class _StepPlan:
    key: tuple
    plan: packinfer.Plan
    last_layer: int
    rows_q: int
    rows_k: int
    max_q: int
    max_k: int


_stats = Stats()
_local = threading.local()  # the step plan, per thread: each continuous-batching manager runs its own thread


def stats() -> Stats:
    """A copy of the counters (launches, plans, layers_per_plan) since the last reset_stats()."""
    return Stats(_stats.launches, _stats.plans, list(_stats.layers_per_plan))


def reset_stats() -> None:
    """Zero the counters and forget the cached step plan."""
    _stats.launches, _stats.plans = 0, 0
    _stats.layers_per_plan.clear()
    _local.__dict__.clear()


def supported_range() -> str:
    """The supported transformers range as a pip specifier."""
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED
    return f">={lo_major}.{lo_minor},<{hi_major}" + (f".{hi_minor}" if hi_minor else "")


def check_version(version: str | None = None) -> str:
    """The installed transformers version (or `version`), after checking it is in SUPPORTED; raises
    UnsupportedTransformersVersion naming the installed and the supported versions otherwise."""
    if version is None:
        try:
            import transformers
        except ImportError as exc:
            raise UnsupportedTransformersVersion(
                f"transformers is not installed; packinfer's integration needs transformers{supported_range()} "
                "(pip install './kernels[transformers]' from the packinfer-bench repository)") from exc
        version = transformers.__version__
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or not SUPPORTED[0] <= (int(match[1]), int(match[2])) < SUPPORTED[1]:
        raise UnsupportedTransformersVersion(
            f"transformers {version} is installed; packinfer's integration supports transformers{supported_range()}")
    return version


@functools.cache
def model_updates_cache() -> bool:
    """True on releases where the model stores and gathers K/V (PagedAttentionCache.update takes `kwargs`) before
    calling the attention function; False where the attention function is handed the cache and updates it."""
    from transformers.generation.continuous_batching import PagedAttentionCache

    return "kwargs" in inspect.signature(PagedAttentionCache.update).parameters


def peer_name(base: str) -> str:
    """The name of transformers' own paged implementation `base` ("sdpa", "eager", "flash_attention_2") on the
    installed release: "paged|<base>" where paged implementations carry the prefix, else the bare name
    ("paged|eager" keeps it on every release)."""
    if base == "eager" or not model_updates_cache():
        return f"paged|{base}"
    return base


def register() -> str:
    """Register packinfer with transformers' attention interface (idempotent) and return the name to pass as
    `attn_implementation` for continuous batching on the installed release."""
    check_version()
    from transformers import AttentionInterface

    for name in NAMES:
        AttentionInterface.register(name, packinfer_attention)
    if not model_updates_cache():
        return NAMES[0]
    _admit_into_continuous_batching()
    return NAMES[1]


def _admit_into_continuous_batching() -> None:
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

    original = ContinuousBatchingManager.switch_to_cb_friendly_attn
    if getattr(original, "_packinfer_admits", False):
        return

    def switch_to_cb_friendly_attn(self, model, *args, **kwargs):
        if model.config._attn_implementation in NAMES:
            return None  # already a paged implementation: nothing to switch
        return original(self, model, *args, **kwargs)

    setattr(switch_to_cb_friendly_attn, "_packinfer_admits", True)  # noqa: B010
    switch_to_cb_friendly_attn.__doc__ = original.__doc__
    setattr(ContinuousBatchingManager, "switch_to_cb_friendly_attn", switch_to_cb_friendly_attn)  # noqa: B010


def packinfer_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, H, q_tokens, D]; key/value [1, Hkv, k_tokens, D] (the step's new
    tokens where the cache comes in `kwargs["cache"]`, else new and cached tokens gathered by the model). Attends
    through packinfer's plan/launch with the step's plan; returns ([1, q_tokens, H, D], None). The 4-D mask is
    not read: cu_seq_lens_q/k and bottom-right causality describe the same attention."""
    _check_call(module, query, dropout, kwargs)
    layer = int(getattr(module, "layer_idx"))  # noqa: B009
    if not model_updates_cache():  # the attention function stores the new K/V itself
        k, v = kwargs["cache"].update(key_states=key, value_states=value, layer_idx=layer,
                                      read_index=kwargs["read_index"], write_index=kwargs["write_index"])
    else:
        k, v = key.squeeze(0).transpose(0, 1), value.squeeze(0).transpose(0, 1)
    cu_q = kwargs["cu_seq_lens_q"]
    cu_k = kwargs["cu_seq_lens_k"]
    if isinstance(cu_k, dict):
        cu_k = cu_k["full_attention"]
    cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
    q = query.squeeze(0).transpose(0, 1)
    step, first_call = _plan_for_step(layer, q, k, cu_q, cu_k)
    rows_q = step.rows_q
    result = cast(torch.Tensor, packinfer.varlen_attention(
        q=q[:rows_q].contiguous(), k=k[:step.rows_k].contiguous(), v=v[:step.rows_k].contiguous(),
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=step.max_q, max_seqlen_k=step.max_k, causal=True,
        softmax_scale=scaling, softcap=float(kwargs.get("softcap") or 0.0), plan=step.plan, validate=first_call))
    _stats.launches += 1
    _stats.layers_per_plan[-1] += 1
    if rows_q < q.shape[0]:  # padded rows (static shapes) attend to nothing
        padded = q.new_zeros(q.shape)
        padded[:rows_q] = result
        result = padded
    return result.unsqueeze(0), None


def _check_call(module: torch.nn.Module, query: torch.Tensor, dropout: float, kwargs: dict) -> None:
    if "cu_seq_lens_q" not in kwargs or "cu_seq_lens_k" not in kwargs:
        raise ValueError("packinfer attention serves transformers' continuous batching (generate_batch / "
                         "init_continuous_batching), which passes cu_seq_lens_q/k; this call has none: load the "
                         "model with another attn_implementation for a plain forward or generate()")
    if kwargs.get("block_table") is not None:
        raise ValueError("packinfer attention got a block table (transformers' flash decode fast path); set "
                         "ContinuousBatchingConfig(max_blocks_per_request=0)")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window:
        raise ValueError(f"layer {module.layer_idx} uses sliding-window attention ({window}); "
                         "packinfer's integration supports full attention only")
    if getattr(module, "sinks", None) is not None:
        raise ValueError(f"layer {module.layer_idx} has attention sinks, which packinfer does not support")
    if dropout:
        raise ValueError(f"packinfer attention is for inference: dropout must be 0, got {dropout}")
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"expected packed queries [1, heads, tokens, head_dim], got {tuple(query.shape)}")


def _plan_for_step(layer: int, q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor,
                   cu_k: torch.Tensor) -> tuple[_StepPlan, bool]:
    """The plan of this generation step: built at the step's first layer (a layer index not above the previous
    call's starts a new forward pass) or when the lengths tensors differ, else the cached one. Returns it and
    whether it was built by this call."""
    step: _StepPlan | None = getattr(_local, "step", None)
    key = (cu_q.data_ptr(), cu_k.data_ptr(), cu_q.shape[0], cu_k.shape[0], q.shape[0], k.shape[0], q.shape[1:],
           k.shape[1], q.device)
    if step is not None and step.key == key and layer > step.last_layer:
        step.last_layer = layer
        return step, False
    cu_q_host, cu_k_host = cu_q.cpu().numpy(), cu_k.cpu().numpy()
    plan = packinfer.plan_for(cu_seqlens_q=cu_q_host, cu_seqlens_k=cu_k_host, num_heads=q.shape[1],
                              num_kv_heads=k.shape[1], head_dim=q.shape[2], causal=True)
    step = _local.step = _StepPlan(key, plan, layer, int(cu_q_host[-1]), int(cu_k_host[-1]),
                                   int(np.diff(cu_q_host).max()), int(np.diff(cu_k_host).max()))
    _stats.plans += 1
    _stats.layers_per_plan.append(0)
    return step, True
