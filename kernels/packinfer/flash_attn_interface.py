"""FlashAttention 2's Python API on packinfer's kernels: replacing `from flash_attn import ...` (or
`from flash_attn.flash_attn_interface import ...`) with `from packinfer.flash_attn_interface import ...` is the
whole migration for inference code.

Same names, positional order, defaults and meaning as FlashAttention 2.8: `causal` defaults to False, masks are
aligned bottom-right (query i of a request sits at key position i + seqlen_k - seqlen_q; a row that sees no key
outputs 0 and its log-sum-exp is +inf), `window_size` (left, right) with -1 unbounded, `softcap`, `alibi_slopes`
([H] or [B, H], fp32), `return_attn_probs` gives (out, softmax_lse, None) with softmax_lse fp32 [H, total_q]
(varlen) or [B, H, seqlen_q] (batched), any head dim up to 256. Every call goes through packinfer's planner
(packing, balancing, splitting stay on). Paged K/V in the varlen call (`block_table`, as vLLM calls it) and
`seqused_k` / `leftpad_k` run on packinfer's cache kernel; everything else on the packed varlen kernel.

Forward only: packinfer has no backward pass, so dropout_p > 0, and inputs that require grad while grad mode is
on, raise a ValueError instead of returning an output with no graph. `deterministic` is accepted (the forward is
deterministic: split rows are merged in a fixed order). Plans are built on the host from the lengths, so
cu_seqlens / cache_seqlens are read on the CPU (one synchronisation per call); a serving loop that calls every
layer with the same batch should plan once with the native API (plan_for / plan_cache_attention) instead.
"""

from __future__ import annotations

import numpy as np
import torch

from packinfer.api import cache_attention, varlen_attention
from packinfer.cache_plan import plan_cache_attention
from packinfer.device import num_sms
from packinfer.kv_cache import KVView
from packinfer.validate import check_window

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, seqused_k=None,
                           leftpad_k=None):
    """q [total_q, H, D], k/v [total_k, Hkv, D] (or with block_table [B, max_pages]: pools
    [num_blocks, page_size, Hkv, D], request b's keys at positions 0..len_b - 1 through block_table[b]),
    cu_seqlens int32 [B+1]. seqused_k [B] / leftpad_k [B] (int32, as FlashAttention 3 and vLLM pass them):
    request b's keys are k[cu_seqlens_k[b] + leftpad_k[b] : cu_seqlens_k[b] + seqused_k[b]]. Returns out like q,
    or (out, softmax_lse [H, total_q], None) with return_attn_probs."""
    _check_inference(dropout_p, q, k, v)
    window = check_window(window_size, "window_size")
    if block_table is not None or seqused_k is not None or leftpad_k is not None:
        out, lse = _varlen_over_cache(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqused_k, leftpad_k,
                                      softmax_scale, causal, window, softcap, alibi_slopes)
    else:
        out, lse = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                    softmax_scale=softmax_scale, window=window, softcap=softcap,
                                    alibi_slopes=alibi_slopes, return_lse=True)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """kv [total_k, 2, Hkv, D]; otherwise flash_attn_varlen_func."""
    k, v = _unpack(kv, 2, "kv")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv [total, 3, H, D] (as many K/V heads as query heads); otherwise flash_attn_varlen_func."""
    q, k, v = _unpack(qkv, 3, "qkv")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [B, seqlen_q, H, D], k/v [B, seqlen_k, Hkv, D]. Returns out like q, or (out, softmax_lse
    [B, H, seqlen_q], None) with return_attn_probs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor [batch, seqlen, heads, head_dim], got shape "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (batch + 1) * seqlen_k, seqlen_k, dtype=torch.int32, device=q.device)
    out, lse, _ = flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                         v.reshape(-1, *v.shape[2:]), cu_q, cu_k, seqlen_q, seqlen_k, dropout_p,
                                         softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                         True)
    out = out.view(q.shape)
    if not return_attn_probs:
        return out
    return out, lse.view(q.shape[2], batch, seqlen_q).transpose(0, 1), None


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """kv [B, seqlen_k, 2, Hkv, D]; otherwise flash_attn_func."""
    k, v = _unpack(kv, 2, "kv")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv [B, seqlen, 3, H, D]; otherwise flash_attn_func."""
    q, k, v = _unpack(qkv, 3, "qkv")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Decode / append attention over a KV cache, FlashAttention 2's semantics. q [B, seqlen_q, H, D];
    k_cache/v_cache [B_cache, seqlen_cache, Hkv, D], or paged [num_blocks, page_size, Hkv, D] with block_table
    [B, max_pages] int32; cache_seqlens int or int32 [B] (None: the whole cache). k/v [B, seqlen_new, Hkv, D]
    (optional) are first written into the cache in place at positions cache_seqlens[b] onwards; rotary_cos/sin
    [seqlen_ro, rotary_dim / 2] rotate the new keys at those positions, and q at them too when causal or
    windowed (else every query at cache_seqlens[b]); rotary_interleaved pairs dims (0, 1), (2, 3), ... instead of
    the two halves. cache_batch_idx [B]: the cache row of each request (dense cache); cache_leftpad [B]: the
    cache of request b starts at that position (dense cache). num_splits: 1 turns the planner's split-KV off;
    any other value lets it decide. Returns out like q, or (out, softmax_lse [B, H, seqlen_q]) with
    return_softmax_lse. Updates k_cache / v_cache in place when k / v are given."""
    _check_inference(0.0, q, k_cache, v_cache, k, v)
    window = check_window(window_size, "window_size")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a tensor [batch, seqlen_q, heads, head_dim], got shape "
                         f"{tuple(getattr(q, 'shape', ()))}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError("k_cache and v_cache must be tensors of one shape [batch or blocks, seqlen or page_size, "
                         f"kv_heads, head_dim], got {tuple(getattr(k_cache, 'shape', ()))} and "
                         f"{tuple(getattr(v_cache, 'shape', ()))}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values to append)")
    batch, seqlen_q = q.shape[0], q.shape[1]
    paged = block_table is not None
    new = 0 if k is None else k.shape[1]
    if k is not None and (k.dim() != 4 or k.shape[0] != batch or v.shape != k.shape
                          or k.shape[2:] != k_cache.shape[2:]):
        raise ValueError(f"k and v must be [batch={batch}, seqlen_new, {k_cache.shape[2]}, {k_cache.shape[3]}], got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if paged and (cache_batch_idx is not None or cache_leftpad is not None):
        raise ValueError("cache_batch_idx and cache_leftpad are not supported with a paged cache (block_table), "
                         "as in FlashAttention")
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
    seqlens = _per_request(cache_seqlens, batch, "cache_seqlens", default=capacity - new)
    leftpad = _per_request(cache_leftpad, batch, "cache_leftpad", default=0)
    rows = _per_request(cache_batch_idx, batch, "cache_batch_idx", default=None)
    rows = np.arange(batch) if rows is None else rows
    if (seqlens < leftpad).any() or (seqlens + new > capacity).any():
        b = int(np.argmax((seqlens < leftpad) | (seqlens + new > capacity)))
        raise ValueError(f"request {b}: cache_seqlens {int(seqlens[b])} + {new} new tokens must fit the cache's "
                         f"{capacity} positions and be >= cache_leftpad {int(leftpad[b])}")
    if not paged and ((rows < 0) | (rows >= k_cache.shape[0])).any():
        raise ValueError(f"cache_batch_idx must index the cache's {k_cache.shape[0]} rows, got {rows.tolist()}")
    k_pool, v_pool = _pool(k_cache, "k_cache"), _pool(v_cache, "v_cache")
    table = None
    if paged:
        table = _check_table(block_table, batch, k_cache.shape[0])
    positions = torch.from_numpy(seqlens).to(q.device)
    if (rotary_cos is not None or rotary_sin is not None) and k is None:
        raise ValueError("rotary_cos / rotary_sin need the new k and v to append (as in FlashAttention)")
    if rotary_cos is not None or rotary_sin is not None:
        q, k = _rotate(q, k, rotary_cos, rotary_sin, positions, causal or window != (-1, -1), rotary_interleaved)
    if k is not None:
        slots = _slots(rows, seqlens, new, page, k_cache.shape[1], table)
        index = torch.from_numpy(slots).to(q.device)
        k_pool.index_copy_(0, index, k.reshape(-1, *k.shape[2:]).to(k_pool.dtype))
        v_pool.index_copy_(0, index, v.reshape(-1, *v.shape[2:]).to(v_pool.dtype))
    kv_lens = seqlens + new - leftpad
    q_lens = np.full(batch, seqlen_q, dtype=np.int64)
    if paged:
        view = _paged_view(k_pool, v_pool, kv_lens, table, page)
    else:
        view = _grouped_view(k_pool, v_pool, kv_lens, rows * k_cache.shape[1] + leftpad)
    out, lse = _attend(q.reshape(-1, *q.shape[2:]), view, q_lens, softmax_scale, causal, window, softcap,
                       alibi_slopes, split=num_splits != 1)
    out = out.view(q.shape)
    if not return_softmax_lse:
        return out
    return out, lse.view(q.shape[2], batch, seqlen_q).transpose(0, 1)


def _varlen_over_cache(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqused_k, leftpad_k, softmax_scale,
                       causal, window, softcap, alibi_slopes):
    """The varlen call with paged K/V or per-request used/padded key ranges, on the cache kernel."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a tensor [total_q, heads, head_dim], got {tuple(getattr(q, 'shape', ()))}")
    cu_q = _host_int32(cu_seqlens_q, "cu_seqlens_q").astype(np.int64)
    cu_k = _host_int32(cu_seqlens_k, "cu_seqlens_k").astype(np.int64)
    if cu_q.ndim != 1 or cu_k.shape != cu_q.shape or len(cu_q) < 2 or cu_q[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens_q / cu_seqlens_k must be int32 [B+1] with cu_seqlens_q[-1] = {q.shape[0]}, "
                         f"got shapes {cu_q.shape} and {cu_k.shape}")
    if (np.diff(cu_q) < 0).any() or (np.diff(cu_k) < 0).any() or cu_q[0] != 0 or cu_k[0] != 0:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must start at 0 and be non-decreasing")
    batch = len(cu_q) - 1
    lens = np.diff(cu_k)
    if block_table is not None:
        if seqused_k is not None or leftpad_k is not None:
            raise ValueError("seqused_k and leftpad_k are not supported together with block_table")
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError("with block_table, k and v must be paged pools [num_blocks, page_size, kv_heads, "
                             f"head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
        table = _check_table(block_table, batch, k.shape[0])
        page = k.shape[1]
        if (lens > table.shape[1] * page).any():
            b = int(np.argmax(lens > table.shape[1] * page))
            raise ValueError(f"request {b} has {int(lens[b])} keys but its block_table row holds "
                             f"{table.shape[1] * page} positions")
        view = _paged_view(_pool(k, "k"), _pool(v, "v"), lens, table, page)
    else:
        used = lens if seqused_k is None else _per_request(seqused_k, batch, "seqused_k", default=None)
        pad = _per_request(leftpad_k, batch, "leftpad_k", default=0)
        if (used > lens).any() or (pad > used).any():
            b = int(np.argmax((used > lens) | (pad > used)))
            raise ValueError(f"request {b}: need leftpad_k ({int(pad[b])}) <= seqused_k ({int(used[b])}) <= its "
                             f"{int(lens[b])} keys in cu_seqlens_k")
        if not isinstance(k, torch.Tensor) or k.dim() != 3 or v.shape != k.shape or cu_k[-1] > k.shape[0]:
            raise ValueError(f"k and v must be [total_k, kv_heads, head_dim] holding cu_seqlens_k[-1] = {cu_k[-1]} "
                             f"tokens, got {tuple(getattr(k, 'shape', ()))} and {tuple(getattr(v, 'shape', ()))}")
        view = _grouped_view(k, v, used - pad, cu_k[:-1] + pad)
    return _attend(q, view, np.diff(cu_q), softmax_scale, causal, window, softcap, alibi_slopes, split=True)


def _attend(q, view: KVView, q_lens: np.ndarray, softmax_scale, causal, window, softcap, alibi_slopes, *,
            split: bool):
    """Plan and run attention of q's rows (q_lens per request of `view`) over the view; requests without query
    rows are left out of the plan. Returns (out, lse [H, rows])."""
    keep = np.flatnonzero(q_lens > 0)
    if len(keep) == 0 or not view.kv_lens[keep].any():  # nothing to attend: every row sees no key
        return (torch.zeros_like(q),
                torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32, device=q.device))
    if len(keep) < len(q_lens):
        view = _subset(view, keep)
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            alibi_slopes = alibi_slopes[torch.from_numpy(keep).to(alibi_slopes.device)]
    if q.shape[2] != view.k.shape[2] or q.dtype != view.k.dtype:
        raise ValueError(f"q ({q.dtype}, head_dim {q.shape[2]}) and k/v ({view.k.dtype}, head_dim "
                         f"{view.k.shape[2]}) must share dtype and head_dim")
    if q.shape[1] % view.k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({view.k.shape[1]}) for GQA/MQA")
    plan = plan_cache_attention(view, q_lens[keep], q.shape[1], causal=causal, window=window, split=split,
                                num_sms=num_sms(q.device), head_dim=q.shape[2])
    return cache_attention(q, view, plan, softmax_scale=softmax_scale, softcap=softcap, alibi_slopes=alibi_slopes,
                           return_lse=True)


def _grouped_view(k: torch.Tensor, v: torch.Tensor, kv_lens: np.ndarray, starts: np.ndarray) -> KVView:
    """Request b's keys at pool rows starts[b] .. starts[b] + kv_lens[b] - 1."""
    n = len(kv_lens)
    return KVView(layout="grouped", k=k, v=v, request_ids=list(range(n)), kv_lens=kv_lens.astype(np.int64),
                  prefix_ids=np.full(n, -1), prefix_lens=np.zeros(n, np.int64), prefix_addr=np.full(n, -1),
                  own_addr=np.asarray(starts, dtype=np.int64))


def _paged_view(k: torch.Tensor, v: torch.Tensor, kv_lens: np.ndarray, table: np.ndarray, page: int) -> KVView:
    n = len(kv_lens)
    return KVView(layout="paged", k=k, v=v, request_ids=list(range(n)), kv_lens=kv_lens.astype(np.int64),
                  prefix_ids=np.full(n, -1), prefix_lens=np.zeros(n, np.int64), block_table=table, page_size=page)


def _subset(view: KVView, keep: np.ndarray) -> KVView:
    return KVView(layout=view.layout, k=view.k, v=view.v, request_ids=[view.request_ids[i] for i in keep],
                  kv_lens=view.kv_lens[keep], prefix_ids=view.prefix_ids[keep], prefix_lens=view.prefix_lens[keep],
                  prefix_addr=None if view.prefix_addr is None else view.prefix_addr[keep],
                  own_addr=None if view.own_addr is None else view.own_addr[keep],
                  block_table=None if view.block_table is None else view.block_table[keep],
                  page_size=view.page_size)


def _slots(rows: np.ndarray, seqlens: np.ndarray, new: int, page: int, seqlen_cache: int,
           table: np.ndarray | None) -> np.ndarray:
    """Pool rows the new tokens go to: positions seqlens[b] .. seqlens[b] + new - 1 of each request."""
    pos = seqlens[:, None] + np.arange(new)[None, :]
    if table is None:
        return (rows[:, None] * seqlen_cache + pos).reshape(-1)
    pages = np.take_along_axis(table.astype(np.int64), pos // page, axis=1)
    return (pages * page + pos % page).reshape(-1)


def _rotate(q, k, cos, sin, positions, per_row: bool, interleaved: bool):
    """Rotary embedding of q and the new k at their cache positions (FlashAttention's rotary_cos / sin)."""
    if cos is None or sin is None or cos.shape != sin.shape or cos.dim() != 2:
        raise ValueError("rotary_cos and rotary_sin must be given together, each [seqlen_ro, rotary_dim / 2]")
    if 2 * cos.shape[1] > q.shape[-1]:
        raise ValueError(f"rotary_dim ({2 * cos.shape[1]}) must be at most head_dim ({q.shape[-1]})")

    def rotate(x, start, per_token):
        steps = torch.arange(x.shape[1], device=x.device) if per_token else torch.zeros(x.shape[1], dtype=torch.long,
                                                                                       device=x.device)
        idx = start.long()[:, None] + steps[None, :]
        if int(idx.max()) >= cos.shape[0]:
            raise ValueError(f"rotary_cos has {cos.shape[0]} positions but position {int(idx.max())} is needed")
        c, s = cos[idx][:, :, None].float(), sin[idx][:, :, None].float()  # [B, S, 1, rotary_dim / 2]
        d = 2 * cos.shape[1]
        xr = x[..., :d].float()
        if interleaved:
            x1, x2 = xr[..., 0::2], xr[..., 1::2]
            rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
        else:
            x1, x2 = xr[..., :d // 2], xr[..., d // 2:]
            rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
        return torch.cat([rot.to(x.dtype), x[..., d:]], dim=-1)

    return rotate(q, positions, per_row), None if k is None else rotate(k, positions, True)


def _check_table(block_table, batch: int, num_blocks: int) -> np.ndarray:
    """block_table int32 [batch, max_pages] whose entries are blocks of the pool (no read outside it)."""
    table = _host_int32(block_table, "block_table")
    if table.ndim != 2 or table.shape[0] != batch:
        raise ValueError(f"block_table must be int32 [batch={batch}, max_pages], got shape {table.shape}")
    if table.size and (table.min() < 0 or table.max() >= num_blocks):
        raise ValueError(f"block_table entries must be blocks 0..{num_blocks - 1} of the paged pool, got "
                         f"{int(table.min())}..{int(table.max())}")
    return table


def _per_request(x, batch: int, name: str, default):
    """An int or int32 [batch] argument as int64 numpy [batch] (None: default, itself None or an int)."""
    if x is None:
        return None if default is None else np.full(batch, default, dtype=np.int64)
    if isinstance(x, int):
        return np.full(batch, x, dtype=np.int64)
    arr = _host_int32(x, name)
    if arr.shape != (batch,):
        raise ValueError(f"{name} must be an int or int32 [batch={batch}], got shape {arr.shape}")
    return arr.astype(np.int64)


def _host_int32(x, name: str) -> np.ndarray:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int32:
        raise ValueError(f"{name} must be an int32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return x.detach().cpu().numpy()


def _pool(t: torch.Tensor, name: str) -> torch.Tensor:
    """[rows, seqlen or page, Hkv, D] as a flat pool [rows * seqlen, Hkv, D] sharing its storage."""
    if t.stride(0) != t.shape[1] * t.stride(1) or t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its first two dims and its last one (a view of a pool), "
                         f"got strides {t.stride()}")
    return t.view(-1, *t.shape[2:])


def _unpack(packed: torch.Tensor, parts: int, name: str) -> tuple[torch.Tensor, ...]:
    axis = packed.dim() - 3 if isinstance(packed, torch.Tensor) else -1
    if not isinstance(packed, torch.Tensor) or packed.dim() < 4 or packed.shape[axis] != parts:
        raise ValueError(f"{name} must have {parts} at dim -3 ([..., {parts}, heads, head_dim]), got shape "
                         f"{tuple(getattr(packed, 'shape', ()))}")
    return packed.unbind(axis)


def _check_inference(dropout_p, *tensors) -> None:
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p} is not supported: packinfer is inference only (forward pass, no "
                         "dropout); pass 0.0")
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise ValueError("inputs require grad, but packinfer has no backward pass (inference only): call it under "
                         "torch.no_grad() / torch.inference_mode(), or detach the inputs")
