"""Re-layout cost over a whole serving replay: the grouped KV cache against the paged one, kept in step with a
continuous-batching schedule (arrivals, prefill chunks, growth, preemption, departures). Per iteration it records
the time and bytes the grouped layout spends making room (compaction by the GPU copy kernel, CPU bookkeeping
included), and on decode iterations times cache attention over both layouts on the same queries. The summary
amortises the re-layouts over the replay: their total against the attention time they serve, and against what
the grouped layout saves over paged. Also tracks fragmentation (reserved vs live bytes) for several headrooms.
Writes iterations.csv, summary.json and env.json to --out.

    python benchmarks/decode_replay.py --out results/decode-replay/<name>    # on a GPU machine
    python benchmarks/decode_replay.py --smoke --out /tmp/dr                 # CPU: tiny, interpreter
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import packinfer
import torch
from common import GPU_SHAPE, SMOKE_SHAPE, write_env

from packinfer_bench.backends.base import PAGE_SIZE
from packinfer_bench.backends.packinfer import DECODE_MAX_Q  # decode iterations take cache attention
from packinfer_bench.serving.kv_follow import CacheFollower, peak_tokens
from packinfer_bench.timing import Timer
from packinfer_bench.traces import load_trace
from packinfer_bench.workload import Batch
from packinfer_bench.workload.continuous import ContinuousSpec, continuous_batches

TIMED_HEADROOM = 64  # the grouped cache whose attention is timed; others only track re-layouts and fragmentation


def replays(smoke: bool, requests: int, rate: float) -> dict[str, list[Batch]]:
    if smoke:
        trace = load_trace(None, "synthetic", name="tiny", num_requests=12, rate=400.0, seed=0,
                           prompt={"dist": "uniform", "low": 2, "high": 60},
                           output={"dist": "uniform", "low": 2, "high": 40}, prefix={"groups": 2, "length": 20})
        spec = ContinuousSpec(arrivals="trace", num_requests=None, max_num_batched_tokens=64, max_num_seqs=8)
        return {"tiny": list(continuous_batches(trace, spec))}
    out = {}
    for name in ("sharegpt", "azure-conv", "mooncake-conv"):
        n = requests // 2 if name == "mooncake-conv" else requests  # its long prompts: ~1.6M KV tokens at 128
        spec = ContinuousSpec(arrivals="poisson", rate=rate, num_requests=n, max_num_seqs=256,
                              max_num_batched_tokens=8192)
        out[name] = list(continuous_batches(load_trace(name), spec))
    return out


def run_replay(name: str, batches: list[Batch], headrooms: list[int], shape, device, timer: Timer,
               check_every: int, writer: csv.DictWriter) -> dict:
    dtype = torch.bfloat16 if shape.dtype == "bf16" else torch.float16
    peak = peak_tokens(batches)
    capacity = int(peak * 1.3) + 2 * max(headrooms) * max(len(b) for b in batches)
    caches = {f"grouped-h{h}": packinfer.make_cache("grouped", capacity, shape.num_kv_heads, shape.head_dim,
                                                    dtype=dtype, device=device, headroom=h) for h in headrooms}
    caches["paged"] = packinfer.make_cache("paged", capacity, shape.num_kv_heads, shape.head_dim, dtype=dtype,
                                           device=device, block_size=PAGE_SIZE)
    follow = {k: CacheFollower(c, batches) for k, c in caches.items()}
    timed = [f"grouped-h{TIMED_HEADROOM}", "paged"]
    sms = packinfer.num_sms(device)
    totals = {k: {"room_s": 0.0, "moved_bytes": 0, "relayouts": 0, "relocations": 0, "frag": []} for k in caches}
    attn = {k: 0.0 for k in timed}
    max_err, decode_iters = 0.0, 0
    gen = torch.Generator().manual_seed(0)
    for i, b in enumerate(batches):
        row = {"trace": name, "iteration": i, "batch_id": b.batch_id, "batch_size": len(b),
               "num_tokens": int(b.q_lens.sum()), "num_kv_tokens": int(b.kv_lens.sum()),
               "decode": int(b.q_lens.max()) <= DECODE_MAX_Q, "timing": timer.method}
        for key, f in follow.items():
            cost = f.step(i, b)
            st = caches[key].stats()
            totals[key]["room_s"] += cost.room_s
            totals[key]["moved_bytes"] += cost.moved_bytes
            totals[key]["relayouts"] += cost.relayouts
            totals[key]["relocations"] += cost.relocations
            totals[key]["frag"].append(st.fragmentation)
            row[f"{key}_room_ms"] = round(cost.room_s * 1e3, 4)
            row[f"{key}_moved_mb"] = round(cost.moved_bytes / 2**20, 3)
            row[f"{key}_reserved_mb"] = round(st.reserved_bytes / 2**20, 3)
            row[f"{key}_live_mb"] = round(st.live_bytes / 2**20, 3)
        row.update({f"{key}_attn_ms": None for key in timed})
        if row["decode"]:
            decode_iters += 1
            q = torch.randn(int(b.q_lens.sum()), shape.num_heads, shape.head_dim, generator=gen).to(device, dtype)
            outs = {}
            for key in timed:
                view = caches[key].view(b.request_ids.tolist())
                plan = packinfer.plan_cache_attention(view, b.q_lens, shape.num_heads, num_sms=sms)
                outs[key] = packinfer.cache_attention(q, view, plan)
                ms = float(np.median(timer(lambda q=q, view=view, plan=plan: packinfer.cache_attention(
                    q, view, plan, validate=False))))
                attn[key] += ms
                row[f"{key}_attn_ms"] = round(ms, 4)
            if not torch.allclose(outs[timed[0]].float(), outs[timed[1]].float(), atol=1e-2, rtol=1e-2):
                raise AssertionError(f"{name} iteration {i}: grouped and paged attention differ")
            if decode_iters % check_every == 1 or check_every == 1:
                max_err = max(max_err, reference_error(q, caches[timed[0]], b, outs[timed[0]]))
        writer.writerow(row)
        for f in follow.values():
            f.retire(i, b)
    g, p = timed
    summary = {"trace": name, "iterations": len(batches), "decode_iterations": decode_iters,
               "peak_kv_tokens": peak, "capacity_tokens": capacity,
               "attention_ms": {k: round(v, 3) for k, v in attn.items()},
               "checked_rel_err_max": float(f"{max_err:.3g}")}
    for key, t in totals.items():
        summary[key] = {"relayouts": t["relayouts"], "relocations": t["relocations"],
                        "moved_gb": round(t["moved_bytes"] / 1e9, 4),
                        "room_ms_total": round(t["room_s"] * 1e3, 3),
                        "room_ms_per_iteration": round(t["room_s"] * 1e3 / len(batches), 4),
                        "fragmentation_mean": round(float(np.mean(t["frag"])), 4)}
    room = totals[g]["room_s"] * 1e3
    summary["amortised"] = {
        "grouped_attention_over_paged": round(attn[g] / attn[p], 4) if attn[p] else None,
        "relayout_share_of_grouped_attention": round(room / attn[g], 4) if attn[g] else None,
        "grouped_attention_plus_relayout_over_paged": round((attn[g] + room) / attn[p], 4) if attn[p] else None}
    return summary


def reference_error(q: torch.Tensor, cache, b: Batch, out: torch.Tensor) -> float:
    """Relative L2 error of `out` against float32 attention over each request's K/V read back from the cache."""
    ks, vs = zip(*(cache.read(r) for r in b.request_ids.tolist()))
    cu_q, cu_k = (torch.from_numpy(c) for c in b.cu_seqlens())
    ref = packinfer.reference_varlen_attention(q.float(), torch.cat(ks).float(), torch.cat(vs).float(), cu_q, cu_k)
    return float((out.float() - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny replay on the CPU under the Triton interpreter")
    ap.add_argument("--requests", type=int, default=256, help="requests replayed per trace (half on Mooncake)")
    ap.add_argument("--rate", type=float, default=40.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--headrooms", default="16,64,256", help="grouped caches' headroom tokens, comma-separated")
    ap.add_argument("--check-every", type=int, default=50, help="compare with float32 every n-th decode iteration")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    headrooms = sorted({int(h) for h in args.headrooms.split(",")} | {TIMED_HEADROOM})
    timer = Timer(device, 1, 1 if args.smoke else args.repeats, flush_l2=True)
    write_env(args.out, "benchmarks/decode_replay.py", shape, timer)
    summaries = []
    with open(args.out / "iterations.csv", "w", newline="") as f:
        writer = _Lazy(f)
        for name, batches in replays(args.smoke, args.requests, args.rate).items():
            print(f"{name}: {len(batches)} iterations, up to {max(len(b) for b in batches)} requests", flush=True)
            summaries.append(run_replay(name, batches, headrooms, shape, device, timer,
                                        1 if args.smoke else args.check_every, writer))
            (args.out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    print(f"\n{'trace':<16}{'iters':>6}{'decode':>7}{'grouped ms':>11}{'paged ms':>9}{'g/p':>6}"
          f"{'relayouts':>10}{'moved GB':>9}{'room ms':>9}{'room/attn':>10}{'(g+room)/p':>11}{'frag g/p':>12}")
    for s in summaries:
        g, a = s[f"grouped-h{TIMED_HEADROOM}"], s["amortised"]
        print(f"{s['trace']:<16}{s['iterations']:>6}{s['decode_iterations']:>7}"
              f"{s['attention_ms'][f'grouped-h{TIMED_HEADROOM}']:>11.2f}{s['attention_ms']['paged']:>9.2f}"
              f"{a['grouped_attention_over_paged']:>6.3f}{g['relayouts']:>10}{g['moved_gb']:>9.3f}"
              f"{g['room_ms_total']:>9.1f}{a['relayout_share_of_grouped_attention']:>10.3f}"
              f"{a['grouped_attention_plus_relayout_over_paged']:>11.3f}"
              f"{g['fragmentation_mean']:>6.3f}/{s['paged']['fragmentation_mean']:.3f}")
        for h in headrooms:
            k = s[f"grouped-h{h}"]
            print(f"    headroom {h:>4}: {k['relayouts']:>5} re-layouts, {k['relocations']:>5} relocations, "
                  f"{k['moved_gb']:.3f} GB moved, "
                  f"{k['room_ms_total']:.1f} ms making room, fragmentation {k['fragmentation_mean']:.3f}")
        print(f"    max rel err vs float32 (sampled): {s['checked_rel_err_max']}")


class _Lazy:
    """A CSV writer that takes its columns from the first row (they depend on the headrooms)."""

    def __init__(self, f):
        self.f, self.w = f, None

    def writerow(self, row: dict) -> None:
        if self.w is None:
            self.w = csv.DictWriter(self.f, fieldnames=list(row))
            self.w.writeheader()
        self.w.writerow(row)
        self.f.flush()


if __name__ == "__main__":
    main()
