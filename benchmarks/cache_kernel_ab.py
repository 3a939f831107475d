"""The cache-attention kernel of another version (a file: `git show REV:kernels/packinfer/cache_attention.py >
FILE`) against this tree's, on the serving batches of experiments/serving.yaml, in one process: each batch is
held in packinfer's grouped cache as the serving call holds it, planned by the planner (its own pick, then every
slot choice with the planner's KV chunk), and both kernels run the same plan on the same tensors, timed in
alternating rounds (L2 flushed), each output checked against the float32 reference. A kernel change is judged
by these ratios, never by two runs on two machines.

Writes ab.csv (one row per batch x plan: the before file's hash, shape, both times, before / after, both errors)
and env.json to --out; resumes where a killed run stopped. The launches are the non-fused form (the batch's K/V
already in the cache; no k_new / v_new), which serving uses for iterations past its fusing threshold.

    git show 0d9d3cf:kernels/packinfer/cache_attention.py > /tmp/before.py   # then copy it into the tree
    python benchmarks/cache_kernel_ab.py --before before.py --out DIR [--only serving-8/sharegpt/it0,...]
    python benchmarks/cache_kernel_ab.py --before before.py --smoke --out /tmp/ab   # CPU: tiny, interpreter
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
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
from packinfer.cache_plan import SLOT_CHOICES

from packinfer_bench.config import load_config
from packinfer_bench.experiment import experiment_batches, load_traces
from packinfer_bench.run_folder import CsvRows
from packinfer_bench.runner import MAX_REL_ERR
from packinfer_bench.workload import Batch

FIELDS = ("batch_id", "before", "kind", "batch_size", "num_tokens", "max_q", "max_kv", "plan", "slots", "kv_chunk",
          "num_items", "before_ms", "after_ms", "speedup", "rel_err_before", "rel_err_after", "status", "measured_at")
#: Alternating rounds per plan (each a median of --repeats launches); the times kept are the rounds' medians.
ROUNDS = 4


def _kernel_from(path: Path):
    """The `launch` of a cache_attention.py file, imported beside this tree's packinfer (whose other modules it
    uses), and the file's hash (rows of another file are not taken as done)."""
    spec = importlib.util.spec_from_file_location("cache_attention_before", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.launch, hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def ab_batch(batch: Batch, s, before, version: str, rows: CsvRows, done: set, sms: int) -> None:
    """Both kernels on every plan of the batch not yet in `done` (the non-fused launch: the cache holds the
    batch's K/V, as for a prompt longer than the serving call's fusing threshold)."""
    plans = [("planner", None)] + [(f"s{n}", n) for n in slot_choices(batch, s.shape.num_heads, s.shape.num_kv_heads)]
    plans = [(name, fixed) for name, fixed in plans if (batch.batch_id, version, name) not in done]
    if not plans:
        return
    after = importlib.import_module("packinfer.cache_attention").launch
    x, ref, cache, view, _ = held_in_cache(batch, s.shape, s.device)
    shape = x.shape
    for name, fixed in plans:
        plan = packinfer.plan_cache_attention(view, batch.q_lens, shape.num_heads, num_sms=sms, slots=fixed)
        runs, errors = {}, {}
        for side, launch in (("before", before), ("after", after)):
            out = torch.full_like(x.q, float("nan"))  # poisoned: every row must be written
            runs[side] = functools.partial(launch, x.q, cache.k, cache.v, out, plan, shape.head_dim ** -0.5)
            runs[side]()
            errors[side] = float((out.float() - ref).norm() / ref.norm())
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(ROUNDS):
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                times[side].append(float(np.median(s.timer(runs[side]))))
        b, a = float(np.median(times["before"])), float(np.median(times["after"]))
        ok = all(np.isfinite(e) and e <= MAX_REL_ERR for e in errors.values())
        row = {"batch_id": batch.batch_id, "before": version,
               "kind": "decode" if int(batch.q_lens.max()) == 1 else batch.phase,
               "batch_size": len(batch), "num_tokens": int(batch.q_lens.sum()), "max_q": int(batch.q_lens.max()),
               "max_kv": int(batch.kv_lens.max()), "plan": name, "slots": plan.slots, "kv_chunk": plan.kv_chunk,
               "num_items": plan.num_items, "before_ms": round(b, 5), "after_ms": round(a, 5),
               "speedup": round(b / a, 4), "rel_err_before": errors["before"], "rel_err_after": errors["after"],
               "status": "ok" if ok else "incorrect", "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        rows.append([row])
        print(f"{batch.batch_id:<30} {name:<8} {plan.slots:>4} slots  before {b * 1e3:8.2f} us  after "
              f"{a * 1e3:8.2f} us  x{b / a:.3f}  {row['status']}", flush=True)
    del x, ref, cache


def summarize(records: list[dict]) -> None:
    """Geometric-mean speed-up (before / after) over the planner's picks and per slot count."""
    def line(label: str, subset: list[dict]) -> None:
        r = np.array([float(x["speedup"]) for x in subset])
        if len(r):
            print(f"{label:<16} {len(r):>4} plans  geomean x{np.exp(np.log(r).mean()):.4f}  min x{r.min():.3f}  "
                  f"max x{r.max():.3f}")
    line("planner picks", [x for x in records if x["plan"] == "planner"])
    for n in SLOT_CHOICES:
        line(f"{n} slots", [x for x in records if int(x["slots"]) == n])
    bad = [x for x in records if x["status"] != "ok"]
    print(f"{len(bad)} incorrect" + (f": {[(x['batch_id'], x['plan']) for x in bad]}" if bad else ""))


def main() -> None:
    def more(ap) -> None:
        ap.add_argument("--before", type=Path, required=True, help="the other version's cache_attention.py")

    s = setup(__doc__, "benchmarks/cache_kernel_ab.py", 10, "(no effect)", more)
    before, version = _kernel_from(s.args.before)
    config = load_config(Path("experiments/serving.yaml"))
    batches = list(experiment_batches(config, load_traces(config.traces)))
    if s.args.smoke:
        batches = [b for b in batches if int(b.kv_lens.sum()) <= 600][:2]
    rows = CsvRows(s.args.out / "ab.csv", list(FIELDS))  # appended and flushed row by row
    done = {(r["batch_id"], r["before"], r["plan"]) for r in rows.read()[0]}
    sms = packinfer.num_sms(s.device)
    for batch in s.select(batches):
        ab_batch(batch, s, before, version, rows, done, sms)
    summarize([r for r in rows.read()[0] if r["before"] == version])


if __name__ == "__main__":
    main()
