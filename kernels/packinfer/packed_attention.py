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

from packinfer import hopper_attention
from packinfer.launch import Bound
from packinfer.plan import RUN_FIELDS, Plan
from packinfer.scoring import NO_OPTIONS, ScoreOptions, window_bounds
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

RUN_WIDTH = tl.constexpr(len(RUN_FIELDS))
RUN_ROW_START = field_offset(RUN_FIELDS, "row_start")
RUN_ROW_END = field_offset(RUN_FIELDS, "row_end")
RUN_SEQ_FIRST = field_offset(RUN_FIELDS, "seq_first")
RUN_SEQ_LAST = field_offset(RUN_FIELDS, "seq_last")
RUN_FIRST_TILE = field_offset(RUN_FIELDS, "first_tile")


@triton.jit
def _load_kv(K, V, k_base, v_base, start, keys, kv_head, k_end, dmask, stride_kt, stride_vt, HEAD_DIM: tl.constexpr,
             MASK_KEYS: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr):
    """The block of K and V at keys (= start + 0..BLOCK_N-1): through TMA descriptors (past k_end: real or
    zero-filled data, masked later), or pointer loads masked to keys < k_end (MASK_KEYS) and to the real head
    dims (unless EVEN_D)."""
    if USE_TMA:  # (one return at the end: the compiler generates every branch of a constexpr if-return)
        k = K.load([start, kv_head * HEAD_DIM])
        v = V.load([start, kv_head * HEAD_DIM])
    else:
        k, v = load_kv(k_base + keys.to(tl.int64)[:, None] * stride_kt, v_base + keys.to(tl.int64)[:, None] * stride_vt,
                       keys < k_end, dmask, MASK_KEYS, EVEN_D)
    return k, v


@triton.jit
def _attend(q, K, V, kv_head, first, mask_end, nomask_end, k_end, lo, hi, diag, slope, qk_scale, cap, stride_kt,
            stride_kh, stride_vt, stride_vh, DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, USE_TMA: tl.constexpr, SAFE: tl.constexpr,
            SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """The tile's slots over its key range: masked blocks [first, mask_end) (a window's left edge), unmasked
    blocks [mask_end, nomask_end) every slot sees whole, masked blocks [nomask_end, k_end). Returns (max, sum, acc)."""
    dims = tl.arange(0, HEAD_DIM)
    dmask = dims < DIM
    EVEN_D: tl.constexpr = DIM == HEAD_DIM
    # the isolating re-run's masked loops are not pipelined: they reduce V per key and pass the cleaned V block
    # through registers, and pipelined they raised the kernel's peak shared memory by 48 bytes, enough to keep two
    # 64-slot, 3-stage programs off one Hopper SM (tests/test_kernel_resources.py)
    SAFE_STAGES: tl.constexpr = 1 if SAFE else None
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    cols = tl.arange(0, BLOCK_N)
    if USE_TMA:
        k_base = 0
        v_base = 0
    else:  # token offsets are int64: tokens * stride can pass 2**31
        k_base = K + kv_head * stride_kh + dims[None, :]
        v_base = V + kv_head * stride_vh + dims[None, :]

    # keys some slots have left behind (only with a window); SAFE_STAGES: see above
    for start in tl.range(first, mask_end, BLOCK_N, num_stages=SAFE_STAGES):
        keys = start + cols
        k, v = _load_kv(K, V, k_base, v_base, start, keys, kv_head, k_end, dmask, stride_kt, stride_vt, HEAD_DIM,
                        True, EVEN_D, USE_TMA)
        valid = (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, cap, keys, diag, slope, valid, True,
                                            SAFE, DOT_F32, SOFTCAP, ALIBI)
    for start in range(mask_end, nomask_end, BLOCK_N):  # keys every slot sees
        keys = start + cols
        k, v = _load_kv(K, V, k_base, v_base, start, keys, kv_head, k_end, dmask, stride_kt, stride_vt, HEAD_DIM,
                        False, EVEN_D, USE_TMA)
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, cap, keys, diag, slope, 0, False,
                                            False, DOT_F32, SOFTCAP, ALIBI)
    for start in tl.range(nomask_end, k_end, BLOCK_N, num_stages=SAFE_STAGES):
        keys = start + cols
        k, v = _load_kv(K, V, k_base, v_base, start, keys, kv_head, k_end, dmask, stride_kt, stride_vt, HEAD_DIM,
                        True, EVEN_D, USE_TMA)
        valid = (keys[None, :] >= lo[:, None]) & (keys[None, :] <= hi[:, None])
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, cap, keys, diag, slope, valid, True,
                                            SAFE, DOT_F32, SOFTCAP, ALIBI)
    return m_i, l_i, acc


@triton.jit
def _packed_attention_fwd(
    Q, K, V, Out, LSE, Slopes, runs, tile_run, cu_q, cu_k, qk_scale, cap, window_left, window_right,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh, stride_st,
    stride_sh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, PACK_GQA: tl.constexpr, CAUSAL: tl.constexpr,
    DIM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    DOT_F32: tl.constexpr, USE_TMA: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, RETURN_LSE: tl.constexpr,
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
    rows = row_start + slot_row
    row_ok = rows < row_end

    # each slot's visible keys [lo, hi] (hi < lo: none) and diagonal (the key index of its own position,
    # bottom-right aligned: the last row of request s sits at key cu_k[s+1] - 1)
    lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    hi = tl.full([BLOCK_M], -1, dtype=tl.int32)
    diag = tl.zeros([BLOCK_M], dtype=tl.int32)
    for s in range(seq_first, seq_last + 1):
        q_stop = tl.load(cu_q + s + 1)
        k_begin = tl.load(cu_k + s)
        k_stop = tl.load(cu_k + s + 1)
        mine = (rows >= tl.load(cu_q + s)) & (rows < q_stop)
        d = k_stop - q_stop + rows
        diag = tl.where(mine, d, diag)
        if WINDOW:  # window_left / window_right: keys before / after the diagonal (a huge value: unbounded)
            lo = tl.where(mine, tl.maximum(k_begin, d - window_left), lo)
            hi = tl.where(mine, tl.minimum(k_stop - 1, d + window_right), hi)
        elif CAUSAL:
            lo = tl.where(mine, k_begin, lo)
            hi = tl.where(mine, d, hi)
        else:
            lo = tl.where(mine, k_begin, lo)
            hi = tl.where(mine, k_stop - 1, hi)
    if WINDOW:
        first, mask_end, nomask_end, k_end = window_blocks(lo, hi, row_ok, BLOCK_N)
    else:
        k_start = tl.load(cu_k + seq_first)
        # the last key any slot sees (with q_len > kv_len a later request's rows may see fewer than earlier ones)
        k_end = tl.maximum(tl.max(tl.where(row_ok, hi, -1), 0) + 1, k_start)
        if CAUSAL:  # bottom-right: row i of request s sees keys < cu_k[s+1] - cu_q[s+1] + i + 1
            first_hi = tl.load(cu_k + seq_first + 1) - tl.load(cu_q + seq_first + 1) + row_start
        else:
            first_hi = tl.load(cu_k + seq_first + 1) - 1
        first = k_start
        mask_end = k_start
        nomask_end = k_start
        if seq_first == seq_last:  # every row shares the keys up to the first row's limit
            nomask_end = tl.minimum(k_start + tl.maximum(first_hi + 1 - k_start, 0) // BLOCK_N * BLOCK_N, k_end)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ALIBI:  # slopes [rows or 1, heads], pre-multiplied by log2 e
        slope = tl.load(Slopes + rows.to(tl.int64) * stride_st + heads * stride_sh, mask=row_ok, other=0.0)

    dims = tl.arange(0, HEAD_DIM)
    dmask = dims < DIM
    q_offs = rows.to(tl.int64) * stride_qt + heads * stride_qh
    q = tl.load(Q + q_offs[:, None] + dims[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i, l_i, acc = _attend(q, K, V, kv_head, first, mask_end, nomask_end, k_end, lo, hi, diag, slope, qk_scale,
                            cap, stride_kt, stride_kh, stride_vt, stride_vh, DIM, HEAD_DIM, BLOCK_M, BLOCK_N, DOT_F32,
                            USE_TMA, False, SOFTCAP, ALIBI)
    if any_nonfinite(acc, l_i, row_ok):  # rare: the isolating re-run (see the module's docstring)
        m_i, l_i, acc = _attend(q, K, V, kv_head, first, mask_end, nomask_end, k_end, lo, hi, diag, slope,
                                qk_scale, cap, stride_kt, stride_kh, stride_vt, stride_vh, DIM, HEAD_DIM, BLOCK_M,
                                BLOCK_N, DOT_F32, USE_TMA, True, SOFTCAP, ALIBI)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees no key writes zeros
    o_offs = rows.to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(Out + o_offs[:, None] + dims[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & dmask[None, :])
    if RETURN_LSE:  # [heads, rows], natural log (FlashAttention's softmax_lse)
        tl.store(LSE + heads.to(tl.int64) * stride_lh + rows, log_sum_exp(m_i, l_i), mask=row_ok)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: Plan, softmax_scale: float,
           use_tma: bool | None = None, options: ScoreOptions = NO_OPTIONS, lse: torch.Tensor | None = None) -> None:
    """Run the plan's tiles over q/k/v into out (all already validated and laid out [tokens, heads, dim]).
    use_tma: load K/V tiles with the Hopper tensor-memory accelerator (None: where the GPU has one; never for a
    head dim that is not a power of two). options: soft cap, ALiBi (the window is the plan's). lse: fp32
    [heads, tokens] receives the natural-log softmax normaliser of every row (+inf for a row that sees no key).
    A plan for the "gluon" engine runs Hopper's warp-specialized kernel (hopper_attention) where it can (not with
    use_tma=False, options or lse); elsewhere this kernel runs it.
    The launch is bound to the plan (launch.Bound): every layer of a batch reuses it."""
    if plan.num_tiles == 0:
        return
    if (plan.engine == "gluon" and use_tma is not False and options.softcap <= 0 and options.alibi_slopes is None
            and lse is None and hopper_attention.available(q.device) and hopper_attention.supports(plan, q)):
        hopper_attention.launch(q, k, v, out, plan, softmax_scale)
        return
    kv_heads, dim = k.shape[1], q.shape[2]
    if use_tma is None:
        use_tma = tma_available(q.device) and os.environ.get("PACKINFER_NO_TMA") != "1"
    use_tma = use_tma and dim == head_dim_padded(dim)
    if use_tma and (k.stride() != (kv_heads * dim, dim, 1) or v.stride() != k.stride()):
        k, v = k.contiguous(), v.contiguous()
    slopes, *slope_strides = options.slopes(out)
    key = ("launch", q.device, q.dtype, q.shape[1:], k.shape[1:], q.stride(), k.stride(), v.stride(), out.stride(),
           softmax_scale, use_tma, options.key(), lse is not None)
    bound = plan._device_cache.get(key)
    if bound is None:
        bound = plan._device_cache[key] = _bind(q, k, v, out, plan, softmax_scale, use_tma, options, lse,
                                                slope_strides)
    if use_tma:
        k, v = (TensorDescriptor.from_tensor(t.view(t.shape[0], kv_heads * dim), block_shape=[plan.block_n, dim])
                for t in (k, v))
    bound(q, k, v, out, out if lse is None else lse, slopes)


def _bind(q, k, v, out, plan: Plan, softmax_scale: float, use_tma: bool, options: ScoreOptions,
          lse: torch.Tensor | None, slope_strides: list[int]) -> Bound:
    runs, tile_run, cu_q, cu_k = plan.device_arrays(q.device)
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    group = heads // kv_heads
    qk_scale, cap = options.scales(softmax_scale)
    left, right = window_bounds(plan.window, plan.causal)
    return Bound(_packed_attention_fwd, (plan.num_tiles * (kv_heads if plan.pack_gqa else heads),), (
        runs, tile_run, cu_q, cu_k, qk_scale, cap, left, right,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        0 if lse is None else lse.stride(0), *slope_strides),
        {"NUM_HEADS": heads, "GROUP": group, "PACK_GQA": plan.pack_gqa, "CAUSAL": plan.causal, "DIM": dim,
         "HEAD_DIM": head_dim_padded(dim), "BLOCK_M": plan.block_m * (group if plan.pack_gqa else 1),
         "BLOCK_N": plan.block_n, "ROWS": plan.block_m, "DOT_F32": interpreter_needs_f32_dot(q.dtype),
         "USE_TMA": use_tma, "WINDOW": plan.window != (-1, -1), "SOFTCAP": softcap_mode(options.softcap),
         "ALIBI": options.alibi_slopes is not None, "RETURN_LSE": lse is not None},
        {"num_warps": plan.num_warps, "num_stages": plan.num_stages})
