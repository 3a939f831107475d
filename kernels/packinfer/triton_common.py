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
def tanh(x, HARDWARE: tl.constexpr):
    """HARDWARE: the GPU's tanh.approx.f32 (one MUFU instruction, max relative error 2^-11, what FlashAttention's
    softcap uses); else from exp2, 1 - 2 / (e^2x + 1), exact at +-inf (the interpreter runs no PTX)."""
    if HARDWARE:
        y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)
    return y


@triton.jit
def scores(q, k, qk_scale, cap, keys, diag, slope, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Base-2 attention scores of the slots over a block of keys. Plain: q k^T * qk_scale (scale * log2 e).
    SOFTCAP (a softcap_mode): cap * tanh(q k^T * qk_scale), with qk_scale = scale / softcap and cap = softcap *
    log2 e (Gemma 2).
    ALIBI: minus slope * |diag - key| per slot (slope pre-multiplied by log2 e; diag = the key index of the
    slot's own position, keys = the block's key indices), FlashAttention's bias, added after the cap."""
    qk = tl.dot(q, tl.trans(k))
    if SOFTCAP:
        qk = cap * tanh(qk * qk_scale, SOFTCAP == HARDWARE_TANH)
    else:
        qk = qk * qk_scale
    if ALIBI:
        qk -= slope[:, None] * tl.abs(diag[:, None] - keys[None, :]).to(tl.float32)
    return qk


@triton.jit
def online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, cap, keys, diag, slope, valid, MASKED: tl.constexpr,
                        SAFE: tl.constexpr, DOT_F32: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """One online-softmax step (base 2, fp32 state) of the query slots over a block of keys, shared by both
    kernels (scores: see `scores`). MASKED: only keys where `valid` [slots, keys] count, so a slot may have seen
    no key yet; its max then stays -inf and is kept out of the exponents. A masked key gets weight exactly 0, but
    0 times a NaN/inf value is NaN, so SAFE (a masked step of the isolating re-run) also zeroes non-finite V
    elements before the dot and gives the scores of a slot's visible keys whose V is not finite NaN instead: no
    masked key's NaN/inf reaches any slot, a visible one makes its slot NaN. With finite V, SAFE changes no bit.
    Returns (max, sum, acc)."""
    if SAFE:
        v_ok = finite(v)
        bad_key = tl.max(tl.where(v_ok, 0, 1), 1) > 0
        v = tl.where(v_ok, v, 0.0)
    if DOT_F32:
        k, v = k.to(tl.float32), v.to(tl.float32)
    qk = scores(q, k, qk_scale, cap, keys, diag, slope, SOFTCAP, ALIBI)
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


@triton.jit
def load_kv(k_ptr, v_ptr, key_ok, dmask, MASK_KEYS: tl.constexpr, EVEN_D: tl.constexpr):
    """The K and V blocks at pointer tiles [keys, dims], shared by both kernels: masked to key_ok [keys]
    (MASK_KEYS) and to the real head dims dmask [dims] (unless EVEN_D); masked elements read 0."""
    if MASK_KEYS:
        mask = key_ok[:, None]
        if not EVEN_D:
            mask = mask & dmask[None, :]
        k = tl.load(k_ptr, mask=mask, other=0.0)
        v = tl.load(v_ptr, mask=mask, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptr)
        v = tl.load(v_ptr)
    else:
        k = tl.load(k_ptr, mask=dmask[None, :], other=0.0)
        v = tl.load(v_ptr, mask=dmask[None, :], other=0.0)
    return k, v


@triton.jit
def window_blocks(lo, hi, row_ok, BLOCK_N: tl.constexpr):
    """Key blocks of a program whose slots see keys [lo, hi] each (hi < lo: none), as three loops: masked
    [first, mask_end), unmasked [mask_end, nomask_end) - every real slot (row_ok) sees those blocks whole -
    and masked [nomask_end, end). Returns (first, mask_end, nomask_end, end)."""
    seen = row_ok & (hi >= lo)
    first = tl.min(tl.where(seen, lo, 2147483647), 0)
    end = tl.max(tl.where(seen, hi, -1), 0) + 1
    first = tl.minimum(first, end)  # no slot sees any key: empty ranges
    a = first + (tl.max(tl.where(row_ok, lo, first), 0) - first + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full = tl.maximum(tl.min(tl.where(row_ok, hi, 2147483646), 0) + 1 - a, 0) // BLOCK_N  # 0 when a > end
    mask_end = tl.minimum(a, end)
    return first, mask_end, mask_end + full * BLOCK_N, end


@triton.jit
def log_sum_exp(m_i, l_i):
    """Natural-log softmax normaliser of base-2 state (m, l); +inf for a slot that saw no key (FlashAttention 2)."""
    return tl.where(l_i > 0, (m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("inf"))


EXP2_TANH = tl.constexpr(1)
HARDWARE_TANH = tl.constexpr(2)


def softcap_mode(softcap: float) -> int:
    """The kernels' SOFTCAP constant: 0 without a cap, else how tanh is computed: HARDWARE_TANH on a GPU,
    EXP2_TANH under the interpreter, on ROCm, or with PACKINFER_EXACT_TANH=1 (to compare the two)."""
    if softcap <= 0:
        return 0
    exact = (os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("PACKINFER_EXACT_TANH") == "1"
             or torch.version.hip is not None)  # tanh.approx.f32 is NVIDIA PTX
    return int(EXP2_TANH if exact else HARDWARE_TANH)


@functools.cache
def tma_available(device: torch.device) -> bool:
    """Hopper or newer GPU (compute capability >= 9); asked once per device (the query costs host time per call)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def interpreter_needs_f32_dot(dtype: torch.dtype) -> bool:
    """Triton's CPU interpreter (3.9) computes tl.dot on bfloat16 operands wrongly (errors of 1e10 on a 16x16
    product), so under the interpreter bf16 operands are widened to fp32 first; compiled kernels never do."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
