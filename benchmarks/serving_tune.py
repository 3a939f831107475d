"""Data for the cache planner's cost model, on the serving path: scheduler batches of a serving experiment
(experiments/serving.yaml), each held in packinfer's grouped KV cache exactly as the serving call holds it, and
the attention launch timed under a grid of plans - query slots x keys per step x KV chunk (unsplit included),
TMA loads, and warps x pipeline stages at the planner's own tile - beside the planner's choice. Where the serving
call stores the new rows' K/V in the attention launch (packinfer_bench.backends.packinfer.fuses), every
candidate is timed as that fused launch (column `fused`), as the serving call runs it. Every candidate's output
is checked against the float32 reference. The planner's regret on a batch is its time over
the best candidate's; CostModel is fit to these rows (benchmarks/fit_cost_model.py).

Writes tune.csv (one row per batch x candidate: the plan's shape, items, partials, the cost model's estimate,
the time), batches.jsonl and env.json to --out, and resumes where a killed run stopped.

    python benchmarks/serving_tune.py --out results/serving-tune/<gpu>        # on a GPU machine
    python benchmarks/serving_tune.py --smoke --out /tmp/st                     # CPU: tiny, interpreter
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import packinfer
import torch
from common import held_in_cache, setup, slot_choices
from packinfer.cache_attention import launch as launch_cache
from packinfer.cache_attention import tma_loads
from packinfer.cache_plan import launch_config
from packinfer.device import shared_memory

from packinfer_bench.config import load_config
from packinfer_bench.experiment import experiment_batches, load_traces
from packinfer_bench.run_folder import CsvRows
from packinfer_bench.runner import MAX_REL_ERR
from packinfer_bench.workload import Batch

FIELDS = ("batch_id", "kind", "batch_size", "num_tokens", "num_kv_tokens", "max_q", "max_kv", "candidate", "slots",
          "block_n", "kv_chunk", "tma", "fused", "num_warps", "num_stages", "num_items", "num_partials", "estimate_us",
          "status", "reason", "ms_median", "ms_p10", "ms_p90", "rel_err", "measured_at")
#: Most programs a candidate may launch (finer chunks only add per-program cost).
MAX_PROGRAMS_PER_SM = 32


def candidates(batch: Batch, num_heads: int, num_kv_heads: int, head_dim: int, sms: int,
               memory: int, plans_only: bool = False) -> list[tuple[str, dict]]:
    """(name, plan/launch options) of the grid; the planner's own choice first ("planner"). plans_only: the plans
    the planner chooses from (its 64 keys per step) at the default launch, and the planner's own plan with
    pointer loads ("planner-pointer"); no other key step or launch shape."""
    group = num_heads // num_kv_heads
    longest = int(batch.kv_lens.max())
    out: list[tuple[str, dict]] = [("planner", {})]
    for slots in slot_choices(batch, num_heads, num_kv_heads):
        for block_n in (64,) if plans_only else (32, 64, 128):
            if launch_config(slots, block_n, head_dim, 2, memory) is None:
                continue
            out.append((f"s{slots}-n{block_n}-whole", {"slots": slots, "block_n": block_n, "split": False}))
            chunk = block_n  # the planner's ladder starts at one key block
            rows_per_item = max(slots // group, 1)
            while chunk < longest:
                items = sum(-(-int(kv) // chunk) * -(-int(q) // rows_per_item)
                            for q, kv in zip(batch.q_lens, batch.kv_lens))
                if items * num_kv_heads <= MAX_PROGRAMS_PER_SM * sms:
                    out.append((f"s{slots}-n{block_n}-c{chunk}", {"slots": slots, "block_n": block_n,
                                                                  "kv_chunk": chunk}))
                chunk *= 2
    out.append(("planner-pointer", {"use_tma": False}))  # (where the default is TMA loads: Hopper)
    if plans_only:
        return out
    for warps in (4, 8):
        for stages in (2, 3, 4):
            out.append((f"planner-w{warps}s{stages}", {"launch": (warps, stages)}))
    return out


def tune_batch(batch: Batch, shape, device, timer, rows: CsvRows, done: set, sms: int, memory: int,
               plans_only: bool = False) -> None:
    x, ref, cache, view, new_kv = held_in_cache(batch, shape, device)  # new_kv: where the serving call fuses
    s = x.shape
    base = {"batch_id": batch.batch_id, "kind": "decode" if int(batch.q_lens.max()) == 1 else batch.phase,
            "batch_size": len(batch), "num_tokens": int(batch.q_lens.sum()), "num_kv_tokens": int(batch.kv_lens.sum()),
            "max_q": int(batch.q_lens.max()), "max_kv": int(batch.kv_lens.max())}
    for name, opts in candidates(batch, s.num_heads, s.num_kv_heads, s.head_dim, sms, memory, plans_only):
        if (batch.batch_id, name) in done:
            continue
        use_tma = tma_loads(opts.get("use_tma"), x.q, cache.k, cache.v, cache.layout)  # what the launch runs
        row = dict(base, candidate=name, status="ok", reason="", tma=use_tma)
        try:
            plan_opts = {k: opts[k] for k in ("slots", "block_n", "kv_chunk", "split") if k in opts}
            plan = packinfer.plan_cache_attention(view, batch.q_lens, s.num_heads, num_sms=sms, **plan_opts)
            if "launch" in opts:
                warps, stages = opts["launch"]
                plan.num_warps, plan.num_stages = warps, stages
            row.update(slots=plan.slots, block_n=plan.block_n, kv_chunk=plan.kv_chunk, num_warps=plan.num_warps,
                       num_stages=plan.num_stages, num_items=plan.num_items, num_partials=plan.num_partials,
                       estimate_us=round(plan.estimate_us, 3))
            fused = new_kv is not None and plan.writes_new  # (re-stores the K/V the cache holds: same work)
            new = dict(zip(("k_new", "v_new"), new_kv)) if fused else {}
            row["fused"] = fused
            out = torch.full_like(x.q, float("nan"))  # poisoned: every row must be written
            run = functools.partial(launch_cache, x.q, cache.k, cache.v, out, plan, s.head_dim ** -0.5,
                                    use_tma=use_tma, **new)

            run()
            diff = out.float() - ref
            row["rel_err"] = float(diff.norm() / ref.norm())
            if not np.isfinite(row["rel_err"]) or row["rel_err"] > MAX_REL_ERR:
                row["status"], row["reason"] = "incorrect", f"relative error {row['rel_err']:.3g}"
            times = timer(run)
            row.update(ms_median=round(float(np.median(times)), 5), ms_p10=round(float(np.percentile(times, 10)), 5),
                       ms_p90=round(float(np.percentile(times, 90)), 5))
        except Exception as e:  # a shape that does not compile or fit is a row, not the end of the sweep
            row["status"], row["reason"] = "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        rows.append([row])
        print(f"{batch.batch_id:<32} {name:<22} {row.get('ms_median', '')!s:>9} ms  plan {row.get('slots')}x"
              f"{row.get('block_n')} chunk {row.get('kv_chunk')} items {row.get('num_items')} {row['status']}",
              flush=True)
    del x, ref, cache, new_kv


def main() -> None:
    s = setup(__doc__, "benchmarks/serving_tune.py", 20, "(no effect: this script only tunes)",
              lambda ap: ap.add_argument("--plans-only", action="store_true",
                                         help="only the plans the planner chooses from, at the default launch"))
    config = load_config(Path(os.environ.get("SERVING_TUNE_CONFIG", "experiments/serving.yaml")))
    batches = list(experiment_batches(config, load_traces(config.traces)))
    if s.args.smoke:
        batches = [b for b in batches if int(b.kv_lens.sum()) <= 600][:3]
    batches = s.select(batches)
    rows = CsvRows(s.args.out / "tune.csv", list(FIELDS))  # appended and flushed row by row; a torn tail is cut
    path = s.args.out / "batches.jsonl"  # the batches of earlier runs into this folder are kept (--only)
    earlier = [json.loads(line) for line in open(path)] if path.exists() else []
    ids = {b.batch_id for b in batches}
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in earlier if r["batch_id"] not in ids)
        f.writelines(json.dumps(b.to_record()) + "\n" for b in batches)
    done = {(r["batch_id"], r["candidate"]) for r in rows.read()[0]}
    sms = packinfer.num_sms(s.device)
    memory = shared_memory(s.device)
    for batch in batches:
        tune_batch(batch, s.shape, s.device, s.timer, rows, done, sms, memory, s.args.plans_only)


if __name__ == "__main__":
    main()
