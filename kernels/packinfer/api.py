"""FlashAttention-varlen-compatible entry points."""

from __future__ import annotations

import numpy as np
import torch

from packinfer.packed_attention import launch
from packinfer.plan import Plan, plan_varlen
from packinfer.validate import check_qkv

#: Kernel configuration per head_dim: (block_m, block_n, num_warps, num_stages); tuned on an H100.
CONFIGS: dict[int, tuple[int, int, int, int]] = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}


def default_blocks(head_dim: int) -> tuple[int, int]:
    """(block_m, block_n) that varlen_attention's kernel uses for this head_dim."""
    if head_dim not in CONFIGS:
        raise ValueError(f"head_dim {head_dim} is not supported; supported: {sorted(CONFIGS)}")
    return CONFIGS[head_dim][:2]


def plan_for(cu_seqlens_q, cu_seqlens_k, num_heads: int, num_kv_heads: int, head_dim: int, *, causal: bool = True,
             packing: bool = True, balancing: bool = True) -> Plan:
    """plan_varlen with the block sizes the kernel uses for head_dim."""
    block_m, block_n = default_blocks(head_dim)
    return plan_varlen(cu_seqlens_q, cu_seqlens_k, num_heads, num_kv_heads, head_dim, causal=causal,
                       block_m=block_m, block_n=block_n, packing=packing, balancing=balancing)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True,
                     softmax_scale: float | None = None, plan: Plan | None = None, out: torch.Tensor | None = None,
                     validate: bool = True, num_warps: int | None = None,
                     num_stages: int | None = None) -> torch.Tensor:
    """Attention over a ragged batch, FlashAttention varlen conventions: q [total_q, H, D], k/v [total_k, Hkv, D],
    int32 cu_seqlens [B+1]; causal masks are aligned bottom-right when q_len < kv_len. Returns out like q.

    `plan` (from plan_varlen / plan_for on the same lengths) skips planning; build it once per batch and reuse it
    for every layer. `out` (like q) receives the result when given. validate=False skips the argument checks,
    which read cu_seqlens on the host (a device sync); use it only for calls whose arguments were checked before.
    max_seqlen_q / max_seqlen_k are accepted for drop-in compatibility and not needed.
    """
    if validate:
        check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
    head_dim = q.shape[2]
    if plan is None:
        plan = plan_for(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1], head_dim, causal=causal)
    elif validate and (plan.causal != causal or plan.num_heads != q.shape[1] or plan.num_kv_heads != k.shape[1]
                       or plan.head_dim != head_dim
                       or not np.array_equal(plan.cu_seqlens_q, cu_seqlens_q.cpu().numpy())
                       or not np.array_equal(plan.cu_seqlens_k, cu_seqlens_k.cpu().numpy())):
        raise ValueError("plan was built for another batch or shape (causal, heads, head_dim or lengths differ)")
    _, _, warps, stages = CONFIGS[head_dim]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}, last dim contiguous), "
                         f"got {tuple(out.shape)}, {out.dtype}, {out.device}")
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    launch(q, k, v, out, plan, scale, num_warps or warps, num_stages or stages)
    return out
