"""The planner for attention over a KV cache, for any serving iteration: decode rows, prompt chunks (q < kv),
fresh prompts (q = kv, their K/V already written) and shared prefixes, all in one work list.

The unit of work is an item: a chunk of one KV segment (a contiguous run of positions of a request, or of a
shared prefix) and a block of the query rows that read it. With prefix grouping on, the requests of a batch that
share a stored prefix are put side by side and the prefix is one segment read by all their query rows (all query
heads of a KV head too, in one program): the prefix KV is loaded once per batch instead of once per request.
With splitting on, segments may be cut into near-equal chunks of at most kv_chunk positions (a ladder of 64 x 2^k,
down to about `waves` programs per SM, and unsplit: the cost model picks) so that the longest context is spread over
several programs (no straggler); a row held by several items gets one partial result (output and log-sum-exp) per
item, and the last of its items to finish merges them exactly, in the same launch. A row held by one item is written
directly. With balancing on, items launch largest first (but for a single wave of near-equal items: EVEN_SPREAD).
The tile shape (query slots per program) and the split are chosen per batch by a cost model of the kernel
(CostModel: each program's bytes and tensor-core work, scheduled over the programs the SMs run at once), but for
launches that fit one wave of the narrowest tile (ONE_WAVE_MARGIN).

Rows are numbered in the plan's order; `rows[i]` (ROW_FIELDS) says which query row plan position i is, the last
position it sees (kv_len - q_len + j for the j-th query of its request, bottom-right causal; kv_len - 1 without
the causal mask; less a window's right side), where its partials are listed in `merge_idx` (part_count 1: no
partial, written directly; 0: the row sees no position, q_len > kv_len), the first position it sees (a window's
left side) and its own position (diag: kv_len - q_len + j, for ALiBi).
For CUDA graphs, PlanBuffers holds plans in fixed-capacity device buffers: loading a plan writes them (one copy),
never reallocates, and a launch covers the capacity with programs past the plan's items returning at once.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from packinfer.device import FALLBACK_SMS, shared_memory, shared_memory_per_sm
from packinfer.kv_cache import KVView
from packinfer.validate import check_window, head_dim_padded

#: Columns of CachePlan.items (partial_base -1: the item writes its rows' outputs directly; new_j: the first of its
#: keys j that is a position of this iteration's rows (their request's kv_len - q_len - pos_start; >= kv_len:
#: none), where a launch given the new rows' K/V reads them from there instead of the cache).
ITEM_FIELDS = ("row_first", "num_rows", "kv_addr", "pos_start", "kv_len", "table_row", "partial_base", "new_j")
#: Columns of CachePlan.rows, by plan position.
ROW_FIELDS = ("q_row", "limit", "part_first", "part_count", "low", "diag")
#: The finest split the planner weighs: about this many programs per SM (twice what the decode tiles fit on a
#: Hopper SM at once). The estimate sees the waves a split queues (CostModel); this only bounds the host work.
WAVES = 4
#: Query slots per program the planner chooses from (a slot is one (row, query head) pair).
SLOT_CHOICES = (16, 32, 64, 128)
#: Keys per step of every tile shape.
BLOCK_N = 64
#: Shared memory a program needs beyond its query tile and K/V stages (Triton's scratch; from the H200's
#: OutOfResources reports in results/fa-features/h200/tune.csv: ~1 KiB).
SHARED_MEMORY_SLACK = 2048
#: Finer KV chunks of a tile shape are not weighed once one is estimated this much slower than its best so
#: far (host time).
STOP_ABOVE_BEST = 1.25
#: The estimate schedules the first wave of a launch's programs and the last EXACT_WAVES - 1 one by one
#: (_launch_us); a launch of more than MANY_WAVES waves is taken as balanced (_balanced_us: host time).
EXACT_WAVES = 3
MANY_WAVES = 32
#: Marks a shared prefix segment, which every row of its group sees whole.
NO_TRIM = 1 << 40
#: Balancing keeps the plan's order where every program runs at once (one wave) and the items' keys are this even
#: (about the 90th over the 10th percentile): largest first moves no program's start there, only which programs share
#: an SM, and the plan's order keeps each request's chunks side by side. On an H100's serving sweeps
#: (results/serving-h100-v3, -v4, -v5: no-balancing against full) the six such launches, Mooncake conv decodes of
#: long requests cut into near-equal chunks, ran 0.962-0.999x as long in the plan's order in each sweep; uneven
#: single waves (ShareGPT decodes) up to 1.035x, so they keep largest first.
EVEN_SPREAD = 1.2
#: A batch whose plan with the narrowest tile runs all its programs at once takes that tile when its estimate is
#: within this factor of the best: such launches are short and latency-bound, which the estimate (bandwidth shared
#: over the SMs) does not see. ShareGPT's 74-token prompts: 16 slots ran 0.930-0.961x the 32 the estimate picked
#: (results/serving-tune/h100-v2 and h200, fastest of their grids) and 0.887-0.958x in the H100 serving sweeps v3-v5.
ONE_WAVE_MARGIN = 1.25


@dataclass(frozen=True)
class CostModel:
    """A program's work: the larger of (bytes of K/V it reads / per-SM bandwidth) and (tensor-core work / per-SM
    rate at its tile shape), plus unhidden times the smaller (a wider tile's extra matmuls on a decode row are not
    free), plus program_us of SM time. A launch runs as many programs per SM at once as shared memory holds
    (resident_programs); the others queue and start, largest first, as running ones finish. Running programs share
    the GPU: each progresses at its fair share of the SMs' bandwidth (all SMs over the programs running), at most
    lone_speedup times one SM's share (a program that has its SM to itself cannot pull the whole GPU's bandwidth).
    The launch takes that schedule's length (_launch_us), plus fixed_us, plus the partials' write and read.
    The schedule is what matters: a KV split that queues a few programs behind a full first wave leaves most SMs
    idle for a program's length (a Mooncake decode of 4 long requests: 136.4 us at 288 programs, 114.0 at 144 on
    an H100; results/serving-tune/h100-mooncake-2).
    Defaults: an H200 (4.8 TB/s and 989 dense bf16 TFLOP/s over 132 SMs), the rest fit on the serving tuning
    sweeps of an H100 and an H200 (results/serving-tune/h100-v2 and h200: benchmarks/serving_tune.py, then
    benchmarks/fit_cost_model.py)."""

    bytes_per_us: float = 4.8e12 / 132 / 1e6
    flops_per_us: float = 989e12 / 132 / 1e6
    efficiency: tuple[tuple[int, float], ...] = ((16, 0.18), (32, 0.33), (64, 0.57), (128, 0.75))
    fixed_us: float = 2.0
    lone_speedup: float = 1.2  # a program's speed, at most, over its fair share of one SM
    program_us: float = 2.5
    unhidden: float = 0.25

    def rate(self, slots: int) -> float:
        eff = dict(self.efficiency)
        return self.flops_per_us * eff.get(slots, min(eff.values()))


@dataclass
class CachePlan:
    """A batch's work list: items int32 [W, 8] (ITEM_FIELDS) in launch order, rows int32 [R, 6] (ROW_FIELDS) by
    plan position, merge_idx int32 [M]: the partial rows of each split row (rows[i].part_first onwards).
    slots = query (row, head) pairs per program, block_n keys per step; estimate_us: the cost model's time.
    writes_new: every row's own position lies in its request's own segment (no row is a position of a prefix),
    so one launch may also store the rows' new K/V (cache_attention's k_new / v_new): each key is written
    where only its own request reads it."""

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
    writes_new: bool = False
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

    kv_chunk: most positions an item reads (None: the cost model picks it from 64 x 2^k down to the chunk that
    makes about `waves` programs per SM of the `num_sms` the GPU has - give packinfer.num_sms(device) - and
    unsplit); split=False: never cut a segment.
    slots: query (row, head) pairs per program (None: the cost model picks from SLOT_CHOICES).
    max_items / max_partials: capacity of the buffers the plan must fit (CUDA graphs): splitting is reduced to
    fit, and a batch that cannot fit even unsplit is a ValueError naming the limit.

    A serving loop plans every iteration, so the host cost matters (benchmarks/plan_cost.py measures it): the
    candidates (tile shape x KV chunk) are weighed from per-piece counts in closed form (_Candidates), and only
    the chosen one's items are built.
    """
    t0 = time.perf_counter()
    q = np.asarray(q_lens, dtype=np.int64)
    kv, num_kv_heads = view.kv_lens, view.k.shape[1]
    head_dim = head_dim or view.k.shape[2]
    if q.shape != kv.shape:
        raise ValueError(f"q_lens has {q.size} entries but the view has {kv.size} requests")
    if len(q) and q.min() < 1:
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

    order, q_plan, start_plan, diag0, segs = _batch_segments(view, q, prefix_grouping, left, right)
    table = segs.table
    ppi = num_kv_heads if pack_gqa else num_heads
    longest = int(table[:, 4].max())
    whole = -(-longest // block_n) * block_n
    elem_bytes = view.k.element_size()
    memory = shared_memory(view.k.device)
    sm_memory = shared_memory_per_sm(view.k.device)

    choices = [slots] if slots else slot_choices(int(table[:, 1].max()), group, bool(pack_gqa), head_dim,
                                                  elem_bytes, memory, block_n)
    rows_per_item = {s: s // group if pack_gqa else s for s in choices}
    num_rows = int(start_plan[-1] + q_plan[-1]) if len(q) else 0
    candidates = _Candidates(segs, num_rows, block_n, [r for r in rows_per_item.values() if r >= 1],
                             windowed=left >= 0, longest=longest)
    best = narrow = None
    for s in choices:
        rpi = rows_per_item[s]
        if rpi < 1:
            raise ValueError(f"slots ({s}) must hold at least one row of {group} GQA heads")
        if kv_chunk is not None:
            chunks = [kv_chunk]
        elif split:
            chunks = _chunk_ladder(table, rpi, waves * num_sms // ppi, block_n, whole)
        else:
            chunks = [whole]
        places = resident_programs(s, block_n, head_dim, elem_bytes, memory, sm_memory) * num_sms
        per_key = _key_us(s, head_dim, elem_bytes, cost)
        lowest = None  # this tile's best estimate so far
        for chunk in chunks:  # coarse to fine: the estimate falls, then rises; stop once well past its lowest
            # rows held by several items: only where a segment was cut or a row reads two segments
            work = candidates.work(chunk, rpi, partials=chunk < whole or len(table) > len(q))
            while max_items is not None and work.items > max_items and chunk < whole:
                chunk = min(2 * chunk, whole)  # coarser chunks until the plan fits the capacity
                work = candidates.work(chunk, rpi, partials=chunk < whole or len(table) > len(q))
            if (max_items is not None and work.items > max_items) or (
                    max_partials is not None and work.partial_rows > max_partials):
                continue
            # a bound from counts alone (_balanced_us): the estimate of a launch of many waves, and no schedule
            # is weighed that cannot beat the best so far (host time)
            t = _balanced_us(work, per_key, ppi, head_dim, num_sms, num_heads, cost)
            if work.items * ppi <= MANY_WAVES * places and (best is None or t < best[0]):
                t = _estimate(candidates.keys(chunk, rpi), work.partial_rows, per_key, ppi, head_dim, num_sms, places,
                              num_heads, cost)
            if best is None or t < best[0] - 1e-9:
                best = (t, s, chunk)
                if s == choices[0]:  # the narrowest tile's best so far, if all its programs run in one wave
                    narrow = best if work.items * ppi <= places else None
            lowest = t if lowest is None else min(lowest, t)
            if t > STOP_ABOVE_BEST * lowest:
                break
    if best is None:
        raise ValueError(f"the batch needs more work items than the plan buffers hold (max_items={max_items}, "
                         f"max_partials={max_partials}) even without splitting: raise the capacity")
    if narrow is not None and narrow[0] <= ONE_WAVE_MARGIN * best[0]:
        best = narrow
    estimate, slots, kv_chunk = best
    pieces = candidates.pieces(kv_chunk)
    items, keys = _build_items(pieces, rows_per_item[slots], windowed=left >= 0)
    places = resident_programs(slots, block_n, head_dim, elem_bytes, memory, sm_memory) * num_sms
    if balancing and not _even_wave(keys, ppi, places):
        items = np.take(items, _launch_order(keys, slots, head_dim, elem_bytes, cost), axis=0)
    rows = _row_table(diag0, q, kv, order, q_plan, start_plan, num_rows, left, right)
    # each segment in one piece and each request one segment: no row is in two items
    warps, stages = _fitting_launch(slots, block_n, head_dim, elem_bytes, memory)
    merge_idx, num_partials = _merge_lists(items, rows, disjoint=pieces.per_segment is None and segs.own_only)
    plan = CachePlan(items=items, rows=rows, merge_idx=merge_idx, q_lens=q, kv_lens=kv.copy(), layout=view.layout,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, slots=slots, block_n=block_n,
                     pack_gqa=bool(pack_gqa), kv_chunk=kv_chunk, split=bool(split), page_size=view.page_size,
                     block_table=view.block_table, kv_tokens_read=int(table[:, 4].sum()), num_partials=num_partials,
                     estimate_us=float(estimate), causal=causal, window=(left, -1 if causal else right),
                     num_warps=warps, num_stages=stages, writes_new=rows_in_own_positions(view, q))
    plan.plan_ms = (time.perf_counter() - t0) * 1e3
    return plan


def rows_in_own_positions(view: KVView, q_lens) -> bool:
    """Whether every request's new rows lie past its prefix (kv_len - q_len >= prefix_len): their positions are
    its own, read by no other request, so a launch may store their K/V while others read the cache
    (CachePlan.writes_new)."""
    own = view.kv_lens - np.asarray(q_lens, np.int64) >= np.where(view.prefix_ids >= 0, view.prefix_lens, 0)
    return bool(own.all())


def _batch_segments(view: KVView, q: np.ndarray, prefix_grouping: bool, left: int,
                    right: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, _Segments]:
    """The plan's request order (None: the batch's), q_lens in it and each request's first plan row, each
    request's kv_len - q_len (its first row's diagonal) and the batch's segments."""
    order, shared = _prefix_order(view, q, prefix_grouping)
    q_plan = q if order is None else q[order]
    start_plan = np.cumsum(q_plan) - q_plan
    if order is None:
        perm_start = start_plan
    else:
        perm_start = np.empty(len(q), np.int64)
        perm_start[order] = start_plan
    # per request: the first row's limit (limits ascend one per row until kv_len - 1) and window start
    diag0 = view.kv_lens - q
    first_limit = (diag0 + right if right else diag0) if right >= 0 else np.full_like(diag0, NO_TRIM)
    first_low = diag0 - left if left >= 0 else -NO_TRIM
    segs = _segments(view, q, shared, order, perm_start, first_limit, first_low, windowed=left >= 0)
    segs.table[:, SEG_FIRST_NEW] = diag0[segs.owner]
    return order, q_plan, start_plan, diag0, segs


def slot_choices(widest_rows: int, group: int, pack_gqa: bool, head_dim: int, elem_bytes: int, memory: int,
                 block_n: int = BLOCK_N) -> list[int]:
    """The query slots per program the planner weighs (SLOT_CHOICES): a whole GQA group at least when packed,
    narrower than twice the widest KV segment's slots (its rows: a request's, or those of all requests reading a
    shared prefix; 16 always), and fitting in `memory` bytes of shared memory per block (launch_config)."""
    widest = widest_rows * (group if pack_gqa else 1)
    return [s for s in SLOT_CHOICES if (not pack_gqa or s >= group) and (s < 2 * widest or s == 16)
            and launch_config(s, block_n, head_dim, elem_bytes, memory) is not None]


def launch_config(slots: int, block_n: int, head_dim: int, elem_bytes: int,
                  memory: int) -> tuple[int, int] | None:
    """(warps, pipeline stages) of a cache-attention program of `slots` query slots: 8 warps from 128 slots; 3
    stages of K/V blocks where `memory` bytes of shared memory per block hold them beside the queries, else 2
    (head dim 256 at 128 slots on Hopper); None where not even 2 fit."""
    return _launch_config(slots, block_n, head_dim, elem_bytes, memory, SHARED_MEMORY_SLACK)


@functools.lru_cache(maxsize=1024)
def _launch_config(slots: int, block_n: int, head_dim: int, elem_bytes: int, memory: int,
                   slack: int) -> tuple[int, int] | None:
    """launch_config, cached (the planner asks it for every tile it weighs, every iteration)."""
    row_bytes = head_dim_padded(head_dim) * elem_bytes
    for stages in (3, 2):
        if (slots + 2 * stages * block_n) * row_bytes + slack <= memory:
            return (8 if slots >= 128 else 4), stages
    return None


def resident_programs(slots: int, block_n: int, head_dim: int, elem_bytes: int, memory: int,
                      sm_memory: int) -> int:
    """How many programs of this tile shape an SM runs at once: its shared memory (sm_memory bytes, 1 KiB of it
    reserved per block) over one program's (launch_config's stages of K/V blocks beside the queries); at least 1."""
    config = launch_config(slots, block_n, head_dim, elem_bytes, memory)
    if config is None:
        return 1
    need = (slots + 2 * config[1] * block_n) * head_dim_padded(head_dim) * elem_bytes + SHARED_MEMORY_SLACK + 1024
    return max(1, sm_memory // need)


def _fitting_launch(slots: int, block_n: int, head_dim: int, elem_bytes: int, memory: int) -> tuple[int, int]:
    config = launch_config(slots, block_n, head_dim, elem_bytes, memory)
    if config is None:
        raise ValueError(f"slots={slots} at head dim {head_dim} needs more shared memory than the GPU's {memory} "
                         "bytes per block: give fewer slots")
    return config


def _prefix_order(view: KVView, q: np.ndarray, prefix_grouping: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Request order of the plan (members of a prefix group side by side; None: the batch's own, no prefix is
    shared) and which requests read their prefix as one shared segment: a member joins only if every row it
    asks for sees the whole prefix."""
    if not prefix_grouping or not len(q) or view.prefix_ids.max() < 0:
        return None, np.zeros(len(q), bool)
    kv = view.kv_lens
    shared = (view.prefix_ids >= 0) & (kv - q >= view.prefix_lens) & (view.prefix_lens > 0)
    ids = np.sort(view.prefix_ids[shared])
    repeated = ids[1:][ids[1:] == ids[:-1]]  # ids held by two or more candidates (np.unique is slow here)
    if not len(repeated):
        return None, np.zeros(len(q), bool)
    at = np.minimum(np.searchsorted(repeated, view.prefix_ids), len(repeated) - 1)
    shared &= repeated[at] == view.prefix_ids  # np.isin(view.prefix_ids, repeated), faster on small arrays
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
#: first position the first row sees under a window (-NO_TRIM: none; ascends by one per row too); then which of
#: its rows see it (counted from its first row): reach, the first whose causal limit reaches its first position
#: (pos_start - first_limit, may be negative or past the last row), and [see_first, see_end), those that see
#: any of it; first_new, its request's first position of this iteration (kv_len - q_len). The first six are
#: ITEM_FIELDS'. A KV piece (a chunk of a segment) has a row of its own.
SEG_FIELDS = ("row_first", "num_rows", "kv_addr", "pos_start", "kv_len", "table_row", "first_limit", "first_low",
              "reach", "see_first", "see_end", "first_new")
SEG_FIRST_NEW = SEG_FIELDS.index("first_new")
#: Kinds of segment: a request's own positions, its unshared prefix (grouped layout), a shared prefix.
OWN, PREFIX, SHARED = 0, 1, 2


class _Segments(NamedTuple):
    """The segment table (SEG_FIELDS, int64) and per segment its request (a shared prefix: its group's first
    member) and kind; own_only: no request has two segments."""

    table: np.ndarray
    owner: np.ndarray
    kind: np.ndarray
    shared: np.ndarray
    own_only: bool


def _segments(view: KVView, q: np.ndarray, shared: np.ndarray, order: np.ndarray | None, perm_start: np.ndarray,
              limit0: np.ndarray, low0: np.ndarray | int, windowed: bool) -> _Segments:
    """The KV segments of the batch: one per shared prefix group, then per request its own positions (after a
    shared prefix), and in the grouped layout its unshared prefix apart; positions before a window's start
    (low0, the first row's; -NO_TRIM for all without a window) are left out."""
    kv, p = view.kv_lens, view.prefix_lens
    n = len(q)
    grouped = view.layout == "grouped"
    if grouped:  # token addresses of the prefixes and of the requests' own positions
        if view.prefix_addr is None or view.own_addr is None:
            raise ValueError("a grouped KVView needs prefix_addr and own_addr")
        prefix_addr, own_addr = view.prefix_addr, view.own_addr
    idx = np.arange(n)
    parts, owners, kinds = [], [], []
    if order is not None:  # plan order puts each group's members side by side; the first holds the group's rows
        members = order[shared[order]]
        ids = view.prefix_ids[members]
        heads = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))  # np.diff(prepend=): slower
        b0 = members[heads]
        parts.append(_columns(perm_start[b0], np.add.reduceat(q[members], heads), prefix_addr[b0] if grouped else 0,
                              0, p[b0], b0, NO_TRIM, -NO_TRIM))
        owners.append(b0)
        kinds.append(np.full(len(b0), SHARED))
    if grouped:
        alone = np.flatnonzero((p > 0) & ~shared)
        if len(alone):
            parts.append(_columns(perm_start[alone], q[alone], prefix_addr[alone], 0, p[alone], alone,
                                  limit0[alone], low0[alone] if isinstance(low0, np.ndarray) else low0))
            owners.append(alone)
            kinds.append(np.full(len(alone), PREFIX))
        parts.append(_columns(perm_start, q, own_addr, p, kv - p, idx, limit0, low0))
    elif order is not None:
        start = np.where(shared, p, 0)
        parts.append(_columns(perm_start, q, 0, start, kv - start, idx, limit0, low0))
    else:
        parts.append(_columns(perm_start, q, 0, 0, kv, idx, limit0, low0))
    if len(parts) > 1:
        owners.append(idx)
        kinds.append(np.full(n, OWN))
        table, owner, kind = np.concatenate(parts), np.concatenate(owners), np.concatenate(kinds)
    else:
        table, owner, kind = parts[0], idx, np.zeros(n, np.int64)
    if windowed:  # drop the positions before the window of every row
        cut = np.clip(table[:, 7] - table[:, 3], 0, table[:, 4])
        table[:, 2] += cut
        table[:, 3] += cut
        table[:, 4] -= cut
    if table[:, 4].min() <= 0:
        keep = table[:, 4] > 0
        table, owner, kind = np.compress(keep, table, axis=0), owner[keep], kind[keep]  # a mask's rows: slower
    _sight(table, windowed)
    return _Segments(table, owner, kind, shared, len(parts) == 1)


def _columns(*cols) -> np.ndarray:
    """int64 [n, len(SEG_FIELDS)] from equal-length columns (or scalars), the last columns left to fill."""
    n = max(len(c) for c in cols if isinstance(c, np.ndarray))
    out = np.empty((n, len(SEG_FIELDS)), np.int64)
    for j, c in enumerate(cols):
        out[:, j] = c
    return out


def _sight(table: np.ndarray, windowed: bool) -> None:
    """Fill reach, see_first and see_end of segments or pieces: rows of a request see one position more each
    (limits ascend by one), and past the last one whose window starts inside it, none of it."""
    np.subtract(table[:, 3], table[:, 6], out=table[:, 8])
    np.maximum(table[:, 8], 0, out=table[:, 9])
    if windowed:
        table[:, 10] = np.minimum(table[:, 1], table[:, 3] + table[:, 4] - table[:, 7])
    else:
        table[:, 10] = table[:, 1]


def _chunk_ladder(segs: np.ndarray, rows_per_item: int, most_items: int, block_n: int, whole: int) -> list[int]:
    """The KV chunks the planner weighs when it may split, coarse to fine: unsplit (`whole`), then block_n x 2^k
    down to the finest that still makes at most about most_items items of the batch's work (finer ones only add
    programs)."""
    row_blocks = -(-segs[:, 1] // rows_per_item)
    finest = int(-(-int((segs[:, 4] * row_blocks).sum()) // max(most_items, 1)))
    blocks = -(-finest // block_n)  # the finest chunk: the least block_n x 2^k >= finest
    chunk = block_n << (blocks - 1).bit_length() if blocks > 1 else block_n
    ladder = []
    while chunk < whole:
        ladder.append(chunk)
        chunk *= 2
    return [whole, *ladder[::-1]]


class _Pieces(NamedTuple):
    """The pieces a KV chunk cuts the segments into (near-equal runs of at most kv_chunk positions, multiples of
    block_n), those some row sees: table (SEG_FIELDS, int64) and seg, each one's segment (None: the segment
    table itself); per segment, per_segment (its pieces) and step (positions from one to the next), None where
    the chunk cuts nothing; one_row: every piece is seen by one row (decode)."""

    table: np.ndarray
    seg: np.ndarray | None
    per_segment: np.ndarray | None
    step: np.ndarray | None
    one_row: bool


def _pieces(segs: np.ndarray, kv_chunk: int, block_n: int, windowed: bool, longest: int) -> _Pieces:
    """Cut each segment into near-equal chunks of at most kv_chunk positions (multiples of block_n); longest:
    the longest segment's positions."""
    length = segs[:, 4]
    seg: np.ndarray | None
    count: np.ndarray | None
    step: np.ndarray | None
    if kv_chunk >= longest:
        table, seg, count, step = segs, None, None, None
    else:
        count = -(-length // kv_chunk)
        per_piece = -(-length // count)  # ceil(length / pieces)
        step = -(-per_piece // block_n) * block_n  # ... rounded up to a multiple of block_n
        seg = np.repeat(np.arange(len(segs)), count)
        offset = _ragged_arange(count) * step[seg]
        table = np.take(segs, seg, axis=0)
        table[:, 2] += offset
        table[:, 3] += offset
        table[:, 4] = np.minimum(step[seg], table[:, 4] - offset)
        _sight(table, windowed)
    seen = table[:, 9] < table[:, 10]
    if not seen.all():
        table, seg = table[seen], np.flatnonzero(seen) if seg is None else seg[seen]
    one_row = bool(len(table)) and int((table[:, 10] - table[:, 9]).max()) == 1
    return _Pieces(table, seg, count, step, one_row)


def _row_blocks(pieces: _Pieces, rows_per_item: int,
                columns: slice | list[int] = slice(None)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each piece's rows cut into blocks of rows_per_item, one item each (rows that see none of a piece are left
    out of its items: appends): the pieces table's `columns` repeated per item, and each item's rows [first, end)
    counted from its piece's first row."""
    table = pieces.table
    first, end = table[:, 9], table[:, 10]
    if not pieces.one_row:
        first_block = first // rows_per_item
        blocks = (end - 1) // rows_per_item - first_block + 1
        if len(blocks) and int(blocks.max()) > 1:
            block_of = np.repeat(first_block - (np.cumsum(blocks) - blocks), blocks)
            idx = np.repeat(np.arange(len(table)), blocks)
            block = (np.arange(len(idx)) + block_of) * rows_per_item
            rows = np.take(table, idx, axis=0)  # table[idx]: slower
            return rows[:, columns], np.maximum(block, first[idx]), np.minimum(block + rows_per_item, end[idx])
    return table[:, columns], first, end


def _item_keys(pieces: _Pieces, rows_per_item: int, windowed: bool) -> np.ndarray:
    """The keys each item of `pieces` cut into blocks of rows_per_item rows reads (_build_items' items, in order):
    up to its last row's causal limit, from its first row's window start."""
    t = pieces.table
    if windowed:
        if pieces.one_row:  # one item per piece (no copy of the table's columns: the planner weighs many chunks)
            return _keys_read(t[:, 3], t[:, 4], t[:, 7], t[:, 8], t[:, 9], t[:, 10], windowed)
        table, first, end = _row_blocks(pieces, rows_per_item, [3, 4, 7, 8])
        return _keys_read(table[:, 0], table[:, 1], table[:, 2], table[:, 3], first, end, windowed)
    reach, end = t[:, 8], t[:, 10]
    last = np.minimum(end, t[:, 4] + reach) - reach  # a piece's last item reads up to its last row's limit
    if pieces.one_row:
        return last
    first_block = t[:, 9] // rows_per_item
    blocks = (end - 1) // rows_per_item - first_block + 1
    if not len(blocks) or int(blocks.max()) <= 1:
        return last
    # without a window's left side, the item of block b reads min((b + 1) * rows_per_item - reach, last): its
    # last row's limit, or the piece's last row's (_keys_read); here from 1-D columns, not the items' table
    before = np.cumsum(blocks) - blocks  # items of the pieces before
    ends = np.repeat((first_block + 1 - before) * rows_per_item - reach, blocks)
    ends += np.arange(len(ends)) * rows_per_item
    return np.minimum(ends, np.repeat(last, blocks))


def _keys_read(pos_start: np.ndarray, n_keys: np.ndarray, first_low: np.ndarray, reach: np.ndarray,
               first: np.ndarray, end: np.ndarray, windowed: bool) -> np.ndarray:
    keys = np.minimum(end, n_keys + reach) - reach  # up to the last row's limit (at least 1 for a seen piece)
    if windowed:  # from the first row's window start on
        keys = np.minimum(keys, n_keys - np.clip(first_low + first - pos_start, 0, n_keys))
    return keys


def _build_items(pieces: _Pieces, rows_per_item: int, windowed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cut each piece's rows into blocks of rows_per_item (_row_blocks). Returns the items (ITEM_FIELDS, int32;
    partial_base left for _merge_lists) and the keys each reads (_item_keys)."""
    table, first, end = _row_blocks(pieces, rows_per_item)
    keys = _keys_read(table[:, 3], table[:, 4], table[:, 7], table[:, 8], first, end, windowed)
    items = np.empty((len(table), len(ITEM_FIELDS)), np.int32)
    items[:, :6] = table[:, :6]
    new_j = table[:, SEG_FIRST_NEW] - table[:, 3]
    items[:, 7] = np.minimum(np.maximum(new_j, -(1 << 30), out=new_j), 1 << 30, out=new_j)  # np.clip: slower
    items[:, 0] += first
    np.subtract(end, first, out=items[:, 1], casting="unsafe")
    return items, keys


def _split_rows(items: np.ndarray, num_rows: int) -> tuple[np.ndarray, int]:
    """Items holding a row held by several items (which write partials), and the partial rows they need."""
    rows = np.repeat(items[:, 0], items[:, 1]) + _ragged_arange(items[:, 1])
    count = np.bincount(rows, minlength=num_rows)
    item_of = np.repeat(np.arange(len(items)), items[:, 1])
    writes = np.bincount(item_of, weights=count[rows] > 1, minlength=len(items)) > 0
    return writes, int(items[writes, 1].sum())


class _Work(NamedTuple):
    """What the cost model needs of one candidate's items: how many, the keys they read in all and at most, and
    the rows of the items holding a row that other items hold too (they write partials; 0 when not asked)."""

    items: int
    keys: int
    max_keys: int
    partial_rows: int


class _Candidates:
    """The work of each (rows per item, KV chunk) the planner weighs, cached per chunk, without building its
    items: counts in closed form per piece (_closed_form_work, every rows-per-item choice at once), or from the
    items where a window's left side makes a row see a middle run of a segment's pieces (windowed); the keys of
    each item (_item_keys) for the estimate."""

    def __init__(self, segs: _Segments, num_rows: int, block_n: int, rows_per_item: list[int], windowed: bool,
                 longest: int) -> None:
        self.segs, self.num_rows, self.block_n, self.rows_per_item = segs, num_rows, block_n, rows_per_item
        self.windowed, self.longest = windowed, longest
        self._pieces: dict[int, _Pieces] = {}
        self._work: dict[tuple[int, int, bool], _Work] = {}
        self._keys: dict[tuple[int, int], np.ndarray] = {}
        self._split_base: _SplitBase | None = None

    def pieces(self, kv_chunk: int) -> _Pieces:
        if kv_chunk not in self._pieces:
            self._pieces[kv_chunk] = _pieces(self.segs.table, kv_chunk, self.block_n, self.windowed, self.longest)
        return self._pieces[kv_chunk]

    def work(self, kv_chunk: int, rows_per_item: int, partials: bool) -> _Work:
        key = (kv_chunk, rows_per_item, partials)
        if key not in self._work:
            pieces = self.pieces(kv_chunk)
            if self.windowed:
                items, keys = _build_items(pieces, rows_per_item, windowed=True)
                self._work[key] = _Work(len(items), int(keys.sum()), int(keys.max()) if len(keys) else 0,
                                        _split_rows(items, self.num_rows)[1] if partials else 0)
            else:
                split_from = None
                if partials:
                    if self._split_base is None:
                        self._split_base = _split_base(self.segs)
                    split_from = _split_from(self.segs, pieces, self._split_base)
                for r, w in zip(self.rows_per_item, _closed_form_work(pieces, self.rows_per_item, split_from)):
                    self._work[kv_chunk, r, partials] = w
        return self._work[key]

    def keys(self, kv_chunk: int, rows_per_item: int) -> np.ndarray:
        """The keys of each item (_item_keys), sorted, largest first (the launch order the estimate assumes)."""
        key = (kv_chunk, 0 if self.pieces(kv_chunk).one_row else rows_per_item)  # decode: the same items for any r
        if key not in self._keys:
            self._keys[key] = np.sort(_item_keys(self.pieces(kv_chunk), rows_per_item, self.windowed))[::-1]
        return self._keys[key]


#: A row number past every batch's rows ("no such row").
_NEVER = 1 << 50


class _SplitBase(NamedTuple):
    """What _split_from needs of the segments whatever the KV chunk: which are a request's own (not a shared
    prefix: mine, and their indices `own`, kinds and requests) and per request the first row that sees both its
    segments' first positions (own positions, unshared prefix; _NEVER: it has one segment)."""

    mine: np.ndarray
    own: np.ndarray
    kind: np.ndarray
    owner: np.ndarray
    sees_both: np.ndarray


def _split_base(segs: _Segments) -> _SplitBase:
    mine = segs.kind != SHARED
    own = np.flatnonzero(mine)
    kind, owner = segs.kind[own], segs.owner[own]
    first = np.full((2, len(segs.shared)), _NEVER)  # per request: of its own positions, of its unshared prefix
    first[kind, owner] = segs.table[own, 9]
    return _SplitBase(mine, own, kind, owner, first.max(axis=0))


def _split_from(segs: _Segments, pieces: _Pieces, base: _SplitBase | None = None) -> np.ndarray:
    """Per piece, the first row of its segment (counted from the segment's first) held by two or more items of
    the batch; all later rows of the segment are too (_NEVER: no row). Without a window's left side a row sees
    the first pieces of each of its segments, more the further down, so a request's rows are split from the
    first that sees two pieces of one of its segments, or one of each (own positions, unshared prefix). Every
    row of a shared prefix's members is split: it sees the whole prefix and (to join) its own first position.
    base: _split_base(segs), which does not depend on the chunk (given: not computed again)."""
    base = _split_base(segs) if base is None else base
    if pieces.per_segment is None:  # one piece per segment: no row sees a second piece of one
        split = base.sees_both.copy()
    else:
        sees_second = np.where(pieces.per_segment >= 2, np.maximum(segs.table[:, 8] + pieces.step, 0), _NEVER)
        second = np.full((2, len(segs.shared)), _NEVER)
        second[base.kind, base.owner] = sees_second[base.own]
        split = np.minimum(second.min(axis=0), base.sees_both)
    split[segs.shared] = 0
    split = np.where(base.mine, split[segs.owner], 0)
    return split if pieces.seg is None else split[pieces.seg]


def _closed_form_work(pieces: _Pieces, rows_per_item: list[int], split_from: np.ndarray | None) -> list[_Work]:
    """_Work of the items _build_items makes of `pieces` for each rows_per_item r (no window's left side), in
    closed form. A piece's rows [see_first, see_end) make blocks b0 = see_first // r .. b1 = (see_end - 1) // r;
    block b (but the last) ends at row (b + 1) * r and reads min((b + 1) * r, full) - reach keys, where full =
    kv_len + reach is the first row that sees the whole piece; the last block reads the most. Given split_from
    (_split_from), partial rows are those of the blocks that end past it."""
    table = pieces.table
    n_keys, reach, first, end = table[:, 4], table[:, 8], table[:, 9], table[:, 10]
    full = n_keys + reach
    last = np.minimum(end, full) - reach  # keys of each piece's last block
    max_keys, last_keys = (int(last.max()), int(last.sum())) if len(last) else (0, 0)
    if pieces.one_row:  # one item per piece, whatever r
        held = 0 if split_from is None else int(np.count_nonzero(split_from < end))
        return [_Work(len(table), last_keys, max_keys, held)] * len(rows_per_item)
    r = np.asarray(rows_per_item)[:, None]
    b0, b1 = first // r, (end - 1) // r
    ramp = np.minimum(np.maximum(full // r, b0), b1)  # blocks b0 .. ramp - 1 end before row `full`
    # sum over b in [b0, b1) of min((b + 1) * r, full): r * (b0 + 1 + ... + ramp) + (b1 - ramp) * full
    triangle = ((ramp - b0) * (ramp + b0 + 1)).sum(axis=1) // 2
    span = b1 - b0
    keys = r[:, 0] * triangle + (b1 - ramp) @ full - span @ reach + last_keys
    items = span.sum(axis=1) + len(table)
    if split_from is None:
        partial = np.zeros(len(rows_per_item), np.int64)
    else:
        seen = (split_from < end).astype(np.int64)
        partial = int(end @ seen) - np.maximum(first, split_from // r * r) @ seen
    return [_Work(w, k, max_keys, p) for w, k, p in zip(items.tolist(), keys.tolist(), partial.tolist())]


def _row_table(diag0: np.ndarray, q: np.ndarray, kv: np.ndarray, order: np.ndarray | None, q_plan: np.ndarray,
               start_plan: np.ndarray, num_rows: int, left: int, right: int) -> np.ndarray:
    """ROW_FIELDS by plan position (int32; part_first 0 and part_count 1 until _merge_lists fills them): the
    rows of the requests in plan order, each request's in order. diag0: each request's kv_len - q_len."""
    rows = np.zeros((num_rows, len(ROW_FIELDS)), np.int32)
    one_row = num_rows == len(q)  # one row per request (decode): per request is per row
    pos = np.arange(num_rows, dtype=np.int32)

    def per_row(x: np.ndarray) -> np.ndarray:  # per request (batch order) to per row
        x = x if order is None else x[order]
        return x if one_row else np.repeat(x, q_plan)

    def plus_row(x: np.ndarray) -> np.ndarray:  # ... plus the row's index within its request
        x = x if order is None else x[order]
        return x if one_row else np.repeat((x - start_plan).astype(np.int32), q_plan) + pos

    diag = plus_row(diag0)
    rows[:, 0] = pos if order is None else plus_row(np.cumsum(q) - q)
    if right == 0:  # the causal limit is the diagonal
        rows[:, 1] = diag
    elif right > 0:  # the diagonal + right, never past kv_len - 1
        rows[:, 1] = np.minimum(diag.astype(np.int64) + right, per_row(kv - 1))
    else:
        rows[:, 1] = per_row(kv - 1)
    rows[:, 3] = 1
    if left >= 0:
        rows[:, 4] = np.maximum(diag.astype(np.int64) - left, 0)
    rows[:, 5] = diag
    return rows


def _merge_lists(items: np.ndarray, rows: np.ndarray, disjoint: bool) -> tuple[np.ndarray, int]:
    """Fill the items' partial_base (compact, -1 when direct) and the rows' part_first and part_count, and
    build merge_idx (per split row, its partials in launch order). disjoint: no row can be in two items."""
    first, n = items[:, 0], items[:, 1]
    items[:, 6] = -1
    none = np.empty(0, np.int32)
    if disjoint and int(n.sum()) == len(rows):  # every row in exactly one item: all written directly
        return none, 0
    ends = np.bincount(first, minlength=len(rows) + 1) - np.bincount(first + n, minlength=len(rows) + 1)
    count = np.cumsum(ends[:-1])
    rows[:, 3] = count
    if disjoint or count.max() <= 1:
        return none, 0
    split = count > 1
    per_row = np.where(split, count, 0)
    part_first = np.cumsum(per_row) - per_row
    rows[:, 2] = part_first
    held = np.concatenate([[0], np.cumsum(split)])
    writes = np.flatnonzero(held[first + n] > held[first])  # items holding a split row
    sizes = n[writes]
    base = np.cumsum(sizes) - sizes
    items[writes, 6] = base
    num_partials = int(sizes.sum())
    width = int(count.max())
    if int(part_first[-1] + per_row[-1]) == width * int(held[-1]):  # every split row in `width` items
        return _merge_index_uniform(first[writes], sizes, base, width, int(held[-1])), num_partials
    row_of = np.repeat(first[writes] - base, sizes) + np.arange(num_partials)  # the row of each partial
    mine = np.flatnonzero(split[row_of])  # partials of split rows, in launch order
    key = row_of[mine]
    if len(rows) <= 1 << 16:  # numpy's stable sort of 16-bit keys is a radix sort, ~1.6x faster here
        key = key.astype(np.uint16)
    return mine[np.argsort(key, kind="stable")].astype(np.int32), num_partials


def _merge_index_uniform(first: np.ndarray, size: np.ndarray, base: np.ndarray, width: int,
                         split_rows: int) -> np.ndarray:
    """merge_idx where each of the split_rows split rows is held by `width` items (a request's unshared prefix and
    own positions, unsplit: Mooncake's mixed batches), from the items that write partials (in launch order: rows
    [first, first + size), partials base .. base + size - 1). The items' row bounds cut the rows into runs that
    one set of items holds, so the entries come from (run, item) pairs sorted by run (~one per item) instead of
    every partial sorted by its row (_merge_lists): entry j of the i-th split row is at i * width + j."""
    ends = first + size
    bounds = np.sort(np.concatenate([first, ends]))
    bounds = bounds[np.concatenate([[True], bounds[1:] != bounds[:-1]])]  # np.unique: slower here
    lo = np.searchsorted(bounds, first)
    spans = np.searchsorted(bounds, ends) - lo  # runs each item holds
    run = np.repeat(lo - (np.cumsum(spans) - spans), spans) + np.arange(int(spans.sum()))  # per pair
    offset = np.repeat(base - first, spans)  # per pair: its item's partial of row x is offset + x
    order = np.argsort(run.astype(np.uint16) if len(bounds) <= 1 << 16 else run, kind="stable")  # radix sort
    offset = offset[order]
    holders = np.bincount(run, minlength=len(bounds) - 1)  # items holding each run
    runs = np.flatnonzero(holders > 1)  # runs of split rows, ascending
    pair = (np.cumsum(holders) - holders)[runs]  # each one's first pair (sorted)
    run_rows = bounds[runs + 1] - bounds[runs]
    shift = bounds[runs] - (np.cumsum(run_rows) - run_rows)  # row of the i-th split row: shift[its run] + i
    at = np.arange(split_rows)
    merge_idx = np.empty(split_rows * width, np.int32)
    for j in range(width):
        np.add(np.repeat(offset[pair + j] + shift, run_rows), at, out=merge_idx[j::width], casting="unsafe")
    return merge_idx


def _program_us(keys: np.ndarray, slots: int, head_dim: int, elem_bytes: int, cost: CostModel) -> np.ndarray:
    """The cost model's time of one program reading `keys` of one KV head with `slots` query slots, at its fair
    share of an SM, and its SM time beyond the keys."""
    return keys * _key_us(slots, head_dim, elem_bytes, cost) + cost.program_us


def _key_us(slots: int, head_dim: int, elem_bytes: int, cost: CostModel) -> float:
    """A program's time per key of one KV head: the larger of reading it (K and V) and its matmuls with `slots`
    query slots, plus `unhidden` times the smaller (both grow with the keys, so this is the program's slope)."""
    memory, matmul = 2 * head_dim * elem_bytes / cost.bytes_per_us, 4.0 * slots * head_dim / cost.rate(slots)
    return max(memory, matmul) + cost.unhidden * min(memory, matmul)


def _launch_order(keys: np.ndarray, slots: int, head_dim: int, elem_bytes: int, cost: CostModel) -> np.ndarray:
    """Items largest first by the cost model's program time, ties in plan order. The time is linear in the keys
    with a positive slope, so this is the order by keys, unless the slope is too small for the float times of
    two key counts to differ (a degenerate cost model): then the times themselves are sorted."""
    rate = cost.rate(slots)
    slope = min(2 * head_dim * elem_bytes / cost.bytes_per_us, 4.0 * slots * head_dim / rate)
    k = int(keys.max()) if len(keys) else 0
    longest = max(k * 2 * head_dim * elem_bytes / cost.bytes_per_us, 4.0 * slots * k * head_dim / rate) + \
        cost.program_us
    if slope > 1e-12 * longest:
        if k < 1 << 16 and (not len(keys) or int(keys.min()) >= 0):  # numpy radix-sorts 16-bit keys stably
            return np.argsort((k - keys).astype(np.uint16), kind="stable")
        return np.argsort(-keys, kind="stable")
    return np.argsort(-_program_us(keys, slots, head_dim, elem_bytes, cost), kind="stable")


def _even_wave(keys: np.ndarray, programs_per_item: int, places: int) -> bool:
    """Whether a launch of these items runs all its programs at once and their keys are even (EVEN_SPREAD)."""
    if not len(keys) or len(keys) * programs_per_item > places:
        return False
    ordered = np.sort(keys)  # a few hundred items at most here; np.percentile costs ~70 us on the host
    tenth = (len(ordered) - 1) // 10
    return bool(ordered[-1 - tenth] <= EVEN_SPREAD * max(int(ordered[tenth]), 1))


def _estimate(keys: np.ndarray, partial_rows: int, per_key: float, programs_per_item: int, head_dim: int,
              num_sms: int, places: int, num_heads: int, cost: CostModel) -> float:
    """The cost model's launch time (us) of a candidate whose items read `keys` (largest first; CostModel) at
    per_key us a key (_key_us): the schedule of its programs, `places` running at once, plus fixed_us and the
    partials' traffic."""
    if not len(keys):
        return 0.0
    work = keys * per_key + cost.program_us  # _program_us; keys come largest first: so does the work
    return _launch_us(work, programs_per_item, places, num_sms, cost.lone_speedup) + cost.fixed_us + \
        _merge_us(partial_rows, num_heads, head_dim, num_sms, cost)


def _balanced_us(work: _Work, per_key: float, programs_per_item: int, head_dim: int, num_sms: int, num_heads: int,
                 cost: CostModel) -> float:
    """A launch's time from the items' count and keys alone: its programs' work over the SMs, or its largest
    program at lone_speedup if that is longer. No schedule is shorter (_estimate's is never below it); that of a
    launch of more than MANY_WAVES waves is about this (the waves before the last are full, and largest first
    leaves the last nearly even). per_key: a program's us a key (_key_us)."""
    total = (work.keys * per_key + work.items * cost.program_us) * programs_per_item / num_sms
    slowest = (work.max_keys * per_key + cost.program_us) / cost.lone_speedup
    return max(total, slowest) + cost.fixed_us + _merge_us(work.partial_rows, num_heads, head_dim, num_sms, cost)


def _merge_us(partial_rows: int, num_heads: int, head_dim: int, num_sms: int, cost: CostModel) -> float:
    """The split rows' partial results written and read back (float32 output and log-sum-exp), over the SMs."""
    return partial_rows * num_heads * head_dim * 4 * 2 / (cost.bytes_per_us * num_sms)


def _launch_us(work: np.ndarray, copies: int, places: int, num_sms: int, lone: float) -> float:
    """How long programs of `work` us each at a fair share of an SM (descending, each `copies` times: one per
    head) take when `places` run at once and the rest queue in order. While n run, each progresses at
    min(num_sms / n, lone) times its fair share, the same for all, so the order in which they finish is fixed by
    their work alone: the queue is list scheduling on `places` slots, which largest first and nearly equal
    pieces make waves filled back and forth (snake order: a slot that got a large program gets a small one next).
    The launch's time integrates 1 / rate over the slots' loads as fewer and fewer stay busy. Of more than
    EXACT_WAVES waves, the first (the largest programs) and the last are placed one by one and the middle ones
    spread evenly (host time: mixed batches make thousands of programs)."""
    total = len(work) * copies
    if total > places:
        waves = -(-total // places)
        tail = min(waves - 1, EXACT_WAVES - 1)  # waves placed one by one after the first
        flat = np.zeros((1 + tail) * places)
        flat[:places] = np.repeat(work[:-(-places // copies)], copies)[:places]
        first = (waves - tail) * places
        programs = np.repeat(work[first // copies:], copies)[first % copies:]
        flat[places:places + len(programs)] = programs
        load = flat.reshape(1 + tail, places)
        for i in range(1, 1 + tail):  # wave waves - tail + i - 1 (from 0): the odd ones fill back to front
            if (waves - tail + i - 1) % 2:
                load[i] = load[i, ::-1].copy()
        spread = (_programs_work(work, copies, first) - _programs_work(work, copies, places)) / places
        loads, slowness = np.sort(load.sum(axis=0)) + spread, _slowness(places, 1, num_sms, lone)
    else:
        loads, slowness = work[::-1], _slowness(len(work), copies, num_sms, lone)
    return float(loads[0] * slowness[0] + (loads[1:] - loads[:-1]) @ slowness[1:])


@functools.lru_cache(maxsize=256)
def _slowness(n: int, copies: int, num_sms: int, lone: float) -> np.ndarray:
    """_launch_us's 1 / rate while copies * (n - i) programs run, i = 0 .. n - 1 (read-only; cached: a serving
    loop's launches repeat their shapes)."""
    busy = copies * (n - np.arange(n))
    slowness = 1.0 / np.minimum(num_sms / busy, lone)
    slowness.flags.writeable = False
    return slowness


def _programs_work(work: np.ndarray, copies: int, n: int) -> float:
    """The work of the first n programs (each item's `copies` in a row)."""
    item, part = divmod(n, copies)
    return float(work[:item].sum()) * copies + (float(work[item]) * part if part else 0.0)


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
