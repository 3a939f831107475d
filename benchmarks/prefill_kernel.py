"""Prefill (and mixed) kernel benchmark: packinfer and its ablations against FA2 varlen, FlexAttention and
FlashInfer on batches replayed from the shipped traces, through the harness's backends and runner (same tensors
for all, every output checked against a float32 reference). Writes records.csv, batches.csv and env.json (and
tune.csv with --tune) to --out.

    python benchmarks/prefill_kernel.py --out results/prefill-kernel/<name>    # on a GPU machine
    python benchmarks/prefill_kernel.py --smoke --out /tmp/pk                  # CPU: tiny, interpreter
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import packinfer
from common import measure_batches, print_table, setup, tune_candidates

from packinfer_bench.backends import BACKENDS, Backend
from packinfer_bench.backends import packinfer as packinfer_backend
from packinfer_bench.config import ShapeConfig
from packinfer_bench.timing import Timer
from packinfer_bench.traces import load_trace
from packinfer_bench.workload import Batch, StaticSpec, static_batches

#: The flashinfer-offline bundle and FlexAttention's compile make these the slow baselines: Flex runs on
#: the headline batches only.
HEADLINE = ("sharegpt/b256/s0/prefill", "azure-conv/b64/s0/prefill", "sharegpt/b128/s0/mixed",
            "sharegpt-like-lognormal/b256/s0/prefill")
NO_TMA = Backend("packinfer", ("no-tma",), packinfer_backend.BACKEND.available,
                 lambda x, variant: packinfer_backend.prepare(x, "full", use_tma=False))


#: DESIGN §5's prompt mixes and the straggler: (name, requests, prompt distribution), one prefill batch each.
PREFILL_MIXES = (
    ("sharegpt-like-lognormal", 256, {"dist": "lognormal", "median": 250, "sigma": 1.0, "max": 8192}),
    ("azure-like-lognormal", 64, {"dist": "lognormal", "median": 1000, "sigma": 0.8, "max": 8192}),
    ("uniform-4096", 16, {"dist": "constant", "value": 4096}),
    ("straggler-32k", 128, {"dist": "bimodal", "long": 32768, "short": 512, "num_long": 1}),
)


def synthetic(name: str, n: int, prompt: dict):
    return load_trace(None, "synthetic", name=name, num_requests=n, prompt=prompt, seed=0)


def make_batches(smoke: bool) -> list[Batch]:
    if smoke:
        spec = StaticSpec(phases=["prefill", "mixed"], batch_sizes=[6], chunk_size=16)
        return list(static_batches(synthetic("tiny", 6, {"dist": "uniform", "low": 1, "high": 40}), spec))
    out: list[Batch] = []
    for trace_name in ("sharegpt", "azure-conv"):
        trace = load_trace(trace_name)
        out += static_batches(trace, StaticSpec(phases=["prefill"], batch_sizes=[32, 64, 128, 256], seed=0))
        out += static_batches(trace, StaticSpec(phases=["mixed"], batch_sizes=[128], decode_fraction=0.75,
                                                chunk_size=512, seed=0))
    for name, n, prompt in PREFILL_MIXES:
        out += static_batches(synthetic(name, n, prompt), StaticSpec(phases=["prefill"], batch_sizes=[n]))
    return out


def variants(batch: Batch, on_gpu: bool) -> list[tuple[Backend, str]]:
    names = ["packinfer", "triton_unpacked"] + (["fa2", "flashinfer"] if on_gpu else [])
    if on_gpu and batch.batch_id in HEADLINE:
        names.append("flex")
    chosen = [(BACKENDS[n], v) for n in names for v in BACKENDS[n].variants]
    return chosen + ([(NO_TMA, "no-tma")] if on_gpu else [])


def tune(batches: list[Batch], shape: ShapeConfig, device, timer: Timer, out_dir: Path) -> None:
    """Time packinfer under several tile shapes (slots x block_n x warps x stages): the data behind
    packinfer.choose_config."""
    K = packinfer.KernelConfig
    configs = [K(128, 128, 8, 3, False), K(128, 128, 8, 4, False), K(128, 64, 8, 3, False), K(128, 64, 8, 4, False),
               K(128, 128, 8, 3, True), K(128, 64, 8, 3, True), K(128, 64, 8, 4, True), K(128, 32, 4, 3, True),
               K(128, 64, 4, 3, True), K(64, 64, 4, 3, True), K(64, 64, 4, 4, True), K(64, 128, 4, 3, True)]
    picks = ("sharegpt/b256/s0/prefill", "azure-conv/b64/s0/prefill", "uniform-4096/b16/s0/prefill",
             "sharegpt-like-lognormal/b256/s0/prefill", "sharegpt/b128/s0/mixed", "azure-conv/b128/s0/mixed",
             "straggler-32k/b128/s0/prefill")
    candidates = []
    for cfg in configs:

        def prepare(x, variant, cfg=cfg):
            s = x.shape
            plan = packinfer.plan_for(x.cu_q_cpu, x.cu_k_cpu, s.num_heads, s.num_kv_heads, s.head_dim, causal=True,
                                      config=cfg)
            return lambda: packinfer.varlen_attention(x.q, x.k, x.v, x.cu_q, x.cu_k, x.max_q, x.max_k, causal=True,
                                                      plan=plan, validate=False)

        candidates.append((f"{cfg.slots}x{cfg.block_n}x{cfg.num_warps}x{cfg.num_stages}"
                           + ("+gqa" if cfg.pack_gqa else ""), prepare))
    tune_candidates(batches, picks, candidates, shape, device, timer, out_dir, "tflops")


def main() -> None:
    s = setup(__doc__, "benchmarks/prefill_kernel.py", 20, "only sweep packinfer tile shapes (writes tune.csv)")
    batches = s.select(make_batches(s.args.smoke))
    if s.args.tune:
        tune(batches, s.shape, s.device, s.timer, s.args.out)
        return
    on_gpu = s.device.type == "cuda"
    print_table(measure_batches(batches, lambda b: variants(b, on_gpu), s.shape, s.device, s.timer, s.args.out))


if __name__ == "__main__":
    main()
