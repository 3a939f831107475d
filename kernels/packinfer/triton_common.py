"""Triton helpers shared by the attention kernels: program-to-slot mapping, the online-softmax step, the checks
that keep one request's NaN/inf out of another's rows, and the host-side switches (TMA, interpreter workaround).
Kernel modules import from here, never from each other."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def field_offset(fields: tuple[str, ...], name: str) -> tl.constexpr:
    """Column `name` of a planner record with columns `fields`, as a constant a kernel can read."""
    return tl.constexpr(fields.index(name))


@triton.jit
def program_slots(pid, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, PACK_GQA: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """(work unit, KV head, row offset of each slot, query head of each slot) of program pid: with PACK_GQA the
    GROUP query heads of a KV head side by side (slot m: row m // GROUP), else one query head per program."""
    slots = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        unit = pid // (NUM_HEADS // GROUP)
        kv_head = pid % (NUM_HEADS // GROUP)
        slot_row = slots // GROUP
        heads = kv_head * GROUP + slots % GROUP
    else:
        unit = pid // NUM_HEADS
        kv_head = (pid % NUM_HEADS) // GROUP
        slot_row = slots
        heads = tl.zeros([BLOCK_M], dtype=tl.int32) + pid % NUM_HEADS
    return unit, kv_head, slot_row, heads


@triton.jit
def finite(x):
    """Elementwise: x is neither NaN nor +-inf (its exponent bits are not all ones). Bit tests, so no compiler
    flag can fold them away; fp32, fp16 or bf16."""
    if x.dtype == tl.float32:
        return (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000
    elif x.dtype == tl.float16:
        return (x.to(tl.int16, bitcast=True) & 0x7C00) != 0x7C00
    else:
        return (x.to(tl.int16, bitcast=True) & 0x7F80) != 0x7F80


@triton.jit
def any_nonfinite(acc, l_i, row_ok):
    """Whether a real slot (row_ok) ended with a NaN/inf accumulator or sum: one row sum, then one bit test per
    slot (a sum holds NaN/inf iff one of its terms does; finite fp32 rows of attention cannot overflow it)."""
    bad = row_ok & ~finite(tl.sum(acc, 1) + l_i)
    return tl.max(bad.to(tl.int32), 0) > 0


@triton.jit
def online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, valid, MASKED: tl.constexpr, SAFE: tl.constexpr,
                        DOT_F32: tl.constexpr):
    """One online-softmax step (base 2, fp32 state) of the query slots over a block of keys, shared by both
    kernels. MASKED: only keys where `valid` [slots, keys] count, so a slot may have seen no key yet; its max then
    stays -inf and is kept out of the exponents. A masked key gets weight exactly 0, but 0 times a NaN/inf value
    is NaN, so SAFE (a masked step of the isolating re-run) also zeroes non-finite V elements before the dot and
    gives the scores of a slot's visible keys whose V is not finite NaN instead: no masked key's NaN/inf reaches
    any slot, a visible one makes its slot NaN. With finite V, SAFE changes no bit. Returns (max, sum, acc)."""
    if SAFE:
        v_ok = finite(v)
        bad_key = tl.max(tl.where(v_ok, 0, 1), 1) > 0
        v = tl.where(v_ok, v, 0.0)
    if DOT_F32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        qk = tl.where(valid, qk, float("-inf"))
        if SAFE:
            qk = tl.where(valid & bad_key[None, :], float("nan"), qk)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = m_new
    p = tl.math.exp2(qk - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@functools.cache
def tma_available(device: torch.device) -> bool:
    """Hopper or newer GPU (compute capability >= 9); asked once per device (the query costs host time per call)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def interpreter_needs_f32_dot(dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter (3.9) computes tl.dot on bfloat16 operands wrongly (errors of 1e10 on a 16x16
    product), so under the interpreter bf16 operands are widened to fp32 first; compiled kernels never do."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
