"""Fit the cache planner's CostModel to a serving_tune.py sweep. For each set of constants on a grid, every
batch of the sweep is planned with them (the planner itself, as a serving loop calls it) and the measured time of
the plan it picks is looked up (same query slots and KV chunk, keys per step and launch as the sweep's grid);
the regret of a batch is that time over the best grid candidate's. Prints the constants with the least
geometric-mean regret (ties: the least worst case), the per-batch table for them and for the constants the
library ships, and writes fit.json beside tune.csv.

    python benchmarks/fit_cost_model.py results/serving-tune/h200
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import packinfer
from common import GPU_SHAPE
from packinfer.cache_plan import WAVES, CostModel

from packinfer_bench.backends.packinfer import _view_like
from packinfer_bench.workload import Batch

#: The constants searched (CostModel's): per-SM bandwidth (bytes/us), a lone program's speed-up, a launch's
#: latency and a program's SM time beyond its keys (us), the unhidden share of the smaller of a program's memory
#: and tensor-core times, and the tensor-core efficiency of each slot count scaled by one factor.
GRID = {"bytes_per_us": [25e3, 36.4e3], "lone_speedup": [1.1, 1.2, 1.5], "fixed_us": [0.0, 2.0],
        "program_us": [1.5, 2.5, 3.5], "unhidden": [0.0, 0.25, 0.5], "efficiency_scale": [0.67, 1.0, 1.33]}


def load(folder: Path) -> tuple[list[Batch], dict[str, dict[tuple[int, int], float]], int]:
    """The sweep's batches, per batch the measured ms of each (slots, kv_chunk) at the default launch (the loads
    its code defaulted to: tune.csv's `tma`), and the GPU's SM count."""
    batches = [Batch.from_record(json.loads(line)) for line in open(folder / "batches.jsonl")]
    times: dict[str, dict[tuple[int, int], float]] = {}
    with open(folder / "tune.csv", newline="") as f:
        for r in csv.DictReader(f):
            grid = r["candidate"] == "planner" or r["candidate"].split("-")[1:2] == ["n64"]
            if r["status"] == "ok" and grid and r["block_n"] == "64":
                times.setdefault(r["batch_id"], {})[int(r["slots"]), int(r["kv_chunk"])] = float(r["ms_median"])
    sms = json.loads((folder / "env.json").read_text())["gpu"]["sms"]
    return [b for b in batches if b.batch_id in times], times, sms


def choice(batch: Batch, cost: CostModel, sms: int, waves: int = WAVES) -> tuple[int, int]:
    """(slots, kv_chunk) the planner picks for the batch at the sweep's shape (serving_tune.py: GPU_SHAPE)."""
    view = _view_like(batch, num_kv_heads=GPU_SHAPE.num_kv_heads, head_dim=GPU_SHAPE.head_dim)
    plan = packinfer.plan_cache_attention(view, batch.q_lens, GPU_SHAPE.num_heads, num_sms=sms, cost=cost,
                                          waves=waves)
    return plan.slots, plan.kv_chunk


def regrets(batches, times, sms: int, cost: CostModel, waves: int = WAVES) -> list[tuple[str, float, tuple[int, int]]]:
    """(batch, regret, choice) per batch; inf where the choice was not measured (a finer split than the sweep's
    grid holds, say)."""
    out = []
    for b in batches:
        pick = choice(b, cost, sms, waves)
        measured = times[b.batch_id]
        out.append((b.batch_id, measured.get(pick, math.inf) / min(measured.values()), pick))
    return out


def model(efficiency_scale: float = 1.0, **constants: float) -> CostModel:
    """CostModel with these constants, its efficiency table scaled (1.0: the shipped table)."""
    base = CostModel()
    eff = tuple((s, e * efficiency_scale) for s, e in base.efficiency)
    return dataclasses.replace(base, efficiency=eff, **constants)


def summary(rows) -> tuple[float, float]:
    r = np.array([x[1] for x in rows])
    return float(np.exp(np.log(r).mean())), float(r.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--waves", default="", help="comma-separated: also the shipped constants with the finest split "
                    f"at these programs per SM (the planner's is {WAVES})")
    args = ap.parse_args()
    batches, times, sms = load(args.folder)
    for waves in [int(w) for w in args.waves.split(",") if w]:
        g, w = summary(regrets(batches, times, sms, CostModel(), waves))
        print(f"shipped constants at {waves} programs per SM: geomean regret {g:.4f}, worst {w:.3f}")
    shipped = regrets(batches, times, sms, CostModel())
    best = None
    for values in itertools.product(*GRID.values()):
        params = dict(zip(GRID, values))
        rows = regrets(batches, times, sms, model(**params))
        score = summary(rows)
        if best is None or score < best[0]:
            best = (score, params, rows)
    assert best is not None
    (geo, worst), params, rows = best
    print(f"{'batch':<32}{'shipped':>9}  {'pick':<12}{'fitted':>9}  pick")
    for (bid, r0, p0), (_, r1, p1) in zip(shipped, rows):
        print(f"{bid:<32}{r0:>9.3f}  {str(p0):<12}{r1:>9.3f}  {p1}")
    g0, w0 = summary(shipped)
    print(f"shipped constants: geomean regret {g0:.3f}, worst {w0:.3f}")
    print(f"fitted {params}: geomean regret {geo:.3f}, worst {worst:.3f}")
    (args.folder / "fit.json").write_text(json.dumps({"params": params, "geomean_regret": geo, "worst_regret": worst,
                                                      "shipped_geomean_regret": g0, "shipped_worst_regret": w0,
                                                      "batches": len(batches)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
