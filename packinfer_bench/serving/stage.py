"""The end-to-end stage of an experiment: for every e2e entry, trace and rate, build the continuous-batching
schedule once, then replay it through the model with each backend's attention (fresh KV cache each), check the
first iterations against the float32 reference attention, and store per-iteration, per-request and summary rows
(e2e/ in the run folder) as they are made."""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch
from packinfer import KVCacheError

from packinfer_bench.backends import BACKENDS, DTYPES
from packinfer_bench.config import REFERENCE, E2EConfig, ExperimentConfig
from packinfer_bench.errors import ConfigError, first_line
from packinfer_bench.reference import ReferenceAttention
from packinfer_bench.run_folder import ITERATIONS_FILE, REQUESTS_FILE
from packinfer_bench.run_folder.e2e import E2ERecord, E2EStore, new_attempt
from packinfer_bench.serving.graphs import DecodeGraphs
from packinfer_bench.serving.kv_follow import peak_tokens
from packinfer_bench.serving.metrics import request_latencies, summarize, timeline
from packinfer_bench.models import preset
from packinfer_bench.serving.model import Decoder
from packinfer_bench.serving.replay import cache_capacity, make_cache, replay
from packinfer_bench.traces import Trace
from packinfer_bench.workload import Batch, continuous_batches
from packinfer_bench.workload.continuous import ContinuousSpec, replayed_requests

#: Sampled rows whose final hidden state is further than this (relative L2) from the reference's: `incorrect`.
#: Looser than the kernel check: bf16 differences in attention compound through every layer.
E2E_MAX_REL_ERR = 5e-2


@dataclasses.dataclass
class Scenario:
    """One schedule to replay: which requests, when they arrive, how many tokens each must produce."""

    spec: ContinuousSpec
    schedule: list[Batch]
    arrivals: dict[int, float]
    expected: dict[int, int]  # request -> output tokens
    refused: int  # requests the scheduler never ran (too large for its limits)


def scenario(trace: Trace, spec: ContinuousSpec) -> Scenario:
    schedule = list(continuous_batches(trace, spec))
    df, times = replayed_requests(trace, spec)
    arrivals = {int(r): float(t) for r, t in zip(df["request_id"], times)}
    expected = {int(r): int(o) for r, o in zip(df["request_id"], df["output_len"])}
    seen = {r for b in schedule for r in b.request_ids.tolist()}
    return Scenario(spec, schedule, {r: t for r, t in arrivals.items() if r in seen},
                    {r: n for r, n in expected.items() if r in seen}, len(expected) - len(seen))


def run_e2e(config: ExperimentConfig, out_dir, traces: dict[str, Trace], device: torch.device,
            log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every end-to-end replay of the config not already stored; returns counts per status."""
    store = E2EStore(out_dir)
    done = store.done()
    counts: dict[str, int] = {}
    for entry in config.e2e:
        cfg = preset(entry.model, entry.num_layers)
        model = graphs = None
        for tcfg in config.traces_of(entry):
            for rate in entry.rates or [None]:
                spec = entry.continuous if rate is None else dataclasses.replace(
                    entry.continuous, arrivals="poisson", rate=rate)
                label = "trace" if rate is None else f"{rate:g}"
                todo = [b for b in entry.backends if (entry.name, tcfg.name, label, b) not in done]
                if not todo:
                    continue
                def base(backend: str) -> E2ERecord:
                    return E2ERecord(entry.name, tcfg.name, label, backend, cfg.name, cfg.num_layers,
                                     cfg.full_layers or cfg.num_layers, status="ok", attempt=new_attempt())

                def store_all(status: str, reason: str) -> None:  # every backend of this replay alike
                    log(f"  {status}: {reason}")
                    for backend in todo:
                        store.add_summary(dataclasses.replace(base(backend), status=status, reason=reason))
                        counts[status] = counts.get(status, 0) + 1

                try:
                    scen = scenario(traces[tcfg.name], spec)
                except Exception as e:  # noqa: BLE001 -- one replay's failure must not end the run
                    store_all("error", f"building the schedule: {type(e).__name__}: {first_line(e)}")
                    continue
                log(f"e2e {entry.name} {tcfg.name} rate {label}: {len(scen.arrivals)} requests "
                    f"({scen.refused} refused), {len(scen.schedule)} iterations, model {cfg.name} "
                    f"x {cfg.num_layers} layers")
                if not scen.arrivals:
                    store_all("refused", f"the scheduler refused all {scen.refused} requests (each needs more than "
                                         "max_kv_tokens / max_num_batched_tokens allow)")
                    continue
                reference = None
                for backend in todo:
                    record = base(backend)
                    why = None if backend == REFERENCE else BACKENDS[backend].available(device)
                    if why:
                        record = dataclasses.replace(record, status="skipped", reason=why)
                        log(f"  {backend}: skipped ({why})")
                    else:
                        try:
                            if model is None:
                                model = Decoder(cfg, device, DTYPES[entry.dtype], seed=entry.seed)
                                if entry.cuda_graphs and device.type == "cuda":
                                    graphs = DecodeGraphs(model)
                            if reference is None and entry.verify_iterations:
                                reference = _reference_outputs(model, scen, entry.verify_iterations)
                            if graphs is not None:  # captured outside the timed replays
                                graphs.ensure(len(b) for b in scen.schedule if int(b.q_lens.max()) == 1)
                        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: this replay only
                            reason = f"model, reference or graphs: {type(e).__name__}: {first_line(e)}"
                            log(f"  {backend}: error ({reason})")
                            record = dataclasses.replace(record, status="error", reason=reason)
                            if device.type == "cuda":
                                torch.cuda.empty_cache()
                        else:
                            record = _replay_one(model, graphs, scen, entry, backend, record, reference, store,
                                                 device, log)
                    store.add_summary(record)
                    counts[record.status] = counts.get(record.status, 0) + 1
        del model, graphs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return counts


def _reference_outputs(model: Decoder, scen: Scenario, n: int):
    head = scen.schedule[:n]
    attn = ReferenceAttention(model.device, model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim)
    cache = make_cache(attn, model, cache_capacity(attn, peak_tokens(head), min(scen.spec.max_num_seqs,
                                                                                 len(scen.arrivals))))
    return replay(model, head, attn, cache, keep_outputs=n)


def _replay_one(model: Decoder, graphs: DecodeGraphs | None, scen: Scenario, entry: E2EConfig, backend: str,
                base: E2ERecord, reference, store: E2EStore, device: torch.device, log) -> E2ERecord:
    cfg = model.cfg
    budget = scen.spec.max_kv_tokens or peak_tokens(scen.schedule)
    labels = {**dict(zip(("e2e", "trace", "rate", "backend"), base.key)), "attempt": base.attempt}
    done_iterations = 0

    def keep(it) -> None:
        nonlocal done_iterations
        done_iterations += 1
        rows.append({**labels, **dataclasses.asdict(it)})
        if len(rows) >= 64:
            store.append(ITERATIONS_FILE, rows)
            rows.clear()

    rows: list[dict] = []
    cache = None
    try:
        serving = ReferenceAttention if backend == REFERENCE else BACKENDS[backend].serving
        attn = serving(device, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        capacity = cache_capacity(attn, budget, min(scen.spec.max_num_seqs, len(scen.arrivals)))
        base = dataclasses.replace(base, kv_layout=attn.layout, kv_access=attn.kv_access, kv_budget_tokens=budget,
                                   kv_capacity_tokens=capacity)
        _check_memory(capacity, cfg, model.dtype, device)
        if entry.warmup and device.type == "cuda":  # compile every kernel specialisation outside the timed replay
            shallow = model.truncated(1)
            replay(shallow, scen.schedule, attn, make_cache(attn, shallow, capacity))
        cache = make_cache(attn, model, capacity)
        t0 = time.perf_counter()
        result = replay(model, scen.schedule, attn, cache, graphs=graphs, keep_outputs=entry.verify_iterations,
                        on_iteration=keep)
        store.append(ITERATIONS_FILE, rows)
    except KVCacheError as e:
        store.append(ITERATIONS_FILE, rows)
        reason = f"KV cache full at iteration {done_iterations} (budget {budget} tokens): {first_line(e)}"
        log(f"  {backend}: error ({reason})")
        return dataclasses.replace(base, status="error", reason=reason, iterations=done_iterations)
    except Exception as e:  # noqa: BLE001 -- a backend failing must not lose the other replays
        store.append(ITERATIONS_FILE, rows)
        log(f"  {backend}: error {type(e).__name__}: {first_line(e)}\n{traceback.format_exc(limit=4)}")
        return dataclasses.replace(base, status="error", reason=f"{type(e).__name__}: {first_line(e)}",
                                   iterations=done_iterations)
    finally:
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    its = result.iterations
    durations = np.array([it.iteration_ms for it in its]) * 1e-3
    ends = timeline(scen.schedule, scen.arrivals, durations)
    requests = request_latencies(scen.schedule, scen.arrivals, ends)
    store.append(REQUESTS_FILE, [{**labels, **r} for r in requests.to_dict("records")])
    metrics = summarize(requests, durations, scen.expected)
    err, match = _compare(result, reference)
    status = "incorrect" if err is not None and err > E2E_MAX_REL_ERR else "ok"
    iteration_ms = sum(it.iteration_ms for it in its)
    record = dataclasses.replace(
        base, status=status, reason="" if status == "ok" else f"final hidden states {err:.3g} from the reference",
        num_requests=len(scen.arrivals) + scen.refused, refused=scen.refused, iterations=len(its),
        **{k: v for k, v in metrics.items() if k in E2ERecord.__dataclass_fields__},
        iteration_ms_mean=iteration_ms / max(len(its), 1),
        prepare_ms_mean=float(np.mean([it.prepare_ms for it in its])) if its else None,
        launch_ms_mean=float(np.mean([it.launch_ms for it in its])) if its else None,
        attention_share=sum(it.attention_ms for it in its) / iteration_ms if iteration_ms else None,
        room_ms_total=sum(it.room_ms for it in its), moved_gb=sum(it.moved_bytes for it in its) / 1e9,
        max_rel_err=err, token_match=match, cuda_graphs="decode (piecewise)" if graphs is not None else "off",
        timing="cuda-synchronised wall clock" if device.type == "cuda" else "wall-clock-cpu")
    log(f"  {backend}: {status}, mean e2e {metrics['e2e_ms_mean']:.1f} ms, TTFT {metrics['ttft_ms_mean']:.1f} ms, "
        f"TPOT {metrics['tpot_ms_mean']:.2f} ms, {metrics['throughput_tok_s']:.0f} tok/s, attention "
        f"{100 * (record.attention_share or 0):.0f}% ({time.perf_counter() - t0:.0f} s)")
    return record


def _compare(result, reference) -> tuple[float | None, float | None]:
    """Largest relative L2 error of the sampled rows' final hidden states against the reference's over the
    verified iterations, and the share of greedy tokens that agree."""
    if reference is None:
        return None, None
    errs, same, total = [], 0, 0
    for i, ref in reference.hidden.items():
        if i in result.hidden and ref.numel():
            errs.append(float((result.hidden[i] - ref).norm() / ref.norm().clamp_min(1e-12)))
            same += int((result.tokens[i] == reference.tokens[i]).sum())
            total += ref.shape[0]
    return (max(errs) if errs else None), (same / total if total else None)


def _check_memory(capacity: int, cfg, dtype: torch.dtype, device: torch.device) -> None:
    if device.type != "cuda":
        return
    need = 2 * capacity * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.9 * free:
        raise ConfigError(f"a KV cache of {capacity} tokens x {cfg.num_layers} layers needs {need / 2**30:.1f} GiB, "
                           f"{free / 2**30:.1f} GiB free: lower continuous.max_kv_tokens or num_layers")

