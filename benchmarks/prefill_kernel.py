"""Prefill (and mixed) kernel benchmark: packinfer and its ablations against FA2 varlen, FlexAttention and
FlashInfer on batches replayed from the shipped traces, same tensors for all, every output checked against a
float32 reference. Writes results.csv, batches.csv, tune.csv (with --tune) and env.json to --out.

    python benchmarks/prefill_kernel.py --out results/prefill-kernel/h100-<date>   # on the GPU machine
    python benchmarks/prefill_kernel.py --smoke --out /tmp/pk                       # CPU: tiny, interpreter

Until the harness runner (issue #5) absorbs it, this script is the one command behind the prefill numbers.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import packinfer  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from packinfer_bench import envinfo  # noqa: E402
from packinfer_bench.traces import load_trace  # noqa: E402
from packinfer_bench.workload import Batch, StaticSpec, static_batches  # noqa: E402

FIELDS = ["batch", "phase", "batch_size", "num_q_tokens", "num_kv_tokens", "kv_cv", "backend", "variant", "status",
          "reason", "plan_ms", "kernel_ms", "kernel_ms_p10", "kernel_ms_p90", "tflops", "max_abs_err", "rel_err"]


@dataclass
class Shape:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


# ---------------------------------------------------------------------------------------------- batches

def synthetic(name: str, n: int, prompt: dict, seed: int = 0):
    return load_trace(None, "synthetic", name=name, num_requests=n, prompt=prompt, seed=seed)


def make_batches(smoke: bool) -> list[tuple[Batch, bool]]:
    """(batch, headline): headline batches also run FlexAttention (it compiles once per shape)."""
    if smoke:
        tr = synthetic("tiny", 6, {"dist": "uniform", "low": 1, "high": 40})
        spec = StaticSpec(phases=["prefill", "mixed"], batch_sizes=[6], chunk_size=16)
        return [(b, True) for b in static_batches(tr, spec)]
    out: list[tuple[Batch, bool]] = []
    for trace_name in ("sharegpt", "azure-conv"):
        trace = load_trace(trace_name)
        spec = StaticSpec(phases=["prefill"], batch_sizes=[32, 64, 128, 256], seed=0)
        for b in static_batches(trace, spec):
            out.append((b, b.batch_id in ("sharegpt/b256/s0/prefill", "azure-conv/b64/s0/prefill")))
        spec = StaticSpec(phases=["mixed"], batch_sizes=[128], decode_fraction=0.75, chunk_size=512, seed=0)
        out.extend((b, trace_name == "sharegpt") for b in static_batches(trace, spec))
    designs = [
        ("sharegpt-like-lognormal", 256, {"dist": "lognormal", "median": 250, "sigma": 1.0, "max": 8192}),
        ("azure-like-lognormal", 64, {"dist": "lognormal", "median": 1000, "sigma": 0.8, "max": 8192}),
        ("uniform-4096", 16, {"dist": "constant", "value": 4096}),
        ("straggler-32k", 128, {"dist": "bimodal", "long": 32768, "short": 512, "num_long": 1}),
    ]
    for name, n, prompt in designs:
        out.extend((b, name == "sharegpt-like-lognormal") for b in
                   static_batches(synthetic(name, n, prompt), StaticSpec(phases=["prefill"], batch_sizes=[n])))
    return out


# ---------------------------------------------------------------------------------------------- backends

def packinfer_backend(packing: bool = True, balancing: bool = True, config=None, gqa_packing: bool = True,
                      use_tma: bool | None = None):
    """config: a packinfer.KernelConfig, or None for the one packinfer.choose_config picks for the batch;
    gqa_packing=False keeps that choice's tile size but gives each query head its own program."""
    def prepare(batch, q, k, v, cu_q, cu_k, shape):
        def build():
            cfg = config or packinfer.choose_config(batch.q_lens, batch.kv_lens, shape.heads, shape.kv_heads,
                                                    shape.head_dim)
            if not gqa_packing:
                cfg = dataclasses.replace(cfg, pack_gqa=False)
            return packinfer.plan_for(cu_q, cu_k, shape.heads, shape.kv_heads, shape.head_dim, causal=True,
                                      packing=packing, balancing=balancing, config=cfg)

        plan_times = []
        for _ in range(7):  # median of warm builds: the per-batch CPU cost a serving loop pays
            t0 = time.perf_counter()
            plan = build()
            plan_times.append((time.perf_counter() - t0) * 1e3)
        plan_ms = statistics.median(plan_times)
        cu_q_d, cu_k_d = cu_q.to(q.device), cu_k.to(q.device)
        mq, mk = int(batch.q_lens.max()), int(batch.kv_lens.max())
        packinfer.varlen_attention(q, k, v, cu_q_d, cu_k_d, mq, mk, causal=True, plan=plan, use_tma=use_tma)
        return plan_ms, lambda: packinfer.varlen_attention(q, k, v, cu_q_d, cu_k_d, mq, mk, causal=True, plan=plan,
                                                           validate=False, use_tma=use_tma)
    return prepare


def fa2_backend(batch, q, k, v, cu_q, cu_k, shape):
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if shape.heads != shape.kv_heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older torch: expand K/V heads outside the timed region
            g = shape.heads // shape.kv_heads
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    cu_q_d, cu_k_d = cu_q.to(q.device), cu_k.to(q.device)
    mq, mk = int(batch.q_lens.max()), int(batch.kv_lens.max())
    return 0.0, lambda: varlen_attn(q, k, v, cu_q_d, cu_k_d, mq, mk, **kwargs)


def flex_backend(batch, q, k, v, cu_q, cu_k, shape):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = q.device
    q_lens, kv_lens = torch.from_numpy(batch.q_lens), torch.from_numpy(batch.kv_lens)
    doc_q = torch.repeat_interleave(torch.arange(len(batch)), q_lens).to(dev)
    doc_k = torch.repeat_interleave(torch.arange(len(batch)), kv_lens).to(dev)
    cq, ck = cu_q.to(dev).long(), cu_k.to(dev).long()
    off = (kv_lens - q_lens).to(dev)

    def mask_mod(b, h, q_idx, kv_idx):
        dq, dk = doc_q[q_idx], doc_k[kv_idx]
        return (dq == dk) & (kv_idx - ck[dk] <= q_idx - cq[dq] + off[dq])

    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, 1, None, q.shape[0], k.shape[0], device=dev, _compile=True)
    torch.cuda.synchronize()
    plan_ms = (time.perf_counter() - t0) * 1e3
    fn = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    return plan_ms, lambda: fn(qt, kt, vt, block_mask=block_mask, enable_gqa=True)[0].transpose(0, 1)


def flashinfer_backend(fi_backend: str):
    def prepare(batch, q, k, v, cu_q, cu_k, shape):
        import flashinfer

        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=fi_backend)
        cu_q_d, cu_k_d = cu_q.to(q.device), cu_k.to(q.device)
        wrapper.plan(cu_q_d, cu_k_d, shape.heads, shape.kv_heads, shape.head_dim, causal=True, q_data_type=q.dtype)
        torch.cuda.synchronize()
        t0 = time.perf_counter()  # second plan: the steady-state CPU cost, JIT compilation excluded
        wrapper.plan(cu_q_d, cu_k_d, shape.heads, shape.kv_heads, shape.head_dim, causal=True, q_data_type=q.dtype)
        torch.cuda.synchronize()
        plan_ms = (time.perf_counter() - t0) * 1e3
        return plan_ms, lambda: wrapper.run(q, k, v)
    return prepare


def backends(on_gpu: bool, headline: bool) -> dict[tuple[str, str], object]:
    out = {("packinfer", "full"): packinfer_backend(),
           ("packinfer", "no-balancing"): packinfer_backend(balancing=False),
           ("packinfer", "no-tma"): packinfer_backend(use_tma=False),
           ("packinfer", "no-packing"): packinfer_backend(packing=False),
           ("packinfer", "no-gqa-packing"): packinfer_backend(gqa_packing=False),
           ("triton_unpacked", "fa2-grid"): packinfer_backend(False, False, packinfer.FA2_LIKE)}
    if on_gpu:
        out[("fa2", "torch-varlen")] = fa2_backend
        if headline:
            out[("flex", "doc-mask")] = flex_backend
        out[("flashinfer", "fa2")] = flashinfer_backend("fa2")
        out[("flashinfer", "fa3")] = flashinfer_backend("fa3")
    return out


# ---------------------------------------------------------------------------------------------- measuring

def reference(batch: Batch, q, k, v, shape) -> torch.Tensor:
    """float32 per-request attention (bottom-right causal) through SDPA on the same device."""
    if q.device.type == "cpu":
        cu_q, cu_k = batch.cu_seqlens()
        return packinfer.reference_varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    from torch.nn.attention.bias import causal_lower_right

    cu_q, cu_k = batch.cu_seqlens()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    g = shape.heads // shape.kv_heads
    for i in range(len(batch)):
        qs = q[cu_q[i]:cu_q[i + 1]].float().transpose(0, 1)[None]
        ks = k[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(g, dim=1).transpose(0, 1)[None]
        vs = v[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(g, dim=1).transpose(0, 1)[None]
        nq, nk = qs.shape[2], ks.shape[2]
        if nq == nk:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(nq, nk))
        out[cu_q[i]:cu_q[i + 1]] = o[0].transpose(0, 1)
    return out


def time_fn(fn, warmup: int, repeats: int, flush: torch.Tensor | None) -> list[float]:
    for _ in range(warmup):
        fn()
    if flush is None:  # CPU (interpreter): wall clock, not representative
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for s, e in zip(starts, ends):
        flush.zero_()  # evict L2 so every repeat reads K/V from HBM
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def run_batch(batch: Batch, headline: bool, shape: Shape, device: torch.device, args, flush, writer) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(1234)
    total_q, total_k = int(batch.q_lens.sum()), int(batch.kv_lens.sum())
    q = torch.randn(total_q, shape.heads, shape.head_dim, generator=gen).to(device, shape.dtype)
    k = torch.randn(total_k, shape.kv_heads, shape.head_dim, generator=gen).to(device, shape.dtype)
    v = torch.randn(total_k, shape.kv_heads, shape.head_dim, generator=gen).to(device, shape.dtype)
    cu_q, cu_k = (torch.from_numpy(c) for c in batch.cu_seqlens())
    ref = reference(batch, q, k, v, shape)
    flops = 4.0 * batch.causal_pairs() * shape.heads * shape.head_dim
    base = {"batch": batch.batch_id, "phase": batch.phase, "batch_size": len(batch), "num_q_tokens": total_q,
            "num_kv_tokens": total_k, "kv_cv": round(float(batch.kv_lens.std() / batch.kv_lens.mean()), 3)}
    rows = []
    for (name, variant), prepare in backends(device.type == "cuda", headline).items():
        row = {**base, "backend": name, "variant": variant, "status": "ok", "reason": ""}
        try:
            plan_ms, fn = prepare(batch, q, k, v, cu_q, cu_k, shape)
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            err = (out.float() - ref).abs()
            row["max_abs_err"] = float(err.max())
            row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
            del out, err
            if not math.isfinite(row["max_abs_err"]) or row["rel_err"] > 2e-2:
                row["status"], row["reason"] = "incorrect", f"rel_err {row['rel_err']:.3g}"
            times = time_fn(fn, args.warmup, args.repeats, flush)
            med = statistics.median(times)
            row.update(plan_ms=round(plan_ms, 4), kernel_ms=round(med, 4),
                       kernel_ms_p10=round(float(np.percentile(times, 10)), 4),
                       kernel_ms_p90=round(float(np.percentile(times, 90)), 4), tflops=round(flops / med / 1e9, 2))
        except ImportError as e:
            row["status"], row["reason"] = "skipped", f"not installed: {e}"
        except torch.cuda.OutOfMemoryError as e:
            row["status"], row["reason"] = "error", f"OOM: {str(e)[:120]}"
        except Exception as e:  # a failing backend is recorded; the run goes on
            row["status"], row["reason"] = "error", f"{type(e).__name__}: {str(e)[:200]}"
            traceback.print_exc()
        writer.writerow(row)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def tune(device, shape, args, flush, out_dir: Path) -> None:
    """Time packinfer (packed, balanced) under several kernel configs (slots x block_n x warps x stages) on a few
    batches: the data behind packinfer.choose_config."""
    K = packinfer.KernelConfig
    configs = [K(128, 128, 8, 3, False), K(128, 128, 8, 4, False), K(128, 64, 8, 3, False), K(128, 64, 8, 4, False),
               K(128, 128, 8, 3, True), K(128, 64, 8, 3, True), K(128, 64, 8, 4, True), K(128, 32, 4, 3, True),
               K(128, 64, 4, 3, True), K(64, 64, 4, 3, True), K(64, 64, 4, 4, True), K(64, 128, 4, 3, True)]
    picks = [b for b, _ in make_batches(False) if b.batch_id in (
        "sharegpt/b256/s0/prefill", "azure-conv/b64/s0/prefill", "uniform-4096/b16/s0/prefill",
        "sharegpt-like-lognormal/b256/s0/prefill", "sharegpt/b128/s0/mixed", "azure-conv/b128/s0/mixed",
        "straggler-32k/b128/s0/prefill")]
    with open(out_dir / "tune.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["batch", "config", "kernel_ms", "tflops", "rel_err"])
        w.writeheader()
        for batch in picks:
            gen = torch.Generator().manual_seed(7)
            q = torch.randn(int(batch.q_lens.sum()), shape.heads, shape.head_dim, generator=gen).to(device, shape.dtype)
            k = torch.randn(int(batch.kv_lens.sum()), shape.kv_heads, shape.head_dim, generator=gen).to(device, shape.dtype)
            v = torch.randn_like(k)
            cu_q, cu_k = (torch.from_numpy(c) for c in batch.cu_seqlens())
            ref = reference(batch, q, k, v, shape)
            flops = 4.0 * batch.causal_pairs() * shape.heads * shape.head_dim
            for cfg in configs:
                name = f"{cfg.slots}x{cfg.block_n}x{cfg.num_warps}x{cfg.num_stages}" + ("+gqa" if cfg.pack_gqa else "")
                try:
                    _, fn = packinfer_backend(config=cfg)(batch, q, k, v, cu_q, cu_k, shape)
                    rel = float((fn().float() - ref).norm() / ref.norm())
                    med = statistics.median(time_fn(fn, 3, 15, flush))
                    row = {"batch": batch.batch_id, "config": name, "kernel_ms": round(med, 4),
                           "tflops": round(flops / med / 1e9, 1), "rel_err": f"{rel:.2e}"}
                except Exception as e:
                    row = {"batch": batch.batch_id, "config": name, "kernel_ms": None,
                           "tflops": None, "rel_err": f"{type(e).__name__}: {str(e)[:80]}"}
                w.writerow(row)
                f.flush()
                print(f"tune {row['batch']:<40} {row['config']:<16} {row['kernel_ms']} ms {row['tflops']} TFLOP/s "
                      f"err {row['rel_err']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    ap.add_argument("--tune", action="store_true", help="only sweep packinfer kernel configs (writes tune.csv)")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only batches whose id has one")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = Shape(4, 2, 64, torch.float16) if args.smoke else Shape(32, 8, 128, torch.bfloat16)
    if args.smoke:
        args.warmup, args.repeats = 1, 2
    env = envinfo.collect()
    env["benchmark"] = {"script": "benchmarks/prefill_kernel.py", "argv": sys.argv[1:], "shape": str(shape),
                        "triton_unpacked_config": str(packinfer.FA2_LIKE)}
    (args.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    if args.tune:
        tune(device, shape, args, flush, args.out)
        return
    batches = make_batches(args.smoke)
    if args.only:
        batches = [(b, h) for b, h in batches if any(s in b.batch_id for s in args.only.split(","))]
    with open(args.out / "batches.csv", "w", newline="") as f:
        stats = [b.stats() for b, _ in batches]
        w = csv.DictWriter(f, fieldnames=list(stats[0]))
        w.writeheader()
        w.writerows(stats)
    rows = []
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for batch, headline in batches:
            print(f"batch {batch.batch_id}: {len(batch)} requests, {int(batch.q_lens.sum())} q tokens", flush=True)
            rows.extend(run_batch(batch, headline, shape, device, args, flush, writer))
            f.flush()
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    by_batch: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_batch.setdefault(r["batch"], {})[f"{r['backend']}:{r['variant']}"] = r
    print(f"\n{'batch':<42}{'backend:variant':<30}{'ms':>9}{'TFLOP/s':>9}{'vs fa2':>8}{'err':>10}  status")
    for batch, entries in by_batch.items():
        fa2 = entries.get("fa2:torch-varlen", {}).get("kernel_ms")
        for key, r in entries.items():
            ms = r.get("kernel_ms")
            speed = f"{fa2 / ms:.2f}x" if fa2 and ms and r["status"] == "ok" else ""
            print(f"{batch:<42}{key:<30}{ms if ms is not None else '':>9}{r.get('tflops', '') or '':>9}{speed:>8}"
                  f"{r.get('rel_err', '') and format(r['rel_err'], '.1e'):>10}  {r['status']} {r['reason'][:60]}")


if __name__ == "__main__":
    main()
