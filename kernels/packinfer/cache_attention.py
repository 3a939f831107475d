"""Attention over a KV cache (paged or grouped) for any serving iteration, in one launch: every item of a
CachePlan attends its query rows over one KV chunk; rows held by one item are written directly, rows split over
several items are merged exactly by whichever of their items finishes last (a per-(row, head) arrival counter),
so nothing waits for a second launch.

Tiling: BLOCK_M query slots x BLOCK_N keys per step, HEAD_DIM whole, online softmax in base 2 with fp32
accumulators. A slot is one (query row, query head) pair of the item's row block:
  PACK_GQA on:  program id // NUM_KV_HEADS is the item, % NUM_KV_HEADS the KV head; slot m is plan row
                row_first + m // GROUP of query head kv_head * GROUP + m % GROUP (all heads that read the KV
                head share every K/V load).
  PACK_GQA off: program id // NUM_HEADS is the item, % NUM_HEADS the query head; slot m is plan row row_first + m.
Programs whose item is past header[0] (the plan's item count; a launch may cover a larger capacity, as CUDA
graphs need) return at once. An item (a row of CachePlan.items, columns ITEM_FIELDS) reads positions
[pos_start, pos_start + kv_len), up to its last row's causal limit: at pool address kv_addr + j (grouped,
contiguous: optional TMA loads on Hopper) or through block table row table_row (paged).
Split rows: the item writes the slot's normalised partial output and base-2 log-sum-exp to partial row
partial_base + m // GROUP (m with PACK_GQA off), then adds one to the slot's counter; the program that brings a
counter to the row's part_count merges that row's partials (listed in merge_idx) into Out and zeroes the counter.
Ordering: a CTA barrier between the partial stores and the counter increments (acq_rel, GPU scope), and another
before the merge, whose partial loads bypass L1 (.cg).
New K/V (FRESH, the launch given k_new / v_new): the slots whose own position is one of the item's keys store
their row's K/V there (the first query head of each GQA group: once per KV head), and keys j >= new_j (this
iteration's positions) are read from k_new / v_new, never from the cache that this launch is writing: no
program waits for another. Blocks of new keys only that every slot sees whole come from k_new / v_new alone
(through TMA descriptors over them where the pool's loads are TMA and their layout allows: NEW_TMA). The
plan's writes_new says every such position is its own request's, which no other request reads.
Isolation: an item reads one request's positions (or a shared prefix all its rows see), pointer loads past the
item are masked and TMA blocks past it have their V zeroed (unwritten pool space may hold NaN bits), so only
positions past a row's causal limit can be masked in a block. As in the packed kernel, a program whose result
holds a NaN/inf is computed again with the masked blocks cleaned (SAFE steps): a row's result depends only on
the positions it sees, and no other bit changes.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from packinfer.cache_plan import ITEM_FIELDS, ROW_FIELDS, CachePlan, PlanBuffers
from packinfer.device import upload
from packinfer.launch import Bound
from packinfer.scoring import NO_OPTIONS, ScoreOptions
from packinfer.triton_common import (
    any_nonfinite,
    field_offset,
    interpreter_needs_f32_dot,
    load_kv,
    log_sum_exp,
    online_softmax_step,
    program_slots,
    softcap_mode,
    tma_available,
    window_blocks,
)
from packinfer.validate import head_dim_padded

ITEM_WIDTH = tl.constexpr(len(ITEM_FIELDS))
ITEM_ROW_FIRST = field_offset(ITEM_FIELDS, "row_first")
ITEM_NUM_ROWS = field_offset(ITEM_FIELDS, "num_rows")
ITEM_KV_ADDR = field_offset(ITEM_FIELDS, "kv_addr")
ITEM_POS_START = field_offset(ITEM_FIELDS, "pos_start")
ITEM_KV_LEN = field_offset(ITEM_FIELDS, "kv_len")
ITEM_TABLE_ROW = field_offset(ITEM_FIELDS, "table_row")
ITEM_PARTIAL_BASE = field_offset(ITEM_FIELDS, "partial_base")
ITEM_NEW_J = field_offset(ITEM_FIELDS, "new_j")
ROW_WIDTH = tl.constexpr(len(ROW_FIELDS))
ROW_Q_ROW = field_offset(ROW_FIELDS, "q_row")
ROW_LIMIT = field_offset(ROW_FIELDS, "limit")
ROW_PART_FIRST = field_offset(ROW_FIELDS, "part_first")
ROW_PART_COUNT = field_offset(ROW_FIELDS, "part_count")
ROW_LOW = field_offset(ROW_FIELDS, "low")
ROW_DIAG = field_offset(ROW_FIELDS, "diag")


@triton.jit
def _addresses(table, kv_addr, pos_start, j, in_range, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Pool addresses (int64) of item keys j: through the block table (paged) or contiguous (grouped)."""
    if PAGED:
        pos = pos_start + j
        page = tl.load(table + pos // PAGE_SIZE, mask=in_range, other=0)
        return page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
    return (kv_addr + j).to(tl.int64)


@triton.jit
def _load_kv(K, V, k_base, v_base, table, kv_addr, pos_start, start, j, kv_head, kv_len, dmask, stride_kt, stride_vt,
             K_new, V_new, stride_nt, stride_nh, stride_vnt, stride_vnh, new_j, row0, HEAD_DIM: tl.constexpr,
             PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MASK_KEYS: tl.constexpr, EVEN_D: tl.constexpr,
             USE_TMA: tl.constexpr, FRESH: tl.constexpr):
    """The block of K and V at item keys j (= start + 0..BLOCK_N-1): TMA (V past the item zeroed: unwritten pool
    space may hold NaN bits, and a masked key's weight 0 times NaN is NaN) or pointer loads masked to j < kv_len
    (MASK_KEYS) and to the real head dims (unless EVEN_D). FRESH: keys j >= new_j come from the new rows' K/V
    instead (K_new / V_new row row0 + j): this launch stores them in the cache, which may not hold them yet."""
    if USE_TMA:  # (one return at the end: the compiler generates every branch of a constexpr if-return)
        k = K.load([kv_addr + start, kv_head * HEAD_DIM])
        v = V.load([kv_addr + start, kv_head * HEAD_DIM])
        if MASK_KEYS:
            v = tl.where((j < kv_len)[:, None], v, 0.0)
    else:
        in_range = j < kv_len
        addr = _addresses(table, kv_addr, pos_start, j, in_range, PAGED, PAGE_SIZE)
        k, v = load_kv(k_base + addr[:, None] * stride_kt, v_base + addr[:, None] * stride_vt, in_range, dmask,
                       MASK_KEYS, EVEN_D)
    if FRESH:
        if start + j.shape[0] > new_j:  # a block holding new keys (the masked ones and the straddling one)
            fresh = (j >= new_j) & (j < kv_len)
            dims = tl.arange(0, HEAD_DIM)
            rows = (row0 + j).to(tl.int64)
            m = fresh[:, None] & dmask[None, :]
            k_new = tl.load(K_new + kv_head * stride_nh + rows[:, None] * stride_nt + dims[None, :], mask=m)
            v_new = tl.load(V_new + kv_head * stride_vnh + rows[:, None] * stride_vnt + dims[None, :], mask=m)
            k = tl.where(fresh[:, None], k_new.to(k.dtype), k)
            v = tl.where(fresh[:, None], v_new.to(v.dtype), v)
    return k, v


@triton.jit
def _attend(q, K, V, table, kv_head, kv_addr, pos_start, kv_len, low, limit, diag, slope, row_ok, qk_scale, cap,
            stride_kt, stride_kh, stride_vt, stride_vh, K_new, V_new, KN_tma, VN_tma, stride_nt, stride_nh,
            stride_vnt, stride_vnh, new_j, row0, DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_F32: tl.constexpr,
            USE_TMA: tl.constexpr, SAFE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
            ALIBI: tl.constexpr, FRESH: tl.constexpr, NEW_TMA: tl.constexpr):
    """The item's slots over its positions (slot m sees item keys low[m] <= j <= limit[m]; low only with a
    window). Returns (max, sum, acc). FRESH: keys j >= new_j are read from K_new / V_new: blocks that every slot
    sees whole and that hold new keys only, from there alone (TMA through KN_tma / VN_tma with NEW_TMA); the one
    block that straddles new_j and the masked blocks mix them into the cache's (_load_kv)."""
    dims = tl.arange(0, HEAD_DIM)
    dmask = dims < DIM
    EVEN_D: tl.constexpr = DIM == HEAD_DIM
    if WINDOW:
        first, mask_end, nomask_end, end = window_blocks(tl.maximum(low, 0), tl.minimum(limit, kv_len - 1), row_ok,
                                                         BLOCK_N)
    else:  # keys [0, nomask_end) are visible to every slot: whole blocks, no mask; none past the last slot's limit
        first = 0
        mask_end = 0
        nomask_end = tl.minimum(tl.maximum(tl.min(limit, 0) + 1, 0), kv_len) // BLOCK_N * BLOCK_N
        end = tl.minimum(tl.max(tl.where(row_ok, limit, -1), 0) + 1, kv_len)
    # unmasked blocks: [mask_end, cache_end) from the cache; with FRESH, [cache_end, mixed_end) is the block that
    # straddles new_j (cached and new keys) and [mixed_end, nomask_end) holds new keys only (block edges counted
    # from mask_end: with a window the blocks start at the first key a slot sees, not at a multiple of BLOCK_N)
    cache_end = nomask_end
    mixed_end = nomask_end
    if FRESH:
        cached = tl.maximum(new_j - mask_end, 0)  # keys of the unmasked blocks before the first new one
        cache_end = tl.minimum(mask_end + cached // BLOCK_N * BLOCK_N, nomask_end)
        mixed_end = tl.minimum(mask_end + (cached + BLOCK_N - 1) // BLOCK_N * BLOCK_N, nomask_end)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    if USE_TMA:
        k_base = 0
        v_base = 0
    else:
        k_base = K + kv_head * stride_kh + dims[None, :]
        v_base = V + kv_head * stride_vh + dims[None, :]

    for start in range(first, mask_end, BLOCK_N):  # only with a window: keys some slots have left behind
        j = start + cols
        k, v = _load_kv(K, V, k_base, v_base, table, kv_addr, pos_start, start, j, kv_head, kv_len, dmask, stride_kt,
                        stride_vt, K_new, V_new, stride_nt, stride_nh, stride_vnt, stride_vnh, new_j, row0, HEAD_DIM,
                        PAGED, PAGE_SIZE, True, EVEN_D, USE_TMA, FRESH)
        valid = (j < kv_len)[None, :] & (j[None, :] <= limit[:, None]) & (j[None, :] >= low[:, None])
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, cap, pos_start + j, diag, slope, valid,
                                            True, SAFE, DOT_F32, SOFTCAP, ALIBI)
    for start in range(mask_end, cache_end, BLOCK_N):
        j = start + cols
        k, v = _load_kv(K, V, k_base, v_base, table, kv_addr, pos_start, start, j, kv_head, kv_len, dmask, stride_kt,
                        stride_vt, K_new, V_new, stride_nt, stride_nh, stride_vnt, stride_vnh, new_j, row0, HEAD_DIM,
                        PAGED, PAGE_SIZE, False, EVEN_D, USE_TMA, False)
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, cap, pos_start + j, diag, slope, 0,
                                            False, False, DOT_F32, SOFTCAP, ALIBI)
    if FRESH:
        for start in range(cache_end, mixed_end, BLOCK_N):  # at most one block
            j = start + cols
            k, v = _load_kv(K, V, k_base, v_base, table, kv_addr, pos_start, start, j, kv_head, kv_len, dmask,
                            stride_kt, stride_vt, K_new, V_new, stride_nt, stride_nh, stride_vnt, stride_vnh, new_j,
                            row0, HEAD_DIM, PAGED, PAGE_SIZE, False, EVEN_D, USE_TMA, True)
            m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, cap, pos_start + j, diag, slope, 0,
                                                False, False, DOT_F32, SOFTCAP, ALIBI)
        kn_base = K_new + kv_head * stride_nh + dims[None, :]
        vn_base = V_new + kv_head * stride_vnh + dims[None, :]
        for start in range(mixed_end, nomask_end, BLOCK_N):  # this iteration's keys, all of them seen by all slots
            j = start + cols
            if NEW_TMA:
                k = KN_tma.load([row0 + start, kv_head * HEAD_DIM])
                v = VN_tma.load([row0 + start, kv_head * HEAD_DIM])
            else:
                rows = (row0 + j).to(tl.int64)[:, None]
                k, v = load_kv(kn_base + rows * stride_nt, vn_base + rows * stride_vnt, None, dmask, False, EVEN_D)
            m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, cap, pos_start + j, diag, slope, 0,
                                                False, False, DOT_F32, SOFTCAP, ALIBI)
    for start in range(nomask_end, end, BLOCK_N):
        j = start + cols
        k, v = _load_kv(K, V, k_base, v_base, table, kv_addr, pos_start, start, j, kv_head, kv_len, dmask, stride_kt,
                        stride_vt, K_new, V_new, stride_nt, stride_nh, stride_vnt, stride_vnh, new_j, row0, HEAD_DIM,
                        PAGED, PAGE_SIZE, True, EVEN_D, USE_TMA, FRESH)
        valid = (j < kv_len)[None, :] & (j[None, :] <= limit[:, None])
        if WINDOW:
            valid = valid & (j[None, :] >= low[:, None])
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, cap, pos_start + j, diag, slope, valid,
                                            True, SAFE, DOT_F32, SOFTCAP, ALIBI)
    return m_i, l_i, acc


@triton.jit
def _merge(O_part, LSE_part, merge_idx, part_first, part_count, heads, last, NUM_HEADS: tl.constexpr,
           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """The exact combination of the partials of the `last` slots (every other slot gives zeros), and its
    base-2 log-sum-exp."""
    dims = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    most = tl.max(tl.where(last, part_count, 0), 0)
    for p in range(0, most):
        take = last & (p < part_count)
        idx = tl.load(merge_idx + part_first + p, mask=take, other=0).to(tl.int64) * NUM_HEADS + heads
        lse = tl.load(LSE_part + idx, mask=take, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(O_part + idx[:, None] * HEAD_DIM + dims[None, :], mask=take[:, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    return acc / tl.where(total > 0, total, 1.0)[:, None], m, total


@triton.jit
def _cache_attention(
    Q, K, V, Out, LSE, Slopes, K_new, V_new, K_pool, V_pool, KN_tma, VN_tma, O_part, LSE_part, counters, header,
    items, rows, merge_idx, block_table, qk_scale, cap, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
    stride_vh, stride_ot, stride_oh, stride_table, stride_lh, stride_st, stride_sh, stride_nt, stride_nh, stride_vnt,
    stride_vnh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, PACK_GQA: tl.constexpr, DIM: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, DOT_F32: tl.constexpr, USE_TMA: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, RETURN_LSE: tl.constexpr, FRESH: tl.constexpr,
    NEW_TMA: tl.constexpr,
):
    item, kv_head, slot_row, heads = program_slots(tl.program_id(0), NUM_HEADS, GROUP, PACK_GQA, BLOCK_M)
    if item >= tl.load(header):
        return
    it = items + item * ITEM_WIDTH
    row_first = tl.load(it + ITEM_ROW_FIRST)
    num_rows = tl.load(it + ITEM_NUM_ROWS)
    kv_addr = tl.load(it + ITEM_KV_ADDR)
    pos_start = tl.load(it + ITEM_POS_START)
    kv_len = tl.load(it + ITEM_KV_LEN)
    table_row = tl.load(it + ITEM_TABLE_ROW)
    partial_base = tl.load(it + ITEM_PARTIAL_BASE)

    row_ok = slot_row < num_rows
    plan_rows = row_first + slot_row
    r = rows + plan_rows * ROW_WIDTH
    q_rows = tl.load(r + ROW_Q_ROW, mask=row_ok, other=0)
    limit = tl.load(r + ROW_LIMIT, mask=row_ok, other=2147483647) - pos_start  # last key j each slot sees
    part_count = tl.load(r + ROW_PART_COUNT, mask=row_ok, other=1)
    low = tl.zeros([BLOCK_M], dtype=tl.int32)
    if WINDOW:  # first key j each slot sees
        low = tl.load(r + ROW_LOW, mask=row_ok, other=0) - pos_start
    diag = tl.zeros([BLOCK_M], dtype=tl.int32)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI or FRESH:  # the slot's own position
        diag = tl.load(r + ROW_DIAG, mask=row_ok, other=0)
    if ALIBI:  # the slot's slope (x log2 e) from [rows or 1, heads]
        slope = tl.load(Slopes + q_rows.to(tl.int64) * stride_st + heads * stride_sh, mask=row_ok, other=0.0)
    dims = tl.arange(0, HEAD_DIM)
    dmask = dims < DIM
    q = tl.load(Q + (q_rows.to(tl.int64) * stride_qt + heads * stride_qh)[:, None] + dims[None, :],
                mask=row_ok[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    table = block_table + table_row.to(tl.int64) * stride_table
    new_j = 0
    row0 = 0
    if FRESH:  # store the new K/V of the slots whose own position is one of this item's keys (one head per group)
        new_j = tl.load(it + ITEM_NEW_J)
        r0 = rows + row_first * ROW_WIDTH
        row0 = tl.load(r0 + ROW_Q_ROW) - tl.load(r0 + ROW_DIAG) + pos_start  # new row of item key 0
        own = diag - pos_start
        writer = row_ok & (own >= 0) & (own < kv_len) & (heads % GROUP == 0)
        addr = _addresses(table, kv_addr, pos_start, own, writer, PAGED, PAGE_SIZE)
        w_mask = writer[:, None] & dmask[None, :]
        src = q_rows.to(tl.int64)[:, None]
        tl.store(K_pool + addr[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                 tl.load(K_new + src * stride_nt + kv_head * stride_nh + dims[None, :], mask=w_mask), mask=w_mask)
        tl.store(V_pool + addr[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                 tl.load(V_new + src * stride_vnt + kv_head * stride_vnh + dims[None, :], mask=w_mask), mask=w_mask)
    m_i, l_i, acc = _attend(q, K, V, table, kv_head, kv_addr, pos_start, kv_len, low, limit, diag, slope, row_ok,
                            qk_scale, cap, stride_kt, stride_kh, stride_vt, stride_vh, K_new, V_new, KN_tma, VN_tma,
                            stride_nt, stride_nh, stride_vnt, stride_vnh, new_j, row0, DIM, HEAD_DIM, BLOCK_M, BLOCK_N,
                            PAGED, PAGE_SIZE, DOT_F32, USE_TMA, False, WINDOW, SOFTCAP, ALIBI, FRESH, NEW_TMA)
    if any_nonfinite(acc, l_i, row_ok):  # rare: the isolating re-run (see the module's docstring)
        m_i, l_i, acc = _attend(q, K, V, table, kv_head, kv_addr, pos_start, kv_len, low, limit, diag, slope, row_ok,
                                qk_scale, cap, stride_kt, stride_kh, stride_vt, stride_vh, K_new, V_new, KN_tma, VN_tma,
                                stride_nt, stride_nh, stride_vnt, stride_vnh, new_j, row0, DIM, HEAD_DIM, BLOCK_M,
                                BLOCK_N, PAGED, PAGE_SIZE, DOT_F32, USE_TMA, True, WINDOW, SOFTCAP, ALIBI, FRESH,
                                NEW_TMA)

    empty = l_i == 0  # a slot that saw no key (a NaN sum stays NaN, and so does its log-sum-exp)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_offs = q_rows.to(tl.int64) * stride_ot + heads * stride_oh
    direct = row_ok & (part_count == 1)
    o_mask = dmask[None, :]
    tl.store(Out + o_offs[:, None] + dims[None, :], out.to(Out.dtype.element_ty), mask=direct[:, None] & o_mask)
    lse_offs = heads.to(tl.int64) * stride_lh + q_rows
    if RETURN_LSE:
        tl.store(LSE + lse_offs, log_sum_exp(m_i, l_i), mask=direct)
    if partial_base >= 0:  # some rows of this item are split over several items
        split = row_ok & (part_count > 1)
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        part = (partial_base + slot_row).to(tl.int64) * NUM_HEADS + heads
        tl.store(LSE_part + part, lse, mask=split)
        tl.store(O_part + part[:, None] * HEAD_DIM + dims[None, :], out, mask=split[:, None])
        tl.debug_barrier()  # every thread's partial stores precede the counter increments below
        counter = counters + plan_rows.to(tl.int64) * NUM_HEADS + heads
        arrived = tl.atomic_add(counter, 1, mask=split, sem="acq_rel", scope="gpu")
        last = split & (arrived == part_count - 1)
        tl.debug_barrier()
        if tl.max(last.to(tl.int32), 0) > 0:  # this program finished last for some rows: it merges them
            part_first = tl.load(r + ROW_PART_FIRST, mask=last, other=0)
            merged, m_all, total = _merge(O_part, LSE_part, merge_idx, part_first, part_count, heads, last,
                                          NUM_HEADS, HEAD_DIM, BLOCK_M)
            tl.store(Out + o_offs[:, None] + dims[None, :], merged.to(Out.dtype.element_ty),
                     mask=last[:, None] & o_mask)
            if RETURN_LSE:
                tl.store(LSE + lse_offs, log_sum_exp(m_all, total), mask=last)
            tl.store(counter, 0, mask=last)  # ready for the next launch (the next layer)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: CachePlan | None,
           softmax_scale: float, use_tma: bool | None = None, buffers: PlanBuffers | None = None,
           grid_items: int | None = None, options: ScoreOptions = NO_OPTIONS,
           lse: torch.Tensor | None = None, k_new: torch.Tensor | None = None,
           v_new: torch.Tensor | None = None) -> None:
    """Run the plan's items over q and the cache pools k/v [tokens, Hkv, D] into out (like q), one launch.
    Without `buffers` the launch covers exactly the plan's items, from arrays copied once per plan; with them
    it covers `grid_items` items (default: their capacity; every plan loaded must have at most that many) and
    reads only them (whatever plan was last loaded, or none: every program returns), so it can be captured in a
    CUDA graph and replayed with any later plan loaded (plan may then be None). Programs past the loaded plan's
    items return at once, but are launched: size grid_items to the iterations the graph serves.
    options: soft cap, ALiBi (the window is the plan's); lse: fp32 [heads, rows of q] receives each row's
    natural-log softmax normaliser. k_new / v_new [rows of q, Hkv, D]: the rows' own K/V, which the launch also
    stores in the cache at each row's position, reading them from k_new / v_new meanwhile (the plan must have
    writes_new; the caller checks it). The launch is bound (launch.Bound): every layer reuses it."""
    spec: CachePlan | PlanBuffers
    if buffers is None:
        if plan is None:
            raise ValueError("a launch without buffers needs the plan")
        spec, holder = plan, plan._device_cache
    else:
        spec, holder = buffers, buffers.launches
        grid_items = min(grid_items or buffers.max_items, buffers.max_items)
    use_tma = tma_loads(use_tma, q, k, v, spec.layout)
    slopes, *slope_strides = options.slopes(out)
    k_pool, v_pool = k, v
    new_strides = None
    if k_new is None or v_new is None:  # (never read: FRESH is off)
        k_new, v_new = k, v
        new_tma = False
    else:
        new_strides = (*k_new.stride()[:2], *v_new.stride()[:2])
        new_tma = use_tma and all(_tma_rows(t) for t in (k_new, v_new))
    key = ("launch", q.device, q.dtype, q.shape[1:], k.shape[1:], q.stride(), k.stride(), v.stride(), out.stride(),
           softmax_scale, use_tma, grid_items, options.key(), None if lse is None else lse.stride(), new_strides,
           new_tma)
    bound = holder.get(key)
    if bound is None:
        bound = holder[key] = _bind(q, k, v, out, spec, softmax_scale, use_tma, buffers, grid_items, options, lse,
                                    slope_strides, new_strides, new_tma)
    kn_tma, vn_tma = k_new, v_new  # (never read without NEW_TMA)
    if use_tma:
        k, v = (_descriptor(t, spec.block_n) for t in (k, v))
    if new_tma:
        kn_tma, vn_tma = (_descriptor(t, spec.block_n) for t in (k_new, v_new))
    bound(q, k, v, out, out if lse is None else lse, slopes, k_new, v_new, k_pool, v_pool, kn_tma, vn_tma)


def _descriptor(t: torch.Tensor, block_n: int) -> TensorDescriptor:
    """A TMA descriptor over [tokens, heads, dim] as [tokens, heads x dim], in blocks of block_n tokens x dim."""
    return TensorDescriptor.from_tensor(t.view(t.shape[0], -1), block_shape=[block_n, t.shape[2]])


def _tma_rows(t: torch.Tensor) -> bool:
    """Whether TMA can read t [tokens, heads, dim] as [tokens, heads x dim]: heads and dims packed, 16-byte
    aligned start and token stride."""
    size = t.element_size()
    return (t.stride(2) == 1 and t.stride(1) == t.shape[2] and t.data_ptr() % 16 == 0
            and t.stride(0) * size % 16 == 0)


def tma_loads(use_tma: bool | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> bool:
    """Whether a launch asked for use_tma (None: the default, on from Hopper unless PACKINFER_NO_TMA=1) loads K/V
    blocks through TMA: only from the grouped layout's contiguous pools at a power-of-two head dim."""
    # on the H200's serving batches TMA loads were 1-9% faster than pointer loads at 16 and 128 slots
    # (results/serving-tune/h200); an older kernel's H100 decode sweep had found them slower
    if use_tma is None:
        use_tma = tma_available(q.device) and os.environ.get("PACKINFER_NO_TMA") != "1"
    return (bool(use_tma) and layout != "paged" and k.is_contiguous() and v.is_contiguous()
            and q.shape[2] == head_dim_padded(q.shape[2]))


def plan_arrays(plan: CachePlan, device: torch.device, head_dim: int) -> dict[str, torch.Tensor]:
    """The plan's device tensors for an exact-size launch (copied once per plan and device): header, items, rows,
    merge_idx, block_table, partial outputs (head dims padded as the kernel has them) / log-sum-exps, counters."""
    key = ("arrays", str(device), head_dim)
    cache = plan._device_cache
    if key not in cache:
        def dev(a) -> torch.Tensor:
            return upload(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)), device)

        table = plan.block_table if plan.block_table is not None and plan.layout == "paged" else np.zeros((1, 1))
        cache[key] = {
            "header": dev(np.array([plan.num_items])), "items": dev(plan.items), "rows": dev(plan.rows),
            "merge_idx": dev(plan.merge_idx if len(plan.merge_idx) else np.zeros(1)), "block_table": dev(table),
            "o_part": torch.empty(max(plan.num_partials, 1), plan.num_heads, head_dim_padded(head_dim),
                                  dtype=torch.float32, device=device),
            "lse_part": torch.empty(max(plan.num_partials, 1), plan.num_heads, dtype=torch.float32, device=device),
            "counters": torch.zeros(max(plan.num_rows, 1) * plan.num_heads, dtype=torch.int32, device=device)}
    return cache[key]


def _bind(q, k, v, out, spec: CachePlan | PlanBuffers, softmax_scale: float, use_tma: bool,
          buffers: PlanBuffers | None, grid_items: int | None, options: ScoreOptions, lse: torch.Tensor | None,
          slope_strides: list[int], new_strides: tuple[int, ...] | None, new_tma: bool) -> Bound:
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    if buffers is None:
        assert isinstance(spec, CachePlan)  # launch passes the plan itself when there are no buffers
        a = plan_arrays(spec, q.device, dim)
        capacity = spec.num_items
        windowed = spec.window[0] >= 0
    else:
        a = {name: getattr(buffers, name) for name in ("header", "items", "rows", "merge_idx", "block_table",
                                                     "o_part", "lse_part", "counters")}
        capacity = buffers.max_items if grid_items is None else grid_items  # launch sets grid_items with buffers
        windowed = False  # PlanBuffers refuse windowed plans
    slots, block_n, pack_gqa, num_warps, num_stages = spec.tile
    table = a["block_table"]
    grid = (max(capacity, 1) * (kv_heads if pack_gqa else heads),)
    qk_scale, cap = options.scales(softmax_scale)
    return Bound(_cache_attention, grid, (
        a["o_part"], a["lse_part"], a["counters"], a["header"], a["items"], a["rows"], a["merge_idx"], table,
        qk_scale, cap, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), table.stride(0), 0 if lse is None else lse.stride(0), *slope_strides,
        *(new_strides or (0, 0, 0, 0))),
        {"NUM_HEADS": heads, "GROUP": heads // kv_heads, "PACK_GQA": pack_gqa, "DIM": dim,
         "HEAD_DIM": head_dim_padded(dim), "BLOCK_M": slots, "BLOCK_N": block_n, "PAGED": spec.layout == "paged",
         "PAGE_SIZE": max(spec.page_size, 1), "DOT_F32": interpreter_needs_f32_dot(q.dtype), "USE_TMA": use_tma,
         "WINDOW": windowed, "SOFTCAP": softcap_mode(options.softcap), "ALIBI": options.alibi_slopes is not None,
         "RETURN_LSE": lse is not None, "FRESH": new_strides is not None, "NEW_TMA": new_tma},
        {"num_warps": num_warps, "num_stages": num_stages})
