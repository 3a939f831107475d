"""The planner for attention over a KV cache, for any serving iteration: decode rows, prompt chunks (q < kv),
fresh prompts (q = kv, their K/V already written) and shared prefixes, all in one work list.

The unit of work is an item: a chunk of one KV segment (a contiguous run of positions of a request, or of a
shared prefix) and a block of the query rows that read it. With prefix grouping on, the requests of a batch that
share a stored prefix are put side by side and the prefix is one segment read by all their query rows (all query
heads of a KV head too, in one program): the prefix KV is loaded once per batch instead of once per request.
With splitting on, and only where the items do not already fill `waves` programs per SM, segments are cut into
near-equal chunks so that the longest context is spread over many programs (no straggler); a row held by several
items gets one partial result (output and log-sum-exp) per item, and the last of its items to finish merges them
exactly, in the same launch. A row held by one item is written directly. With balancing on, items launch largest
first. The tile shape (query slots per program) and the split are chosen per batch by a cost model of the
kernel (CostModel: bytes and tensor-core work per program, the slowest program, SM count).

Rows are numbered in the plan's order; `rows[i]` (ROW_FIELDS) says which query row plan position i is, the last
position it sees (kv_len - q_len + j for the j-th query of its request, bottom-right causal; kv_len - 1 without
the causal mask; less a window's right side), where its partials are listed in `merge_idx` (part_count 1: no
partial, written directly; 0: the row sees no position, q_len > kv_len), the first position it sees (a window's
left side) and its own position (diag: kv_len - q_len + j, for ALiBi).
For CUDA graphs, PlanBuffers holds plans in fixed-capacity device buffers: loading a plan writes them (one copy),
never reallocates, and a launch covers the capacity with programs past the plan's items returning at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from packinfer.device import FALLBACK_SMS
from packinfer.kv_cache import KVView
from packinfer.validate import check_window, head_dim_padded

#: Columns of CachePlan.items (partial_base -1: the item writes its rows' outputs directly).
ITEM_FIELDS = ("row_first", "num_rows", "kv_addr", "pos_start", "kv_len", "table_row", "partial_base")
#: Columns of CachePlan.rows, by plan position.
ROW_FIELDS = ("q_row", "limit", "part_first", "part_count", "low", "diag")
#: Programs the splitting aims at per SM (several waves keep the tail of the launch short).
WAVES = 4
#: Query slots per program the planner chooses from (a slot is one (row, query head) pair).
SLOT_CHOICES = (16, 32, 64, 128)
#: Keys per step of every tile shape.
BLOCK_N = 64
#: Marks a shared prefix segment, which every row of its group sees whole.
NO_TRIM = 1 << 40


@dataclass(frozen=True)
class CostModel:
    """A program's time: max(bytes of K/V it reads / per-SM bandwidth, tensor-core work / per-SM rate at its
    tile shape) + a fixed cost; a launch takes the larger of (total / SMs) and its slowest program (which, last
    to finish, has its SM to itself: lone_speedup). Partials of split rows cost their write and read.
    Defaults: an H100/H200-class GPU (3.35 TB/s, 989 dense bf16 TFLOP/s over 132 SMs) with the efficiency Triton
    tiles of each slot count reach (fit on H100 serving batches)."""

    bytes_per_us: float = 3.35e12 / 132 / 1e6
    flops_per_us: float = 989e12 / 132 / 1e6
    efficiency: tuple[tuple[int, float], ...] = ((16, 0.12), (32, 0.22), (64, 0.38), (128, 0.5))
    fixed_us: float = 2.0
    lone_speedup: float = 2.5  # a program alone on its SM reads this much faster than its fair share

    def rate(self, slots: int) -> float:
        eff = dict(self.efficiency)
        return self.flops_per_us * eff.get(slots, min(eff.values()))


@dataclass
class CachePlan:
    """A batch's work list: items int32 [W, 7] (ITEM_FIELDS) in launch order, rows int32 [R, 4] (ROW_FIELDS) by
    plan position, merge_idx int32 [M]: the partial rows of each split row (rows[i].part_first onwards).
    slots = query (row, head) pairs per program, block_n keys per step; estimate_us: the cost model's time."""

    items: np.ndarray
    rows: np.ndarray
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
    split: bool
    page_size: int
    block_table: np.ndarray | None
    kv_tokens_read: int
    num_partials: int
    estimate_us: float = 0.0
    causal: bool = True
    window: tuple[int, int] = (-1, -1)
    num_warps: int = 4
    num_stages: int = 3
    plan_ms: float = 0.0
    _device_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def row_perm(self) -> np.ndarray:
        return self.rows[:, 0]

    @property
    def empty_rows(self) -> np.ndarray:
        """Query rows that see no position (q_len > kv_len under the causal mask): no item writes them."""
        return self.rows[self.rows[:, 3] == 0, 0]

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rows_per_item(self) -> int:
        return self.slots // self.group if self.pack_gqa else self.slots

    @property
    def programs_per_item(self) -> int:
        return self.num_kv_heads if self.pack_gqa else self.num_heads

    @property
    def tile(self) -> tuple[int, int, bool, int, int]:
        """What a compiled kernel is specialised on: (slots, block_n, pack_gqa, num_warps, num_stages)."""
        return self.slots, self.block_n, self.pack_gqa, self.num_warps, self.num_stages


def plan_cache_attention(view: KVView, q_lens, num_heads: int, *, prefix_grouping: bool = True,
                         split: bool = True, balancing: bool = True, kv_chunk: int | None = None,
                         num_sms: int = FALLBACK_SMS, waves: int = WAVES, block_n: int = BLOCK_N,
                         slots: int | None = None, pack_gqa: bool | None = None, head_dim: int | None = None,
                         max_items: int | None = None, max_partials: int | None = None,
                         cost: CostModel = CostModel(), causal: bool = True,
                         window: tuple[int, int] = (-1, -1)) -> CachePlan:
    """Plan attention of q_lens[i] new query rows of each request of `view` (the rows are the last q_lens[i]
    positions of the request, already in the cache; with q_len > kv_len the first rows see nothing) over
    everything the request sees: bottom-right causal, or every position (causal=False), cut to a sliding
    window (left, right) as FlashAttention defines it (-1: unbounded side; a window turns prefix grouping off).

    kv_chunk: most positions an item reads (None: chosen so the batch makes about `waves` programs per SM of
    the `num_sms` the GPU has: give packinfer.num_sms(device)); split=False: never cut a segment.
    slots: query (row, head) pairs per program (None: the cost model picks from SLOT_CHOICES).
    max_items / max_partials: capacity of the buffers the plan must fit (CUDA graphs): splitting is reduced to
    fit, and a batch that cannot fit even unsplit is a ValueError naming the limit.
    """
    t0 = time.perf_counter()
    q = np.asarray(q_lens, dtype=np.int64)
    kv, num_kv_heads = view.kv_lens, view.k.shape[1]
    head_dim = head_dim or view.k.shape[2]
    if q.shape != kv.shape:
        raise ValueError(f"q_lens has {q.size} entries but the view has {kv.size} requests")
    if (q < 1).any():
        i = int(np.argmax(q < 1))
        raise ValueError(f"q_lens must be >= 1; request {view.request_ids[i]!r} has q_len {int(q[i])}")
    left, right = check_window(window)
    right = 0 if causal else right
    if left >= 0:
        prefix_grouping = False
    if num_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of the cache's {num_kv_heads} KV heads")
    for name, b in (("block_n", block_n), ("slots", slots or 16)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    if kv_chunk is not None and (kv_chunk <= 0 or kv_chunk % block_n):
        raise ValueError(f"kv_chunk must be a positive multiple of block_n ({block_n}), got {kv_chunk}")
    group = num_heads // num_kv_heads
    if pack_gqa is None:
        pack_gqa = group & (group - 1) == 0 and group <= 64
    elif pack_gqa and group & (group - 1):
        raise ValueError(f"pack_gqa needs a power-of-two GQA group, got {group}")

    order, shared = _prefix_order(view, q, prefix_grouping)
    cu_q = np.concatenate([[0], np.cumsum(q)])
    within = _ragged_arange(q[order])
    row_perm = np.repeat(cu_q[:-1][order], q[order]) + within
    row_diag = np.repeat((kv - q)[order], q[order]) + within
    if right != 0:  # the causal limit (right 0) is the diagonal itself, which never passes kv_len - 1
        row_limit = np.minimum(row_diag + right if right > 0 else NO_TRIM, np.repeat(kv[order] - 1, q[order]))
    else:
        row_limit = row_diag
    row_low = np.maximum(row_diag - left, 0) if left >= 0 else np.zeros_like(row_diag)
    perm_start = np.empty(len(q), np.int64)
    perm_start[order] = np.cumsum(q[order]) - q[order]
    # per request: the first row's limit (limits ascend one per row until kv_len - 1) and window start
    first_limit = kv - q + right if right >= 0 else np.full_like(kv, NO_TRIM)
    first_low = kv - q - left if left >= 0 else np.full_like(kv, -NO_TRIM)
    segs = _segments(view, q, shared, order, perm_start, first_limit, first_low)
    ppi = num_kv_heads if pack_gqa else num_heads
    whole = int(-(-int(segs[:, 4].max()) // block_n) * block_n)

    if slots:
        choices = [slots]
    else:  # no wider than the largest segment's rows need
        widest = int(segs[:, 1].max()) * (group if pack_gqa else 1)
        choices = [s for s in SLOT_CHOICES if (not pack_gqa or s >= group) and (s < 2 * widest or s == 16)]
    best = None
    for s in choices:
        rows_per_item = s // group if pack_gqa else s
        if rows_per_item < 1:
            raise ValueError(f"slots ({s}) must hold at least one row of {group} GQA heads")
        chunks, tried_cut = [kv_chunk] if kv_chunk is not None else [whole], False
        while chunks:
            chunk = chunks.pop()
            items, keys = _items(segs, rows_per_item, chunk, block_n)
            while max_items is not None and len(items) > max_items and chunk < whole:
                chunk = min(2 * chunk, whole)  # coarser chunks until the plan fits the capacity
                items, keys = _items(segs, rows_per_item, chunk, block_n)
            # rows held by several items: only where a segment was cut or a row reads two segments
            partial_rows = _split_rows(items, len(row_perm))[1] if chunk < whole or len(segs) > len(q) else 0
            if (max_items is not None and len(items) > max_items) or (
                    max_partials is not None and partial_rows > max_partials):
                continue
            total, slowest = _estimate(keys, partial_rows, s, ppi, head_dim, view.k.element_size(), num_sms,
                                       num_heads, cost)
            t = max(total, slowest)
            if best is None or t < best[0] - 1e-9:
                best = (t, s, chunk, items, keys)
            if not tried_cut and kv_chunk is None and split and slowest > total:  # a straggler: try cutting it
                tried_cut = True
                cut = _split_chunk(segs, rows_per_item, waves * num_sms // ppi, block_n)
                if cut < whole:
                    chunks.append(cut)
    if best is None:
        raise ValueError(f"the batch needs more work items than the plan buffers hold (max_items={max_items}, "
                         f"max_partials={max_partials}) even without splitting: raise the capacity")
    estimate, slots, kv_chunk, items, keys = best
    if balancing:
        items = items[np.argsort(-_program_us(keys, slots, head_dim, view.k.element_size(), cost), kind="stable")]
    rows, merge_idx, num_partials = _merge_lists(items, row_perm, row_limit, row_low, row_diag)
    plan = CachePlan(items=items.astype(np.int32), rows=rows.astype(np.int32), merge_idx=merge_idx.astype(np.int32),
                     q_lens=q, kv_lens=kv.copy(), layout=view.layout, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, slots=slots, block_n=block_n, pack_gqa=bool(pack_gqa),
                     kv_chunk=kv_chunk, split=bool(split), page_size=view.page_size, block_table=view.block_table,
                     kv_tokens_read=int(segs[:, 4].sum()), num_partials=num_partials, estimate_us=float(estimate),
                     causal=causal, window=(left, -1 if causal else right),
                     num_warps=8 if slots >= 128 else 4)
    plan.plan_ms = (time.perf_counter() - t0) * 1e3
    return plan


def _prefix_order(view: KVView, q: np.ndarray, prefix_grouping: bool) -> tuple[np.ndarray, np.ndarray]:
    """Request order of the plan (members of a prefix group side by side) and which requests read their prefix
    as one shared segment: a member joins only if every row it asks for sees the whole prefix."""
    kv = view.kv_lens
    shared = prefix_grouping & (view.prefix_ids >= 0) & (kv - q >= view.prefix_lens) & (view.prefix_lens > 0)
    ids = np.sort(view.prefix_ids[shared])
    repeated = ids[1:][ids[1:] == ids[:-1]]  # ids held by two or more candidates (np.unique is slow here)
    shared &= np.isin(view.prefix_ids, repeated) if len(repeated) else False
    return np.lexsort((np.arange(len(q)), np.where(shared, view.prefix_ids, -1))), shared


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """0..counts[0]-1, 0..counts[1]-1, ... concatenated."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    if total == len(counts):  # every count 1 (decode rows, single-row items): zeros
        return np.zeros(total, np.int64)
    return np.arange(total) - np.repeat(ends - counts, counts)


#: Columns of the segment table: first plan row, rows, pool address of the first position (grouped), first
#: position, positions, block table row (paged), last position the first row sees (rows of one request: limits
#: ascend by one per row; NO_TRIM for a shared prefix, which every row sees whole, or without a causal mask),
#: first position the first row sees under a window (-NO_TRIM: none; ascends by one per row too).
SEG_FIELDS = ("row_first", "num_rows", "kv_addr", "pos_start", "kv_len", "table_row", "first_limit", "first_low")


def _segments(view: KVView, q: np.ndarray, shared: np.ndarray, order: np.ndarray, perm_start: np.ndarray,
              limit0: np.ndarray, low0: np.ndarray) -> np.ndarray:
    """The KV segments of the batch (SEG_FIELDS, int64): one per shared prefix group, then per request its
    own positions (after a shared prefix), and in the grouped layout its unshared prefix apart; positions
    before a window's start (low0, the first row's) are left out."""
    kv, p = view.kv_lens, view.prefix_lens
    grouped = view.layout == "grouped"
    if grouped:  # token addresses of the prefixes and of the requests' own positions
        if view.prefix_addr is None or view.own_addr is None:
            raise ValueError("a grouped KVView needs prefix_addr and own_addr")
        prefix_addr, own_addr = view.prefix_addr, view.own_addr
    idx = np.arange(len(q))
    parts = []
    ids = np.sort(view.prefix_ids[shared])
    for gid in ids[np.flatnonzero(np.diff(ids, prepend=-1))] if len(ids) else ():
        members = order[shared[order] & (view.prefix_ids[order] == gid)]
        b0 = members[0]
        parts.append(np.array([[perm_start[b0], q[members].sum(), prefix_addr[b0] if grouped else 0, 0, p[b0],
                                b0, NO_TRIM, -NO_TRIM]]))
    if grouped:
        alone = np.flatnonzero((p > 0) & ~shared)
        if len(alone):
            parts.append(_columns(perm_start[alone], q[alone], prefix_addr[alone], 0, p[alone], alone,
                                  limit0[alone], low0[alone]))
        parts.append(_columns(perm_start, q, own_addr, p, kv - p, idx, limit0, low0))
    else:
        start = np.where(shared, p, 0)
        parts.append(_columns(perm_start, q, 0, start, kv - start, idx, limit0, low0))
    segs = np.concatenate(parts) if len(parts) > 1 else parts[0]
    cut = np.clip(segs[:, 7] - segs[:, 3], 0, segs[:, 4])  # positions before the window of every row
    segs[:, 2] += cut
    segs[:, 3] += cut
    segs[:, 4] -= cut
    return segs[segs[:, 4] > 0]


def _columns(*cols) -> np.ndarray:
    """int64 [n, len(cols)] from equal-length columns (or scalars)."""
    n = max(len(c) for c in cols if isinstance(c, np.ndarray))
    out = np.empty((n, len(cols)), np.int64)
    for j, c in enumerate(cols):
        out[:, j] = c
    return out


def _split_chunk(segs: np.ndarray, rows_per_item: int, target_items: int, block_n: int) -> int:
    """The KV chunk that makes about target_items items of the batch's work (only longer segments are cut)."""
    row_blocks = -(-segs[:, 1] // rows_per_item)
    chunk = int(-(-int((segs[:, 4] * row_blocks).sum()) // max(target_items, 1)))
    return max(block_n, -(-chunk // block_n) * block_n)


def _items(segs: np.ndarray, rows_per_item: int, kv_chunk: int, block_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut each segment into near-equal chunks of at most kv_chunk positions (multiples of block_n) and its rows
    into blocks of rows_per_item; rows that see none of a chunk are left out of its item (appends). Returns the
    items (ITEM_FIELDS, partial_base 0) and the keys each reads (up to its last row's causal limit)."""
    row0, nrows, addr, pos0, length, table_row, limit0, low0 = segs.T
    pieces = -(-length // kv_chunk)
    per_piece = -(-length // pieces)  # ceil(length / pieces)
    step = -(-per_piece // block_n) * block_n  # ... rounded up to a multiple of block_n
    seg = np.repeat(np.arange(len(segs)), pieces)
    c = _ragged_arange(pieces) * step[seg]
    blocks = (-(-nrows // rows_per_item))[seg]  # row blocks of each chunk
    chunk = np.repeat(np.arange(len(seg)), blocks)  # chunk of each item
    seg, c = seg[chunk], c[chunk]
    r = row0[seg] + _ragged_arange(blocks) * rows_per_item
    r_end = np.minimum(r + rows_per_item, row0[seg] + nrows[seg])
    first = np.maximum(r, row0[seg] + pos0[seg] + c - limit0[seg])  # the first row whose limit reaches the chunk
    n_keys = np.minimum(step[seg], length[seg] - c)
    # rows past the last one whose window starts inside the chunk do not see it
    r_end = np.minimum(r_end, row0[seg] + pos0[seg] + c + n_keys - low0[seg])
    keep = first < r_end
    seg, c, first, r_end, n_keys = seg[keep], c[keep], first[keep], r_end[keep], n_keys[keep]
    last_limit = limit0[seg] + (r_end - 1 - row0[seg])  # rows of a request: limits ascend one per row
    keys = np.where(limit0[seg] >= NO_TRIM, n_keys, np.clip(last_limit - (pos0[seg] + c) + 1, 0, n_keys))
    keys = np.minimum(keys, n_keys - np.clip(low0[seg] + (first - row0[seg]) - (pos0[seg] + c), 0, n_keys))
    return _columns(first, r_end - first, addr[seg] + c, pos0[seg] + c, n_keys, table_row[seg], 0), keys


def _split_rows(items: np.ndarray, num_rows: int) -> tuple[np.ndarray, int]:
    """Items holding a row held by several items (which write partials), and the partial rows they need."""
    rows = np.repeat(items[:, 0], items[:, 1]) + _ragged_arange(items[:, 1])
    count = np.bincount(rows, minlength=num_rows)
    item_of = np.repeat(np.arange(len(items)), items[:, 1])
    writes = np.bincount(item_of, weights=count[rows] > 1, minlength=len(items)) > 0
    return writes, int(items[writes, 1].sum())


def _merge_lists(items: np.ndarray, row_perm: np.ndarray, row_limit: np.ndarray, row_low: np.ndarray,
                 row_diag: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Fill the items' partial_base (compact, -1 when direct) and build ROW_FIELDS rows and merge_idx."""
    writes, num_partials = _split_rows(items, len(row_perm))
    items[:, 6] = -1
    items[writes, 6] = np.cumsum(items[writes, 1]) - items[writes, 1]
    rows = np.repeat(items[:, 0], items[:, 1]) + _ragged_arange(items[:, 1])
    count = np.bincount(rows, minlength=len(row_perm))
    partial = np.repeat(items[:, 6], items[:, 1]) + _ragged_arange(items[:, 1])
    split = count[rows] > 1
    by_row = np.argsort(rows[split], kind="stable")
    merge_idx = partial[split][by_row]
    per_row = np.bincount(rows[split], minlength=len(row_perm))
    first = np.cumsum(per_row) - per_row
    table = np.stack([row_perm, row_limit, first, count, row_low, row_diag], axis=1)
    return table, merge_idx, num_partials


def _program_us(keys: np.ndarray, slots: int, head_dim: int, elem_bytes: int, cost: CostModel,
                lone: bool = False) -> np.ndarray:
    """The cost model's time of one program reading `keys` of one KV head with `slots` query slots (lone: with
    the SM to itself, as the last programs of a launch run)."""
    bandwidth = cost.bytes_per_us * (cost.lone_speedup if lone else 1.0)
    return np.maximum(keys * 2 * head_dim * elem_bytes / bandwidth,
                      4.0 * slots * keys * head_dim / cost.rate(slots)) + cost.fixed_us


def _estimate(keys: np.ndarray, partial_rows: int, slots: int, programs_per_item: int, head_dim: int,
              elem_bytes: int, num_sms: int, num_heads: int, cost: CostModel) -> tuple[float, float]:
    """The cost model's launch time (us) of items reading `keys` each, as (all programs over the SMs, plus
    the partials' traffic; the slowest program alone); the launch takes the larger (see CostModel)."""
    t = _program_us(keys, slots, head_dim, elem_bytes, cost)
    merge = partial_rows * num_heads * head_dim * 4 * 2 / (cost.bytes_per_us * num_sms)
    slowest = float(_program_us(keys.max(), slots, head_dim, elem_bytes, cost, lone=True)) if len(keys) else 0.0
    return float(t.sum() * programs_per_item / num_sms + merge), slowest


class PlanBuffers:
    """Fixed-capacity device buffers for the plans of one tile shape and layout, as CUDA graphs need them:
    `load(plan)` writes a plan in (host-to-device copies from pinned memory, no allocation), `clear()` leaves
    no work, and launches read only these tensors, so a graph captured once replays any plan that fits.
    Capacities: items, rows, partial rows (split rows' per-item results), block-table rows x pages (paged).
    `share` takes the partial-result and counter tensors of other buffers (one launch runs at a time)."""

    o_part: torch.Tensor  # declared: __init__ may take them from `share`, which mypy cannot type on its own
    lse_part: torch.Tensor
    counters: torch.Tensor

    def __init__(self, device: torch.device | str, *, num_heads: int, num_kv_heads: int, head_dim: int,
                 tile: tuple[int, int, bool, int, int], max_items: int, max_rows: int, max_partials: int,
                 layout: str = "grouped", page_size: int = 0, max_table_rows: int = 1, max_table_pages: int = 1,
                 share: PlanBuffers | None = None) -> None:
        self.device = torch.device(device)
        self.num_heads, self.num_kv_heads, self.head_dim, self.tile = num_heads, num_kv_heads, head_dim, tile
        self.layout, self.page_size = layout, page_size
        self.block_n = tile[1]
        self.launches: dict = {}
        self.max_items, self.max_rows, self.max_partials = max_items, max_rows, max_partials
        self.max_table_rows, self.max_table_pages = max_table_rows, max_table_pages
        sizes = (1, max_items * len(ITEM_FIELDS), max_rows * len(ROW_FIELDS), max(max_partials, 1),
                 max_table_rows * max_table_pages)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        pinned = self.device.type == "cuda"
        self._host = torch.zeros(int(self._offsets[-1]), dtype=torch.int32, pin_memory=pinned)
        self._dev = torch.zeros_like(self._host, device=self.device)
        self.header, items, rows, self.merge_idx, table = (self._dev[a:b] for a, b in zip(self._offsets[:-1],
                                                                                             self._offsets[1:]))
        self.items = items.view(max_items, len(ITEM_FIELDS))
        self.rows = rows.view(max_rows, len(ROW_FIELDS))
        self.block_table = table.view(max_table_rows, max_table_pages)
        if share is not None and share.max_partials >= max_partials and share.max_rows >= max_rows:
            self.o_part, self.lse_part, self.counters = share.o_part, share.lse_part, share.counters
        else:
            self.o_part = torch.empty(max(max_partials, 1), num_heads, head_dim_padded(head_dim),
                                      dtype=torch.float32, device=self.device)
            self.lse_part = torch.empty(max(max_partials, 1), num_heads, dtype=torch.float32, device=self.device)
            self.counters = torch.zeros(max_rows * num_heads, dtype=torch.int32, device=self.device)
        self.plan: CachePlan | None = None
        self._copied = torch.cuda.Event() if pinned else None  # the last load's copy (the host side is reused)

    def clear(self) -> None:
        """No work: every program of a launch returns at once (for capturing a graph before any plan)."""
        self.header.zero_()
        self.plan = None

    def load(self, plan: CachePlan) -> None:
        """Write `plan` into the buffers (ValueError naming the capacity it exceeds or the shape it differs in)."""
        if plan.tile != self.tile or (plan.num_heads, plan.num_kv_heads, plan.layout) != (
                self.num_heads, self.num_kv_heads, self.layout):
            raise ValueError(f"plan tile {plan.tile} / heads {plan.num_heads}/{plan.num_kv_heads} / {plan.layout} "
                             f"differ from the buffers' {self.tile} / {self.num_heads}/{self.num_kv_heads} / "
                             f"{self.layout}")
        if plan.window[0] >= 0:
            raise ValueError("plan has a sliding window (window_left >= 0): PlanBuffers launches do not take one")
        table = plan.block_table if plan.layout == "paged" else None
        for what, n, cap in (("items", plan.num_items, self.max_items), ("rows", plan.num_rows, self.max_rows),
                             ("partial rows", plan.num_partials, self.max_partials),
                             ("merge entries", len(plan.merge_idx), len(self.merge_idx)),
                             ("block-table rows", 0 if table is None else table.shape[0], self.max_table_rows),
                             ("block-table pages", 0 if table is None else table.shape[1], self.max_table_pages)):
            if n > cap:
                raise ValueError(f"plan has {n} {what}, more than the buffers' capacity of {cap}: raise it "
                                 "(max_num_seqs / max_num_batched_tokens of the graphs)")
        if self._copied is not None:
            self._copied.synchronize()
        h, o = self._host.numpy(), self._offsets
        h[0] = plan.num_items
        h[o[1]:o[1] + plan.items.size] = plan.items.reshape(-1)
        h[o[2]:o[2] + plan.rows.size] = plan.rows.reshape(-1)
        h[o[3]:o[3] + len(plan.merge_idx)] = plan.merge_idx
        used = [(0, o[1] + plan.items.size), (o[2], o[2] + plan.rows.size), (o[3], o[3] + len(plan.merge_idx))]
        if table is not None:
            t = h[o[4]:o[5]].reshape(self.max_table_rows, self.max_table_pages)
            t[:table.shape[0], :table.shape[1]] = table
            used.append((o[4], o[4] + table.shape[0] * self.max_table_pages))
        for a, b in used:  # only what the plan fills: a few KB, not the whole capacity
            if b > a:
                self._dev[a:b].copy_(self._host[a:b], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.plan = plan
