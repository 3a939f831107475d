"""CPU cost of packinfer's planner (choose_config + plan_for) on batches replayed from the shipped traces:
median of many builds per batch. Needs no GPU. plan_cost.csv's columns follow the harness's records
(packinfer_bench/run_folder/records.py: batch_id, num_tokens, plan_ms = the median, timing), plus the plan's
tiles and runs and the 10th / 90th percentiles of the plan time.

    python benchmarks/plan_cost.py --out results/plan-cost/<machine>
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import packinfer

from packinfer_bench import envinfo
from packinfer_bench.traces import load_trace
from packinfer_bench.workload import StaticSpec, static_batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--batch-sizes", default="32,64,128,256", help="comma-separated requests per batch")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.json").write_text(json.dumps(envinfo.collect(), indent=2) + "\n")
    rows = []
    for trace_name in ("sharegpt", "azure-conv"):
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        spec = StaticSpec(phases=["prefill", "mixed"], batch_sizes=sizes, seed=0)
        for batch in static_batches(load_trace(trace_name), spec):
            cu_q, cu_k = batch.cu_seqlens()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                plan = packinfer.plan_for(cu_q, cu_k, 32, 8, 128, causal=True)
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append({"trace": batch.trace, "phase": batch.phase, "batch_id": batch.batch_id,
                         "batch_size": len(batch), "num_tokens": int(batch.q_lens.sum()),
                         "num_kv_tokens": int(batch.kv_lens.sum()), "backend": "packinfer", "variant": "full",
                         "tiles": plan.num_tiles, "runs": len(plan.runs),
                         "plan_ms": round(statistics.median(times), 4),
                         "plan_ms_p10": round(sorted(times)[int(0.1 * len(times))], 4),
                         "plan_ms_p90": round(sorted(times)[int(0.9 * len(times))], 4), "timing": "wall-clock-cpu"})
            print(f"{rows[-1]['batch_id']:<32} {rows[-1]['tiles']:>6} tiles {rows[-1]['runs']:>4} runs "
                  f"{rows[-1]['plan_ms']:.3f} ms (p90 {rows[-1]['plan_ms_p90']:.3f})", flush=True)
    with open(args.out / "plan_cost.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
