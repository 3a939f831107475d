"""FlashAttention-compatible features on the GPU: packinfer through `packinfer.flash_attn_interface` against
FlashAttention 2 (PyTorch's aten._flash_attention_forward) and FlashAttention 3 (`flash_attn_interface` or the
`fa3-fwd` wheel) on the same tensors, for what issue 17 adds: head dims 80 (Phi-2) and 96 (Phi-3) in prefill
and decode, a 4096-token sliding window on long prompts (Mistral 7B v0.1), softcap 50 (Gemma 2, head dim 256).
Lengths come from the shipped traces. Each output is checked against the float32 reference on its first
requests, and against every peer on the whole batch. A peer without the feature is skipped, named. `packinfer` is
the FlashAttention-signature call (it plans on the host every call, as that API must); `packinfer-planned` is the
native call with the plan built once, as a serving loop runs it for every layer of a step.
`--regression` times packinfer's head dim 128 native calls alone; the parent runs that for this checkout and
for the kernels of `--before DIR` (an older kernels/ tree), alternating, to show no regression at 128.

    python benchmarks/fa_features.py --out results/fa-features/h200 [--before .old_kernels]   # GPU
    python benchmarks/fa_features.py --smoke --out /tmp/faf                                     # CPU, tiny
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import packinfer
import torch

try:
    from packinfer import flash_attn_interface as pfa
except ImportError:  # an older kernels/ under --regression-child: only its native API is timed
    pfa = None

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    trace: str
    phase: str  # prefill: whole prompts, causal; decode: one row over prompt + output tokens
    batch: int
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    max_len: int = 8192


CASES = [
    Case("prefill-d80 (Phi-2)", 32, 32, 80, "sharegpt", "prefill", 64),
    Case("prefill-d96 (Phi-3-mini)", 32, 32, 96, "sharegpt", "prefill", 64),
    Case("decode-d80 (Phi-2)", 32, 32, 80, "sharegpt", "decode", 128),
    Case("decode-d96 (Phi-3-mini)", 32, 32, 96, "sharegpt", "decode", 128),
    Case("prefill-window4096 (Mistral-7B-v0.1)", 32, 8, 128, "mooncake-conv", "prefill", 16, (4096, 0),
         max_len=32768),
    Case("decode-window4096 (Mistral-7B-v0.1)", 32, 8, 128, "mooncake-conv", "decode", 64, (4096, 0),
         max_len=32768),
    Case("prefill-softcap50 (Gemma-2-9B)", 16, 8, 256, "sharegpt", "prefill", 64, softcap=50.0),
    Case("prefill-d256 no softcap (Gemma-2-9B)", 16, 8, 256, "sharegpt", "prefill", 64),
]
REGRESSION = [Case("prefill-d128", 32, 8, 128, "sharegpt", "prefill", 64),
              Case("prefill-d128 azure", 32, 8, 128, "azure-conv", "prefill", 32),
              Case("decode-d128", 32, 8, 128, "sharegpt", "decode", 128)]
SMOKE = [Case("smoke-d80", 4, 2, 80, "sharegpt", "prefill", 4, max_len=48),
         Case("smoke-decode-window", 4, 2, 64, "sharegpt", "decode", 4, (16, 0), max_len=48)]


def lengths(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(q_lens, kv_lens) of `batch` requests drawn from the trace, capped at max_len."""
    from packinfer_bench.traces import load_trace

    reqs = load_trace(case.trace).requests.sample(n=case.batch, random_state=seed, replace=True)
    prompt = np.minimum(reqs["prompt_len"].to_numpy(), case.max_len)
    if case.phase == "prefill":
        return prompt, prompt
    kv = np.minimum(prompt + reqs["output_len"].to_numpy(), case.max_len)
    return np.ones_like(kv), kv


def causal_flops(q_lens, kv_lens, heads, dim, window) -> float:
    """4 * dim * heads * (query, key) pairs the mask keeps (bottom-right causal, window left side)."""
    pairs = 0
    for q, k in zip(q_lens.tolist(), kv_lens.tolist()):
        pos = np.arange(k - q, k)
        lo = np.maximum(pos - window[0], 0) if window[0] >= 0 else np.zeros_like(pos)
        pairs += int((pos - lo + 1).clip(min=0).sum())
    return 4.0 * dim * heads * pairs


def fa3_module():
    for name in ("flash_attn_interface", "fa3_fwd_interface"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def calls(case: Case, q_lens, kv_lens, device, dtype, peers: bool = True):
    """{backend: (callable, reason or None)} over one set of tensors; decode reads a dense cache in place.
    peers=False: the tensors alone (what an older kernels/ under --regression-child needs)."""
    gen = torch.Generator().manual_seed(1)
    b = len(q_lens)
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32, device=device)
    q = torch.randn(int(q_lens.sum()), case.heads, case.head_dim, generator=gen).to(device, dtype)
    left, right = case.window
    out: dict = {}
    if case.phase == "prefill":
        cu_k = cu_q
        k = torch.randn(int(kv_lens.sum()), case.kv_heads, case.head_dim, generator=gen).to(device, dtype)
        v = torch.randn_like(k)
        tensors = (q, k, v, cu_q, cu_k)
        mq, mk = int(q_lens.max()), int(kv_lens.max())
        if not peers:
            return tensors, {}
        out["packinfer"] = lambda: pfa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=True,
                                                              window_size=case.window, softcap=case.softcap)
        plan = packinfer.plan_for(cu_q.cpu(), cu_k.cpu(), case.heads, case.kv_heads, case.head_dim, causal=True,
                                  window=case.window)
        out["packinfer-planned"] = lambda: packinfer.varlen_attention(
            q, k, v, cu_q, cu_k, mq, mk, causal=True, window=case.window, softcap=case.softcap, plan=plan,
            validate=False)
        fa2_k, fa2_v, fa2_cu, fa2_used = k, v, cu_k, None
    else:
        cap = int(kv_lens.max())
        k_cache = torch.randn(b, cap, case.kv_heads, case.head_dim, generator=gen).to(device, dtype)
        v_cache = torch.randn_like(k_cache)
        seqlens = torch.tensor(kv_lens, dtype=torch.int32, device=device)
        qb = q.view(b, 1, case.heads, case.head_dim)
        k = torch.cat([k_cache[i, :n] for i, n in enumerate(kv_lens.tolist())])
        v = torch.cat([v_cache[i, :n] for i, n in enumerate(kv_lens.tolist())])
        tensors = (q, k, v, cu_q, torch.tensor(np.concatenate([[0], np.cumsum(kv_lens)]), dtype=torch.int32,
                                               device=device))
        if not peers:
            return tensors, {}
        out["packinfer"] = lambda: pfa.flash_attn_with_kvcache(qb, k_cache, v_cache, cache_seqlens=seqlens,
                                                               causal=True, window_size=case.window,
                                                               softcap=case.softcap).view_as(q)
        view = pfa._grouped_view(k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:]),
                                 kv_lens.astype(np.int64), np.arange(b) * cap)
        plan = packinfer.plan_cache_attention(view, q_lens, case.heads, window=case.window,
                                              num_sms=packinfer.num_sms(device))
        out["packinfer-planned"] = lambda: packinfer.cache_attention(q, view, plan, softcap=case.softcap,
                                                                     validate=False)
        fa2_k, fa2_v = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        fa2_cu = torch.arange(0, (b + 1) * cap, cap, dtype=torch.int32, device=device)
        fa2_used, mq, mk = seqlens, 1, cap
    if case.softcap:
        out["fa2"] = (None, "PyTorch's FA2 has no softcap")
    elif device.type != "cuda":
        out["fa2"] = (None, "needs CUDA")
    else:
        def fa2():
            return torch.ops.aten._flash_attention_forward(
                q, fa2_k, fa2_v, cu_q, fa2_cu, mq, mk, 0.0, True, False, seqused_k=fa2_used,
                window_size_left=left if left >= 0 else None, window_size_right=right if left >= 0 else None)[0]
        out["fa2"] = fa2
    mod = fa3_module() if device.type == "cuda" else None
    if mod is None:
        out["fa3"] = (None, "FlashAttention 3 not installed")
    elif dtype != torch.bfloat16 and "fa3_fwd" in mod.__name__:
        out["fa3"] = (None, "fa3-fwd runs bf16 only")
    elif case.phase == "prefill":
        out["fa3"] = lambda: _first(mod.flash_attn_varlen_func(q, k, v, cu_q, cu_q, int(q_lens.max()),
                                                               int(kv_lens.max()), causal=True,
                                                               window_size=case.window, softcap=case.softcap))
    else:
        out["fa3"] = lambda: _first(mod.flash_attn_with_kvcache(qb, k_cache, v_cache, cache_seqlens=seqlens,
                                                                causal=True, window_size=case.window,
                                                                softcap=case.softcap)).view_as(q)
    return tensors, out


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def check(fn, tensors, case: Case, n: int = 4, max_keys: int = 4096) -> float:
    """Max abs error against the float32 reference on up to n requests of at most max_keys keys (the reference
    holds a q x k score matrix); NaN when the batch has none (the peers' agreement still checks the rest)."""
    q, k, v, cu_q, cu_k = tensors
    out = fn()
    cq, ck = cu_q.cpu().numpy(), cu_k.cpu().numpy()
    worst = float("nan")
    for b in [b for b in range(len(cq) - 1) if ck[b + 1] - ck[b] <= max_keys][:n]:
        one_q, one_k = [0, int(cq[b + 1] - cq[b])], [0, int(ck[b + 1] - ck[b])]
        ref = packinfer.reference_varlen_attention(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                                                   one_q, one_k, causal=True, window=case.window,
                                                   softcap=case.softcap)
        err = float((out[cq[b]:cq[b + 1]].float() - ref).abs().max())
        worst = err if worst != worst else max(worst, err)
    return worst


def time_ms(fn, device, warmup: int, repeats: int) -> list[float]:
    from packinfer_bench.timing import Timer

    return Timer(device, warmup, repeats, flush_l2=True)(fn)


def run_cases(cases, args, device, dtype, writer) -> list[dict]:
    rows = []
    for case in cases:
        q_lens, kv_lens = lengths(case)
        tensors, backends = calls(case, q_lens, kv_lens, device, dtype)
        flops = causal_flops(q_lens, kv_lens, case.heads, case.head_dim, case.window)
        outs = {}
        for name, fn in backends.items():
            row = {"case": case.name, "backend": name, "batch": case.batch, "tokens_q": int(q_lens.sum()),
                   "tokens_kv": int(kv_lens.sum()), "heads": case.heads, "kv_heads": case.kv_heads,
                   "head_dim": case.head_dim, "window": f"{case.window[0]},{case.window[1]}",
                   "softcap": case.softcap}
            if isinstance(fn, tuple):
                row.update(status="skipped", reason=fn[1])
            else:
                try:
                    row["max_err_vs_ref"] = check(fn, tensors, case)
                    outs[name] = fn().float()
                    times = time_ms(fn, device, args.warmup, args.repeats)
                    med = float(np.median(times))
                    row.update(status="ok", ms_median=med, ms_p10=float(np.percentile(times, 10)),
                               ms_p90=float(np.percentile(times, 90)), tflops=flops / med / 1e9)
                except Exception as e:  # a peer that fails on a case is recorded, the run goes on
                    row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            writer(row)
        if "packinfer" in outs:
            for r in rows:
                if r["case"] == case.name and r["backend"] in outs and r["backend"] != "packinfer":
                    r["max_diff_vs_packinfer"] = float((outs[r["backend"]] - outs["packinfer"]).abs().max())
    return rows


def regression_child(args, device, dtype) -> None:
    """Times packinfer's native calls at head dim 128 (whatever kernels/ is on the path) as JSON lines."""
    for case in REGRESSION:
        q_lens, kv_lens = lengths(case)
        tensors, _ = calls(case, q_lens, kv_lens, device, dtype, peers=False)
        q, k, v, cu_q, cu_k = tensors
        plan = packinfer.plan_for(cu_q.cpu(), cu_k.cpu(), case.heads, case.kv_heads, 128, causal=True)
        mq, mk = int(q_lens.max()), int(kv_lens.max())
        fn = functools.partial(packinfer.varlen_attention, q, k, v, cu_q, cu_k, mq, mk, causal=True, plan=plan,
                               validate=False)
        print(json.dumps({"case": case.name, "ms": time_ms(fn, device, args.warmup, args.repeats)}), flush=True)
        if case.phase == "decode":  # and the serving path: cache attention over the same K/V, grouped layout
            n = len(kv_lens)
            view = packinfer.KVView(layout="grouped", k=k, v=v, request_ids=list(range(n)),
                                    kv_lens=kv_lens.astype(np.int64), prefix_ids=np.full(n, -1),
                                    prefix_lens=np.zeros(n, np.int64), prefix_addr=np.full(n, -1),
                                    own_addr=cu_k[:-1].cpu().numpy().astype(np.int64))
            cplan = packinfer.plan_cache_attention(view, q_lens, case.heads, num_sms=packinfer.num_sms(device))
            fn = functools.partial(packinfer.cache_attention, q, view, cplan, validate=False)
            print(json.dumps({"case": case.name + " cache", "ms": time_ms(fn, device, args.warmup, args.repeats)}),
                  flush=True)


def regression(args, out: Path) -> None:
    """This checkout's kernels against --before's, alternating processes, three rounds each."""
    results: dict = {}
    for _ in range(3):
        for label, kernels in (("before", args.before), ("after", REPO / "kernels")):
            env = {**os.environ, "PYTHONPATH": f"{kernels}{os.pathsep}{REPO}"}
            proc = subprocess.run([sys.executable, __file__, "--regression-child", "--out", str(out),
                                   "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"regression child ({label}) failed")
            for line in proc.stdout.splitlines():
                r = json.loads(line)
                results.setdefault((r["case"], label), []).extend(r["ms"])
    with open(out / "regression_d128.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "before_ms_median", "after_ms_median", "after_over_before", "samples_each"])
        for name in dict.fromkeys(c for c, _ in results):
            b, a = np.median(results[(name, "before")]), np.median(results[(name, "after")])
            w.writerow([name, f"{b:.4f}", f"{a:.4f}", f"{a / b:.4f}", len(results[(name, "after")])])
            print(f"{name:24s} before {b:.3f} ms  after {a:.3f} ms  ratio {a / b:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--before", type=Path, help="an older kernels/ folder for the head dim 128 regression check")
    ap.add_argument("--regression-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="comma-separated substrings of the case names to run")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16
    if args.regression_child:
        regression_child(args, device, dtype)
        return
    from packinfer_bench import envinfo

    env = {**envinfo.collect(), "benchmark": {"script": "benchmarks/fa_features.py", "argv": sys.argv[1:],
                                              "dtype": "bf16", "timing": "cuda-events, L2 flushed"}}
    (args.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    fields = ["case", "backend", "status", "reason", "batch", "tokens_q", "tokens_kv", "heads", "kv_heads",
              "head_dim", "window", "softcap", "ms_median", "ms_p10", "ms_p90", "tflops", "max_err_vs_ref",
              "max_diff_vs_packinfer"]
    rows_seen: list[dict] = []
    cases = SMOKE if args.smoke else CASES
    if args.only:
        cases = [c for c in cases if any(s in c.name for s in args.only.split(","))]
    rows = run_cases(cases, args, device, dtype, rows_seen.append)
    with open(args.out / "records.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    print(f"{'case':40s} {'backend':10s} {'ms':>8s} {'TFLOP/s':>8s} {'err':>8s}  time / packinfer's")
    base = {r["case"]: r.get("ms_median") for r in rows if r["backend"] == "packinfer"}
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['case']:40s} {r['backend']:10s} {r['status']}: {r.get('reason', '')}")
            continue
        speed = f"{r['ms_median'] / base[r['case']]:.2f}x" if base.get(r["case"]) else ""
        print(f"{r['case']:40s} {r['backend']:10s} {r['ms_median']:8.3f} {r['tflops']:8.1f} "
              f"{r['max_err_vs_ref']:8.4f}  {speed}")
    if args.before and not args.smoke:
        regression(args, args.out)


if __name__ == "__main__":
    main()
