"""The planner: turn a ragged batch (lengths only) into a balanced work list of query tiles.

A tile is a contiguous range of at most block_m rows of the packed query tensor plus the key range those rows
need. With packing on, consecutive short requests (and the leftover head rows of a long one) share a tile, each
row masked to its own request's keys (block-diagonal inside the tile); long requests are split into full
block_m-row tiles. Tiles come in runs: a run is a row range cut into tiles from its end, so a request's tiles
launch last rows first (the most keys under a causal mask). With balancing on, runs launch heaviest first: the
GPU's block scheduler hands the next tile to the first free SM (greedy list scheduling), so no long tile starts
last and straggles, while the tiles of one request stay adjacent and share its keys in L2. (Sorting all tiles by
cost alone was 2-26% slower on H100 prefill batches: results/prefill-kernel/h100-r3, variant tile-cost-order.)
The plan is O(requests) small arrays plus one int32 per tile, built in well under a millisecond for 256
requests, and depends only on the lengths: build it once per batch on the CPU, reuse it for every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from packinfer.validate import check_cu_seqlens, check_window

#: Columns of Plan.runs.
RUN_FIELDS = ("row_start", "row_end", "seq_first", "seq_last", "num_tiles", "first_tile")
#: Columns of Plan.tile_table().
TILE_FIELDS = ("row_start", "row_end", "seq_first", "seq_last", "k_start", "k_nomask_end", "k_end")
#: Kernels that run a Plan (see plan_varlen's engine).
ENGINES = ("triton", "gluon")
#: Tile cost of its fixed work (load Q, write O, launch), in key blocks.
TILE_OVERHEAD_BLOCKS = 2.0


@dataclass
class Plan:
    """A batch's work list. `runs` is int32 [R, 6] (RUN_FIELDS: absolute query rows, first and last request,
    tiles, launch position of the run's first tile); `tile_run` is int32 [T], the run of each tile in launch
    order. Tile j of a run covers rows [max(row_start, row_end - (j + 1) * block_m), row_end - j * block_m).
    With pack_gqa the kernel runs a tile once per KV head with all the query heads of that KV head side by
    side (block_m * group slots), else once per query head."""

    runs: np.ndarray
    tile_run: np.ndarray
    cu_seqlens_q: np.ndarray
    cu_seqlens_k: np.ndarray
    causal: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_m: int
    block_n: int
    packing: bool
    balancing: bool
    pack_gqa: bool = False
    window: tuple[int, int] = (-1, -1)
    num_warps: int = 4
    num_stages: int = 3
    engine: str = "triton"
    plan_ms: float = 0.0
    _device_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tiles(self) -> int:
        return len(self.tile_run)

    @property
    def batch_size(self) -> int:
        return len(self.cu_seqlens_q) - 1

    def tile_table(self) -> np.ndarray:
        """Every tile in launch order as int64 [T, 7] with the columns of TILE_FIELDS (keys of
        [k_start, k_nomask_end) are valid for every row of the tile and need no mask)."""
        runs = self.runs.astype(np.int64)[self.tile_run]
        j = np.arange(self.num_tiles) - runs[:, 5]
        row_end = runs[:, 1] - j * self.block_m
        row_start = np.maximum(runs[:, 0], row_end - self.block_m)
        bounds = key_bounds(row_start, row_end, runs[:, 2], runs[:, 3], self.cu_seqlens_q.astype(np.int64),
                            self.cu_seqlens_k.astype(np.int64), self.causal, self.block_n, self.window)
        return np.stack([row_start, row_end, runs[:, 2], runs[:, 3], *bounds], axis=1)

    def tile_costs(self) -> np.ndarray:
        """Estimated cost of each tile (launch order) in key blocks: the cost model the balancing uses."""
        table = self.tile_table()
        return tile_costs(table[:, 4], table[:, 6], self.block_n)

    def device_arrays(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(runs, tile_run, cu_seqlens_q, cu_seqlens_k) as int32 tensors on `device`, copied once per device."""
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = tuple(
                torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)
                for a in (self.runs, self.tile_run, self.cu_seqlens_q, self.cu_seqlens_k))
        return self._device_cache[key]


def tile_costs(k_start: np.ndarray, k_end: np.ndarray, block_n: int) -> np.ndarray:
    return -(-(k_end - k_start) // block_n) + TILE_OVERHEAD_BLOCKS


def as_numpy(x, name: str) -> np.ndarray:
    """cu_seqlens (int32 tensor on any device, or array) as a host numpy array; ValueError if not int32."""
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")
        return x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype != np.int32:
        raise ValueError(f"{name} must be int32, got {arr.dtype}")
    return arr


def plan_varlen(cu_seqlens_q, cu_seqlens_k, num_heads: int, num_kv_heads: int, head_dim: int, *,
                causal: bool, block_m: int = 128, block_n: int = 64, packing: bool = True,
                balancing: bool = True, pack_gqa: bool = False, window: tuple[int, int] = (-1, -1),
                num_warps: int = 4, num_stages: int = 3, engine: str = "triton") -> Plan:
    """Plan a varlen attention batch from its cu_seqlens (int32 [B+1], tensors or arrays; read on the CPU).

    causal: bottom-right aligned mask (FlashAttention's; rows of a request with q_len > kv_len that see no key
    give zeros). window (left, right): each query sees keys at most `left` before and `right` after its own
    position (-1: unbounded), FlashAttention's sliding window; tiles read only the keys some row sees.
    packing=False gives FlashAttention-2's grid (one request per tile); balancing=False keeps batch order;
    pack_gqa=True puts the query heads of a KV head in one program (block_m rows x group heads per tile).
    num_warps / num_stages: the kernel's launch configuration for this plan. engine: which kernel runs it,
    "triton" (packed_attention, any GPU and the interpreter) or "gluon" (hopper_attention: 128-slot tiles of
    128-key steps on a Hopper GPU; elsewhere, or for options it lacks, the Triton kernel runs the same plan).
    """
    import time

    t0 = time.perf_counter()
    cu_q = as_numpy(cu_seqlens_q, "cu_seqlens_q").astype(np.int64)
    cu_k = as_numpy(cu_seqlens_k, "cu_seqlens_k").astype(np.int64)
    check_cu_seqlens(cu_q, cu_k)
    window = check_window(window)
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    group = num_heads // num_kv_heads
    slots = block_m * group if pack_gqa else block_m
    if pack_gqa and group & (group - 1):
        raise ValueError(f"pack_gqa needs a power-of-two GQA group, got num_heads/num_kv_heads = {group}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    for name, b in (("block_m (x group with pack_gqa)", slots), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    runs = _packed_runs(cu_q, cu_k, block_m) if packing else _request_runs(cu_q, block_m)
    # the first tile of a run (its last rows) is its heaviest
    heavy_start = np.maximum(runs[:, 0], runs[:, 1] - block_m)
    k_start, _, k_end = key_bounds(heavy_start, runs[:, 1], runs[:, 2], runs[:, 3], cu_q, cu_k, causal, block_n,
                                   window)
    order = np.argsort(-tile_costs(k_start, k_end, block_n), kind="stable") if balancing else np.arange(len(runs))
    counts = runs[order, 4]
    runs[order, 5] = np.cumsum(counts) - counts
    plan = Plan(runs=runs.astype(np.int32), tile_run=np.repeat(order.astype(np.int32), counts),
                cu_seqlens_q=cu_q.astype(np.int32), cu_seqlens_k=cu_k.astype(np.int32), causal=causal,
                num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_m=block_m,
                block_n=block_n, packing=packing, balancing=balancing, pack_gqa=pack_gqa, window=window,
                num_warps=num_warps, num_stages=num_stages, engine=engine)
    plan.plan_ms = (time.perf_counter() - t0) * 1e3
    return plan


def key_bounds(row_start, row_end, seq_first, seq_last, cu_q, cu_k, causal, block_n, window=(-1, -1)):
    """k_start, k_nomask_end, k_end of tiles given their rows and first/last request (vectorised); with a window
    (the kernel then finds its unmasked blocks itself) k_nomask_end is k_start."""
    k_start = cu_k[seq_first]
    last_row = row_end - 1
    # a row's diagonal (the key index of its own position, bottom-right aligned)
    first_diag = cu_k[seq_first + 1] - cu_q[seq_first + 1] + row_start
    last_diag = cu_k[seq_last + 1] - cu_q[seq_last + 1] + last_row
    if causal:  # query i of a request sees keys up to kv_len - q_len + i
        # a pack's earlier requests bring all their rows, the last of which sees all their keys; the last one
        # brings its head rows, which may see fewer (or none, with q_len > kv_len)
        k_end = np.maximum(np.minimum(cu_k[seq_last + 1], last_diag + 1),
                           np.where(seq_first != seq_last, cu_k[seq_last], k_start))
        first_hi = first_diag  # inclusive bound of the tile's first row
    else:
        k_end = cu_k[seq_last + 1]
        first_hi = cu_k[seq_first + 1] - 1
    if window != (-1, -1):
        if window[0] >= 0:
            k_start = np.maximum(k_start, first_diag - window[0])
        if window[1] >= 0 and not causal:
            k_end = np.minimum(k_end, last_diag + window[1] + 1)
        k_end = np.maximum(k_end, k_start)
        return k_start, k_start, k_end
    full = (first_hi + 1 - k_start) // block_n * block_n
    k_nomask_end = np.where(seq_first == seq_last, k_start + np.maximum(full, 0), k_start)
    return k_start, np.minimum(k_nomask_end, k_end), k_end


def _request_runs(cu_q, block_m) -> np.ndarray:
    """One run per request with queries: FlashAttention-2's grid, no tile shared by two requests."""
    seqs = np.flatnonzero(np.diff(cu_q))
    q_lens = cu_q[seqs + 1] - cu_q[seqs]
    runs = np.zeros((len(seqs), len(RUN_FIELDS)), np.int64)
    runs[:, 0], runs[:, 1], runs[:, 2], runs[:, 3], runs[:, 4] = (cu_q[seqs], cu_q[seqs + 1], seqs, seqs,
                                                                  -(-q_lens // block_m))
    return runs


def _packed_runs(cu_q, cu_k, block_m) -> np.ndarray:
    """Each request's head rows (q_len % block_m of them, the ones with the fewest keys when causal) join the
    open pack when they fit, else open a new one; its remaining rows form a run of full tiles, which closes the
    pack (tiles are contiguous row ranges whose key ranges hold only keys some row needs: a request with keys
    but no queries closes the pack too). Only the greedy choice of pack is a Python loop; runs come out in
    row order."""
    q_lens = np.diff(cu_q)
    heads, fulls = q_lens % block_m, q_lens // block_m
    pack_of = np.full(len(q_lens), -1, dtype=np.int64)
    ck, pid, open_rows, last = cu_k.tolist(), -1, 0, 0
    for s, (h, f) in enumerate(zip(heads.tolist(), fulls.tolist())):
        if h:
            if open_rows and open_rows + h <= block_m and ck[s] == ck[last + 1]:
                open_rows += h
            else:
                pid, open_rows = pid + 1, h
            pack_of[s], last = pid, s
        if f:
            open_rows = 0
    members = np.flatnonzero(pack_of >= 0)
    pack = pack_of[members]
    first = members[np.diff(pack, prepend=-1) != 0]
    last_member = members[np.diff(pack, append=pack[-1] + 1) != 0] if len(pack) else members
    # members before the last of a pack have no full tiles, so a pack's rows are contiguous
    packs = np.stack([cu_q[first], cu_q[last_member] + heads[last_member], first, last_member,
                      np.ones_like(first), np.zeros_like(first)], axis=1)
    long = np.flatnonzero(fulls)
    full_runs = np.stack([cu_q[long] + heads[long], cu_q[long + 1], long, long, fulls[long], np.zeros_like(long)],
                         axis=1)
    runs = np.concatenate([packs, full_runs])
    return runs[np.argsort(runs[:, 0], kind="stable")]
