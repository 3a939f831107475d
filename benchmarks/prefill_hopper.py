"""Prefill tile shapes of the packed kernel on Hopper against FlashAttention-3 and FlashInfer's fa3 backend: the
kernel sweep's prefill batches (ShareGPT and Azure conv b32-b256, Mooncake conv b32/b64), prompt-length families
outside the traces, and, for regressions, the sweep's mixed batches. The data behind issue 20's ablation and
choose_config. Every output is checked against the float32 reference; the log gives each candidate's compiled
registers, spills and shared memory. Rows go to records.csv (the harness's schema; a candidate is a packinfer
variant) as they are measured, and a second call with the same --out skips what is there, so a killed run
resumes; summary.txt holds the geomean table.

    python benchmarks/prefill_hopper.py --out results/prefill-hopper/<name>    # on a Hopper GPU
    python benchmarks/prefill_hopper.py --smoke --out /tmp/ph                  # CPU: tiny, interpreter
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import packinfer
import pandas as pd
from common import measure_batches, setup
from packinfer import hopper_attention
from prefill_kernel import PREFILL_MIXES, synthetic

from packinfer_bench.backends import BACKENDS, Backend, Inputs
from packinfer_bench.report.tables import load_records
from packinfer_bench.run_folder.records import Record
from packinfer_bench.traces import load_trace
from packinfer_bench.workload import Batch, StaticSpec, static_batches

K = packinfer.KernelConfig
#: name -> the tile shape (KernelConfig) of the candidate; "chosen" is choose_config's for the batch (on Hopper: the
#: Gluon kernel for long tiles), "chosen-triton" the same with the Triton kernel for every tile. Launch
#: knobs measured before and dropped (results/prefill-hopper/NOTES.md): Triton's warp-specialized loop, maxnreg,
#: the scale inside the exponent, 4 stages (00fd9b1), the software-pipelined unmasked loop (4d8e8b5), the Gluon
#: kernel's one-bound mask (gluon-simplemask, results/prefill-hopper/h100-knobs).
CANDIDATES: dict[str, K | None] = {
    "chosen": None,
    "chosen-triton": None,
    # the warp-specialized Hopper kernel (hopper_attention; warps and stages here are the Triton fallback's)
    "gluon": K(128, 128, 8, 3, True, engine="gluon"),
    "gluon-nogqa": K(128, 128, 8, 3, False, engine="gluon"),
    "gluon-pp": K(128, 128, 8, 3, True, engine="gluon"),
    "gluon-s3": K(128, 128, 8, 3, True, engine="gluon"),
    "gluon-pp-s3": K(128, 128, 8, 3, True, engine="gluon"),
    "gluon-r240": K(128, 128, 8, 3, True, engine="gluon"),
    "gluon-pp-r240": K(128, 128, 8, 3, True, engine="gluon"),
    "gluon-l48": K(128, 128, 8, 3, True, engine="gluon"),
    "gluon-widestore": K(128, 128, 8, 3, True, engine="gluon"),
    "gluon-rescaleqk": K(128, 128, 8, 3, True, engine="gluon"),
    "gluon-rescaleqk-pp": K(128, 128, 8, 3, True, engine="gluon"),
    "128x128x8+gqa": K(128, 128, 8, 3, True),
    "128x64x8+gqa": K(128, 64, 8, 3, True),
    "128x128x8": K(128, 128, 8, 3, False),
    "64x64x4+gqa": K(64, 64, 4, 3, True),
    "64x64x4+gqa-s2": K(64, 64, 4, 2, True),
    "64x128x4+gqa-s2": K(64, 128, 4, 2, True),
}
#: Variants of the Gluon kernel under measurement (packinfer.hopper_attention.TUNING), per candidate.
TUNINGS = {"gluon-pp": {"pingpong": True}, "gluon-s3": {"stages": 3},
           "gluon-pp-s3": {"pingpong": True, "stages": 3}, "gluon-r240": {"regs": (240, 24)},
           "gluon-pp-r240": {"pingpong": True, "regs": (240, 24)}, "gluon-l48": {"regs": (232, 48)},
           "gluon-widestore": {"wide_store": True}, "gluon-rescaleqk": {"rescale_under_qk": True},
           "gluon-rescaleqk-pp": {"rescale_under_qk": True, "pingpong": True}}
#: The Gluon kernel's shipped settings, which a candidate's TUNINGS entry overrides.
DEFAULT_TUNING = dict(hopper_attention.TUNING)
PEERS = (("fa3", "varlen"), ("flashinfer", "fa3"))
#: Prompt-length families outside the traces, for choosing the tile shape: prefill_kernel's mixes and short
#: lognormal prompts (name, requests, prompt distribution).
SYNTHETIC = (*PREFILL_MIXES, ("short-lognormal", 256, {"dist": "lognormal", "median": 500, "sigma": 0.6, "max": 8192}))


def make_batches(smoke: bool) -> list[Batch]:
    if smoke:
        trace = synthetic("tiny", 6, {"dist": "uniform", "low": 1, "high": 40})
        return list(static_batches(trace, StaticSpec(phases=["prefill", "mixed"], batch_sizes=[6], chunk_size=16)))
    out: list[Batch] = []
    for name in ("sharegpt", "azure-conv"):
        trace = load_trace(name)
        out += static_batches(trace, StaticSpec(phases=["prefill"], batch_sizes=[32, 64, 128, 256], seed=0))
    out += static_batches(load_trace("mooncake-conv"), StaticSpec(phases=["prefill"], batch_sizes=[32, 64],
                                                                   max_len=32768, seed=0))
    for name, n, prompt in SYNTHETIC:
        out += static_batches(synthetic(name, n, prompt), StaticSpec(phases=["prefill"], batch_sizes=[n]))
    for name in ("sharegpt", "azure-conv"):
        out += static_batches(load_trace(name), StaticSpec(phases=["mixed"], batch_sizes=[128], decode_fraction=0.75,
                                                           chunk_size=512, seed=0))
    return out


def candidate(config: K | None, resources: dict, name: str) -> Callable[[Inputs, str], Callable]:
    """prepare(inputs, variant) for packinfer with this tile shape (None: choose_config's); the compiled
    kernel's registers, spills and shared memory land in resources[name] after its first call on a batch."""

    def prepare(x: Inputs, variant: str):
        s = x.shape
        chosen = config
        if name == "chosen-triton":
            chosen = packinfer.choose_config(x.batch.q_lens, x.batch.kv_lens, s.num_heads, s.num_kv_heads,
                                             s.head_dim, gluon=False)
        plan = packinfer.plan_for(x.cu_q_cpu, x.cu_k_cpu, s.num_heads, s.num_kv_heads, s.head_dim, causal=True,
                                  config=chosen)

        def run():
            hopper_attention.TUNING.update({**DEFAULT_TUNING, **TUNINGS.get(name, {})})
            out = packinfer.varlen_attention(x.q, x.k, x.v, x.cu_q, x.cu_k, x.max_q, x.max_k, causal=True,
                                             plan=plan, validate=False)
            if name not in resources:
                for bound in plan._device_cache.values():
                    c = getattr(bound, "compiled", None)
                    if c is not None:
                        tile = f"{plan.block_m}x{plan.block_n}x{plan.num_warps}x{plan.num_stages}"
                        resources[name] = dict(tile=tile + ("+gqa" if plan.pack_gqa else ""),
                                               regs=getattr(c, "n_regs", None), spills=getattr(c, "n_spills", None),
                                               shared=getattr(getattr(c, "metadata", None), "shared", None))
            return out

        return run

    return prepare


def summary(records: pd.DataFrame) -> str:
    """Per candidate: geomean TFLOP/s ratio to fa3 and to FlashInfer fa3 over the prefill batches both ran, to
    `chosen` (choose_config's tile, as shipped) over the mixed batches, and geomean prefill TFLOP/s (the
    roofline: 989 dense bf16 on H100/H200)."""
    ok = records[records.status == "ok"]
    t = ok.pivot_table(index="batch_id", columns="system", values="tflops")
    prefill, mixed = t[t.index.str.endswith("prefill")], t[t.index.str.endswith("mixed")]

    def ratio(frame: pd.DataFrame, system: str, peer: str) -> str:
        if system not in frame or peer not in frame:
            return "-"
        r = (frame[system] / frame[peer]).dropna()
        return f"{np.exp(np.log(r).mean()):.3f} ({len(r)})" if len(r) else "-"

    lines = [f"{'candidate':<34}{'prefill/fa3':>13}{'/fi-fa3':>13}{'mixed/chosen':>13}{'TFLOP/s':>9}"]
    for system in [f"packinfer:{c}" for c in CANDIDATES] + [f"{b}:{v}" for b, v in PEERS]:
        tf = prefill[system].dropna() if system in prefill else pd.Series(dtype=float)
        lines.append(f"{system:<34}{ratio(prefill, system, 'fa3:varlen'):>13}"
                     f"{ratio(prefill, system, 'flashinfer:fa3'):>13}{ratio(mixed, system, 'packinfer:chosen'):>13}"
                     f"{np.exp(np.log(tf).mean()) if len(tf) else float('nan'):>9.0f}")
    return "\n".join(lines)


def main() -> None:
    s = setup(__doc__, "benchmarks/prefill_hopper.py", 20, "no effect here (every candidate is timed)",
              lambda ap: ap.add_argument("--candidates", default=",".join(CANDIDATES),
                                         help="comma-separated packinfer candidates (default: all)"))
    batches = s.select(make_batches(s.args.smoke))
    resources: dict[str, dict] = {}  # per candidate: the compiled kernel's resources, printed with its record
    names = s.args.candidates.split(",")
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        raise SystemExit(f"--candidates: unknown {unknown}; choose from {list(CANDIDATES)}")
    todo = [(BACKENDS[b], v) for b, v in PEERS] + [
        (Backend("packinfer", (name,), lambda d: None, candidate(CANDIDATES[name], resources, name)), name)
        for name in names]

    def show(rec: Record) -> None:
        print(f"  {rec.backend}:{rec.variant:<22} {rec.kernel_ms} ms {rec.tflops} TFLOP/s {rec.status} "
              f"{rec.reason[:80]} {resources.pop(rec.variant, '') if rec.backend == 'packinfer' else ''}", flush=True)

    measure_batches(batches, lambda b: todo, s.shape, s.device, s.timer, s.args.out, resume=True, on_record=show)
    table = summary(load_records(s.args.out))
    (s.args.out / "summary.txt").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
