"""Packed varlen attention forward for Hopper: a warp-specialized, persistent Gluon kernel (FlashAttention-3's
design) over the same Plan as the Triton kernel (packed_attention.py), for the common case: head dim 64 or 128,
bf16/fp16, causal or not, no window, soft cap, ALiBi or log-sum-exp output (those go to the Triton kernel).

Tiling: a tile is the plan's 128 query slots (slot = one (query row, query head) pair, laid out as in
packed_attention: with PACK_GQA slot m is row m // GROUP of query head kv_head * GROUP + m % GROUP), split
between two consumer warpgroups of 64 slots each; keys go in steps of BLOCK_N = 128 through a STAGES-deep ring
of K and V blocks that TMA fills.
Program id: persistent, one program per SM (grid = min(work items, SMs)); program p takes work items p,
2P - 1 - p, 2P + p, ... (snake order over the plan's heaviest-first list), a work item being (tile, KV head)
with PACK_GQA, else (tile, query head).
Partitions: the loader (a warpgroup, few registers) issues the TMA loads and cleans V blocks (below); consumer c
(c = 0: the default partition, c = 1: a worker) computes S = Q K^T and O += P V with wgmma, issuing a block's
Q K^T together with the previous block's P V, whose product then runs under this block's softmax (FA3's
intra-warpgroup overlap), and loads its next tile's query rows under its last product. Both consumers read every
K/V block; a stage is free again when both have released it. TUNING["pingpong"] makes the consumers take turns
to issue their products (FA3's inter-warpgroup overlap), TUNING["stages"] sets the ring's depth, TUNING["regs"]
the (consumer, loader) register split, TUNING["wide_store"] writes the output through shared memory in 16-byte
stores and TUNING["rescale_under_qk"] issues a block's Q K^T before rescaling O and converting P (FA3's
order: both then run under that product, P's conversion under the previous P V): ablation knobs, measured in
results/prefill-hopper/NOTES.md.
Isolation: a masked key gets weight 0, but 0 x NaN is NaN, so another request's NaN/inf value in a key block
would reach slots that never see it. The loader cleans every block that may hold another request's keys (all
blocks of a packed tile, and a block that runs past the end of its request's keys) before the consumers read
it: non-finite V elements become 0 and the block's flags mark those keys; a slot that does see a flagged key
scores it NaN, as the reference would give. Other blocks hold only the tile's own request's keys, as in the
reference (where a NaN value also reaches that request's earlier rows). With finite inputs cleaning changes
nothing.
"""

from __future__ import annotations

import functools

import torch

from packinfer.plan import RUN_FIELDS, Plan

try:  # Gluon (Triton >= 3.5) with Hopper's wgmma, TMA and mbarriers
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
except ImportError:  # pragma: no cover - an older Triton: the Triton kernel serves every batch
    gluon = None

#: The tile shape this kernel runs: query slots per tile (two warpgroups of 64) and keys per step.
SLOTS = 128
BLOCK_N = 128
STAGES = 2
HEAD_DIMS = (64, 128)
#: Registers: 12 warps (3 warpgroups) share the SM's 64K; the loader keeps LOADER_REGS, each consumer CONSUMER_REGS.
MAXNREG = 168
LOADER_REGS = 32
CONSUMER_REGS = 232
#: Variants under measurement (benchmarks/prefill_hopper.py sets them per candidate).
TUNING: dict = {"pingpong": False, "stages": STAGES, "regs": (CONSUMER_REGS, LOADER_REGS),
                "wide_store": False, "rescale_under_qk": False}

if gluon is not None:
    _RUN_WIDTH = gl.constexpr(len(RUN_FIELDS))
    NO_MASK, KEY_RANGE = gl.constexpr(0), gl.constexpr(1)  # _softmax's masks
    # names that changed after Triton 3.6 (the GPU machine has 3.6, CI a newer one that compiles it too)
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

    @gluon.jit
    def _work_item(p, i, P):
        """The i-th work item of program p of P, snake order (even rounds ascending, odd rounds descending)."""
        return i * P + p + (i % 2) * (P - 1 - 2 * p)

    @gluon.jit
    def _slot_rows_heads(base, unit, M: gl.constexpr, GROUP: gl.constexpr, PACK_GQA: gl.constexpr,
                         layout: gl.constexpr):
        """Query row and head of each of a consumer's M slots (its rows start at `base`; unit: KV head with
        PACK_GQA, else query head)."""
        slots = gl.arange(0, M, layout=layout)
        if PACK_GQA:
            rows = base + slots // GROUP
            heads = unit * GROUP + slots % GROUP
        else:
            rows = base + slots
            heads = unit + slots * 0
        return rows, heads

    @gluon.jit
    def _tile_keys(tile, runs, tile_run, cu_q, cu_k, ROWS: gl.constexpr, BLOCK: gl.constexpr, CAUSAL: gl.constexpr):
        """(row_start, row_end, seq_first, seq_last, k_start, k_nomask_end, k_end, k_stop) of a tile:
        plan.key_bounds, scalar, and k_stop, the end of its last request's keys. Keys [k_start, k_nomask_end) are
        seen whole by every row of the tile."""
        r = runs + gl.load(tile_run + tile) * _RUN_WIDTH
        run_start = gl.load(r)
        row_end = gl.load(r + 1) - (tile - gl.load(r + 5)) * ROWS  # a run's tiles launch from its last rows
        row_start = gl.maximum(run_start, row_end - ROWS)
        seq_first = gl.load(r + 2)
        seq_last = gl.load(r + 3)
        k_start = gl.load(cu_k + seq_first)
        k_stop = gl.load(cu_k + seq_last + 1)
        if CAUSAL:  # bottom-right: row i of request s sees keys < cu_k[s+1] - cu_q[s+1] + i + 1
            k_end = gl.maximum(gl.minimum(k_stop, k_stop - gl.load(cu_q + seq_last + 1) + row_end), k_start)
            if seq_first != seq_last:  # a pack's earlier requests: their last rows see all their keys
                k_end = gl.maximum(k_end, gl.load(cu_k + seq_last))
            first_hi = gl.load(cu_k + seq_first + 1) - gl.load(cu_q + seq_first + 1) + row_start
        else:
            k_end = k_stop
            first_hi = gl.load(cu_k + seq_first + 1) - 1
        nomask_end = k_start
        if seq_first == seq_last:
            nomask_end = gl.minimum(k_start + gl.maximum(first_hi + 1 - k_start, 0) // BLOCK * BLOCK, k_end)
        return row_start, row_end, seq_first, seq_last, k_start, nomask_end, k_end, k_stop

    @gluon.jit
    def _load_q(Q, item, num_items, runs, tile_run, cu_q, cu_k, stride_qt, stride_qh, C: gl.constexpr,
                M: gl.constexpr, UNITS: gl.constexpr, GROUP: gl.constexpr, PACK_GQA: gl.constexpr,
                CAUSAL: gl.constexpr, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
                layout: gl.constexpr):
        """Consumer C's query rows [M, HEAD_DIM] of a work item (zeros past its rows, or when item >= num_items):
        loaded a tile ahead, so the load runs under the previous tile's last product."""
        tile = gl.minimum(item, num_items - 1) // UNITS
        row_start, row_end, _, _, _, _, _, _ = _tile_keys(tile, runs, tile_run, cu_q, cu_k, ROWS, BLOCK, CAUSAL)
        HALF: gl.constexpr = M // GROUP if PACK_GQA else M
        rows, heads = _slot_rows_heads(row_start + C * HALF, item % UNITS, M, GROUP, PACK_GQA,
                                       gl.SliceLayout(1, layout))
        dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
        offs = rows.to(gl.int64) * stride_qt + heads * stride_qh
        return gl.load(Q + gl.expand_dims(offs, 1) + gl.expand_dims(dims, 0),
                       mask=gl.expand_dims((rows < row_end) & (item < num_items), 1), other=0.0)

    @gluon.jit
    def _foreign(start, seq_first, seq_last, k_stop, BLOCK: gl.constexpr):
        """Whether the key block at `start` may hold keys of a request other than its rows' own: in a packed tile
        (several requests), or past the end of its request's keys."""
        return (seq_first != seq_last) | (start + BLOCK > k_stop)

    @gluon.jit
    def _clean(v_buf, flag_buf, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, EXP_MASK: gl.constexpr,
               num_warps: gl.constexpr):
        """Zero the non-finite elements of a V block in shared memory and flag their keys (bit test on the
        exponent: all ones is NaN or inf)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        CHUNK: gl.constexpr = 16
        for r in gl.static_range(0, BLOCK, CHUNK):
            chunk = v_buf.slice(r, CHUNK, 0)
            v = chunk.load(layout)
            ok = (v.to(gl.int16, bitcast=True) & EXP_MASK) != EXP_MASK
            bad = gl.max(gl.where(ok, 0, 1), 1)
            if gl.max(bad, 0) > 0:
                chunk.store(gl.where(ok, v, gl.zeros_like(v)))
            flag_buf.slice(r, CHUNK).store(bad)

    @gluon.jit
    def _loader(k_desc, v_desc, runs, tile_run, cu_q, cu_k, num_items, k_smem, v_smem, flags, k_ready, k_empty,
                v_ready, v_empty, v_clean, UNITS: gl.constexpr, GROUP: gl.constexpr, PACK_GQA: gl.constexpr,
                CAUSAL: gl.constexpr, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                EXP_MASK: gl.constexpr):
        BLOCK: gl.constexpr = k_smem.shape[1]
        nbytes: gl.constexpr = BLOCK * HEAD_DIM * k_desc.dtype.primitive_bitwidth // 8
        p = gl.program_id(0)
        P = gl.num_programs(0)
        it = 0
        for i in range(gl.cdiv(num_items, P)):
            item = _work_item(p, i, P)
            if item < num_items:
                tile = item // UNITS
                if PACK_GQA:
                    kv_head = item % UNITS
                else:
                    kv_head = item % UNITS // GROUP
                _, _, seq_first, seq_last, k_start, nomask_end, k_end, k_stop = _tile_keys(
                    tile, runs, tile_run, cu_q, cu_k, ROWS, BLOCK, CAUSAL)
                for start in range(k_start, k_end, BLOCK):
                    s = it % STAGES
                    phase = it // STAGES & 1
                    mbarrier.wait(k_empty.index(s), phase ^ 1)
                    mbarrier.expect(k_ready.index(s), nbytes)
                    _tma_load(k_desc, [start, kv_head * HEAD_DIM], k_ready.index(s), k_smem.index(s))
                    mbarrier.wait(v_empty.index(s), phase ^ 1)
                    mbarrier.expect(v_ready.index(s), nbytes)
                    _tma_load(v_desc, [start, kv_head * HEAD_DIM], v_ready.index(s), v_smem.index(s))
                    if _foreign(start, seq_first, seq_last, k_stop, BLOCK):  # clean it before the consumers read it
                        mbarrier.wait(v_ready.index(s), phase)
                        _clean(v_smem.index(s), flags.index(s), BLOCK, HEAD_DIM, EXP_MASK, 4)
                        fence_async_shared()
                        _barrier()
                    mbarrier.arrive(v_clean.index(s))
                    it += 1

    @gluon.jit
    def _take_turn(turn, C: gl.constexpr, parity, PINGPONG: gl.constexpr):
        """PINGPONG: wait until the other consumer has issued its matrix products for this step (FA3's
        inter-warpgroup overlap: one consumer's products run under the other's softmax). Returns the parity of
        the next wait."""
        if PINGPONG:
            mbarrier.wait(turn.index(C), parity)
        return parity ^ 1

    @gluon.jit
    def _pass_turn(turn, C: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - C))

    @gluon.jit
    def _softmax(sc, m_i, l_i, qk_scale, start, lo, hi, flag_buf, cleaned, MASK: gl.constexpr,
                 col_layout: gl.constexpr):
        """One online-softmax step (base 2, fp32) on raw scores sc [64, BLOCK]: returns (p, max, sum, alpha), the
        scale folded into the exponent. MASK: NO_MASK; KEY_RANGE: only keys in [lo, hi] of each slot count, and in
        a cleaned block a flagged key (its V was not finite) that a slot sees scores NaN."""
        if MASK == KEY_RANGE:
            keys = gl.expand_dims(start + gl.arange(0, sc.shape[1], layout=col_layout), 0)
            valid = (keys >= gl.expand_dims(lo, 1)) & (keys <= gl.expand_dims(hi, 1))
            bad = gl.expand_dims((flag_buf.load(col_layout) != 0) & cleaned, 0)
            sc = gl.where(valid, sc, float("-inf"))
            sc = gl.where(valid & bad, float("nan"), sc)
        m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)
        if MASK == NO_MASK:
            m_ref = m_new
        else:  # a slot that has seen no key yet
            m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(sc * qk_scale - gl.expand_dims(m_ref, 1))
        alpha = gl.exp2(m_i - m_ref)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _block_softmax(sc, m_i, l_i, qk_scale, start, nomask_end, lo, hi, flag_buf, clean_bar, phase, seq_first,
                       seq_last, k_stop, col_layout: gl.constexpr):
        """_softmax of the key block at `start`: unmasked before the tile's first masked block; from there masked
        once the loader has released it (clean_bar), where it may hold another request's keys (cleaned)."""
        if start >= nomask_end:
            foreign = _foreign(start, seq_first, seq_last, k_stop, sc.shape[1])
            p, m_new, l_new, alpha = _ranged_softmax(sc, m_i, l_i, qk_scale, start, lo, hi, flag_buf, clean_bar,
                                                     phase, foreign, col_layout)
        else:
            p, m_new, l_new, alpha = _softmax(sc, m_i, l_i, qk_scale, start, lo, hi, flag_buf, False, NO_MASK,
                                              col_layout)
        return p, m_new, l_new, alpha

    @gluon.jit
    def _ranged_softmax(sc, m_i, l_i, qk_scale, start, lo, hi, flag_buf, clean_bar, phase, foreign,
                        col_layout: gl.constexpr):
        """_softmax with KEY_RANGE, once the loader has released the block (cleaned where `foreign`)."""
        mbarrier.wait(clean_bar, phase)
        return _softmax(sc, m_i, l_i, qk_scale, start, lo, hi, flag_buf, foreign, KEY_RANGE, col_layout)

    @gluon.jit
    def _rescaled(acc, alpha, rows_o: gl.constexpr):
        """O x alpha, per slot (alpha from the softmax's row layout into O's)."""
        return acc * gl.expand_dims(gl.convert_layout(alpha, rows_o), 1)

    @gluon.jit
    def _as_operand(p, dtype: gl.constexpr, p_op: gl.constexpr):
        """P in 16 bits, in the register layout of P V's A operand."""
        return gl.convert_layout(p.to(dtype), p_op)

    @gluon.jit
    def _consumer(C: gl.constexpr, Q, Out, runs, tile_run, cu_q, cu_k, num_items, qk_scale, stride_qt, stride_qh,
                  stride_ot, stride_oh, q_smem, k_smem, v_smem, flags, k_ready, k_empty, v_ready, v_empty, v_clean,
                  turn, UNITS: gl.constexpr, GROUP: gl.constexpr, PACK_GQA: gl.constexpr, CAUSAL: gl.constexpr,
                  ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                  WIDE_STORE: gl.constexpr, RESCALE_UNDER_QK: gl.constexpr):
        BLOCK: gl.constexpr = k_smem.shape[1]
        M: gl.constexpr = 64
        dtype: gl.constexpr = q_smem.dtype
        s_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK, 16])
        o_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])
        p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_mma)
        cols_s: gl.constexpr = gl.SliceLayout(0, s_mma)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_mma)
        cols_o: gl.constexpr = gl.SliceLayout(0, o_mma)
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        HALF: gl.constexpr = M // GROUP if PACK_GQA else M  # rows of a consumer's half of the tile
        my_q = q_smem.index(C)

        p_id = gl.program_id(0)
        P = gl.num_programs(0)
        it = 0
        my_turn = 1 - C  # parity of this consumer's next wait for its turn to issue (PINGPONG)
        q = _load_q(Q, _work_item(p_id, 0, P), num_items, runs, tile_run, cu_q, cu_k, stride_qt, stride_qh, C, M,
                    UNITS, GROUP, PACK_GQA, CAUSAL, ROWS, HEAD_DIM, BLOCK, q_layout)
        for i in range(gl.cdiv(num_items, P)):
            item = _work_item(p_id, i, P)
            if item < num_items:
                tile = item // UNITS
                unit = item % UNITS
                row_start, row_end, seq_first, seq_last, k_start, nomask_end, k_end, k_stop = _tile_keys(
                    tile, runs, tile_run, cu_q, cu_k, ROWS, BLOCK, CAUSAL)
                base = row_start + C * HALF

                my_q.store(q)  # the slots' query rows, into this consumer's shared buffer
                fence_async_shared()
                _barrier()

                # each slot's visible keys [lo, hi] (hi < lo: none), per request of the tile
                rows, _ = _slot_rows_heads(base, unit, M, GROUP, PACK_GQA, rows_s)
                lo = gl.zeros([M], gl.int32, rows_s)
                hi = gl.full([M], -1, gl.int32, rows_s)
                for req in range(seq_first, seq_last + 1):
                    req_q_stop = gl.load(cu_q + req + 1)
                    req_k_begin = gl.load(cu_k + req)
                    req_k_stop = gl.load(cu_k + req + 1)
                    mine = (rows >= gl.load(cu_q + req)) & (rows < req_q_stop)
                    lo = gl.where(mine, req_k_begin, lo)
                    if CAUSAL:
                        hi = gl.where(mine, req_k_stop - req_q_stop + rows, hi)
                    else:
                        hi = gl.where(mine, req_k_stop - 1, hi)

                m_i = gl.full([M], float("-inf"), gl.float32, rows_s)
                l_i = gl.zeros([M], gl.float32, rows_s)
                acc = gl.zeros([M, HEAD_DIM], gl.float32, o_mma)
                if k_end > k_start:
                    s = it % STAGES
                    phase = it // STAGES & 1
                    mbarrier.wait(k_ready.index(s), phase)
                    my_turn = _take_turn(turn, C, my_turn, PINGPONG)
                    sc = warpgroup_mma(my_q, k_smem.index(s).permute((1, 0)), gl.zeros([M, BLOCK], gl.float32, s_mma),
                                       use_acc=False, is_async=True)
                    _pass_turn(turn, C, PINGPONG)
                    sc = warpgroup_mma_wait(0, deps=[sc])
                    mbarrier.arrive(k_empty.index(s))
                    p, m_i, l_i, alpha = _block_softmax(sc, m_i, l_i, qk_scale, k_start, nomask_end, lo, hi,
                                                        flags.index(s), v_clean.index(s), phase, seq_first, seq_last,
                                                        k_stop, cols_s)
                    if RESCALE_UNDER_QK:  # P converted under the previous P V, O rescaled under this Q K^T
                        p_op_val = _as_operand(p, dtype, p_op)
                    for nxt in range(k_start + BLOCK, k_end, BLOCK):
                        s2 = (it + 1) % STAGES
                        phase2 = (it + 1) // STAGES & 1
                        mbarrier.wait(k_ready.index(s2), phase2)
                        if not RESCALE_UNDER_QK:
                            mbarrier.wait(v_ready.index(s), phase)
                            mbarrier.wait(v_clean.index(s), phase)
                            p_op_val = _as_operand(p, dtype, p_op)
                        my_turn = _take_turn(turn, C, my_turn, PINGPONG)
                        sc = warpgroup_mma(my_q, k_smem.index(s2).permute((1, 0)),
                                           gl.zeros([M, BLOCK], gl.float32, s_mma), use_acc=False, is_async=True)
                        if RESCALE_UNDER_QK:
                            mbarrier.wait(v_ready.index(s), phase)
                            mbarrier.wait(v_clean.index(s), phase)
                            acc = _rescaled(acc, alpha, rows_o)
                        acc = warpgroup_mma(p_op_val, v_smem.index(s), acc, is_async=True)
                        _pass_turn(turn, C, PINGPONG)
                        sc = warpgroup_mma_wait(1, deps=[sc])
                        mbarrier.arrive(k_empty.index(s2))
                        p, m_i, l_i, alpha = _block_softmax(sc, m_i, l_i, qk_scale, nxt, nomask_end, lo, hi,
                                                            flags.index(s2), v_clean.index(s2), phase2, seq_first,
                                                            seq_last, k_stop, cols_s)
                        if RESCALE_UNDER_QK:
                            p_next = _as_operand(p, dtype, p_op)
                        acc, p_op_val = warpgroup_mma_wait(0, deps=[acc, p_op_val])
                        mbarrier.arrive(v_empty.index(s))
                        if RESCALE_UNDER_QK:
                            p_op_val = p_next
                        else:
                            acc = _rescaled(acc, alpha, rows_o)
                        it += 1
                        s = s2
                        phase = phase2
                    mbarrier.wait(v_ready.index(s), phase)
                    mbarrier.wait(v_clean.index(s), phase)
                    if RESCALE_UNDER_QK:
                        acc = _rescaled(acc, alpha, rows_o)
                    else:
                        p_op_val = _as_operand(p, dtype, p_op)
                    my_turn = _take_turn(turn, C, my_turn, PINGPONG)
                    acc = warpgroup_mma(p_op_val, v_smem.index(s), acc, is_async=True)
                    _pass_turn(turn, C, PINGPONG)
                    q = _load_q(Q, _work_item(p_id, i + 1, P), num_items, runs, tile_run, cu_q, cu_k, stride_qt,
                                stride_qh, C, M, UNITS, GROUP, PACK_GQA, CAUSAL, ROWS, HEAD_DIM, BLOCK, q_layout)
                    acc, p_op_val = warpgroup_mma_wait(0, deps=[acc, p_op_val])
                    mbarrier.arrive(v_empty.index(s))
                    it += 1
                else:
                    q = _load_q(Q, _work_item(p_id, i + 1, P), num_items, runs, tile_run, cu_q, cu_k, stride_qt,
                                stride_qh, C, M, UNITS, GROUP, PACK_GQA, CAUSAL, ROWS, HEAD_DIM, BLOCK, q_layout)

                # a slot that sees no key writes zeros
                l_o = gl.convert_layout(l_i, rows_o)
                out = acc / gl.expand_dims(gl.where(l_o > 0, l_o, 1.0), 1)
                if WIDE_STORE:  # through shared memory into 16-byte stores of whole rows
                    out = gl.convert_layout(out.to(dtype), q_layout)
                    o_rows, o_heads = _slot_rows_heads(base, unit, M, GROUP, PACK_GQA, gl.SliceLayout(1, q_layout))
                    o_dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, q_layout))
                else:
                    out = out.to(dtype)
                    o_rows, o_heads = _slot_rows_heads(base, unit, M, GROUP, PACK_GQA, rows_o)
                    o_dims = gl.arange(0, HEAD_DIM, layout=cols_o)
                o_offs = o_rows.to(gl.int64) * stride_ot + o_heads * stride_oh
                gl.store(Out + gl.expand_dims(o_offs, 1) + gl.expand_dims(o_dims, 0), out,
                         mask=gl.expand_dims(o_rows < row_end, 1))

    @gluon.jit
    def _hopper_attention_fwd(Q, k_desc, v_desc, Out, runs, tile_run, cu_q, cu_k, num_items, qk_scale, stride_qt,
                              stride_qh, stride_ot, stride_oh, UNITS: gl.constexpr, GROUP: gl.constexpr,
                              PACK_GQA: gl.constexpr, CAUSAL: gl.constexpr, ROWS: gl.constexpr,
                              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, EXP_MASK: gl.constexpr,
                              PINGPONG: gl.constexpr, WIDE_STORE: gl.constexpr,
                              RESCALE_UNDER_QK: gl.constexpr, LOADER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        BLOCK: gl.constexpr = k_desc.block_type.shape[0]
        dtype: gl.constexpr = k_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], k_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], v_desc.layout)
        flags = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        v_clean = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar_layout)
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(v_clean.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumers release each stage
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()
        gl.warp_specialize([
            (_consumer, (0, Q, Out, runs, tile_run, cu_q, cu_k, num_items, qk_scale, stride_qt, stride_qh, stride_ot,
                         stride_oh, q_smem, k_smem, v_smem, flags, k_ready, k_empty, v_ready, v_empty, v_clean,
                         turn, UNITS, GROUP, PACK_GQA, CAUSAL, ROWS, HEAD_DIM, STAGES, PINGPONG, WIDE_STORE,
                         RESCALE_UNDER_QK)),
            (_consumer, (1, Q, Out, runs, tile_run, cu_q, cu_k, num_items, qk_scale, stride_qt, stride_qh, stride_ot,
                         stride_oh, q_smem, k_smem, v_smem, flags, k_ready, k_empty, v_ready, v_empty, v_clean,
                         turn, UNITS, GROUP, PACK_GQA, CAUSAL, ROWS, HEAD_DIM, STAGES, PINGPONG, WIDE_STORE,
                         RESCALE_UNDER_QK)),
            (_loader, (k_desc, v_desc, runs, tile_run, cu_q, cu_k, num_items, k_smem, v_smem, flags, k_ready,
                       k_empty, v_ready, v_empty, v_clean, UNITS, GROUP, PACK_GQA, CAUSAL, ROWS, HEAD_DIM, STAGES,
                       EXP_MASK)),
        ], [4, 4], [CONSUMER_REGS, LOADER_REGS])


@functools.cache
def available(device: torch.device) -> bool:
    """A Hopper GPU (compute capability 9.x) and a Triton with Gluon's Hopper language."""
    return gluon is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def supports(plan: Plan, q: torch.Tensor) -> bool:
    """Whether this kernel runs the plan: 128-slot tiles, 128-key steps, a head dim it has, bf16/fp16, no
    window, and some keys (a TMA descriptor needs a non-empty tensor)."""
    group = plan.num_heads // plan.num_kv_heads
    slots = plan.block_m * (group if plan.pack_gqa else 1)
    return (slots == SLOTS and plan.block_n == BLOCK_N and plan.head_dim in HEAD_DIMS and plan.window == (-1, -1)
            and q.dtype in (torch.bfloat16, torch.float16) and (not plan.pack_gqa or group <= 64)
            and int(plan.cu_seqlens_k[-1]) > 0)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, plan: Plan,
           softmax_scale: float) -> None:
    """Run the plan over q/k/v into out (validated, [tokens, heads, dim], last dims contiguous)."""
    if plan.num_tiles == 0:
        return
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    k, v = (t if t.stride() == (kv_heads * dim, dim, 1) else t.contiguous() for t in (k, v))
    k_desc, v_desc = (_descriptor(t) for t in (k, v))
    runs, tile_run, cu_q, cu_k = plan.device_arrays(q.device)
    constexprs, options = _constants(q.dtype, dim, heads // kv_heads, plan.pack_gqa, plan.causal)
    num_items = plan.num_tiles * (kv_heads if plan.pack_gqa else heads)
    _hopper_attention_fwd[(min(num_items, _sms(q.device)),)](
        q, k_desc, v_desc, out, runs, tile_run, cu_q, cu_k, num_items, softmax_scale * LOG2E, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), UNITS=kv_heads if plan.pack_gqa else heads, **constexprs,
        **options)


LOG2E = 1.4426950408889634


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _descriptor(t: torch.Tensor) -> GluonDescriptor:
    """TMA descriptor of K or V [tokens, kv_heads, dim] as a [tokens, kv_heads * dim] matrix, BLOCK_N x dim
    blocks."""
    dim = t.shape[2]
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, dim], gl.bfloat16 if t.dtype == torch.bfloat16
                                                  else gl.float16)
    return GluonDescriptor.from_tensor(t.view(t.shape[0], t.shape[1] * dim), [BLOCK_N, dim], layout)


def _constants(dtype: torch.dtype, dim: int, group: int, pack_gqa: bool, causal: bool) -> tuple[dict, dict]:
    """The kernel's constexprs (but UNITS) and launch options."""
    return (dict(GROUP=group, PACK_GQA=pack_gqa, CAUSAL=causal, ROWS=SLOTS // group if pack_gqa else SLOTS,
                 HEAD_DIM=dim, STAGES=TUNING["stages"], EXP_MASK=0x7F80 if dtype == torch.bfloat16 else 0x7C00,
                 PINGPONG=TUNING["pingpong"], WIDE_STORE=TUNING["wide_store"],
                 RESCALE_UNDER_QK=TUNING["rescale_under_qk"],
                 CONSUMER_REGS=TUNING["regs"][0], LOADER_REGS=TUNING["regs"][1]),
            dict(num_warps=4, maxnreg=MAXNREG))


def compile_source(dim: int, dtype: torch.dtype, heads: int = 32, kv_heads: int = 8, pack_gqa: bool = True,
                   causal: bool = True):
    """(source, options) for triton.compile: the kernel as a launch of this shape binds it, for compiling ahead
    of time (for sm_90a on a machine without a GPU, say)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    constexprs, options = _constants(dtype, dim, heads // kv_heads, pack_gqa, causal)
    constexprs["UNITS"] = kv_heads if pack_gqa else heads
    desc = mangle_type(_descriptor(torch.empty(BLOCK_N, kv_heads, dim, dtype=dtype)))
    element = "*bf16" if dtype == torch.bfloat16 else "*fp16"
    kinds = {"Q": element, "Out": element, "k_desc": desc, "v_desc": desc, "runs": "*i32", "tile_run": "*i32",
             "cu_q": "*i32", "cu_k": "*i32", "qk_scale": "fp32"}
    kernel = _hopper_attention_fwd
    signature = {n: "constexpr" if n in constexprs else kinds.get(n, "i32") for n in kernel.arg_names}
    source = GluonASTSource(kernel, signature,
                            constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()})
    return source, options
