"""FlashInfer batch prefill over ragged K/V (backends fa2 and fa3), an optional extra. wrapper.plan() is the
plan cost; FlashInfer JIT-compiles each module on first use (excluded: prepare plans once before timing)."""

from __future__ import annotations

import torch

from packinfer_bench.backends.base import Backend, Inputs, needs_cuda

WORKSPACE_BYTES = 256 << 20


def _available(device: torch.device) -> str | None:
    return needs_cuda(device, "flashinfer", missing="flashinfer is not installed (pip install packinfer-bench[flashinfer])")


def _prepare(x: Inputs, variant: str):
    import flashinfer

    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=x.q.device)
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=variant)
    wrapper.plan(x.cu_q, x.cu_k, x.shape.num_heads, x.shape.num_kv_heads, x.shape.head_dim, causal=True,
                 q_data_type=x.q.dtype)
    return lambda: wrapper.run(x.q, x.k, x.v)


BACKEND = Backend("flashinfer", ("fa2", "fa3"), _available, _prepare)
