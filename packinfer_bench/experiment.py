"""Running an experiment: load its traces, replay its workloads into batches, write them to the run folder,
then (unless a dry run) measure every batch through every backend.

A run folder (results/<experiment>/<run-id>/) holds config.yaml (the resolved config), env.json, traces.json
(what each trace is), batches.jsonl (every batch with its lengths, appended as it is made), workload.csv
(one row of statistics per batch) and records.csv (one row per batch, shape, backend and variant), or with
device: analytic, analytic.csv (predicted per-SM balance of FA2's grid and the packinfer plan; no GPU needed);
and e2e/ for the end-to-end replays (packinfer_bench.serving). Writing is incremental, and --resume skips what a
folder already holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from packinfer_bench import envinfo
from packinfer_bench.analytic import write_predictions
from packinfer_bench.config import ExperimentConfig, TraceConfig
from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.records import RECORDS_FILE
from packinfer_bench.runner import measure, pick_device
from packinfer_bench.serving.results import E2E_DIR
from packinfer_bench.serving.stage import run_e2e
from packinfer_bench.traces import Trace, load_trace
from packinfer_bench.workload import Batch, continuous_batches, static_batches

BATCHES_FILE = "batches.jsonl"
WORKLOAD_FILE = "workload.csv"
ANALYTIC_FILE = "analytic.csv"


@dataclass
class RunSummary:
    out_dir: Path
    batches_new: int
    batches_kept: int
    measured: bool


def run_dir(config: ExperimentConfig, out: str | Path | None, resume: bool) -> Path:
    """The run folder: `out` if given, else a new timestamped one (or, with resume, the latest one)."""
    if out is not None:
        path = Path(out)
        if path.exists() and any(path.iterdir()) and not resume:
            raise PackinferBenchError(f"output folder {path} is not empty: pass --resume to continue it, "
                                      "or another --out")
        return path
    base = Path(config.output.dir) / config.name
    if resume:
        runs = sorted(p for p in base.glob("*") if (p / BATCHES_FILE).exists() or (p / E2E_DIR).exists()) \
            if base.exists() else []
        if not runs:
            raise PackinferBenchError(f"--resume: no earlier run of {config.name!r} under {base}")
        return runs[-1]
    return base / time.strftime("%Y%m%d-%H%M%S")


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
                   resume: bool = False, only: str | None = None,
                   log: Callable[[str], None] = print) -> RunSummary:
    """Replay the experiment's workloads into its run folder and measure them (with dry_run, stop there), then
    run its end-to-end replays; only='kernel' or 'e2e' runs one of the two stages."""
    out_dir = run_dir(config, out, resume)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    (out_dir / "env.json").write_text(json.dumps(envinfo.collect(), indent=2) + "\n", encoding="utf-8")
    traces = load_traces(config.traces)
    (out_dir / "traces.json").write_text(
        json.dumps({n: {**t.describe(), "notes": t.notes} for n, t in traces.items()}, indent=2, default=str) + "\n",
        encoding="utf-8")
    for name, trace in traces.items():
        log(f"trace {name}: {len(trace)} requests ({trace.kind}, tokenizer: {trace.tokenizer})")

    summary = RunSummary(out_dir=out_dir, batches_new=0, batches_kept=0, measured=False)
    if only != "e2e":
        summary = _kernel_stage(config, out_dir, traces, dry_run, log)
    if config.e2e and only != "kernel" and not dry_run and config.device != "analytic":
        counts = run_e2e(config, out_dir, traces, pick_device(config), log=log)
        log("e2e: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + f" -> {out_dir / E2E_DIR}")
        summary.measured = True
    return summary


def _kernel_stage(config: ExperimentConfig, out_dir: Path, traces: dict[str, Trace], dry_run: bool,
                  log: Callable[[str], None]) -> RunSummary:
    done = stored_batch_ids(out_dir)
    new = kept = 0
    with open(out_dir / BATCHES_FILE, "a", encoding="utf-8") as f:
        for batch in experiment_batches(config, traces):
            if batch.batch_id in done:
                kept += 1
                continue
            f.write(json.dumps(batch.to_record()) + "\n")
            f.flush()
            new += 1
    batches = read_batches(out_dir)
    if not batches:
        return RunSummary(out_dir=out_dir, batches_new=0, batches_kept=0, measured=False)
    stats = workload_stats(batches)
    stats.to_csv(out_dir / WORKLOAD_FILE, index=False)
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
    counts = measure(config, out_dir, batches, log=log)
    log("records: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + f" -> {out_dir / RECORDS_FILE}")
    return RunSummary(out_dir=out_dir, batches_new=new, batches_kept=kept, measured=True)


def stored_batch_ids(out_dir: Path) -> set[str]:
    """Batch ids already written to a run folder; a line cut short by an interrupted write is dropped."""
    path = out_dir / BATCHES_FILE
    if not path.exists():
        return set()
    ids, good = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ids.add(json.loads(line)["batch_id"])
            good.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    path.write_text("".join(g + "\n" for g in good), encoding="utf-8")
    return ids


def read_batches(out_dir: Path) -> list[Batch]:
    """The batches stored in a run folder, in the order they were made."""
    path = out_dir / BATCHES_FILE
    return [Batch.from_record(json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]


def workload_stats(batches: list[Batch]) -> pd.DataFrame:
    stats = pd.DataFrame([b.stats() for b in batches])
    return stats.astype({"iteration": "Int64"}) if len(stats) else stats
