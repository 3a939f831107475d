"""Decode kernel benchmark: packinfer cache attention (grouped and paged layouts, ablations) against FA2 varlen,
padded SDPA, FlexAttention and FlashInfer (paged decode, cascade) on decode batches replayed from the shipped
traces, DESIGN §5's length mixes, the straggler (1 x 32k + 127 x 512) and shared-prefix batches (B x P). Same
tensors for every backend (a shared prefix holds the same K/V in every member), every output checked against a
float32 reference. Writes records.csv, batches.csv, env.json (and tune.csv with --tune) to --out.

    python benchmarks/decode_kernel.py --out results/decode-kernel/<name>    # on a GPU machine
    python benchmarks/decode_kernel.py --smoke --out /tmp/dk                 # CPU: tiny, interpreter
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import packinfer
from common import GPU_SHAPE, measure_batches, print_table, setup, tune_candidates

from packinfer_bench.backends import BACKENDS, Backend
from packinfer_bench.backends.kv_layouts import cache_for
from packinfer_bench.timing import Timer
from packinfer_bench.traces import load_trace
from packinfer_bench.workload import Batch, StaticSpec, static_batches

#: FlexAttention compiles per shape: it runs on these batches only.
HEADLINE = ("sharegpt/b128/s0/decode@0.5", "straggler-32k/b128/s0/decode@0", "prefix-4096/b64/s0/decode@0")


def synthetic(name: str, n: int, prompt: dict, prefix: dict | None = None):
    return load_trace(None, "synthetic", name=name, num_requests=n, prompt=prompt, prefix=prefix,
                      output={"dist": "constant", "value": 2}, seed=0)


def make_batches(smoke: bool) -> list[Batch]:

    def first_step(n: int) -> StaticSpec:
        return StaticSpec(phases=["decode"], decode_points=[0.0], batch_sizes=[n])

    if smoke:
        tiny = synthetic("tiny", 6, {"dist": "uniform", "low": 1, "high": 70})
        shared = synthetic("tiny-prefix", 5, {"dist": "uniform", "low": 1, "high": 20}, {"groups": 1, "length": 33})
        return [*static_batches(tiny, first_step(6)),
                *static_batches(shared, first_step(5))]
    out: list[Batch] = []
    for trace_name in ("sharegpt", "azure-conv"):
        out += static_batches(load_trace(trace_name), StaticSpec(phases=["decode"], batch_sizes=[64, 128, 256],
                                                                  decode_points=[0.5], seed=0))
    out += static_batches(load_trace("mooncake-conv"), StaticSpec(phases=["decode"], batch_sizes=[64],
                                                                  decode_points=[0.5], max_len=32768, seed=0))
    designs = [  # DESIGN §5's decode mixes (context lengths), and the straggler
        ("sharegpt-like-kv", 128, {"dist": "lognormal", "median": 600, "sigma": 1.0, "max": 8192}),
        ("azure-like-kv", 128, {"dist": "lognormal", "median": 1500, "sigma": 0.8, "max": 8192}),
        ("uniform-2048", 128, {"dist": "constant", "value": 2048}),
        ("straggler-32k", 128, {"dist": "bimodal", "long": 32768, "short": 512, "num_long": 1}),
    ]
    for name, n, prompt in designs:
        out += static_batches(synthetic(name, n, prompt), first_step(n))
    for b in (32, 64, 128):  # B requests share a P-token system prompt, own suffix ~200 tokens
        for p in (2048, 4096, 8192):
            trace = synthetic(f"prefix-{p}", b, {"dist": "uniform", "low": 150, "high": 250},
                              {"groups": 1, "length": p})
            out += static_batches(trace, first_step(b))
    return out


def variants(batch: Batch, on_gpu: bool) -> list[tuple[Backend, str]]:
    names = ["packinfer"] + (["fa2", "sdpa_padded", "flashinfer"] if on_gpu else [])
    if on_gpu and batch.batch_id in HEADLINE:
        names.append("flex")
    return [(BACKENDS[n], v) for n in names for v in BACKENDS[n].variants
            if not (n == "flashinfer" and v == "fa3")]  # fa3 ragged prefill: no decode kernel, slow plan


def tune(batches: list[Batch], device, timer: Timer, out_dir: Path) -> None:
    """Time packinfer cache attention under several key blocks, pipeline depths, split targets, TMA on/off."""
    picks = ("sharegpt/b128/s0/decode@0.5", "azure-conv/b128/s0/decode@0.5", "straggler-32k/b128/s0/decode@0",
             "uniform-2048/b128/s0/decode@0", "prefix-4096/b64/s0/decode@0")
    candidates = []
    for bn, stages, waves, tma in [(bn, stages, waves, tma) for bn in (32, 64) for stages in (2, 3, 4)
                                   for waves in (2, 4) for tma in (True, False)]:

        def prepare(x, variant, bn=bn, stages=stages, waves=waves, tma=tma):
            _, view = cache_for(x, "grouped")
            plan = packinfer.plan_cache_attention(view, x.batch.q_lens, x.shape.num_heads, block_n=bn, waves=waves)
            plan = dataclasses.replace(plan, num_stages=stages)
            return lambda: packinfer.cache_attention(x.q, view, plan, validate=False, use_tma=tma)

        candidates.append((f"n{bn}-s{stages}-waves{waves}" + ("-tma" if tma else ""), prepare))
    tune_candidates(batches, picks, candidates, GPU_SHAPE, device, timer, out_dir, "kv_tbps")


def main() -> None:
    s = setup(__doc__, "benchmarks/decode_kernel.py", 30, "only sweep packinfer launch settings (writes tune.csv)")
    batches = s.select(make_batches(s.args.smoke))
    if s.args.tune:
        tune(batches, s.device, s.timer, s.args.out)
        return
    on_gpu = s.device.type == "cuda"
    records = measure_batches(batches, lambda b: variants(b, on_gpu), s.shape, s.device, s.timer, s.args.out)
    print_table(records, metric="kv_tbps")


if __name__ == "__main__":
    main()
