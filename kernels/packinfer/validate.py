"""Input checks shared by the public entry points: a bad argument is a ValueError that names it."""

from __future__ import annotations

import numpy as np
import torch

#: Head dims the tile shapes were tuned on (packinfer.HEAD_DIMS); any head dim up to MAX_HEAD_DIM runs, padded
#: inside the kernels to the next power of two.
HEAD_DIMS = (64, 128, 256)
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16)


def check_cu_seqlens(cu_q: np.ndarray, cu_k: np.ndarray) -> None:
    """cu_seqlens_q / cu_seqlens_k: 1-D, same length >= 2, start at 0, non-decreasing."""
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.ndim != 1 or len(cu) < 2:
            raise ValueError(f"{name} must be 1-D with B+1 >= 2 entries, got shape {tuple(cu.shape)}")
        if cu[0] != 0:
            raise ValueError(f"{name} must start at 0, got {int(cu[0])}")
        if (np.diff(cu) < 0).any():
            i = int(np.argmax(np.diff(cu) < 0))
            raise ValueError(f"{name} must be non-decreasing, but entry {i + 1} ({int(cu[i + 1])}) < entry {i} "
                             f"({int(cu[i])})")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (B+1), got {len(cu_q)} and "
                         f"{len(cu_k)}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
              cu_seqlens_k: torch.Tensor) -> None:
    """q [total_q, H, D], k/v [total_k, Hkv, D]: same device and dtype (fp16/bf16), H % Hkv == 0, D <= 256,
    cu_seqlens int32 with last entries equal to total_q / total_k."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have rank 3 [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be float16 or bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[2]
    check_head_dim(head_dim)
    if k.shape[2] != head_dim:
        raise ValueError(f"k/v head_dim {k.shape[2]} differs from q's {head_dim}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for GQA/MQA")
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
            raise ValueError(f"{name} must be an int32 tensor, got {getattr(cu, 'dtype', type(cu).__name__)}")
        if cu.dim() == 1 and len(cu) and int(cu[-1]) != total:
            raise ValueError(f"{name}[-1] = {int(cu[-1])} does not match the {total} tokens of "
                             f"{'q' if name.endswith('q') else 'k'}")


def check_head_dim(head_dim: int) -> None:
    """1 <= head_dim <= MAX_HEAD_DIM (the kernels pad it to a power of two)."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported: it must be between 1 and {MAX_HEAD_DIM}")


def head_dim_padded(head_dim: int) -> int:
    """The power-of-two head dim (>= 16) the kernels are compiled for; dims above the real one load as zeros."""
    return max(16, 1 << (head_dim - 1).bit_length())


def check_score_options(softcap: float, alibi_slopes, num_heads: int, batch: int, device: torch.device) -> None:
    """softcap >= 0 (0: off); alibi_slopes None or an fp32 tensor [H] or [B, H] on q's device."""
    if not softcap >= 0:
        raise ValueError(f"softcap must be >= 0 (0 turns it off), got {softcap}")
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
        raise ValueError(f"alibi_slopes must be a float32 tensor, got {getattr(alibi_slopes, 'dtype', alibi_slopes)}")
    if tuple(alibi_slopes.shape) not in ((num_heads,), (batch, num_heads)):
        raise ValueError(f"alibi_slopes must have shape ({num_heads},) or ({batch}, {num_heads}), got "
                         f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")


def check_window(window, name: str = "window") -> tuple[int, int]:
    """A sliding window (left, right) as two ints, each -1 (unbounded) or >= 0; ValueError naming `name`."""
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (left, right), got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"{name} must be (left, right) with {name} entries -1 (unbounded) or >= 0, got "
                         f"{(left, right)}")
    return left, right
