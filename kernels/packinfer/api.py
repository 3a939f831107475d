"""FlashAttention-varlen-compatible entry points, and the choice of tile shape for a batch."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch

from packinfer import hopper_attention
from packinfer.cache_attention import launch as launch_cache
from packinfer.cache_plan import CachePlan, PlanBuffers
from packinfer.device import shared_memory as device_shared_memory
from packinfer.kv_cache import KVView
from packinfer.packed_attention import launch as launch_packed
from packinfer.plan import Plan, as_numpy, plan_varlen
from packinfer.scoring import ScoreOptions
from packinfer.validate import check_head_dim, check_qkv, check_score_options, check_window, head_dim_padded


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch configuration: `slots` (query row x head pairs per tile: rows with pack_gqa off,
    rows x GQA group with it on), block_n keys per step, the Triton kernel's warps and pipeline stages, and the
    kernel (`engine`, plan_varlen's: "triton", or Hopper's warp-specialized "gluon", which has its own warps and
    stages and leaves the plan to the Triton kernel where it cannot run)."""

    slots: int
    block_n: int
    num_warps: int
    num_stages: int
    pack_gqa: bool
    engine: str = "triton"


#: FA2-like fixed tiles (128 query rows x 64 keys): the `triton_unpacked` baseline's configuration.
FA2_LIKE = KernelConfig(128, 64, 8, 3, False)

# Head dim 128 (bf16, H=32, Hkv=8, TMA loads), from the H100 sweep results/prefill-kernel/h100-tune-tma and
# confirmed on the H200 (results/prefill-hopper/h200-smem): long prompts (>= 1500 keys per query row on average)
# want 128-slot tiles and 128-key steps; shorter prompts and decode/chunk mixes want 64 slots (16 rows x 4 heads),
# where less causal-diagonal and block-diagonal work is wasted per tile. The 64-slot tile's 3 stages take 115,712
# bytes of shared memory, exactly what lets two programs share a Hopper SM (2 x (115,712 + 1 KiB) = 228 KiB;
# tests/test_kernel_resources.py). With 48 bytes more it held one program per SM and fell 1.06-1.42x behind the
# same tile at 2 stages, which it beats by 1.10-1.25x at two programs. GQA packing helped on every mix but uniform
# 4k prompts (-1.5%, H100).
_LONG = KernelConfig(128, 128, 8, 3, True)
_SHORT = KernelConfig(64, 64, 4, 3, True)
_LONG_KEYS_PER_ROW = 1500
# On Hopper the long tile runs the warp-specialized Gluon kernel (hopper_attention) where it can (head dim 128;
# PACKINFER_GLUON=0 keeps the Triton kernel): ahead of the Triton kernel's long tile on the batches that take it,
# in three H100 runs (results/prefill-hopper/h100-gluon-v2, -v3, -v4: geomeans 1.04x, 1.07x, 1.03x); on the short
# tile's batches it lost (0.87-1.02), so they keep that tile.
_LONG_GLUON = dataclasses.replace(_LONG, engine="gluon")
# Other head dims, from the H200 sweep results/fa-features/h200/tune.csv (bf16; ShareGPT, Azure conv, Mooncake
# prompts): at 256 one shape won every batch, 3-5.6x the half-slot 32-key shape used before; it needs ~193 KiB of
# shared memory (Hopper has 227), so a GPU with less (A100: 163) takes the runner-up that needs ~97 (not measured
# there). A head dim padded to 128 loads K/V through pointers (TMA needs the real width), where 64-key steps beat
# 128 on long prompts by 8%.
_D256 = KernelConfig(128, 64, 8, 2, True)
_D256_SMALL = KernelConfig(64, 32, 4, 2, True)
_D256_SHARED_MEMORY = 200 << 10


def choose_config(q_lens: np.ndarray, kv_lens: np.ndarray, num_heads: int, num_kv_heads: int,
                  head_dim: int, causal: bool = True, shared_memory: int | None = None,
                  gluon: bool | None = None) -> KernelConfig:
    """Tile shape for a batch from two statistics: mean keys attended per query row, and mean query rows per
    request (small for decode and chunked prefill, which keep the small tiles whatever their context). A head dim
    that is not a power of two gets the tiles of the power of two it is padded to, with 64-key steps. Head dim
    256 takes its own shape, a smaller one where the GPU's shared memory per block (default: the current CUDA
    device's, see packinfer.device) cannot hold it. gluon: give head dim 128's long tiles to Hopper's Gluon kernel
    (default: where the current CUDA device runs it, unless PACKINFER_GLUON=0)."""
    check_head_dim(head_dim)
    q_total = max(int(q_lens.sum()), 1)
    if causal:
        keys_per_row = float((q_lens * np.maximum(kv_lens - q_lens, 0) + q_lens * (q_lens + 1) // 2).sum()) / q_total
    else:
        keys_per_row = float((q_lens * kv_lens).sum()) / q_total
    cfg = _LONG if keys_per_row >= _LONG_KEYS_PER_ROW and q_lens.mean() >= 256 else _SHORT
    padded = head_dim_padded(head_dim)
    if padded == 256:
        memory = device_shared_memory() if shared_memory is None else shared_memory
        cfg = _D256 if memory >= _D256_SHARED_MEMORY else _D256_SMALL
    elif head_dim != padded and cfg.block_n == 128:
        cfg = dataclasses.replace(cfg, block_n=64)
    group = num_heads // num_kv_heads
    if cfg.pack_gqa and (group & (group - 1) or group > cfg.slots // 16):
        cfg = dataclasses.replace(cfg, pack_gqa=False)
    if cfg == _LONG and head_dim == 128 and (_gluon_asked() if gluon is None else gluon):
        cfg = _LONG_GLUON
    return cfg


def _gluon_asked() -> bool:
    """The current CUDA device runs Hopper's Gluon kernel (hopper_attention.available), and PACKINFER_GLUON is not
    0."""
    return (os.environ.get("PACKINFER_GLUON") != "0" and torch.cuda.is_available()
            and hopper_attention.available(torch.device("cuda", torch.cuda.current_device())))


def plan_for(cu_seqlens_q, cu_seqlens_k, num_heads: int, num_kv_heads: int, head_dim: int, *, causal: bool,
             window: tuple[int, int] = (-1, -1), packing: bool = True, balancing: bool = True,
             config: KernelConfig | None = None) -> Plan:
    """plan_varlen with the tile shape chosen for this batch (or the given config)."""
    cu_q, cu_k = as_numpy(cu_seqlens_q, "cu_seqlens_q"), as_numpy(cu_seqlens_k, "cu_seqlens_k")
    if config is None:
        config = choose_config(np.diff(cu_q.astype(np.int64)), np.diff(cu_k.astype(np.int64)), num_heads,
                               num_kv_heads, head_dim, causal)
    group = num_heads // num_kv_heads if config.pack_gqa else 1
    return plan_varlen(cu_q, cu_k, num_heads, num_kv_heads, head_dim, causal=causal, window=window,
                       block_m=config.slots // group, block_n=config.block_n, packing=packing, balancing=balancing,
                       pack_gqa=config.pack_gqa, num_warps=config.num_warps, num_stages=config.num_stages,
                       engine=config.engine)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool,
                     softmax_scale: float | None = None, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None, return_lse: bool = False, plan: Plan | None = None,
                     out: torch.Tensor | None = None, validate: bool = True,
                     use_tma: bool | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a ragged batch, FlashAttention varlen conventions: q [total_q, H, D], k/v [total_k, Hkv, D]
    (any D <= 256), int32 cu_seqlens [B+1]; causal masks are aligned bottom-right (a row of a request with
    q_len > kv_len that sees no key gives zeros). Returns out like q, and with return_lse the natural-log
    softmax normaliser fp32 [H, total_q] (+inf for a row that sees no key).

    window (left, right): sliding window around each query's position (-1: unbounded side); softcap > 0:
    scores capped as softcap * tanh(s / softcap); alibi_slopes fp32 [H] or [B, H]: ALiBi bias
    -slope * |i + kv_len - q_len - j|. `plan` (from plan_for / plan_varlen on the same lengths, causal flag and
    window) skips planning; build it once per batch and reuse it for every layer. `out` (like q) receives the
    result when given. validate=False skips the argument checks, which read cu_seqlens on the host (a device
    sync); use it only for calls whose arguments were checked before. use_tma: load K/V through the Hopper
    tensor-memory accelerator (None: on GPUs that have one). max_seqlen_q / max_seqlen_k are accepted for drop-in
    compatibility and not needed. Forward only (inference).
    """
    window = check_window(window)
    if validate:
        check_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k)
        check_score_options(softcap, alibi_slopes, q.shape[1], len(cu_seqlens_q) - 1, q.device)
    head_dim = q.shape[2]
    if plan is None:
        plan = plan_for(cu_seqlens_q, cu_seqlens_k, q.shape[1], k.shape[1], head_dim, causal=causal, window=window)
    elif validate and (plan.causal != causal or plan.window != window or plan.num_heads != q.shape[1]
                       or plan.num_kv_heads != k.shape[1] or plan.head_dim != head_dim
                       or not np.array_equal(plan.cu_seqlens_q, cu_seqlens_q.cpu().numpy())
                       or not np.array_equal(plan.cu_seqlens_k, cu_seqlens_k.cpu().numpy())):
        raise ValueError("plan was built for another batch or shape (causal, window, heads, head_dim or lengths "
                         "differ)")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = _output(q, out)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device) if return_lse else None
    if alibi_slopes is not None and alibi_slopes.dim() == 2:  # one slope row per query row
        alibi_slopes = _slopes_per_row(alibi_slopes, np.diff(plan.cu_seqlens_q), q.shape[0])
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    launch_packed(q, k, v, out, plan, scale, use_tma, ScoreOptions(softcap, alibi_slopes), lse)
    return out if lse is None else (out, lse)  # lse is set exactly when return_lse


def cache_attention(q: torch.Tensor, view: KVView, plan: CachePlan, *, softmax_scale: float | None = None,
                    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, return_lse: bool = False,
                    out: torch.Tensor | None = None, validate: bool = True, use_tma: bool | None = None,
                    buffers: PlanBuffers | None = None, k_new: torch.Tensor | None = None,
                    v_new: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of new query rows over a KV cache, any mix of decode rows, prompt chunks and fresh prompts
    (their K/V written to the cache first): q [sum(q_lens), H, D], the rows of each request of `view` in order,
    each the last q_lens[i] positions of its request (bottom-right; the plan says causal or not, and its window).
    One kernel launch. `plan` comes from plan_cache_attention(view, q_lens, H) and serves every layer of the step;
    `buffers` (PlanBuffers the plan was loaded into) makes the launch read only fixed-capacity tensors (CUDA
    graphs). softcap / alibi_slopes ([H] or [requests, H]) / return_lse as in varlen_attention (lse fp32
    [H, rows]). Returns out like q; validate=False skips the checks (for calls whose arguments were checked
    before). use_tma: load K/V of the grouped layout through Hopper's TMA (None: where the GPU has it, unless
    PACKINFER_NO_TMA=1).
    k_new / v_new [rows of q, Hkv, D]: the rows' own K/V, not yet in the cache (whose positions the view already
    counts): the same launch stores them at their positions and attends with them, saving the separate cache
    write. Needs plan.writes_new (no query row is a position of a prefix)."""
    if (k_new is None) != (v_new is None):
        raise ValueError("give both k_new and v_new, or neither")
    if validate:
        _check_cache_call(q, view, plan, out)
        if k_new is not None and v_new is not None:
            _check_new_kv(q, view, plan, k_new, v_new)
        check_score_options(softcap, alibi_slopes, q.shape[1], len(plan.q_lens), q.device)
        if buffers is not None and buffers.plan is not plan:
            raise ValueError("buffers hold another plan: load(plan) them first")
    out = _output(q, out)
    lse = None
    if return_lse:
        lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    if alibi_slopes is not None and alibi_slopes.dim() == 2:
        alibi_slopes = _slopes_per_row(alibi_slopes, plan.q_lens, q.shape[0])
    empty = plan.empty_rows
    if len(empty):  # rows that see no position (q_len > kv_len): no program writes them
        out[torch.from_numpy(empty.astype(np.int64)).to(q.device)] = 0
    scale = softmax_scale if softmax_scale is not None else q.shape[2] ** -0.5
    launch_cache(q if q.stride(-1) == 1 else q.contiguous(), view.k, view.v, out, plan, scale, use_tma, buffers,
                 options=ScoreOptions(softcap, alibi_slopes), lse=lse, k_new=k_new, v_new=v_new)
    return out if lse is None else (out, lse)  # lse is set exactly when return_lse


def _check_new_kv(q: torch.Tensor, view: KVView, plan: CachePlan, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
    want = (q.shape[0], view.k.shape[1], view.k.shape[2])
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            raise ValueError(f"{name} must be [rows of q, KV heads, head_dim] = {list(want)}, got "
                             f"{list(getattr(t, 'shape', ()))}")
        if t.dtype != view.k.dtype or t.device != view.k.device or t.stride(-1) != 1:
            raise ValueError(f"{name} must be {view.k.dtype} on {view.k.device} with a contiguous last dim, got "
                             f"{t.dtype} on {t.device}, strides {t.stride()}")
    if not plan.writes_new:
        raise ValueError("k_new / v_new: the plan's writes_new is False (some query row is a position of a shared "
                         "prefix, which other requests read): write the new K/V to the cache first and call "
                         "without them")


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}, last dim contiguous), "
                         f"got {tuple(out.shape)}, {out.dtype}, {out.device}")
    return out


def _slopes_per_row(slopes: torch.Tensor, q_lens: np.ndarray, total: int) -> torch.Tensor:
    """[B, H] slopes as one row per query row."""
    counts = torch.from_numpy(np.asarray(q_lens, dtype=np.int64)).to(slopes.device)
    return torch.repeat_interleave(slopes, counts, dim=0, output_size=total)


def _check_cache_call(q: torch.Tensor, view: KVView, plan: CachePlan, out: torch.Tensor | None) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a tensor [tokens, heads, head_dim], got {tuple(getattr(q, 'shape', ()))}")
    rows = int(plan.q_lens.sum())
    if q.shape[0] != rows or q.shape[1] != plan.num_heads:
        raise ValueError(f"q has shape {tuple(q.shape)} but the plan expects {rows} rows of {plan.num_heads} heads")
    if q.shape[2] != view.k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} must equal the cache's ({view.k.shape[2]})")
    check_head_dim(q.shape[2])
    if q.dtype != view.k.dtype or q.device != view.k.device:
        raise ValueError(f"q is {q.dtype} on {q.device}, the cache {view.k.dtype} on {view.k.device}")
    if (plan.layout != view.layout or plan.num_kv_heads != view.k.shape[1]
            or not np.array_equal(plan.kv_lens, view.kv_lens)):
        raise ValueError("plan was built for another view (layout, KV heads or lengths differ)")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"out must match q (shape {tuple(q.shape)}, {q.dtype}, {q.device}, last dim contiguous)")
