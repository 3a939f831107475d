"""PackInfer (ours) and its ablations: full (packing, balancing, GQA packing, tile shape per batch), and each
of those switched off; triton_unpacked is the same kernel on FlashAttention-2's grid with fixed 128x64 tiles.
Planning is the plan cost (built once, reused by every call, as across layers)."""

from __future__ import annotations

import dataclasses
import os

import packinfer
import torch

from packinfer_bench.backends.base import Backend, Inputs

PACKINFER_VARIANTS = ("full", "no-balancing", "no-packing", "no-gqa-packing")


def _available(device: torch.device) -> str | None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on the CPU Triton kernels need TRITON_INTERPRET=1 (set before triton is imported)"
    return None


def _plan(x: Inputs, variant: str) -> packinfer.Plan:
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
    plan = _plan(x, variant)
    checked = [False]

    def run() -> torch.Tensor:  # arguments checked on the first call only, as a serving loop would
        out = packinfer.varlen_attention(x.q, x.k, x.v, x.cu_q, x.cu_k, x.max_q, x.max_k, plan=plan,
                                         validate=not checked[0], use_tma=use_tma)
        checked[0] = True
        return out

    return run


BACKEND = Backend("packinfer", PACKINFER_VARIANTS, _available, prepare)
UNPACKED = Backend("triton_unpacked", ("fa2-grid",), _available, prepare)
