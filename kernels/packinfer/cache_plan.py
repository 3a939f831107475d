"""The I/O planner for decode and append attention over a KV cache: which program reads which KV, for whom.

The unit of work is an item: a chunk of one KV segment (a contiguous run of positions of a request, or of a
shared prefix) and a block of the query rows that read it. With prefix grouping on, the requests of a batch that
share a stored prefix are put side by side and the prefix is one segment read by all their query rows (all
query heads of a KV head too, in one program), so the prefix KV is loaded once per batch instead of once per
request. With splitting on, segments are cut into near-equal chunks so that the longest context is spread over
many programs (no straggler); each item writes a partial result (output and log-sum-exp per row and head) that
a merge step combines exactly. With balancing on, items launch largest first.

Rows are numbered in the plan's order (`row_perm[i]` is the query row at plan position i); a row's causal limit
is the last position it sees (kv_len - q_len + i for its i-th query, bottom-right).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from packinfer.device import FALLBACK_SMS
from packinfer.kv_cache import KVView

#: Columns of CachePlan.items.
ITEM_FIELDS = ("row_first", "num_rows", "kv_addr", "pos_start", "kv_len", "table_row", "partial_base")
#: Programs the splitting aims at per SM (several waves keep the tail of the launch short).
WAVES = 4


@dataclass
class CachePlan:
    """A decode/append batch's work list: items int32 [W, 7] (ITEM_FIELDS) in launch order; row_perm / row_limit
    int32 [total_q] by plan position; merge_ptr [total_q + 1] / merge_idx [num_partials]: the partials of the row
    at each plan position. slots = query (row, head) pairs per program; block_n keys per step."""

    items: np.ndarray
    row_perm: np.ndarray
    row_limit: np.ndarray
    merge_ptr: np.ndarray
    merge_idx: np.ndarray
    q_lens: np.ndarray
    kv_lens: np.ndarray
    layout: str
    num_heads: int
    num_kv_heads: int
    slots: int
    block_n: int
    pack_gqa: bool
    kv_chunk: int
    page_size: int
    block_table: np.ndarray | None
    kv_tokens_read: int
    num_warps: int = 4
    num_stages: int = 3
    plan_ms: float = 0.0
    _device_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_partials(self) -> int:
        return len(self.merge_idx)

    @property
    def rows_per_item(self) -> int:
        return self.slots // (self.num_heads // self.num_kv_heads) if self.pack_gqa else self.slots

    def device_arrays(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(items, row_perm, row_limit, merge_ptr, merge_idx, block_table) as int32 tensors on `device`."""
        key = str(device)
        if key not in self._device_cache:
            table = self.block_table if self.block_table is not None else np.zeros((1, 1), np.int32)
            self._device_cache[key] = tuple(
                torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)
                for a in (self.items, self.row_perm, self.row_limit, self.merge_ptr, self.merge_idx, table))
        return self._device_cache[key]


    def partial_buffers(self, device: torch.device, num_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
        """Float32 partial outputs [num_partials, H, D] and log-sum-exps [num_partials, H], allocated once and
        reused by every call with this plan (every layer of a step: calls on one stream run in order)."""
        key = ("partials", str(device), num_heads, head_dim)
        if key not in self._device_cache:
            self._device_cache[key] = (
                torch.empty(self.num_partials, num_heads, head_dim, dtype=torch.float32, device=device),
                torch.empty(self.num_partials, num_heads, dtype=torch.float32, device=device))
        return self._device_cache[key]


def plan_cache_attention(view: KVView, q_lens, num_heads: int, *, prefix_grouping: bool = True,
                         split: bool = True, balancing: bool = True, kv_chunk: int | None = None,
                         num_sms: int = FALLBACK_SMS, waves: int = WAVES, block_n: int = 64, slots: int | None = None,
                         pack_gqa: bool | None = None) -> CachePlan:
    """Plan attention of q_lens[i] new query rows of each request of `view` (the rows are the last q_lens[i]
    positions of the request, already in the cache) over everything the request sees.

    kv_chunk: most positions an item reads (None: chosen so the batch makes about `waves` programs per SM of
    the `num_sms` the GPU has: give packinfer.num_sms(device)).
    slots: query (row, head) pairs per program (None: enough for the largest row block, 16 to 128).
    """
    t0 = time.perf_counter()
    q = np.asarray(q_lens, dtype=np.int64)
    kv, num_kv_heads = view.kv_lens, view.k.shape[1]
    if q.shape != kv.shape:
        raise ValueError(f"q_lens has {q.size} entries but the view has {kv.size} requests")
    if (q < 1).any() or (q > kv).any():
        i = int(np.argmax((q < 1) | (q > kv)))
        raise ValueError(f"q_lens must satisfy 1 <= q_len <= kv_len; request {view.request_ids[i]!r} has q_len "
                         f"{int(q[i])}, kv_len {int(kv[i])}")
    if num_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of the cache's {num_kv_heads} KV heads")
    for name, b in (("block_n", block_n), ("slots", slots or 16)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    group = num_heads // num_kv_heads
    if pack_gqa is None:
        pack_gqa = group & (group - 1) == 0 and group <= 64
    elif pack_gqa and group & (group - 1):
        raise ValueError(f"pack_gqa needs a power-of-two GQA group, got {group}")

    # requests of a shared prefix side by side; a member joins only if every row it asks for sees the whole prefix
    shared = prefix_grouping & (view.prefix_ids >= 0) & (kv - q >= view.prefix_lens) & (view.prefix_lens > 0)
    ids = np.sort(view.prefix_ids[shared])
    repeated = ids[1:][ids[1:] == ids[:-1]]  # ids held by two or more candidates (np.unique is slow here)
    shared &= np.isin(view.prefix_ids, repeated) if len(repeated) else False
    order = np.lexsort((np.arange(len(q)), np.where(shared, view.prefix_ids, -1)))
    perm_start = np.empty(len(q), np.int64)
    perm_start[order] = np.cumsum(q[order]) - q[order]
    cu_q = np.concatenate([[0], np.cumsum(q)])
    within = _ragged_arange(q[order])
    row_perm = np.repeat(cu_q[:-1][order], q[order]) + within
    row_limit = np.repeat((kv - q)[order], q[order]) + within
    segs = _segments(view, q, shared, order, perm_start)

    if slots is None:
        most = int(segs[:, 1].max()) * (group if pack_gqa else 1)
        slots = int(min(128, max(16, 1 << (most - 1).bit_length())))
    rows_per_item = slots // group if pack_gqa else slots
    if rows_per_item < 1:
        raise ValueError(f"slots ({slots}) must hold at least one row of {group} GQA heads")
    row_blocks = -(-segs[:, 1] // rows_per_item)
    if kv_chunk is None:
        programs_per_item = num_kv_heads if pack_gqa else num_heads
        target_items = max(1, waves * num_sms // programs_per_item)
        kv_chunk = int(-(-int((segs[:, 4] * row_blocks).sum()) // target_items)) if split else int(segs[:, 4].max())
        kv_chunk = max(block_n, -(-kv_chunk // block_n) * block_n)
    elif kv_chunk <= 0 or kv_chunk % block_n:
        raise ValueError(f"kv_chunk must be a positive multiple of block_n ({block_n}), got {kv_chunk}")
    items = _items(segs, rows_per_item, kv_chunk, block_n)
    if balancing:
        items = items[np.argsort(-items[:, 4] * (1 + items[:, 1] / rows_per_item), kind="stable")]
    items[:, 6] = np.cumsum(items[:, 1]) - items[:, 1]
    rows = np.repeat(items[:, 0], items[:, 1]) + _ragged_arange(items[:, 1])
    by_row = np.argsort(rows, kind="stable")
    merge_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(row_perm)))])
    plan = CachePlan(
        items=items.astype(np.int32), row_perm=row_perm.astype(np.int32), row_limit=row_limit.astype(np.int32),
        merge_ptr=merge_ptr.astype(np.int32), merge_idx=by_row.astype(np.int32), q_lens=q, kv_lens=kv.copy(),
        layout=view.layout,
        num_heads=num_heads, num_kv_heads=num_kv_heads, slots=slots, block_n=block_n, pack_gqa=bool(pack_gqa),
        kv_chunk=kv_chunk, page_size=view.page_size, block_table=view.block_table,
        kv_tokens_read=int(segs[:, 4].sum()), num_warps=8 if slots >= 128 else 4)
    plan.plan_ms = (time.perf_counter() - t0) * 1e3
    return plan


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """0..counts[0]-1, 0..counts[1]-1, ... concatenated."""
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts)


#: Columns of the segment table: first plan row, rows, pool address of the first position (grouped), first
#: position, positions, block table row (paged), causal limit of the first row (rows of one request: limits
#: ascend by one per row; NO_TRIM for a shared prefix, which every row sees whole).
SEG_FIELDS = ("row_first", "num_rows", "kv_addr", "pos_start", "kv_len", "table_row", "first_limit")
NO_TRIM = 1 << 40


def _segments(view: KVView, q: np.ndarray, shared: np.ndarray, order: np.ndarray,
              perm_start: np.ndarray) -> np.ndarray:
    """The KV segments of the batch (SEG_FIELDS, int64): one per shared prefix group, then per request its
    own positions (after a shared prefix), and in the grouped layout its unshared prefix apart."""
    kv, p = view.kv_lens, view.prefix_lens
    grouped = view.layout == "grouped"
    limit0 = kv - q
    idx = np.arange(len(q))
    parts = []
    ids = np.sort(view.prefix_ids[shared])
    for gid in ids[np.flatnonzero(np.diff(ids, prepend=-1))] if len(ids) else ():
        members = order[shared[order] & (view.prefix_ids[order] == gid)]
        b0 = members[0]
        parts.append(np.array([[perm_start[b0], q[members].sum(), view.prefix_addr[b0] if grouped else 0, 0, p[b0],
                                b0, NO_TRIM]]))
    if grouped:
        alone = np.flatnonzero((p > 0) & ~shared)
        if len(alone):
            parts.append(_columns(perm_start[alone], q[alone], view.prefix_addr[alone], 0, p[alone], alone,
                                  limit0[alone]))
        parts.append(_columns(perm_start, q, view.own_addr, p, kv - p, idx, limit0))
    else:
        start = np.where(shared, p, 0)
        parts.append(_columns(perm_start, q, 0, start, kv - start, idx, limit0))
    segs = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return segs[segs[:, 4] > 0]


def _columns(*cols) -> np.ndarray:
    """int64 [n, len(cols)] from equal-length columns (or scalars)."""
    n = max(len(c) for c in cols if isinstance(c, np.ndarray))
    out = np.empty((n, len(cols)), np.int64)
    for j, c in enumerate(cols):
        out[:, j] = c
    return out


def _items(segs: np.ndarray, rows_per_item: int, kv_chunk: int, block_n: int) -> np.ndarray:
    """Cut each segment into near-equal chunks of at most kv_chunk positions (multiples of block_n) and its rows
    into blocks of rows_per_item; rows that see none of a chunk are left out of its item (appends)."""
    row0, nrows, addr, pos0, length, table_row, limit0 = segs.T
    pieces = -(-length // kv_chunk)
    step = -(-(-(-length // pieces)) // block_n) * block_n
    seg = np.repeat(np.arange(len(segs)), pieces)
    c = _ragged_arange(pieces) * step[seg]
    blocks = (-(-nrows // rows_per_item))[seg]  # row blocks of each chunk
    chunk = np.repeat(np.arange(len(seg)), blocks)  # chunk of each item
    seg, c = seg[chunk], c[chunk]
    r = row0[seg] + _ragged_arange(blocks) * rows_per_item
    r_end = np.minimum(r + rows_per_item, row0[seg] + nrows[seg])
    first = np.maximum(r, row0[seg] + pos0[seg] + c - limit0[seg])  # the first row whose limit reaches the chunk
    keep = first < r_end
    seg, c, first, r_end = seg[keep], c[keep], first[keep], r_end[keep]
    return _columns(first, r_end - first, addr[seg] + c, pos0[seg] + c, np.minimum(step[seg], length[seg] - c),
                    table_row[seg], 0)
