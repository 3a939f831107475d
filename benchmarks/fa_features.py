"""FlashAttention-compatible features on the GPU: packinfer through `packinfer.flash_attn_interface` against
FlashAttention 2 (PyTorch's aten._flash_attention_forward), FlashAttention 3 (`flash_attn_interface` or the
`fa3-fwd` wheel) and FlashInfer (fa3 prefill backend, tensor-core decode) on the same tensors, for what issue 17
adds: head dims 80 (Phi-2) and 96 (Phi-3) in prefill and decode, a 4096-token sliding window on long prompts
(Mistral 7B v0.1), head dim 256 with and without softcap 50 (Gemma 2). Lengths come from the shipped traces. Each
output is checked against the float32 reference on its first requests, and against packinfer's on the whole
batch. A peer without the feature is skipped, named. `packinfer` is the FlashAttention-signature call (it plans on
the host every call, as that API must); `packinfer-planned` is the native call with the plan built once, as a
serving loop runs it for every layer of a step. records.csv keeps the rows of cases a call did not run.
`--before DIR` (an older kernels/ tree) then times packinfer's head dim 128 native calls with this checkout's
kernels and with DIR's, alternating processes, to show no regression at 128 (`--regression-only`: that alone).
`--tune` times the prefill cases at every TUNE_CONFIGS tile shape instead (tune.csv).

    python benchmarks/fa_features.py --out results/fa-features/h200 [--before .old_kernels]   # GPU
    python benchmarks/fa_features.py --out results/fa-features/h200 --tune                     # GPU
    python benchmarks/fa_features.py --smoke --out /tmp/faf                                     # CPU, tiny
"""
from __future__ import annotations

import argparse
import csv
import functools
import importlib
import importlib.util
import io
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
PAGE = 16  # FlashInfer's page size over the decode cases' cache


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
    Case("prefill-d256 Mooncake (Gemma-2-9B)", 16, 8, 256, "mooncake-conv", "prefill", 16, max_len=16384),
    Case("prefill-d256 Azure conv (Gemma-2-9B)", 16, 8, 256, "azure-conv", "prefill", 32),
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
    k_cache = v_cache = None  # decode: the dense cache [batch, capacity, kv heads, dim]
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
        if case.softcap:  # the same call with tanh from exp2 (the kernels' CPU path), to show what the GPU's tanh wins
            exact_plan = packinfer.plan_for(cu_q.cpu(), cu_k.cpu(), case.heads, case.kv_heads, case.head_dim,
                                            causal=True, window=case.window)

            def exact_tanh():
                os.environ["PACKINFER_EXACT_TANH"] = "1"
                try:
                    return packinfer.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, causal=True, window=case.window,
                                                      softcap=case.softcap, plan=exact_plan, validate=False)
                finally:
                    del os.environ["PACKINFER_EXACT_TANH"]
            out["packinfer-planned-exp2-tanh"] = exact_tanh
        fa2_k, fa2_v, fa2_cu, fa2_used = k, v, cu_k, None
    else:
        cap = -(-int(kv_lens.max()) // PAGE) * PAGE  # whole pages, so FlashInfer can read it as a paged cache
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
    out["flashinfer"] = flashinfer_call(case, q_lens, kv_lens, tensors, k_cache, v_cache, device, dtype)
    return tensors, out


def flashinfer_call(case: Case, q_lens, kv_lens, tensors, k_cache, v_cache, device, dtype):
    """FlashInfer at its best on Hopper: batch prefill over ragged K/V with the fa3 backend; batch decode over
    the cache read as pages of PAGE tokens, tensor cores on. Or (None, reason)."""
    if device.type != "cuda":
        return None, "needs CUDA"
    if importlib.util.find_spec("flashinfer") is None:
        return None, "flashinfer not installed"
    if case.head_dim not in (64, 128, 256):
        return None, (f"FlashInfer's kernels take head dims 64/128/256 (others crash, flashinfer issue 4299); "
                      f"not run at {case.head_dim}")
    import flashinfer

    q, k, v, cu_q, cu_k = tensors
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    opts = {"window_left": case.window[0], "logits_soft_cap": case.softcap or None, "q_data_type": dtype}
    if case.phase == "prefill":
        wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="fa3")
        wrapper.plan(cu_q, cu_k, case.heads, case.kv_heads, case.head_dim, causal=True, **opts)
        return lambda: wrapper.run(q, k, v)
    b, cap = k_cache.shape[:2]
    pages = -(-kv_lens.astype(np.int64) // PAGE)
    indptr = torch.tensor(np.concatenate([[0], np.cumsum(pages)]), dtype=torch.int32, device=device)
    indices = torch.tensor(np.concatenate([i * (cap // PAGE) + np.arange(n) for i, n in enumerate(pages)]),
                           dtype=torch.int32, device=device)
    last = torch.tensor(kv_lens - (pages - 1) * PAGE, dtype=torch.int32, device=device)
    paged = tuple(t.view(-1, PAGE, case.kv_heads, case.head_dim) for t in (k_cache, v_cache))
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    wrapper.plan(indptr, indices, last, case.heads, case.kv_heads, case.head_dim, PAGE, kv_data_type=dtype, **opts)
    return lambda: wrapper.run(q, paged)


def warm_flashinfer(cases, args) -> None:
    """Build FlashInfer's JIT modules of the cases in parallel processes (each a fresh build of ~30-100 s on a
    new machine; one process per case, the module cache on disk is shared), before anything is timed."""
    if importlib.util.find_spec("flashinfer") is None:
        return
    procs = [subprocess.Popen([sys.executable, __file__, "--warm-flashinfer", c.name, "--out", str(args.out)])
             for c in cases if c.head_dim in (64, 128, 256)]
    for p in procs:
        p.wait()


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


def run_cases(cases, args, device, dtype, rows: list[dict], save) -> None:
    """Each case's backends, checked and timed, appended to rows; save() after every case."""
    for case in cases:
        q_lens, kv_lens = lengths(case)
        tensors, backends = calls(case, q_lens, kv_lens, device, dtype)
        flops = causal_flops(q_lens, kv_lens, case.heads, case.head_dim, case.window)
        outs, mine = {}, []
        for name, fn in backends.items():
            row = {"case": case.name, "backend": name, "batch": case.batch, "tokens_q": int(q_lens.sum()),
                   "tokens_kv": int(kv_lens.sum()), "heads": case.heads, "kv_heads": case.kv_heads,
                   "head_dim": case.head_dim, "window": f"{case.window[0]},{case.window[1]}",
                   "softcap": case.softcap, "git_sha": args.git_sha}
            if isinstance(fn, tuple):
                row.update(status="skipped", reason=fn[1])
            else:
                try:
                    _measure(row, fn, tensors, case, flops, args, device)
                    outs[name] = fn().float()
                except Exception as e:  # a peer that fails on a case is recorded, the run goes on
                    row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
            mine.append(row)
        if "packinfer" in outs:
            for r in mine:
                if r["backend"] in outs and r["backend"] != "packinfer":
                    r["max_diff_vs_packinfer"] = float((outs[r["backend"]] - outs["packinfer"]).abs().max())
        rows[:] = [r for r in rows if r["case"] != case.name] + mine
        save()


#: Tile shapes tried by --tune (slots, block_n, warps, stages; GQA packing as the planner chose), besides the
#: planner's own choice.
TUNE_CONFIGS = [(32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2),
                (128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3),
                (128, 128, 8, 3), (64, 128, 4, 3)]


def tune(cases, args, device, dtype) -> None:
    """Every TUNE_CONFIGS tile shape on the prefill cases (checked against the reference, timed), into tune.csv
    (rows kept across calls: a case already there is not run again)."""
    path = args.out / "tune.csv"
    rows = _read_csv(path)
    done = {r["case"] for r in rows}
    fields = ["case", "config", "slots", "block_n", "num_warps", "num_stages", "pack_gqa", "status", "reason",
              "ms_median", "tflops", "max_err_vs_ref"]
    for case in [c for c in cases if c.phase == "prefill" and c.name not in done]:
        q_lens, kv_lens = lengths(case)
        tensors, _ = calls(case, q_lens, kv_lens, device, dtype, peers=False)
        q, k, v, cu_q, cu_k = tensors
        mq, mk = int(q_lens.max()), int(kv_lens.max())
        flops = causal_flops(q_lens, kv_lens, case.heads, case.head_dim, case.window)
        group = case.heads // case.kv_heads
        chosen = packinfer.choose_config(q_lens, kv_lens, case.heads, case.kv_heads, case.head_dim)
        grid = [packinfer.KernelConfig(*c, chosen.pack_gqa) for c in TUNE_CONFIGS
                if not chosen.pack_gqa or c[0] >= 16 * group]
        configs = [("planner", chosen)] + [("grid", c) for c in grid if c != chosen]
        for label, cfg in configs:
            row = {"case": case.name, "config": label, "slots": cfg.slots, "block_n": cfg.block_n,
                   "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "pack_gqa": cfg.pack_gqa}
            try:
                plan = packinfer.plan_for(cu_q.cpu(), cu_k.cpu(), case.heads, case.kv_heads, case.head_dim,
                                          causal=True, window=case.window, config=cfg)
                fn = functools.partial(packinfer.varlen_attention, q, k, v, cu_q, cu_k, mq, mk, causal=True,
                                       window=case.window, softcap=case.softcap, plan=plan, validate=False)
                _measure(row, fn, tensors, case, flops, args, device)
            except Exception as e:  # a shape that does not compile (shared memory, registers) is recorded
                row.update(status="error", reason=f"{type(e).__name__}: {e}"[:200])
            rows.append(row)
            print(f"tune {case.name:40s} {cfg} {row.get('ms_median', row.get('reason'))}", flush=True)
        _write_csv(path, fields, rows)


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Write rows whole or not at all (a kill mid-write keeps the previous file)."""
    from packinfer_bench.run_folder import write_atomic

    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, text.getvalue())


def _read_csv(path: Path) -> list[dict]:
    """The rows an earlier call wrote (none if it did not)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _measure(row: dict, fn, tensors, case: Case, flops: float, args, device) -> None:
    """One call checked against the float32 reference, then timed, into row's measured columns (the error
    first: a call that fails while timed keeps it)."""
    row["max_err_vs_ref"] = check(fn, tensors, case)
    times = time_ms(fn, device, args.warmup, args.repeats)
    med = float(np.median(times))
    row.update(status="ok", ms_median=med, ms_p10=float(np.percentile(times, 10)),
               ms_p90=float(np.percentile(times, 90)), tflops=flops / med / 1e9)


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
        _write_regression(out / "regression_d128.csv", results)  # after every round: a kill keeps the rounds done


def _write_regression(path: Path, results: dict) -> None:
    rows = []
    for name in dict.fromkeys(c for c, _ in results):
        if (name, "before") in results and (name, "after") in results:
            b, a = np.median(results[(name, "before")]), np.median(results[(name, "after")])
            rows.append({"case": name, "before_ms_median": f"{b:.4f}", "after_ms_median": f"{a:.4f}",
                         "after_over_before": f"{a / b:.4f}", "samples_each": len(results[(name, "after")])})
            print(f"{name:24s} before {b:.3f} ms  after {a:.3f} ms  ratio {a / b:.3f}", flush=True)
    _write_csv(path, ["case", "before_ms_median", "after_ms_median", "after_over_before", "samples_each"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--before", type=Path, help="an older kernels/ folder for the head dim 128 regression check")
    ap.add_argument("--regression-only", action="store_true", help="only the head dim 128 check against --before")
    ap.add_argument("--regression-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="comma-separated substrings of the case names to run")
    ap.add_argument("--tune", action="store_true", help="time the prefill cases at every TUNE_CONFIGS tile shape")
    ap.add_argument("--warm-flashinfer", metavar="CASE", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16
    if args.regression_child:
        regression_child(args, device, dtype)
        return
    if args.regression_only and not args.before:
        ap.error("--regression-only needs --before DIR")
    if args.warm_flashinfer:  # build (and run once) FlashInfer's call of one case, for warm_flashinfer
        case = next(c for c in CASES if c.name == args.warm_flashinfer)
        q_lens, kv_lens = lengths(case)
        fn = calls(case, q_lens, kv_lens, device, dtype)[1]["flashinfer"]
        if not isinstance(fn, tuple):
            fn()
        return
    from packinfer_bench import envinfo

    env = {**envinfo.collect(), "benchmark": {"script": "benchmarks/fa_features.py", "argv": sys.argv[1:],
                                              "dtype": "bf16", "timing": "cuda-events, L2 flushed"}}
    name = "env-tune.json" if args.tune else "env-regression.json" if args.regression_only else "env.json"
    (args.out / name).write_text(json.dumps(env, indent=2) + "\n")  # one per kind of call: none overwrites another
    fields = ["case", "backend", "status", "reason", "batch", "tokens_q", "tokens_kv", "heads", "kv_heads",
              "head_dim", "window", "softcap", "ms_median", "ms_p10", "ms_p90", "tflops", "max_err_vs_ref",
              "max_diff_vs_packinfer", "git_sha"]
    path = args.out / "records.csv"
    rows = _read_csv(path)  # a rerun replaces only its cases' rows
    cases = SMOKE if args.smoke else CASES
    if args.only:
        cases = [c for c in cases if any(s in c.name for s in args.only.split(","))]
    if args.tune:
        tune(cases, args, device, dtype)
        return
    if args.regression_only:
        regression(args, args.out)
        return
    if not args.smoke:
        warm_flashinfer(cases, args)
    args.git_sha = env["git_sha"]  # rows of earlier calls keep theirs
    run_cases(cases, args, device, dtype, rows, lambda: _write_csv(path, fields, rows))
    print(f"{'case':40s} {'backend':28s} {'ms':>8s} {'TFLOP/s':>8s} {'err':>8s}  time / packinfer-planned's")
    base = {r["case"]: float(r["ms_median"]) for r in rows
            if r["backend"] == "packinfer-planned" and r.get("ms_median")}
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['case']:40s} {r['backend']:28s} {r['status']}: {r.get('reason', '')}")
            continue
        ms = float(r["ms_median"])
        speed = f"{ms / base[r['case']]:.2f}x" if base.get(r["case"]) else ""
        print(f"{r['case']:40s} {r['backend']:28s} {ms:8.3f} {float(r['tflops']):8.1f} "
              f"{float(r['max_err_vs_ref']):8.4f}  {speed}")
    if args.before and not args.smoke:
        regression(args, args.out)


if __name__ == "__main__":
    main()
