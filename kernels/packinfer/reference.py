"""A float32 (or float64) reference for varlen attention, one request at a time (slow, exact semantics): the
meaning of every option the kernels take, written the plain way."""

from __future__ import annotations

import torch


def reference_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q, cu_seqlens_k, *,
                               causal: bool = True, softmax_scale: float | None = None,
                               dtype: torch.dtype = torch.float32, window: tuple[int, int] = (-1, -1),
                               softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
                               return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-request softmax(s) v in `dtype` with s = q k^T * scale, then softcap * tanh(s / softcap) when
    softcap > 0, then - slope * |p - j| with ALiBi ([H] or [B, H] slopes); query i of a request sits at key
    position p = i + kv_len - q_len (bottom-right) and sees keys j with p - left <= j <= p + right for
    window (left, right) (-1: unbounded), j <= p when causal. Rows that see no key give zeros (lse +inf).
    return_lse: also the natural-log normaliser [H, total_q]."""
    cu_q = [int(x) for x in cu_seqlens_q]
    cu_k = [int(x) for x in cu_seqlens_k]
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else dim ** -0.5
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((heads, q.shape[0]), float("inf"), dtype=dtype, device=q.device)
    for b in range(len(cu_q) - 1):
        qs, ks = q[cu_q[b]:cu_q[b + 1]].to(dtype), k[cu_k[b]:cu_k[b + 1]].to(dtype)
        vs = v[cu_k[b]:cu_k[b + 1]].to(dtype)
        n_q, n_k = qs.shape[0], ks.shape[0]
        if n_q == 0 or n_k == 0:
            continue
        ks = ks.repeat_interleave(heads // kv_heads, dim=1)
        vs = vs.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        pos = (n_k - n_q + torch.arange(n_q, device=q.device))[:, None]
        key = torch.arange(n_k, device=q.device)[None, :]
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            scores = scores - slopes.to(dtype)[:, None, None] * (pos - key).abs().to(dtype)[None]
        allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= key <= pos
        if window[0] >= 0:
            allowed &= key >= pos - window[0]
        if window[1] >= 0:
            allowed &= key <= pos + window[1]
        scores = scores.masked_fill(~allowed, float("-inf"))
        seen = allowed.any(1)
        row_lse = torch.logsumexp(scores, -1)
        probs = torch.where(seen[None, :, None], (scores - row_lse[..., None]).exp(), 0)
        out[cu_q[b]:cu_q[b + 1]] = torch.einsum("hqk,khd->qhd", probs, vs)
        lse[:, cu_q[b]:cu_q[b + 1]] = torch.where(seen[None], row_lse, float("inf"))
    return (out, lse) if return_lse else out
