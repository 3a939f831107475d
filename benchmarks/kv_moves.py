"""KV data the grouped cache moves over an experiment's end-to-end schedules, per placement policy: the cache
bookkeeping a replay does (packinfer_bench.serving.kv_follow.CacheFollower over the scheduler's iterations, at the
replay's cache capacity), counted on the CPU. Needs no GPU: the copies are counted, not run (token data does not
change where extents go). Bytes are for the entry's model (its KV heads, head dim, layers, bf16).

    python benchmarks/kv_moves.py experiments/e2e-h200.yaml --step-time results/e2e-h200-v2/e2e/step_time.json \\
        --out results/kv-moves/e2e-h200.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import packinfer
import packinfer.kv_cache.base as cache_base
import packinfer.kv_cache.grouped as grouped
import torch

from packinfer_bench.config import load_config
from packinfer_bench.experiment import load_traces
from packinfer_bench.models import preset
from packinfer_bench.serving.kv_follow import CacheFollower
from packinfer_bench.serving.replay import HEADROOM, layout_capacity
from packinfer_bench.serving.stage import load_point_specs, scenario, server_budget, stored_step_time

POLICIES = {"first-fit (before)": dict(placement="first-fit", relayout_slack=0.0),
            "spread": dict(placement="spread", relayout_slack=0.0),
            "spread + relayout slack (default)": dict(placement="spread", relayout_slack=0.5)}
FIELDS = ["e2e", "trace", "rate", "policy", "iterations", "moved_tokens", "moved_gb", "iterations_with_moves",
          "relocations", "relayouts"]


def count_moves(schedule, capacity: int, policy: dict) -> dict:
    cache = packinfer.make_cache("grouped", capacity, 1, 1, dtype=torch.float32, headroom=HEADROOM, **policy)
    cache.allocate("scratch", reserve=1)  # as the replay's cache holds the padded rows' slot
    follower = CacheFollower(cache, schedule, synchronize=False)
    moved = relocations = relayouts = busy = 0
    for i, batch in enumerate(schedule):
        cost = follower.step(i, batch, write=False)
        follower.retire(i, batch)
        moved += cost.moved_bytes // cache.token_bytes
        relocations, relayouts, busy = relocations + cost.relocations, relayouts + cost.relayouts, busy + (
            cost.moved_bytes > 0)
    return dict(iterations=len(schedule), moved_tokens=moved, iterations_with_moves=busy, relocations=relocations,
                relayouts=relayouts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--step-time", type=Path, help="a run folder's e2e/step_time.json (its schedules exactly); "
                    "default: each entry's continuous.step_time")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    no_copy = lambda *a, **k: None  # noqa: E731 -- counting only
    grouped.copy_token_ranges = cache_base.copy_token_ranges = no_copy
    cfg = load_config(args.config)
    traces = load_traces(cfg.traces)
    stored = json.loads(args.step_time.read_text()) if args.step_time else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        out = csv.DictWriter(f, FIELDS, lineterminator="\n")
        out.writeheader()
        for e in cfg.e2e:
            m = preset(e.model, e.num_layers)
            token_bytes = m.num_layers * 2 * m.num_kv_heads * m.head_dim * 2
            st = stored_step_time(stored, e) or e.continuous.step_time
            points = {(trace, label): scenario(traces[trace], spec)
                      for trace, label, spec in load_point_specs(cfg, e, st)}
            # the capacity of the entry's replay caches
            capacity = layout_capacity("grouped", 0, *server_budget(e.continuous, points.values()))
            for (trace, label), scen in points.items():
                for name, policy in POLICIES.items():
                    row = dict(e2e=e.name, trace=trace, rate=label, policy=name,
                               **count_moves(scen.schedule, capacity, policy))
                    row["moved_gb"] = round(row["moved_tokens"] * token_bytes / 1e9, 2)
                    out.writerow(row)
                    f.flush()
                    print(f"{e.name} {label:>4} {name:34s} {row['moved_gb']:7.1f} GB, {row['relocations']:4d} "
                          f"relocations, {row['relayouts']:3d} re-layouts")


if __name__ == "__main__":
    main()
