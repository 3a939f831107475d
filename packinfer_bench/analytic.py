"""Analytic mode: predict without a GPU how evenly FlashAttention-2's grid and the packinfer plan spread a
batch's work over a GPU's SMs, and the speedup that balance alone would give.

Model: a program's cost is the MMA work of its tile (query slots x keys it visits, padded to whole key blocks,
plus a fixed overhead of TILE_OVERHEAD_BLOCKS key blocks); the hardware hands programs in launch order to the
first free SM (one resident program per SM); the batch takes as long as the busiest SM (the makespan). FA2's
varlen grid launches (query head, request, 128-row block) with the row block fastest; packinfer launches its
plan's tiles, heads side by side. Compare with measurement before trusting it: it ignores memory traffic,
L2 reuse and occupancy above one program per SM.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import packinfer
import pandas as pd
from packinfer.plan import tile_costs

from packinfer_bench.config import ShapeConfig
from packinfer_bench.workload import Batch


def makespan(costs: np.ndarray, workers: int) -> float:
    """Finish time of greedy list scheduling: each program, in order, starts on the first free worker."""
    free = [0.0] * min(workers, len(costs))
    heapq.heapify(free)
    for cost in costs.tolist():
        heapq.heappush(free, heapq.heappop(free) + cost)
    return max(free) if free else 0.0


def _tile_work(plan: packinfer.Plan) -> tuple[np.ndarray, np.ndarray]:
    """(tile table, MMA work of each tile): query slots x keys visited, in whole key blocks plus the overhead."""
    table = plan.tile_table()
    slots = plan.block_m * (plan.num_heads // plan.num_kv_heads if plan.pack_gqa else 1)
    work = slots * tile_costs(table[:, 4], table[:, 6], plan.block_n) * plan.block_n
    return table, work.astype(np.float64)


def program_costs(plan: packinfer.Plan) -> np.ndarray:
    """Cost of every program of a plan, in launch order (tile-major, the tile's heads side by side)."""
    _, work = _tile_work(plan)
    return np.repeat(work, plan.num_kv_heads if plan.pack_gqa else plan.num_heads)


def fa2_grid_costs(plan: packinfer.Plan) -> np.ndarray:
    """FA2's launch order over an unpacked plan's tiles: for each head, for each request, its row blocks."""
    table, work = _tile_work(plan)
    order = np.lexsort((table[:, 0], table[:, 2]))  # request, then first row
    return np.tile(work[order], plan.num_heads)


def write_predictions(batches: list[Batch], shapes: list[ShapeConfig], sms: int, path: Path) -> int:
    """One CSV row per (batch, shape) with the batch's statistics and predict()'s numbers; returns the rows."""
    rows = [{**batch.stats(), "shape": shape.name, "sms": sms, **predict(batch, shape, sms)}
            for batch in batches for shape in shapes]
    pd.DataFrame(rows).to_csv(path, index=False)
    return len(rows)


def predict(batch: Batch, shape: ShapeConfig, sms: int) -> dict[str, float]:
    """Makespans, imbalance (makespan / perfectly even split) and predicted speedup of packinfer over FA2's grid."""
    cu_q, cu_k = batch.cu_seqlens()
    fa2 = packinfer.plan_for(cu_q, cu_k, shape.num_heads, shape.num_kv_heads, shape.head_dim, causal=True,
                             packing=False, balancing=False, config=packinfer.FA2_LIKE)
    ours = packinfer.plan_for(cu_q, cu_k, shape.num_heads, shape.num_kv_heads, shape.head_dim, causal=True)
    out: dict[str, float] = {}
    for name, costs in (("fa2_grid", fa2_grid_costs(fa2)), ("packinfer", program_costs(ours))):
        span = makespan(costs, sms)
        out[f"{name}_work"] = float(costs.sum())
        out[f"{name}_makespan"] = span
        out[f"{name}_imbalance"] = float(span / (costs.sum() / sms))
    out["predicted_speedup"] = out["fa2_grid_makespan"] / out["packinfer_makespan"]
    return out
