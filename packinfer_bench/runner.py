"""The measuring stage: every batch through every configured backend variant on the same tensors, timed the
same way, checked against a float32 reference, each result appended to the run's records as it is made."""

from __future__ import annotations

import functools
import math
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from packinfer_bench import envinfo
from packinfer_bench.backends import BACKENDS, DTYPES, AttentionShape, Backend, Inputs, NotApplicable
from packinfer_bench.backends.serving_call import serving_call
from packinfer_bench.config import ExperimentConfig, ShapeConfig
from packinfer_bench.deadline import Deadline
from packinfer_bench.errors import ConfigError, first_line
from packinfer_bench.logs import console, get_logger
from packinfer_bench.reference import reference_attention
from packinfer_bench.run_folder.records import UNAVAILABLE, Record, RecordStore
from packinfer_bench.timing import Timer
from packinfer_bench.workload import Batch

_log = get_logger(__name__)

#: An output whose relative L2 error to the float32 reference exceeds this is `incorrect` (bf16 lands near 2e-3).
MAX_REL_ERR = 2e-2


def pick_device(config: ExperimentConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but torch sees no CUDA device (use device: auto or cpu)")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def make_inputs(batch: Batch, shape: ShapeConfig, device: torch.device, seed: int = 0) -> Inputs:
    """Random normal q/k/v for a batch, the same for every backend: seeded by the batch id and shape name."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{batch.batch_id}/{shape.name}".encode()))
    dtype = DTYPES[shape.dtype]
    total_q, total_k = int(batch.q_lens.sum()), int(batch.kv_lens.sum())
    q = torch.randn(total_q, shape.num_heads, shape.head_dim, generator=gen).to(device, dtype)
    k = torch.randn(total_k, shape.num_kv_heads, shape.head_dim, generator=gen).to(device, dtype)
    v = torch.randn(total_k, shape.num_kv_heads, shape.head_dim, generator=gen).to(device, dtype)
    cu_q, cu_k = (torch.from_numpy(c) for c in batch.cu_seqlens())
    for first, members, length in batch.shared_prefixes():  # a shared prefix holds the same K/V in every member
        for m in members:
            dst, src = int(cu_k[m]), int(cu_k[first])
            k[dst:dst + length], v[dst:dst + length] = k[src:src + length], v[src:src + length]
    return Inputs(batch=batch, shape=AttentionShape(shape.num_heads, shape.num_kv_heads, shape.head_dim, dtype),
                  q=q, k=k, v=v, cu_q=cu_q.to(device), cu_k=cu_k.to(device), cu_q_cpu=cu_q, cu_k_cpu=cu_k)


def is_serving(batch: Batch) -> bool:
    """A batch the continuous-batching scheduler made: measured through each backend's serving call."""
    return batch.workload == "continuous"


def variants_of(backend: Backend, batch: Batch) -> list[str]:
    """What a backend runs on a batch: its serving call's variants on scheduler batches, else its kernel ones."""
    if is_serving(batch):
        return list(backend.serving_variants) if backend.serving is not None else ["serving"]
    return list(backend.variants)


def record_base(batch: Batch, shape: ShapeConfig) -> dict:
    """The batch and shape columns of a record (phase 'serving' for scheduler batches: the serving call)."""
    return {"trace": batch.trace, "workload": batch.batch_id.split("/")[0],
            "phase": "serving" if is_serving(batch) else batch.phase,
            "batch_id": batch.batch_id, "batch_size": len(batch), "num_tokens": int(batch.q_lens.sum()),
            "num_kv_tokens": int(batch.kv_lens.sum()), "shape": shape.name}


@functools.cache
def _commit() -> str:
    return envinfo.git_sha() or ""


def stamp() -> dict[str, str]:
    """The commit and time a record is measured at."""
    return {"commit": _commit(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def measure_one(backend: Backend, variant: str, x: Inputs, ref: torch.Tensor, timer: Timer,
                base: dict) -> Record:
    """Prepare and check against the reference, prepare again (timed as plan cost), then time the call."""
    rec = Record(**base, backend=backend.name, variant=variant, status="ok", timing=timer.method, **stamp())
    sync = torch.cuda.synchronize if x.q.device.type == "cuda" else (lambda: None)
    prepare = (lambda: serving_call(backend, x, variant)) if is_serving(x.batch) else (
        lambda: backend.prepare(x, variant))
    try:
        fn = prepare()
        out = fn()
        sync()
        diff = out.float() - ref
        rec.max_abs_err = float(diff.abs().max())
        rec.rel_err = float(diff.norm() / ref.norm())
        del out, diff, fn
        if not math.isfinite(rec.rel_err) or rec.rel_err > MAX_REL_ERR:
            rec.status, rec.reason = "incorrect", f"relative error {rec.rel_err:.3g} > {MAX_REL_ERR}"
        # prepare again, timed: the steady-state plan cost, with one-time compilation (JIT, autotuning) done
        t0 = time.perf_counter()
        fn = prepare()
        sync()
        rec.plan_ms = round((time.perf_counter() - t0) * 1e3, 4)
        times = timer(fn)
        med = float(np.median(times))
        flops = 4.0 * x.batch.causal_pairs() * x.shape.num_heads * x.shape.head_dim
        kv_bytes = 2.0 * x.k.numel() * x.k.element_size()
        rec.kernel_ms, rec.kernel_ms_p10, rec.kernel_ms_p90 = (round(float(v), 4) for v in
                                                              (med, np.percentile(times, 10), np.percentile(times, 90)))
        rec.tflops, rec.kv_tbps = float(f"{flops / med / 1e9:.6g}"), float(f"{kv_bytes / med / 1e9:.6g}")
    except NotApplicable as e:
        rec.status, rec.reason = "skipped", f"not applicable: {first_line(e)}"
    except torch.cuda.OutOfMemoryError as e:
        rec.status, rec.reason = "error", f"out of memory: {first_line(e)}"
    except Exception as e:  # a failing backend is recorded and the run goes on
        rec.status, rec.reason = "error", f"{type(e).__name__}: {first_line(e)}"
        _log.warning("%s:%s on %s (%s): error", backend.name, variant, x.batch.batch_id, base["shape"], exc_info=True)
    finally:
        if x.q.device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def measure(config: ExperimentConfig, out_dir: Path, batches: Iterable[Batch],
            log: Callable[[str], None] = print, *, share: tuple[int, int] = (0, 1), device: torch.device | None = None,
            store: RecordStore | None = None, progress: bool = True,
            deadline: Deadline | None = None) -> dict[str, int]:
    """Measure every (batch, shape, backend, variant) not yet in the run folder's records; returns counts by
    status of the records written now. A rank of a spread sweep passes share=(rank, ranks): it measures the
    (batch, shape) pairs left to do whose place in that list is rank modulo ranks, on `device`, into `store` (its
    part file). With a deadline, a (batch, shape) is not started unless the slowest one so far would end in time."""
    device = device or pick_device(config)
    backends = [BACKENDS[name] for name in config.backends]
    unavailable = {b.name: b.available(device) for b in backends}
    runnable = [name for name, reason in unavailable.items() if not reason]  # stored as unavailable: measured now
    stored = RecordStore(out_dir).keys(runnable)  # the shares are cut from records.csv alone: every rank cuts alike
    if store is None:
        store = RecordStore(out_dir)
    done = stored | store.keys(runnable)
    timer = Timer(device, config.timing.warmup, config.timing.repeats, config.timing.flush_l2,
                  config.timing.cuda_graphs)
    for name, reason in unavailable.items():
        if reason:
            log(f"backend {name}: skipped ({reason})")
    if device.type == "cpu":
        log("device: cpu (Triton interpreter); timings are not representative"
            + ("; timing.cuda_graphs ignored" if config.timing.cuda_graphs else ""))
    batches = list(batches)
    todo = [(b, s) for b in batches for s in config.shapes
            if any((b.batch_id, s.name, be.name, v) not in stored for be in backends for v in variants_of(be, b))]
    todo = todo[share[0]::share[1]]
    counts = {"ok": 0, "incorrect": 0, "skipped": 0, "error": 0}
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console(), disable=not progress) as bars:
        tasks = {b.name: bars.add_task(b.name, total=sum(len(variants_of(b, batch)) for batch, _ in todo))
                 for b in backends}
        slowest = 0.0
        for batch, shape in todo:
            if deadline is not None and not deadline.allows(slowest, f"batch {batch.batch_id} ({shape.name})"):
                break
            started = time.monotonic()
            base = record_base(batch, shape)
            x = ref = setup_error = None
            for backend in backends:
                for variant in variants_of(backend, batch):
                    if (batch.batch_id, shape.name, backend.name, variant) in done:
                        bars.advance(tasks[backend.name])
                        continue
                    if x is None and setup_error is None and not unavailable[backend.name]:
                        try:
                            x = make_inputs(batch, shape, device)
                            ref = reference_attention(x)
                        except Exception as e:  # e.g. out of memory: every backend of this batch records it
                            x = ref = None
                            setup_error = f"inputs or reference: {type(e).__name__}: {first_line(e)}"
                    if unavailable[backend.name]:
                        rec = Record(**base, backend=backend.name, variant=variant, status="skipped",
                                     reason=UNAVAILABLE + unavailable[backend.name], timing=timer.method, **stamp())
                    elif setup_error:
                        rec = Record(**base, backend=backend.name, variant=variant, status="error",
                                     reason=setup_error, timing=timer.method, **stamp())
                    else:
                        rec = measure_one(backend, variant, x, ref, timer, base)
                    store.append(rec)
                    counts[rec.status] += 1
                    bars.advance(tasks[backend.name])
            slowest = max(slowest, time.monotonic() - started)
    return counts


def record_order(config: ExperimentConfig, batches: Iterable[Batch]) -> dict[tuple[str, str, str, str], int]:
    """Every record key of the sweep and its place in the order a single process measures them (batch, shape,
    backend, variant): how a spread sweep's parts are merged."""
    keys = ((b.batch_id, s.name, name, v) for b in batches for s in config.shapes for name in config.backends
            for v in variants_of(BACKENDS[name], b))
    return {key: i for i, key in enumerate(keys)}
