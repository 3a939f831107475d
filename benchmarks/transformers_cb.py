"""packinfer inside Hugging Face transformers' continuous batching, against transformers' own paged attention
implementations on the same model, requests and engine settings.

A decoder with random weights is built from a config (shapes of Llama-3.1-8B and Qwen2.5-7B from
packinfer_bench.models; no download; --layers cuts depth) and serves requests replayed from a shipped trace
(packinfer_bench.traces: random token ids of the trace's prompt lengths, max_new_tokens from its output lengths,
both capped by --max-prompt / --max-new). All requests are submitted at once (an offline batch, as
`generate_batch` serves it); EOS is disabled so every request generates exactly its max_new_tokens.
--engine manager (default) feeds transformers' continuous-batching manager (the engine generate_batch wraps)
with each request's own max_new_tokens; --engine generate_batch calls model.generate_batch with one
max_new_tokens (--max-new) for all. Implementations: packinfer (packinfer.integrations.transformers) and
transformers' sdpa, eager and flash_attention_2 (when flash-attn is installed) in their paged forms; CUDA graphs
and torch.compile off for all (packinfer plans on the host), transformers' auto switch to flash off.
Per implementation and repeat (interleaved A B C A B C, after one warm-up run each): wall time from submission
to the last result, generated tokens/s, prompt+generated tokens/s, TTFT and TPOT from transformers' per-token
timestamps (TTFT includes the wait in the queue: everything arrives at t=0), the share of requests whose tokens
equal the first peer's (random weights in bf16: agreement is informative, not a pass mark), and for packinfer
its kernel launches and plans. Writes results.csv, results.json and env.json to --out.

    python benchmarks/transformers_cb.py --out results/transformers-cb/h200            # GPU (default config)
    python benchmarks/transformers_cb.py --model tiny --out /tmp/tcb                    # CPU smoke, seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from packinfer_bench import envinfo
from packinfer_bench.models import ModelConfig, preset
from packinfer_bench.traces import load_trace

FIELDS = ["model", "layers", "trace", "impl", "attn_implementation", "repeat", "status", "error", "requests",
          "prompt_tokens", "generated_tokens", "wall_s", "generated_tok_s", "total_tok_s", "ttft_mean_ms",
          "ttft_p50_ms", "ttft_p90_ms", "tpot_mean_ms", "tpot_p50_ms", "tpot_p90_ms", "peer", "same_tokens_as_peer",
          "packinfer_launches", "packinfer_plans"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="llama-3.1-8b,qwen2.5-7b",
                    help="comma-separated presets: llama-3.1-8b, qwen2.5-7b, tiny (CPU smoke)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own)")
    ap.add_argument("--trace", default="sharegpt", help="shipped trace name or file (packinfer-bench traces list)")
    ap.add_argument("--requests", type=int, default=None, help="requests taken from the trace (default 32; tiny 6)")
    ap.add_argument("--max-prompt", type=int, default=None, help="prompt length cap (default 4096; tiny 40)")
    ap.add_argument("--max-new", type=int, default=None, help="max_new_tokens cap (default 32; tiny 4)")
    ap.add_argument("--impls", default="packinfer,sdpa,eager,flash_attention_2",
                    help="comma-separated; flash_attention_2 is skipped where flash-attn is not installed")
    ap.add_argument("--repeats", type=int, default=None, help="measured runs per implementation (default 2; tiny 1)")
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="tokens per step (default 2048: eager runs out of memory at 8192; tiny 32)")
    ap.add_argument("--engine", choices=["manager", "generate_batch"], default="manager")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tiny = args.model == "tiny"
    for name, default, smoke in (("requests", 32, 6), ("max_prompt", 4096, 40), ("max_new", 32, 4),
                                 ("repeats", 2, 1), ("max_batch_tokens", 2048, 32)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if tiny else default)
    return args


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A causal LM of the preset's shape with random weights (Qwen2 for qwen presets: q/k/v biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {"vocab_size": cfg.vocab, "hidden_size": cfg.hidden, "intermediate_size": cfg.intermediate,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_eps,
              "max_position_embeddings": 32768, "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    qwen = cfg.name.startswith("qwen")
    config = Qwen2Config(use_sliding_window=False, **common) if qwen else LlamaConfig(**common)
    torch.manual_seed(seed)
    with torch.device(device):
        model = (Qwen2ForCausalLM if qwen else LlamaForCausalLM)._from_config(config, dtype=dtype)
    return model.eval()


def requests_from_trace(trace: str, n: int, max_prompt: int, max_new: int, vocab: int,
                        seed: int) -> tuple[list[list[int]], list[int]]:
    """The trace's first n requests: random token ids of its prompt lengths, its output lengths (both capped)."""
    df = load_trace(trace).requests.head(n)
    if len(df) < n:
        raise SystemExit(f"trace {trace} has {len(df)} requests, fewer than --requests {n}")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=min(int(p), max_prompt)).tolist() for p in df["prompt_len"]]
    return prompts, [min(int(o), max_new) for o in df["output_len"]]


def implementations(wanted: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """{impl: attn_implementation name} for those that can run here, and {impl: reason} for the others."""
    from packinfer.integrations import transformers as pit

    names, skipped = {}, {}
    for impl in wanted:
        if impl == "packinfer":
            names[impl] = pit.register()
        elif impl == "flash_attention_2":
            try:
                import flash_attn  # noqa: F401
            except ImportError:
                skipped[impl] = "flash-attn is not installed"
                continue
            if not torch.cuda.is_available():
                skipped[impl] = "no CUDA device"
                continue
            names[impl] = pit.peer_name(impl)
        elif impl in ("sdpa", "eager"):
            names[impl] = pit.peer_name(impl)
        else:
            raise SystemExit(f"--impls: unknown implementation {impl!r}; allowed: packinfer, sdpa, eager, "
                             "flash_attention_2")
    return names, skipped


def cb_config(prompts: list[list[int]], new_tokens: list[int], max_batch_tokens: int):
    """Engine settings shared by every implementation: a cache sized for the workload, no CUDA graphs, no compile,
    no decode fast path (a flash-only block-table path), no switch to flash."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    cb = ContinuousBatchingConfig(max_batch_tokens=max_batch_tokens, use_cuda_graph=False,
                                  max_blocks_per_request=0)
    page = getattr(cb, "page_size", None) or getattr(cb, "block_size", 256)
    cb.num_blocks = sum(math.ceil((len(p) + n) / page) for p, n in zip(prompts, new_tokens)) + 2
    if hasattr(cb, "auto_switch_to_flash"):
        cb.auto_switch_to_flash = False
    return cb


def serve(model, prompts: list[list[int]], new_tokens: list[int], engine: str, max_new: int,
          max_batch_tokens: int) -> tuple[float, list]:
    """Submit every request at once; (wall seconds to the last result, outputs in request order)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max_new)
    cb = cb_config(prompts, new_tokens if engine == "manager" else [max_new] * len(prompts), max_batch_tokens)
    if engine == "generate_batch":
        start = time.perf_counter()
        out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                                   record_timestamps=True, progress_bar=False)
        _sync()
        return time.perf_counter() - start, list(out.values())
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                   block=True, timeout=10, warmup=False) as manager:
        start = time.perf_counter()
        ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=n, record_timestamps=True)
               for i, (p, n) in enumerate(zip(prompts, new_tokens))]
        results = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError(f"continuous batching stopped with {len(ids) - len(results)} requests unserved")
        _sync()
        wall = time.perf_counter() - start
    return wall, [results[i] for i in ids]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def latency_stats(outputs: list) -> dict[str, float]:
    """TTFT (first token's timestamp minus the request's creation) and TPOT (mean gap between later tokens), ms."""
    ttft, tpot = [], []
    for o in outputs:
        stamps = o.timestamps or []
        if stamps:
            ttft.append((stamps[0] - o.created_time) * 1e3)
        if len(stamps) > 1:
            tpot.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3)
    row = {}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        arr = np.asarray(values) if values else np.asarray([np.nan])
        row.update({f"{name}_mean_ms": float(arr.mean()), f"{name}_p50_ms": float(np.percentile(arr, 50)),
                    f"{name}_p90_ms": float(np.percentile(arr, 90))})
    return row


def measure(model, cfg: ModelConfig, args, prompts, new_tokens, names: dict[str, str]) -> list[dict]:
    from packinfer.integrations import transformers as pit

    rows, tokens = [], {}
    warm = (prompts[:8], new_tokens[:8])
    for name in names.values():  # warm-up: Triton compiles, CUDA allocator, kernels' first launches
        model.set_attn_implementation(name)
        serve(model, *warm, args.engine, args.max_new, args.max_batch_tokens)
    for repeat in range(args.repeats):
        for impl, name in names.items():
            model.set_attn_implementation(name)
            pit.reset_stats()
            row = {"model": cfg.name, "layers": cfg.num_layers, "trace": args.trace, "impl": impl,
                   "attn_implementation": name, "repeat": repeat, "requests": len(prompts),
                   "prompt_tokens": sum(map(len, prompts))}
            try:
                wall, outputs = serve(model, prompts, new_tokens, args.engine, args.max_new, args.max_batch_tokens)
            except Exception as exc:  # noqa: BLE001 - out of memory included: recorded, the others go on
                rows.append({**row, "status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"  {impl} repeat {repeat}: error {rows[-1]['error']}", flush=True)
                _free()
                continue
            failed = [o.error for o in outputs if o.error is not None]
            generated = sum(len(o.generated_tokens) for o in outputs)
            if not failed:
                tokens[repeat, impl] = [o.generated_tokens for o in outputs]
            stats = pit.stats()
            row.update(status="error" if failed else "ok", error=failed[0][:300] if failed else "",
                       generated_tokens=generated, wall_s=wall, generated_tok_s=generated / wall,
                       total_tok_s=(generated + row["prompt_tokens"]) / wall, **latency_stats(outputs),
                       packinfer_launches=stats.launches if impl == "packinfer" else "",
                       packinfer_plans=stats.plans if impl == "packinfer" else "")
            rows.append(row)
            if failed:
                print(f"  {impl} repeat {repeat}: {len(failed)} requests failed: {failed[0][:300]}", flush=True)
                continue
            print(f"  {impl} repeat {repeat}: {generated} tokens in {wall:.2f} s = {generated / wall:.0f} tok/s, "
                  f"TTFT p50 {row['ttft_p50_ms']:.0f} ms, TPOT p50 {row['tpot_p50_ms']:.1f} ms", flush=True)
    peer = "sdpa" if "sdpa" in names else next((p for p in names if p != "packinfer"), None)
    for row in rows:  # agreement with the peer's tokens of the same repeat
        theirs, ours = tokens.get((row["repeat"], peer)), tokens.get((row["repeat"], row["impl"]))
        if theirs is not None and ours is not None and row["impl"] != peer:
            row["peer"] = peer
            row["same_tokens_as_peer"] = float(np.mean([a == b for a, b in zip(ours, theirs)]))
    return rows


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(rows: list[dict]) -> list[dict]:
    """Per model: median generated tokens/s of each implementation and packinfer's ratio to each peer."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and r["status"] == "ok"]
        med = {impl: float(np.median([r["generated_tok_s"] for r in ok if r["impl"] == impl]))
               for impl in dict.fromkeys(r["impl"] for r in ok)}
        entry = {"model": model, "median_generated_tok_s": med}
        if "packinfer" in med:
            entry["packinfer_speedup"] = {p: med["packinfer"] / v for p, v in med.items() if p != "packinfer"}
        out.append(entry)
    return out


def main() -> None:
    args = parse_args()
    tiny = args.model == "tiny"
    if tiny or not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: kernels under the interpreter (before triton loads)
    from packinfer.integrations import transformers as pit

    version = pit.check_version()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float16 if device.type == "cpu" else torch.bfloat16
    names, skipped = implementations(args.impls.split(","))
    env = {**envinfo.collect(), "transformers": version,
           "benchmark": {"script": "benchmarks/transformers_cb.py", "argv": sys.argv[1:], "device": str(device),
                         "dtype": str(dtype), "skipped": skipped}}
    (args.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    for impl, why in skipped.items():
        print(f"skipping {impl}: {why}")
    rows = []
    for model_name in args.model.split(","):
        cfg = preset(model_name, args.layers)
        model = build_model(cfg, device, dtype, args.seed)
        prompts, new_tokens = requests_from_trace(args.trace, args.requests, args.max_prompt, args.max_new,
                                                  cfg.vocab, args.seed)
        print(f"{cfg.name} ({cfg.num_layers} layers, {dtype}, {device}): {len(prompts)} {args.trace} requests, "
              f"{sum(map(len, prompts))} prompt tokens, {sum(new_tokens)} to generate", flush=True)
        rows += measure(model, cfg, args, prompts, new_tokens, names)
        del model
        _free()
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "skipped": skipped, "summary": summary, "rows": rows},
                                                      indent=2) + "\n")
    for entry in summary:
        print(json.dumps(entry))


if __name__ == "__main__":
    main()
