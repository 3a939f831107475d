"""Running an experiment: load its traces, replay its workloads into batches, write them to the run folder,
then (unless a dry run) measure every batch through every backend.

A run folder (results/<experiment>/<run-id>/) holds config.yaml (the resolved config, with its hash), env.json
(the first session's environment; every session's in sessions.jsonl), traces.json (what each trace is),
batches.jsonl (every batch with its lengths, appended as it is made), workload.csv (one row of statistics per
batch) and records.csv (one row per batch, shape, backend and variant), or with device: analytic, analytic.csv
(predicted per-SM balance of FA2's grid and the packinfer plan; no GPU needed); and e2e/ for the end-to-end
replays (packinfer_bench.serving). Files are written through packinfer_bench.run_folder: append only, one writer
at a time, and --resume skips what a folder already holds (with the same config only). With `gpus` > 1 the
kernel sweep, and e2e entries with `tp` > 1, run on several processes (packinfer_bench.ranks) that add to the
folder this process holds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from packinfer_bench import envinfo
from packinfer_bench.analytic import write_predictions
from packinfer_bench.config import ExperimentConfig, TraceConfig
from packinfer_bench.deadline import Deadline
from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.logs import get_logger, run_log
from packinfer_bench.ranks import check_devices, spread_sweep, tensor_parallel_e2e
from packinfer_bench.run_folder import (
    ANALYTIC_FILE,
    BATCHES_FILE,
    E2E_DIR,
    RECORDS_FILE,
    TRACES_FILE,
    WORKLOAD_FILE,
    JsonLines,
    new_run_path,
    open_run_folder,
    write_atomic,
)
from packinfer_bench.run_folder.records import merge_parts
from packinfer_bench.runner import measure, pick_device, record_order
from packinfer_bench.serving.preview import preview_e2e
from packinfer_bench.serving.stage import run_e2e
from packinfer_bench.traces import Trace, load_trace
from packinfer_bench.workload import Batch, continuous_batches, static_batches

_log = get_logger(__name__)


@dataclass
class RunSummary:
    out_dir: Path
    batches_new: int
    batches_kept: int
    measured: bool
    stopped: str | None = None  # what the time limit kept from starting (None: the run did all it had to)


def run_dir(config: ExperimentConfig, out: str | Path | None, resume: bool) -> Path:
    """The run folder: `out` if given, else a new, uniquely named one (or, with resume, the latest one)."""
    if out is not None:
        return Path(out)
    base = Path(config.output.dir) / config.name
    if resume:
        runs = sorted(p for p in base.glob("*") if (p / BATCHES_FILE).exists() or (p / E2E_DIR).exists()) \
            if base.is_dir() else []
        if not runs:
            raise PackinferBenchError(f"--resume: no earlier run of {config.name!r} under {base}")
        return runs[-1]
    return new_run_path(base)


def experiment_batches(config: ExperimentConfig, traces: dict[str, Trace]) -> Iterator[Batch]:
    """Every batch of the experiment, in config order (workload, then trace), ids prefixed by the workload."""
    for workload in config.workloads:
        for tcfg in config.traces_of(workload):
            trace = traces[tcfg.name]
            batches = (static_batches(trace, workload.static) if workload.static is not None
                       else continuous_batches(trace, workload.continuous))
            for batch in batches:
                batch.batch_id = f"{workload.name}/{batch.batch_id}"
                yield batch


def load_traces(configs: list[TraceConfig]) -> dict[str, Trace]:
    return {t.name: load_trace(t.source, t.kind, name=t.name, **t.options) for t in configs}


def run_experiment(config: ExperimentConfig, out: str | Path | None = None, *, dry_run: bool = False,
                   resume: bool = False, only: str | None = None, gpus: int = 1,
                   log: Callable[[str], None] | None = None, deadline: Deadline | None = None) -> RunSummary:
    """Replay the experiment's workloads into its run folder and measure them (with dry_run, stop there), then
    run its end-to-end replays; only='kernel' or 'e2e' runs one of the two stages; gpus > 1 spreads the kernel
    sweep over that many processes, one per GPU (e2e entries take their own `tp`). With a deadline, nothing is
    started that would not end before it (single-process work: the sweep on one GPU, entries of tp 1);
    summary.stopped then says what was left. Progress messages go to the packinfer_bench logger (and the run
    folder's run.log), and to `log` when given."""
    deadline = deadline or Deadline()

    def say(message: str) -> None:
        _log.info(message)
        if log is not None:
            log(message)

    if not dry_run and config.device != "analytic":  # enough GPUs, before anything is written
        check_devices(config, gpus if only != "e2e" else 1, pick_device(config), e2e=only != "kernel")
    traces = load_traces(config.traces)  # bad traces fail before anything is written
    full_env = not dry_run and config.device != "cpu" and torch.cuda.is_available()
    with open_run_folder(run_dir(config, out, resume), config.to_dict(), envinfo.collect(full=full_env),
                         resume=resume, measures=not dry_run, log=say) as folder, run_log(folder.path):
        out_dir = folder.path
        _log.info("session: %s %s", config.name, "resumed" if resume else "started", extra={"console": False})
        write_atomic(out_dir / TRACES_FILE, json.dumps({n: {**t.describe(), "notes": t.notes} for n, t in
                                                        traces.items()}, indent=2, default=str) + "\n")
        for name, trace in traces.items():
            say(f"trace {name}: {len(trace)} requests ({trace.kind}, tokenizer: {trace.tokenizer})")

        summary = RunSummary(out_dir=out_dir, batches_new=0, batches_kept=0, measured=False)
        if only != "e2e":
            summary = _kernel_stage(config, out_dir, traces, dry_run, gpus, say, deadline)
        if config.e2e and only != "kernel" and dry_run:
            preview_e2e(config, out_dir, traces, say)
        if config.e2e and only != "kernel" and not dry_run and config.device != "analytic" and not deadline.stopped:
            counts = _e2e_stage(config, out_dir, traces, say, deadline)
            say("e2e: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + f" -> {out_dir / E2E_DIR}")
            summary.measured = True
        if deadline.stopped:
            summary.stopped = deadline.stopped
            say(f"time limit ({deadline.seconds:g} s): stopped before {deadline.stopped}; the rest: run again "
                f"with --resume --out {out_dir}")
        return summary


def _e2e_stage(config: ExperimentConfig, out_dir: Path, traces: dict[str, Trace],
               log: Callable[[str], None], deadline: Deadline) -> dict[str, int]:
    """The e2e entries in config order, each run of consecutive entries of one tp together: here for tp 1, on tp
    ranks otherwise (a group of ranks is started only while time is left, and then runs to its end)."""
    device, counts = pick_device(config), {}
    for tp, entries in itertools.groupby(config.e2e, key=lambda e: e.tp):
        part = dataclasses.replace(config, e2e=list(entries))
        if tp == 1:
            got = run_e2e(part, out_dir, traces, device, log=log, deadline=deadline)
        elif deadline.allows(0.0, f"the tp={tp} entries {[e.name for e in part.e2e]}"):
            got = tensor_parallel_e2e(part, out_dir, traces, device, log)
        else:
            break
        for status, n in got.items():
            counts[status] = counts.get(status, 0) + n
    return counts


def _kernel_stage(config: ExperimentConfig, out_dir: Path, traces: dict[str, Trace], dry_run: bool, gpus: int,
                  log: Callable[[str], None], deadline: Deadline) -> RunSummary:
    done = stored_batch_ids(out_dir)
    new = kept = 0
    store, pending = JsonLines(out_dir / BATCHES_FILE), []
    for batch in experiment_batches(config, traces):
        if batch.batch_id in done:
            kept += 1
            continue
        pending.append(batch.to_record())
        new += 1
        if len(pending) >= 256:
            store.append(pending)
            pending.clear()
    store.append(pending)
    batches = read_batches(out_dir)
    if not batches:
        return RunSummary(out_dir=out_dir, batches_new=0, batches_kept=0, measured=False)
    stats = workload_stats(batches)
    write_atomic(out_dir / WORKLOAD_FILE, stats.to_csv(index=False))
    log(f"workload: {new} new batch(es), {kept} already stored -> {out_dir / WORKLOAD_FILE}")
    for (workload, phase), group in stats.groupby([stats["batch_id"].str.split("/").str[0], "phase"]):
        log(f"  {workload:<24} {phase:<8} {len(group):5d} batches, batch size {group['batch_size'].min()}-"
            f"{group['batch_size'].max()}, kv_len p50 {group['kv_len_p50'].median():.0f}, "
            f"kv cv {group['kv_len_cv'].mean():.2f}")
    if dry_run:
        return RunSummary(out_dir=out_dir, batches_new=new, batches_kept=kept, measured=False)
    if config.device == "analytic":
        rows = write_predictions(batches, config.shapes, config.gpu.sms, out_dir / ANALYTIC_FILE)
        log(f"analytic: {rows} predictions for {config.gpu.name} ({config.gpu.sms} SMs) -> {out_dir / ANALYTIC_FILE}")
        return RunSummary(out_dir=out_dir, batches_new=new, batches_kept=kept, measured=False)
    kept_parts = merge_parts(out_dir, record_order(config, batches))  # what ranks of a killed run measured
    if kept_parts:
        log(f"records: {sum(kept_parts.values())} measured by the ranks of an earlier session, merged")
    if gpus > 1:
        counts = spread_sweep(config, out_dir, batches, gpus, pick_device(config), log)
    else:
        counts = measure(config, out_dir, batches, log=log, deadline=deadline)
    log("records: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + f" -> {out_dir / RECORDS_FILE}")
    return RunSummary(out_dir=out_dir, batches_new=new, batches_kept=kept, measured=True)


def stored_batch_ids(out_dir: Path) -> set[str]:
    """Batch ids already written to a run folder (unreadable lines are skipped, never rewritten)."""
    return {b.batch_id for b in read_batches(out_dir)}


def read_batches(out_dir: Path) -> list[Batch]:
    """The batches stored in a run folder, in the order they were made (the first copy of an id)."""
    items, _ = JsonLines(out_dir / BATCHES_FILE).read()
    batches, seen = [], set()
    for n, item in enumerate(items):
        try:
            batch = Batch.from_record(item)
        except (KeyError, TypeError, ValueError) as e:
            raise PackinferBenchError(f"{out_dir / BATCHES_FILE}: batch {n} is not a batch record ({e}); start a "
                                      "new run folder") from None
        if batch.batch_id not in seen:
            seen.add(batch.batch_id)
            batches.append(batch)
    return batches


def workload_stats(batches: list[Batch]) -> pd.DataFrame:
    stats = pd.DataFrame([b.stats() for b in batches])
    return stats.astype({"iteration": "Int64"}) if len(stats) else stats
