"""Decode/append attention over a KV cache (paged or grouped): split-KV partials, then an exact merge.

Partial kernel tiling: BLOCK_M query slots x BLOCK_N keys per step, HEAD_DIM whole, online softmax in base 2
with fp32 accumulators. A slot is one (query row, query head) pair of the item's row block:
  PACK_GQA on:  program id // NUM_KV_HEADS is the item, % NUM_KV_HEADS the KV head; slot m is plan row
                row_first + m // GROUP of query head kv_head * GROUP + m % GROUP (all heads that read the KV
                head share every K/V load).
  PACK_GQA off: program id // NUM_HEADS is the item, % NUM_HEADS the query head; slot m is plan row row_first + m.
An item (a row of CachePlan.items, columns ITEM_FIELDS) reads positions [pos_start, pos_start + kv_len): at pool
address kv_addr + j (grouped, contiguous: TMA loads on Hopper) or through the block table row table_row (paged).
It writes, per slot, the normalised partial output and its base-2 log-sum-exp to partial row
partial_base + m // GROUP (m with PACK_GQA off).
Merge kernel: program id 0 is a plan row, id 1 a query head; it combines the row's partials MERGE_BLOCK_P at a
time (only partials of items holding that row).
Isolation: an item reads one request's positions (or a shared prefix all its rows see), pointer loads past the
item are masked and TMA blocks past it have their V zeroed (unwritten pool space may hold NaN bits), so only
positions past a row's causal limit can be masked in a block. As in the packed kernel, a program whose result
holds a NaN/inf is computed again with the masked blocks cleaned (SAFE steps): a row's partial depends only on
the positions it sees, and no other bit changes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from packinfer.cache_plan import ITEM_FIELDS, CachePlan
from packinfer.launch import Bound
from packinfer.triton_common import (LOG2E, any_nonfinite, field_offset, interpreter_needs_f32_dot,
                                     online_softmax_step, program_slots)

MERGE_BLOCK_P = 16
ITEM_WIDTH = tl.constexpr(len(ITEM_FIELDS))
ITEM_ROW_FIRST = field_offset(ITEM_FIELDS, "row_first")
ITEM_NUM_ROWS = field_offset(ITEM_FIELDS, "num_rows")
ITEM_KV_ADDR = field_offset(ITEM_FIELDS, "kv_addr")
ITEM_POS_START = field_offset(ITEM_FIELDS, "pos_start")
ITEM_KV_LEN = field_offset(ITEM_FIELDS, "kv_len")
ITEM_TABLE_ROW = field_offset(ITEM_FIELDS, "table_row")
ITEM_PARTIAL_BASE = field_offset(ITEM_FIELDS, "partial_base")


@triton.jit
def _addresses(table, kv_addr, pos_start, j, in_range, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Pool addresses (int64) of item keys j: through the block table (paged) or contiguous (grouped)."""
    if PAGED:
        pos = pos_start + j
        page = tl.load(table + pos // PAGE_SIZE, mask=in_range, other=0)
        return page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
    return (kv_addr + j).to(tl.int64)


@triton.jit
def _attend(q, K, V, table, kv_head, kv_addr, pos_start, kv_len, limit, qk_scale, stride_kt, stride_kh, stride_vt,
            stride_vh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
            PAGE_SIZE: tl.constexpr, DOT_F32: tl.constexpr, USE_TMA: tl.constexpr, SAFE: tl.constexpr):
    """The item's slots over its kv_len positions (slot m sees j <= limit[m]). Returns (max, sum, acc)."""
    dims = tl.arange(0, HEAD_DIM)
    # keys [0, nomask_end) are visible to every slot: whole blocks, no mask
    nomask_end = tl.minimum(tl.maximum(tl.min(limit, 0) + 1, 0), kv_len) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    if not USE_TMA:
        k_base = K + kv_head * stride_kh + dims[None, :]
        v_base = V + kv_head * stride_vh + dims[None, :]

    for start in range(0, nomask_end, BLOCK_N):
        j = start + cols
        if USE_TMA:
            k = K.load([kv_addr + start, kv_head * HEAD_DIM])
            v = V.load([kv_addr + start, kv_head * HEAD_DIM])
        else:
            addr = _addresses(table, kv_addr, pos_start, j, j < kv_len, PAGED, PAGE_SIZE)
            k = tl.load(k_base + addr[:, None] * stride_kt)
            v = tl.load(v_base + addr[:, None] * stride_vt)
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, 0, False, False, DOT_F32)
    for start in range(nomask_end, kv_len, BLOCK_N):
        j = start + cols
        in_range = j < kv_len
        if USE_TMA:  # keys past the item are other data (or zeros past the pool), masked like the rest
            k = K.load([kv_addr + start, kv_head * HEAD_DIM])
            # unwritten pool space may hold NaN bits, and a masked key's weight 0 times NaN is NaN
            v = tl.where(in_range[:, None], V.load([kv_addr + start, kv_head * HEAD_DIM]), 0.0)
        else:
            addr = _addresses(table, kv_addr, pos_start, j, in_range, PAGED, PAGE_SIZE)
            k = tl.load(k_base + addr[:, None] * stride_kt, mask=in_range[:, None], other=0.0)
            v = tl.load(v_base + addr[:, None] * stride_vt, mask=in_range[:, None], other=0.0)
        valid = in_range[None, :] & (j[None, :] <= limit[:, None])
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, valid, True, SAFE, DOT_F32)
    return m_i, l_i, acc


@triton.jit
def _cache_attention_partial(
    Q, K, V, O_part, LSE_part, items, row_perm, row_limit, block_table, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_table,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, PACK_GQA: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DOT_F32: tl.constexpr, USE_TMA: tl.constexpr,
):
    item, kv_head, slot_row, heads = program_slots(tl.program_id(0), NUM_HEADS, GROUP, PACK_GQA, BLOCK_M)
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
    q_rows = tl.load(row_perm + plan_rows, mask=row_ok, other=0)
    limit = tl.load(row_limit + plan_rows, mask=row_ok, other=2147483647) - pos_start  # last key j each slot sees
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + (q_rows.to(tl.int64) * stride_qt + heads * stride_qh)[:, None] + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    table = block_table + table_row.to(tl.int64) * stride_table
    m_i, l_i, acc = _attend(q, K, V, table, kv_head, kv_addr, pos_start, kv_len, limit, qk_scale, stride_kt,
                            stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK_M, BLOCK_N, PAGED, PAGE_SIZE, DOT_F32,
                            USE_TMA, False)
    if any_nonfinite(acc, l_i, row_ok):  # rare: the isolating re-run (see the module's docstring)
        m_i, l_i, acc = _attend(q, K, V, table, kv_head, kv_addr, pos_start, kv_len, limit, qk_scale, stride_kt,
                                stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK_M, BLOCK_N, PAGED, PAGE_SIZE,
                                DOT_F32, USE_TMA, True)

    empty = l_i == 0  # a slot that saw no key (a NaN sum stays NaN, and so does its log-sum-exp)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    part = (partial_base + slot_row).to(tl.int64) * NUM_HEADS + heads
    tl.store(LSE_part + part, lse, mask=row_ok)
    tl.store(O_part + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None])


@triton.jit
def _merge_partials(Out, O_part, LSE_part, merge_ptr, merge_idx, row_perm, stride_ot, stride_oh,
                    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    first = tl.load(merge_ptr + row)
    last = tl.load(merge_ptr + row + 1)
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(first, last, BLOCK_P):  # BLOCK_P partials at once: their loads are independent
        idx = start + tl.arange(0, BLOCK_P)
        ok = idx < last
        part = tl.load(merge_idx + idx, mask=ok, other=0).to(tl.int64) * NUM_HEADS + head
        lse = tl.load(LSE_part + part, mask=ok, other=float("-inf"))
        o = tl.load(O_part + part[:, None] * HEAD_DIM + dims[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)
    q_row = tl.load(row_perm + row).to(tl.int64)
    tl.store(Out + q_row * stride_ot + head * stride_oh + dims, out.to(Out.dtype.element_ty))


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: CachePlan,
           softmax_scale: float, use_tma: bool | None = None) -> None:
    """Run the plan's items over q and the cache pools k/v [tokens, Hkv, D], then merge into out (like q).
    The two launches are bound to the plan (launch.Bound): every layer of a step reuses them."""
    paged = plan.layout == "paged"
    # TMA loads were 0-40% slower than pointer loads on every decode mix of the H100 tuning sweep
    # (results/decode-kernel/h100-tune), so they are opt-in here, unlike prefill
    use_tma = bool(use_tma) and not paged and k.is_contiguous() and v.is_contiguous()
    key = ("launch", q.device, q.dtype, q.shape[1:], k.shape[1:], q.stride(), k.stride(), v.stride(), out.stride(),
           softmax_scale, use_tma)
    bound = plan._device_cache.get(key)
    if bound is None:
        bound = plan._device_cache[key] = _bind(q, k, v, out, plan, softmax_scale, use_tma)
    partial, merge = bound
    if use_tma:
        dim = q.shape[2]
        k, v = (TensorDescriptor.from_tensor(t.view(t.shape[0], -1), block_shape=[plan.block_n, dim]) for t in (k, v))
    partial(q, k, v)
    merge(out)


def _bind(q, k, v, out, plan: CachePlan, softmax_scale: float, use_tma: bool) -> tuple[Bound, Bound]:
    items, row_perm, row_limit, merge_ptr, merge_idx, table = plan.device_arrays(q.device)
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    o_part, lse_part = plan.partial_buffers(q.device, heads, dim)
    grid = (plan.num_items * (kv_heads if plan.pack_gqa else heads),)
    partial = Bound(_cache_attention_partial, grid, (
        o_part, lse_part, items, row_perm, row_limit, table, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), table.stride(0)),
        {"NUM_HEADS": heads, "GROUP": heads // kv_heads, "PACK_GQA": plan.pack_gqa, "HEAD_DIM": dim,
         "BLOCK_M": plan.slots, "BLOCK_N": plan.block_n, "PAGED": plan.layout == "paged",
         "PAGE_SIZE": max(plan.page_size, 1), "DOT_F32": interpreter_needs_f32_dot(q.dtype), "USE_TMA": use_tma},
        {"num_warps": plan.num_warps, "num_stages": plan.num_stages})
    merge = Bound(_merge_partials, (len(plan.row_perm), heads), (
        o_part, lse_part, merge_ptr, merge_idx, row_perm, out.stride(0), out.stride(1)),
        {"NUM_HEADS": heads, "HEAD_DIM": dim, "BLOCK_P": MERGE_BLOCK_P}, {"num_warps": 1})
    return partial, merge
