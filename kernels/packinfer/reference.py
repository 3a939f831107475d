"""A float32 reference for varlen attention, one request at a time (slow, exact semantics)."""

from __future__ import annotations

import torch


def reference_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q, cu_seqlens_k, *,
                               causal: bool = True, softmax_scale: float | None = None,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-request softmax(q k^T * scale) v in `dtype`, bottom-right causal; rows with no key give zeros."""
    cu_q = [int(x) for x in cu_seqlens_q]
    cu_k = [int(x) for x in cu_seqlens_k]
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else dim ** -0.5
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    for b in range(len(cu_q) - 1):
        qs, ks = q[cu_q[b]:cu_q[b + 1]].to(dtype), k[cu_k[b]:cu_k[b + 1]].to(dtype)
        vs = v[cu_k[b]:cu_k[b + 1]].to(dtype)
        n_q, n_k = qs.shape[0], ks.shape[0]
        if n_q == 0 or n_k == 0:
            continue
        ks = ks.repeat_interleave(heads // kv_heads, dim=1)
        vs = vs.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            allowed = torch.arange(n_k, device=q.device)[None, :] <= (n_k - n_q + torch.arange(n_q, device=q.device))[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[cu_q[b]:cu_q[b + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out
