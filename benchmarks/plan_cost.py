"""CPU cost of packinfer's planners on batches replayed from the shipped traces: median of many builds per batch.
Needs no GPU. Two planners, two CSVs whose columns follow the harness's records (packinfer_bench/run_folder/
records.py: batch_id, num_tokens, plan_ms = the median, timing) plus what the plan is made of and the 10th / 90th
percentiles of the plan time:

- plan_cost.csv: the varlen planner (choose_config + plan_for) on prefill and mixed batches (tiles, runs);
- cache_plan_cost.csv: the cache planner (plan_cache_attention, which a serving loop runs every iteration) on
  decode and mixed batches of the ShareGPT, Azure and Mooncake traces, over a grouped cache of an 8B model's
  attention (32 query heads, 8 KV heads of 128, bf16) on a 132-SM GPU (items, slots, kv_chunk, partials).

    python benchmarks/plan_cost.py --out results/plan-cost/<machine> [--planners cache] [--before REV]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import packinfer
import torch
from packinfer.cache_plan import ITEM_FIELDS, ROW_FIELDS

from packinfer_bench import envinfo
from packinfer_bench.traces import load_trace
from packinfer_bench.workload import Batch, StaticSpec, static_batches

REPO = Path(__file__).resolve().parents[1]
HEADS, KV_HEADS, HEAD_DIM, SMS = 32, 8, 128, 132  # Llama-3-8B's attention on an H100 / H200
Plan = TypeVar("Plan")


def _timed(build: Callable[[], Plan], repeats: int) -> tuple[Plan, dict]:
    """The last of `repeats` builds and the median / 10th / 90th percentile of their wall-clock times (ms)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = build()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, _summary(times)


def _record(batch: Batch) -> dict:
    return {"trace": batch.trace, "phase": batch.phase, "batch_id": batch.batch_id, "batch_size": len(batch),
            "num_tokens": int(batch.q_lens.sum()), "num_kv_tokens": int(batch.kv_lens.sum()), "backend": "packinfer"}


def _grouped_view(batch: Batch) -> packinfer.KVView:
    """A grouped-cache view with the batch's lengths and prefix groups (addresses made up: the plan's cost does
    not depend on them), as the serving backend builds for choosing a graph's tile shape."""
    n = len(batch)
    empty = torch.empty(0, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    return packinfer.KVView("grouped", empty, empty, list(range(n)), batch.kv_lens.copy(), batch.prefix_ids.copy(),
                            np.where(batch.prefix_ids >= 0, batch.prefix_lens, 0),
                            prefix_addr=np.zeros(n, np.int64), own_addr=np.cumsum(batch.kv_lens) - batch.kv_lens)


def varlen_rows(sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for trace_name in ("sharegpt", "azure-conv"):
        spec = StaticSpec(phases=["prefill", "mixed"], batch_sizes=sizes, seed=0)
        for batch in static_batches(load_trace(trace_name), spec):
            cu_q, cu_k = batch.cu_seqlens()
            plan, timing = _timed(partial(packinfer.plan_for, cu_q, cu_k, HEADS, KV_HEADS, HEAD_DIM, causal=True),
                                  repeats)
            rows.append({**_record(batch), "variant": "full", "tiles": plan.num_tiles, "runs": len(plan.runs),
                         **timing})
            print(f"{rows[-1]['batch_id']:<32} {rows[-1]['tiles']:>6} tiles {rows[-1]['runs']:>4} runs "
                  f"{rows[-1]['plan_ms']:.3f} ms (p90 {rows[-1]['plan_ms_p90']:.3f})", flush=True)
    return rows


def cache_rows(sizes: list[int], repeats: int, before: Callable | None = None) -> list[dict]:
    """The cache planner on each batch; with `before` (an older plan_cache_attention) that one too, timed in
    alternating rounds on the same batch, its plans checked to be the same."""
    rows = []
    print(f"{'batch':<34} {'rows':>6} {'items':>6} {'slots':>5} {'kv_chunk':>8} {'median ms':>9} {'p90 ms':>7}"
          + (f" {'before ms':>9}" if before else ""))
    for trace_name in ("sharegpt", "azure-conv", "mooncake-conv"):
        spec = StaticSpec(phases=["decode", "mixed"], batch_sizes=sizes, seed=0)
        for batch in static_batches(load_trace(trace_name), spec):
            view = _grouped_view(batch)
            now = partial(packinfer.plan_cache_attention, view, batch.q_lens, HEADS, num_sms=SMS)
            if before is None:
                plan, timing = _timed(now, repeats)
                extra = {}
            else:
                old = partial(before, view, batch.q_lens, HEADS, num_sms=SMS)
                plan, timing, old_plan, old_timing = _alternating(now, old, repeats)
                same = _same_plan(plan, old_plan, before)
                extra = {"plan_ms_before": old_timing["plan_ms"], "plan_ms_p90_before": old_timing["plan_ms_p90"],
                         "same_plan_as_before": same}
            rows.append({**_record(batch), "variant": "cache-plan", "items": plan.num_items, "slots": plan.slots,
                         "kv_chunk": plan.kv_chunk, "partials": plan.num_partials, **timing, **extra})
            r = rows[-1]
            print(f"{r['batch_id']:<34} {r['num_tokens']:>6} {r['items']:>6} {r['slots']:>5} {r['kv_chunk']:>8} "
                  f"{r['plan_ms']:>9.3f} {r['plan_ms_p90']:>7.3f}"
                  + (f" {r['plan_ms_before']:>9.3f}" if before else ""), flush=True)
    return rows


def _same_plan(plan, old_plan, before: Callable) -> bool:
    """Whether two revisions' plans are the same in every item and row column both name (a revision may add
    columns) and in merge_idx."""
    old_module = sys.modules[before.__module__]
    for table, names, old_names in (("items", ITEM_FIELDS, old_module.ITEM_FIELDS),
                                    ("rows", ROW_FIELDS, old_module.ROW_FIELDS)):
        new, old = getattr(plan, table), getattr(old_plan, table)
        if new.shape[0] != old.shape[0] or any(not np.array_equal(new[:, names.index(f)], old[:, old_names.index(f)])
                                               for f in names if f in old_names):
            return False
    return np.array_equal(plan.merge_idx, old_plan.merge_idx)


def _alternating(a: Callable[[], Plan], b: Callable[[], Plan], repeats: int, rounds: int = 5):
    """_timed of a and of b in alternating rounds (machine noise falls on both alike): (plan a, timing a, plan b,
    timing b), each timing over all its repeats."""
    times: dict[int, list[float]] = {0: [], 1: []}
    plans: dict[int, Plan] = {}
    for _ in range(rounds):
        for i, build in enumerate((a, b)):
            for _ in range(max(repeats // rounds, 1)):
                t0 = time.perf_counter()
                plans[i] = build()
                times[i].append((time.perf_counter() - t0) * 1e3)
    return plans[0], _summary(times[0]), plans[1], _summary(times[1])


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"plan_ms": round(statistics.median(times), 4), "plan_ms_p10": round(times[int(0.1 * len(times))], 4),
            "plan_ms_p90": round(times[int(0.9 * len(times))], 4), "timing": "wall-clock-cpu"}


def _planner_at(rev: str) -> Callable:
    """plan_cache_attention of kernels/packinfer/cache_plan.py at git revision `rev` (imported beside the
    current packinfer, whose other modules it uses)."""
    source = subprocess.run(["git", "show", f"{rev}:kernels/packinfer/cache_plan.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"cache_plan_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)  # dataclasses look themselves up
    spec.loader.exec_module(module)
    return module.plan_cache_attention


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--batch-sizes", default="32,64,128,256", help="varlen planner: comma-separated requests per batch")
    ap.add_argument("--cache-batch-sizes", default="32,128,256",
                    help="cache planner: comma-separated requests per batch")
    ap.add_argument("--planners", default="varlen,cache", help="comma-separated: varlen, cache")
    ap.add_argument("--before", metavar="REV", help="also time the cache planner of this git revision, alternating")
    args = ap.parse_args()
    planners = set(args.planners.split(","))
    if not planners or planners - {"varlen", "cache"}:
        ap.error(f"--planners takes varlen and/or cache, got {args.planners!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.json").write_text(json.dumps(envinfo.collect(), indent=2) + "\n")
    if "varlen" in planners:
        _write(args.out / "plan_cost.csv", varlen_rows([int(b) for b in args.batch_sizes.split(",")], args.repeats))
    if "cache" in planners:
        _write(args.out / "cache_plan_cost.csv",
               cache_rows([int(b) for b in args.cache_batch_sizes.split(",")], args.repeats,
                          _planner_at(args.before) if args.before else None))


if __name__ == "__main__":
    main()
