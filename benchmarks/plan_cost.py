"""CPU cost of packinfer's planner (choose_config + plan_for) on batches replayed from the shipped traces:
median of many builds per batch. Needs no GPU.

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
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.json").write_text(json.dumps(envinfo.collect(), indent=2) + "\n")
    rows = []
    for trace_name in ("sharegpt", "azure-conv"):
        spec = StaticSpec(phases=["prefill", "mixed"], batch_sizes=[32, 64, 128, 256], seed=0)
        for batch in static_batches(load_trace(trace_name), spec):
            cu_q, cu_k = batch.cu_seqlens()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                plan = packinfer.plan_for(cu_q, cu_k, 32, 8, 128)
                times.append((time.perf_counter() - t0) * 1e3)
            rows.append({"batch": batch.batch_id, "batch_size": len(batch), "num_q_tokens": int(batch.q_lens.sum()),
                         "tiles": plan.num_tiles, "runs": len(plan.runs), "plan_ms_median": round(statistics.median(times), 4),
                         "plan_ms_p90": round(sorted(times)[int(0.9 * len(times))], 4)})
            print(f"{rows[-1]['batch']:<32} {rows[-1]['tiles']:>6} tiles {rows[-1]['runs']:>4} runs "
                  f"{rows[-1]['plan_ms_median']:.3f} ms (p90 {rows[-1]['plan_ms_p90']:.3f})", flush=True)
    with open(args.out / "plan_cost.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
