"""Build the FlashInfer JIT modules of its serving calls (decode with tensor cores, prefill over the paged cache
with the fa3 and the fa2 backend, BatchAttention) for one attention shape, in parallel processes. On a fresh
machine the first replay or sweep otherwise builds them one after another: about 3.5 minutes on a 16-core H200
host (without BatchAttention). FlashInfer caches what it built (~/.cache/flashinfer, or under
FLASHINFER_WORKSPACE_BASE), so later processes load it.

    python benchmarks/warm_flashinfer.py [--heads 32 --kv-heads 8 --head-dim 128 --dtype bf16]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

#: (batch kind, serving variant) pairs: each builds one module.
MODULES = (("decode", "serving"), ("mixed", "serving"), ("mixed", "serving-fa2"), ("mixed", "batch-attention"))


def build_one(kind: str, variant: str, args: argparse.Namespace) -> None:
    import torch

    from packinfer_bench.backends import BACKENDS
    from packinfer_bench.backends.base import NotApplicable
    from packinfer_bench.backends.serving_call import serving_call
    from packinfer_bench.config import ShapeConfig
    from packinfer_bench.runner import make_inputs
    from packinfer_bench.workload import Batch

    q, kv = ([1, 1, 1], [100, 200, 300]) if kind == "decode" else ([50, 1], [50, 300])
    batch = Batch(f"warm-{kind}", "warm", "continuous", q, kv, list(range(len(q))))
    shape = ShapeConfig("warm", args.heads, args.kv_heads, args.head_dim, args.dtype)
    try:
        serving_call(BACKENDS["flashinfer"], make_inputs(batch, shape, torch.device("cuda")), variant)()
    except NotApplicable as e:  # a variant this FlashInfer cannot build (batch-attention, say): runs skip it too
        print(f"{variant}: skipped, {e}", flush=True)
        return
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        build_one(*args.one, args)
        return
    t0 = time.perf_counter()
    shape = ["--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
             "--dtype", args.dtype]
    procs = [(m, subprocess.Popen([sys.executable, __file__, "--one", *m, *shape])) for m in MODULES]
    failed = [m for m, p in procs if p.wait() != 0]
    print(f"FlashInfer serving modules built in {time.perf_counter() - t0:.0f} s"
          + (f"; failed: {failed}" if failed else ""), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
