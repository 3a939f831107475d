"""PackInfer (ours) and its ablations. Prefill, append and mixed batches go through the packed varlen kernel;
decode batches (every request at most DECODE_MAX_Q new rows) through cache attention over the grouped KV cache.
Variants switch one feature off each: balancing, packing (prefill tiles), GQA packing, prefix grouping, KV
splitting, and the grouped layout (paged instead); a variant that does not touch a batch's path is skipped.
triton_unpacked is the packed varlen kernel on FlashAttention-2's grid with fixed 128x64 tiles.
Planning is the plan cost (built once, reused by every call, as across layers)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import packinfer
import torch

from packinfer_bench.backends.base import Backend, Inputs, NotApplicable, ServingAttention
from packinfer_bench.backends.kv_layouts import cache_for

PACKINFER_VARIANTS = ("full", "no-balancing", "no-packing", "no-gqa-packing", "no-prefix-grouping", "no-split",
                      "paged")
#: Batches whose requests all have at most this many query rows are decode batches (cache attention).
DECODE_MAX_Q = 16
_PREFILL_ONLY = {"no-packing"}  # fa2-grid (triton_unpacked) always takes the varlen path
_DECODE_ONLY = {"no-prefix-grouping", "no-split", "paged"}


def _available(device: torch.device) -> str | None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on the CPU Triton kernels need TRITON_INTERPRET=1 (set before triton is imported)"
    return None


def is_decode(x: Inputs) -> bool:
    return int(x.batch.q_lens.max()) <= DECODE_MAX_Q


def _varlen_plan(x: Inputs, variant: str) -> packinfer.Plan:
    s, b = x.shape, x.batch
    if variant == "fa2-grid":
        return packinfer.plan_for(x.cu_q_cpu, x.cu_k_cpu, s.num_heads, s.num_kv_heads, s.head_dim, packing=False,
                                  balancing=False, config=packinfer.FA2_LIKE)
    config = packinfer.choose_config(b.q_lens, b.kv_lens, s.num_heads, s.num_kv_heads, s.head_dim)
    if variant == "no-gqa-packing":
        config = dataclasses.replace(config, pack_gqa=False)
    return packinfer.plan_for(x.cu_q_cpu, x.cu_k_cpu, s.num_heads, s.num_kv_heads, s.head_dim, config=config,
                              packing=variant != "no-packing", balancing=variant != "no-balancing")


def prepare(x: Inputs, variant: str, use_tma: bool | None = None):
    decode = is_decode(x) and variant != "fa2-grid"
    if decode and variant in _PREFILL_ONLY:
        raise NotApplicable(f"variant {variant!r} changes prefill tiles; this is a decode batch")
    if not decode and variant in _DECODE_ONLY:
        raise NotApplicable(f"variant {variant!r} changes decode attention; this batch has up to "
                            f"{int(x.batch.q_lens.max())} query rows per request (> {DECODE_MAX_Q})")
    checked = [False]
    if decode:
        _, view = cache_for(x, "paged" if variant == "paged" else "grouped")
        plan = packinfer.plan_cache_attention(
            view, x.batch.q_lens, x.shape.num_heads, prefix_grouping=variant != "no-prefix-grouping",
            split=variant != "no-split", balancing=variant != "no-balancing", num_sms=packinfer.num_sms(x.q.device),
            pack_gqa=False if variant == "no-gqa-packing" else None)

        def run() -> torch.Tensor:
            out = packinfer.cache_attention(x.q, view, plan, validate=not checked[0], use_tma=use_tma)
            checked[0] = True
            return out

        return run
    plan = _varlen_plan(x, variant)

    def run() -> torch.Tensor:  # arguments checked on the first call only, as a serving loop would
        out = packinfer.varlen_attention(x.q, x.k, x.v, x.cu_q, x.cu_k, x.max_q, x.max_k, plan=plan,
                                         validate=not checked[0], use_tma=use_tma)
        checked[0] = True
        return out

    return run


class PackinferAttention(ServingAttention):
    """Serving: the grouped (group-contiguous) cache; fresh prompts longer than DECODE_MAX_Q rows go through the
    packed varlen kernel on their own new K/V, every other row (decode, prompt chunks over cached tokens, short
    prompts) through cache attention, prefix groups read once. Both plans are made once per iteration."""

    name, layout = "packinfer", "grouped"

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
                plan = packinfer.plan_cache_attention(view, q_lens, h, num_sms=packinfer.num_sms(dev))
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


BACKEND = Backend("packinfer", PACKINFER_VARIANTS, _available, prepare, serving=PackinferAttention)
UNPACKED = Backend("triton_unpacked", ("fa2-grid",), _available, prepare)
