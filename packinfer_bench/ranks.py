"""The stages of a run that take several processes (started by packinfer_bench.distributed, one per GPU): the kernel
sweep spread over N GPUs (`run --gpus N`: rank r measures the r-th of every N (batch, shape) pairs left to do into
its own part file, merged afterwards into records.csv in the order one process would have written it) and the
end-to-end entries with `tp: N` (N ranks serving one sharded model, rank 0 writing e2e/). The process that
started them keeps the run folder (its lock, config, batches); the ranks only add rows to it."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from packinfer_bench.config import ExperimentConfig
from packinfer_bench.distributed import Job, World, launch
from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.logs import ROOT, get_logger, run_log, setup_console
from packinfer_bench.run_folder import write_atomic
from packinfer_bench.run_folder.e2e import E2ERecord, E2EStore
from packinfer_bench.run_folder.files import DIST_DIR
from packinfer_bench.run_folder.records import RecordStore, merge_parts
from packinfer_bench.runner import measure, record_order
from packinfer_bench.serving.stage import failed_replay_file, installed, replays_left, run_e2e
from packinfer_bench.traces import Trace
from packinfer_bench.workload import Batch

_log = get_logger(__name__)


def check_devices(config: ExperimentConfig, gpus: int, device: torch.device, e2e: bool = True) -> None:
    """On a GPU machine, enough GPUs for `--gpus` and for every e2e entry's tp (a CPU runs any number of ranks)."""
    if device.type != "cuda":
        return
    have = torch.cuda.device_count()
    if gpus > have:
        raise PackinferBenchError(f"--gpus {gpus}: torch sees {have} GPU(s) here; allowed: 1..{have}")
    for i, entry in enumerate(config.e2e if e2e else []):
        if entry.tp > have:
            raise PackinferBenchError(f"e2e[{i}].tp: {entry.tp} ranks need {entry.tp} GPUs, torch sees {have}; "
                                      f"allowed here: a degree <= {have} (or run it on a larger machine)")


# --- the kernel sweep over N GPUs ----------------------------------------------------------------------------------
def spread_sweep(config: ExperimentConfig, out_dir: Path, batches: list[Batch], ranks: int, device: torch.device,
                 log: Callable[[str], None]) -> dict[str, int]:
    """Measure the sweep on `ranks` processes and merge their records into records.csv (also what a failed rank
    measured before it failed); returns counts by status of the records added."""
    if not set(record_order(config, batches)) - RecordStore(out_dir).keys(installed(config.backends, device)):
        return {}  # nothing left to measure: no ranks to start
    job = Job("packinfer_bench.ranks:sweep_rank", {"config": config, "out_dir": Path(out_dir), "batches": batches,
                                                    "cuda": device.type == "cuda"}, cuda=device.type == "cuda")
    try:
        launch(job, ranks, Path(out_dir) / DIST_DIR / "kernel.job", log)
    finally:
        counts = merge_parts(out_dir, record_order(config, batches))
    return counts


def sweep_rank(world: World, config: ExperimentConfig, out_dir: Path, batches: list[Batch], cuda: bool) -> None:
    """One rank of a spread sweep: its share of the pairs left to do, into its part file."""
    with _rank_log(world, out_dir) as log:
        measure(config, out_dir, batches, log, share=(world.rank, world.size), device=_device(world, cuda),
                store=RecordStore.part(out_dir, world.rank), progress=world.writer)


# --- end-to-end entries with tp: N ---------------------------------------------------------------------------------
def tensor_parallel_e2e(config: ExperimentConfig, out_dir: Path, traces: dict[str, Trace], device: torch.device,
                        log: Callable[[str], None]) -> dict[str, int]:
    """Run the config's e2e entries (all of one tp > 1) on tp ranks; returns counts per status. A replay that
    fails on a rank ends the job (the group cannot go on without that rank); it is stored here as an error row,
    and the ranks start again on the replays after it."""
    (tp,) = {e.tp for e in config.e2e}
    dist_dir = Path(out_dir) / DIST_DIR
    result = dist_dir / "e2e-result.json"
    counts: dict[str, int] = {}
    while replays_left(config, out_dir, device):
        job = Job("packinfer_bench.ranks:e2e_rank", {"config": config, "out_dir": Path(out_dir), "traces": traces,
                                                      "cuda": device.type == "cuda", "result": result},
                  cuda=device.type == "cuda")
        log(f"e2e {', '.join(e.name for e in config.e2e)}: tensor parallel over {tp} ranks")
        try:
            launch(job, tp, dist_dir / "e2e.job", log)
        except PackinferBenchError:
            failed = _failed_replay(out_dir, tp)
            if failed is None:  # not a replay's failure (model, calibration, reference): stop, --resume retries
                raise
            E2EStore(out_dir).add_summary(failed)
            counts["error"] = counts.get("error", 0) + 1
            log(f"  {failed.backend} #{failed.repeat} ({failed.trace} {failed.rate}): error ({failed.reason}); "
                "starting the ranks again for the replays after it")
            continue
        for status, n in json.loads(result.read_text(encoding="utf-8")).items():
            counts[status] = counts.get(status, 0) + n
        result.unlink()
        break
    with contextlib.suppress(OSError):
        dist_dir.rmdir()
    return counts


def _failed_replay(out_dir: Path, ranks: int) -> E2ERecord | None:
    """The error record of the replay a rank failed in, the files removed; None if no rank left one. Where
    several did, the first written: the others failed because it did (their peer went away)."""
    paths = [p for p in (failed_replay_file(out_dir, r) for r in range(ranks)) if p.exists()]
    if not paths:
        return None
    first = min(paths, key=lambda p: p.stat().st_mtime_ns)
    record = E2ERecord(**json.loads(first.read_text(encoding="utf-8")))
    for path in paths:
        path.unlink()
    return record


def e2e_rank(world: World, config: ExperimentConfig, out_dir: Path, traces: dict[str, Trace], cuda: bool,
             result: Path) -> None:
    """One rank of a tensor-parallel group: every entry's replays through this rank's shard; rank 0 writes."""
    with _rank_log(world, out_dir) as log:
        counts = run_e2e(config, out_dir, traces, _device(world, cuda), log=log, world=world)
    if world.writer:
        write_atomic(result, json.dumps(counts))


def _device(world: World, cuda: bool) -> torch.device:
    return torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")


@contextlib.contextmanager
def _rank_log(world: World, out_dir: Path) -> Iterator[Callable[[str], None]]:
    """Rank 0 logs as the run does (console and run.log); the others show warnings and errors only."""
    setup_console()
    if not world.writer:
        logging.getLogger(ROOT).setLevel(logging.WARNING)
        yield lambda _message: None
        return
    with run_log(out_dir):
        yield _log.info
