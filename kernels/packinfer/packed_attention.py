"""Packed varlen attention forward: one launch walks a Plan's tile list.

Tiling: BLOCK_M query slots of one tile (possibly several requests, masked block-diagonally) x BLOCK_N keys per
step, HEAD_DIM whole; online softmax in base 2 with fp32 accumulators, exactly FlashAttention's algorithm.
A slot is one (query row, query head) pair:
  PACK_GQA off: program id // NUM_HEADS is the tile, % NUM_HEADS the query head; slot m is row row_start + m.
  PACK_GQA on:  program id // NUM_KV_HEADS is the tile, % NUM_KV_HEADS the KV head; slot m is row
                row_start + m // GROUP of query head kv_head * GROUP + m % GROUP, so the GROUP query heads that
                read one KV head share every K/V load (a tile then holds BLOCK_M // GROUP rows).
Tiles run in the plan's launch order, the heads of a tile side by side; a tile finds its rows from its run
(ROWS = rows per tile; the run's columns are RUN_FIELDS) and its key range from cu_seqlens. Each slot's key
interval [lo, hi] (its request's keys, cut at the bottom-right causal limit) is built once per tile; key blocks
inside [k_start, k_nomask_end) are valid for every slot and skip the mask.
Isolation: a masked key gets weight 0, and 0 x NaN/inf is NaN, so a NaN/inf value of another request in a packed
tile's key blocks (or past k_end, TMA loads) could reach a slot that never sees it. Rather than clean every
masked block, a tile whose result holds a NaN/inf (never, for finite inputs) is computed again with the masked
blocks cleaned (online_softmax_step's SAFE): the same arithmetic, so every other row's output keeps each bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from packinfer.launch import Bound
from packinfer.plan import RUN_FIELDS, Plan
from packinfer.triton_common import (LOG2E, any_nonfinite, field_offset, interpreter_needs_f32_dot,
                                     online_softmax_step, program_slots, tma_available)

RUN_WIDTH = tl.constexpr(len(RUN_FIELDS))
RUN_ROW_START = field_offset(RUN_FIELDS, "row_start")
RUN_ROW_END = field_offset(RUN_FIELDS, "row_end")
RUN_SEQ_FIRST = field_offset(RUN_FIELDS, "seq_first")
RUN_SEQ_LAST = field_offset(RUN_FIELDS, "seq_last")
RUN_FIRST_TILE = field_offset(RUN_FIELDS, "first_tile")


@triton.jit
def _attend(q, K, V, kv_head, k_start, k_nomask_end, k_end, lo, hi, qk_scale, stride_kt, stride_kh, stride_vt,
            stride_vh, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
            USE_TMA: tl.constexpr, SAFE: tl.constexpr):
    """The tile's slots over its key range: unmasked blocks, then masked ones. Returns (max, sum, acc)."""
    dims = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    if not USE_TMA:
        k_base = K + kv_head * stride_kh + dims[None, :]
        v_base = V + kv_head * stride_vh + dims[None, :]  # token offsets are int64: tokens * stride can pass 2**31

    for start in range(k_start, k_nomask_end, BLOCK_N):  # keys of one request that every slot sees
        if USE_TMA:
            k = K.load([start, kv_head * HEAD_DIM])
            v = V.load([start, kv_head * HEAD_DIM])
        else:
            keys = start + cols
            k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kt)
            v = tl.load(v_base + keys.to(tl.int64)[:, None] * stride_vt)
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, 0, False, False, DOT_F32)

    for start in range(k_nomask_end, k_end, BLOCK_N):
        keys = start + cols
        if USE_TMA:  # keys past k_end are real (or zero-filled) data, masked below like the rest
            k = K.load([start, kv_head * HEAD_DIM])
            v = V.load([start, kv_head * HEAD_DIM])
        else:
            in_range = keys < k_end
            k = tl.load(k_base + keys.to(tl.int64)[:, None] * stride_kt, mask=in_range[:, None], other=0.0)
            v = tl.load(v_base + keys.to(tl.int64)[:, None] * stride_vt, mask=in_range[:, None], other=0.0)
        valid = (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, valid, True, SAFE, DOT_F32)
    return m_i, l_i, acc


@triton.jit
def _packed_attention_fwd(
    Q, K, V, O, runs, tile_run, cu_q, cu_k, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, PACK_GQA: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    DOT_F32: tl.constexpr, USE_TMA: tl.constexpr,
):
    tile, kv_head, slot_row, heads = program_slots(tl.program_id(0), NUM_HEADS, GROUP, PACK_GQA, BLOCK_M)
    run = tl.load(tile_run + tile)
    r = runs + run * RUN_WIDTH
    run_start = tl.load(r + RUN_ROW_START)
    run_end = tl.load(r + RUN_ROW_END)
    seq_first = tl.load(r + RUN_SEQ_FIRST)
    seq_last = tl.load(r + RUN_SEQ_LAST)
    row_end = run_end - (tile - tl.load(r + RUN_FIRST_TILE)) * ROWS  # a run's tiles launch from its last rows
    row_start = tl.maximum(run_start, row_end - ROWS)
    k_start = tl.load(cu_k + seq_first)
    if CAUSAL:  # bottom-right: the last row of request s sees keys < cu_k[s+1] - cu_q[s+1] + row + 1
        k_end = tl.load(cu_k + seq_last + 1) - tl.load(cu_q + seq_last + 1) + row_end
        first_hi = tl.load(cu_k + seq_first + 1) - tl.load(cu_q + seq_first + 1) + row_start
    else:
        k_end = tl.load(cu_k + seq_last + 1)
        first_hi = tl.load(cu_k + seq_first + 1) - 1
    k_nomask_end = k_start
    if seq_first == seq_last:  # every row shares the keys up to the first row's limit
        k_nomask_end = tl.minimum(k_start + tl.maximum(first_hi + 1 - k_start, 0) // BLOCK_N * BLOCK_N, k_end)

    rows = row_start + slot_row
    row_ok = rows < row_end
    lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    hi = tl.full([BLOCK_M], -1, dtype=tl.int32)
    for s in range(seq_first, seq_last + 1):
        q_begin = tl.load(cu_q + s)
        q_stop = tl.load(cu_q + s + 1)
        k_begin = tl.load(cu_k + s)
        k_stop = tl.load(cu_k + s + 1)
        mine = (rows >= q_begin) & (rows < q_stop)
        if CAUSAL:
            row_hi = k_stop - q_stop + rows
        else:
            row_hi = tl.zeros([BLOCK_M], dtype=tl.int32) + (k_stop - 1)
        lo = tl.where(mine, k_begin, lo)
        hi = tl.where(mine, row_hi, hi)

    dims = tl.arange(0, HEAD_DIM)
    q_offs = rows.to(tl.int64) * stride_qt + heads * stride_qh
    q = tl.load(Q + q_offs[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i, l_i, acc = _attend(q, K, V, kv_head, k_start, k_nomask_end, k_end, lo, hi, qk_scale, stride_kt, stride_kh,
                            stride_vt, stride_vh, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_F32, USE_TMA, False)
    if any_nonfinite(acc, l_i, row_ok):  # rare: the isolating re-run (see the module's docstring)
        m_i, l_i, acc = _attend(q, K, V, kv_head, k_start, k_nomask_end, k_end, lo, hi, qk_scale, stride_kt,
                                stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_F32, USE_TMA, True)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with no key at all (kv_len 0) writes zeros
    o_offs = rows.to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(O + o_offs[:, None] + dims[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: Plan, softmax_scale: float,
           use_tma: bool | None = None) -> None:
    """Run the plan's tiles over q/k/v into out (all already validated and laid out [tokens, heads, dim]).
    use_tma: load K/V tiles with the Hopper tensor-memory accelerator (None: where the GPU has one).
    The launch is bound to the plan (launch.Bound): every layer of a batch reuses it."""
    if plan.num_tiles == 0:
        return
    kv_heads, dim = k.shape[1], q.shape[2]
    if use_tma is None:
        use_tma = tma_available(q.device) and os.environ.get("PACKINFER_NO_TMA") != "1"
    if use_tma and (k.stride() != (kv_heads * dim, dim, 1) or v.stride() != k.stride()):
        k, v = k.contiguous(), v.contiguous()
    key = ("launch", q.device, q.dtype, q.shape[1:], k.shape[1:], q.stride(), k.stride(), v.stride(), out.stride(),
           softmax_scale, use_tma)
    bound = plan._device_cache.get(key)
    if bound is None:
        bound = plan._device_cache[key] = _bind(q, k, v, out, plan, softmax_scale, use_tma)
    if use_tma:
        k, v = (TensorDescriptor.from_tensor(t.view(t.shape[0], kv_heads * dim), block_shape=[plan.block_n, dim])
                for t in (k, v))
    bound(q, k, v, out)


def _bind(q, k, v, out, plan: Plan, softmax_scale: float, use_tma: bool) -> Bound:
    runs, tile_run, cu_q, cu_k = plan.device_arrays(q.device)
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    group = heads // kv_heads
    return Bound(_packed_attention_fwd, (plan.num_tiles * (kv_heads if plan.pack_gqa else heads),), (
        runs, tile_run, cu_q, cu_k, softmax_scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1)),
        {"NUM_HEADS": heads, "GROUP": group, "PACK_GQA": plan.pack_gqa, "CAUSAL": plan.causal, "HEAD_DIM": dim,
         "BLOCK_M": plan.block_m * (group if plan.pack_gqa else 1), "BLOCK_N": plan.block_n, "ROWS": plan.block_m,
         "DOT_F32": interpreter_needs_f32_dot(q.dtype), "USE_TMA": use_tma},
        {"num_warps": plan.num_warps, "num_stages": plan.num_stages})
