"""What the kernel benchmarks share: the environment record, the measuring loop over batches (through the
harness's runner, so every backend gets the same tensors and the same checks), and the summary table."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import packinfer.device
import torch
from packinfer import cache_plan

from packinfer_bench import envinfo
from packinfer_bench.backends import Backend
from packinfer_bench.backends.base import Step
from packinfer_bench.backends.packinfer import PackinferAttention
from packinfer_bench.backends.serving_call import _cached
from packinfer_bench.config import ShapeConfig
from packinfer_bench.reference import reference_attention
from packinfer_bench.run_folder.records import FIELDS, Record, RecordStore
from packinfer_bench.runner import make_inputs, measure_one, record_base
from packinfer_bench.timing import Timer
from packinfer_bench.workload import Batch

GPU_SHAPE = ShapeConfig("llama3-8b", 32, 8, 128, "bf16")
SMOKE_SHAPE = ShapeConfig("tiny", 4, 2, 64, "fp16")


@dataclass
class Setup:
    """A benchmark's parsed arguments and what follows from them."""

    args: argparse.Namespace
    device: torch.device
    shape: ShapeConfig
    timer: Timer

    def select(self, batches: list[Batch]) -> list[Batch]:
        """The batches --only names (all without it)."""
        if not self.args.only:
            return batches
        return [b for b in batches if any(s in b.batch_id for s in self.args.only.split(","))]


def setup(doc: str, script: str, repeats: int, tune_help: str,
          more: Callable[[argparse.ArgumentParser], None] | None = None) -> Setup:
    """The common command line (--out, --smoke, --tune, --only, --warmup, --repeats, and what `more` adds), the
    output folder with env.json, the device, shape and timer."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if more is not None:
        more(ap)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument("--tune", action="store_true", help=tune_help)
    ap.add_argument("--only", default="", help="comma-separated substrings: run only batches whose id has one")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=repeats)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    timer = Timer(device, 0 if args.smoke else args.warmup, 1 if args.smoke else args.repeats, flush_l2=True)
    write_env(args.out, script, shape, timer)
    return Setup(args, device, shape, timer)


def write_env(out: Path, script: str, shape: ShapeConfig, timer: Timer) -> None:
    env = {**envinfo.collect(), "benchmark": {"script": script, "argv": sys.argv[1:], "shape": str(shape),
                                              "timing": timer.method}}
    (out / "env.json").write_text(json.dumps(env, indent=2) + "\n")


def measure_batches(batches: list[Batch], variants: Callable[[Batch], list[tuple[Backend, str]]],
                    shape: ShapeConfig, device: torch.device, timer: Timer, out: Path, *, resume: bool = False,
                    on_record: Callable[[Record], None] | None = None) -> list[Record]:
    """Every (backend, variant) of each batch on the batch's tensors; batches.csv and records.csv under out.
    resume: skip what records.csv already holds (a batch with nothing left makes no tensors); on_record: called
    with each new record as it is stored. Returns the new records."""
    with open(out / "batches.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(batches[0].stats()))
        writer.writeheader()
        writer.writerows(b.stats() for b in batches)
    store, records = RecordStore(out), []
    done = store.keys() if resume else set()
    for batch in batches:
        base = record_base(batch, shape)
        todo = [(b, v) for b, v in variants(batch) if (base["batch_id"], base["shape"], b.name, v) not in done]
        if not todo:
            continue
        print(f"batch {batch.batch_id}: {len(batch)} requests, {int(batch.q_lens.sum())} q tokens, "
              f"{int(batch.kv_lens.sum())} kv tokens", flush=True)
        x = make_inputs(batch, shape, device)
        ref = reference_attention(x)
        for backend, variant in todo:
            reason = backend.available(device)
            rec = (Record(**base, backend=backend.name, variant=variant, status="skipped", reason=reason,
                          timing=timer.method) if reason else measure_one(backend, variant, x, ref, timer, base))
            store.append(rec)
            records.append(rec)
            if on_record is not None:
                on_record(rec)
        del x, ref
    return records


UNITS = {"tflops": "TFLOP/s", "kv_tbps": "TB/s"}


def tune_candidates(batches: list[Batch], picks: tuple[str, ...], candidates: list[tuple[str, Callable]],
                    shape: ShapeConfig, device: torch.device, timer: Timer, out: Path, metric: str) -> None:
    """Time each (name, prepare) launch-setting candidate of packinfer on the picked batches (same inputs, each
    output checked against the reference): one row per (batch, candidate) in out/tune.csv, written as measured,
    in the harness's records schema (run_folder/records.py; the candidate is the variant)."""
    with open(out / "tune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)  # the harness's records schema; variant: the candidate
        writer.writeheader()
        for batch in (b for b in batches if b.batch_id in picks):
            x = make_inputs(batch, shape, device)
            ref = reference_attention(x)
            for name, prepare in candidates:
                rec = measure_one(Backend("packinfer", (name,), lambda d: None, prepare), name, x, ref, timer,
                                  record_base(batch, shape))
                writer.writerow({k: "" if v is None else v for k, v in dataclasses.asdict(rec).items()})
                f.flush()
                value = getattr(rec, metric)
                print(f"tune {batch.batch_id:<40} {name:<22} {rec.kernel_ms} ms {value} {UNITS[metric]} {rec.status}",
                      flush=True)
            del x, ref


def print_table(records: list[Record], metric: str = "tflops") -> None:
    """One line per record: time, `metric` (tflops or kv_tbps), speed-up over fa2 on the same batch, error."""
    fa2 = {r.batch_id: r.kernel_ms for r in records if r.backend == "fa2" and r.status == "ok"}
    label = UNITS[metric]
    print(f"\n{'batch':<42}{'backend:variant':<32}{'ms':>9}{label:>9}{'vs fa2':>8}{'rel err':>10}  status")
    for r in records:
        comparable = r.batch_id in fa2 and r.kernel_ms and r.status == "ok"
        speed = f"{fa2[r.batch_id] / r.kernel_ms:.2f}x" if comparable else ""
        err = f"{r.rel_err:.1e}" if r.rel_err is not None else ""
        value = getattr(r, metric)
        value = f"{value:.2f}" if value is not None else ""
        print(f"{r.batch_id:<42}{r.backend + ':' + r.variant:<32}{r.kernel_ms or '':>9}{value:>9}"
              f"{speed:>8}{err:>10}  {r.status} {r.reason[:60]}")


def slot_choices(batch: Batch, num_heads: int, num_kv_heads: int, head_dim: int = 128, elem_bytes: int = 2,
                 memory: int | None = None) -> list[int]:
    """The query-slot counts the cache planner weighs on a batch (packinfer.cache_plan.slot_choices, GQA-packed),
    its widest KV segment bounded from the batch: a request's rows, or all rows of the requests sharing a prefix,
    which the planner reads as one segment (its own rule may find a narrower one). memory: shared memory per block
    (default: this machine's GPU, or the planner's fallback)."""
    ids = batch.prefix_ids[batch.prefix_ids >= 0]
    shared = max((int(batch.q_lens[batch.prefix_ids == i].sum()) for i in set(ids.tolist())), default=0)
    widest = max(int(batch.q_lens.max()), shared)
    memory = memory if memory is not None else packinfer.device.shared_memory()
    return cache_plan.slot_choices(widest, num_heads // num_kv_heads, True, head_dim, elem_bytes, memory)


def held_in_cache(batch: Batch, shape: ShapeConfig, device: torch.device):
    """The batch as packinfer's serving call holds it: (inputs, float32 reference, grouped cache with the new rows'
    K/V written too, the cache's view of the batch's requests, the new rows' (K, V) where the serving call stores
    them in its attention launch, else None)."""
    x = make_inputs(batch, shape, device)
    ref = reference_attention(x)
    s = x.shape
    attention = PackinferAttention(device, s.num_heads, s.num_kv_heads, s.head_dim)
    cache, slots, new = _cached(x, attention)
    attention.begin(Step(batch, cache, None, slots, batch.cu_seqlens()[0]))
    k_new, v_new = x.k[new], x.v[new]
    attention(0, x.q, k_new, v_new)  # the new rows' K/V into the cache, as the serving call writes them
    fused = (k_new, v_new) if attention.launches_per_layer == 1 else None
    return x, ref, cache, cache.view(batch.request_ids.tolist()), fused
