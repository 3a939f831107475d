"""Kernel-level measurement records and their store: one CSV row per (batch, shape, backend, variant), appended
and flushed as it is measured, so an interrupted run loses nothing finished and --resume skips what is stored.
A sweep spread over several processes (`run --gpus N`) has each rank append to its own part file under dist/;
merge_parts moves their rows into records.csv in a single process's order. A record skipped because its backend
could not run on that machine (reason UNAVAILABLE ...) is measured by a later --resume where it can; the later
row is the record (`store.last_per_key`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packinfer_bench.run_folder.files import DIST_DIR, RECORDS_FILE
from packinfer_bench.run_folder.store import CsvRows, not_a_number

STATUSES = ("ok", "incorrect", "skipped", "error")
#: How the reason of a record skipped because its backend cannot run on the machine begins (not installed, another
#: GPU): unlike a variant that does not apply to a batch, a later session may be able to measure it.
UNAVAILABLE = "unavailable: "


@dataclass
class Record:
    """trace/workload/phase/batch_id/batch_size/num_tokens/num_kv_tokens: the batch (num_tokens = query tokens);
    shape: the attention shape's name; backend/variant: what ran; status: ok | incorrect (output off the float32
    reference) | skipped (cannot run here: reason) | error (it raised: reason); plan_ms: CPU/prepare time, once;
    kernel_ms(_p10/_p90): median (10th/90th percentile) of the timed call; tflops: causal-area FLOPs / median;
    kv_tbps: K and V bytes read once / median; max_abs_err, rel_err (L2): against the reference; timing:
    cuda-events, cuda-graph (replays of a captured graph), or wall-clock-cpu (not representative); commit and
    measured_at: the code and the time of the measurement. Phase 'serving': a scheduler batch measured through
    the backend's serving call (write the new K/V into its cache, attend)."""

    trace: str
    workload: str
    phase: str
    batch_id: str
    batch_size: int
    num_tokens: int
    num_kv_tokens: int
    shape: str
    backend: str
    variant: str
    status: str
    reason: str = ""
    plan_ms: float | None = None
    kernel_ms: float | None = None
    kernel_ms_p10: float | None = None
    kernel_ms_p90: float | None = None
    tflops: float | None = None
    kv_tbps: float | None = None
    max_abs_err: float | None = None
    rel_err: float | None = None
    timing: str = ""
    commit: str = ""
    measured_at: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.batch_id, self.shape, self.backend, self.variant)


FIELDS = [f.name for f in dataclasses.fields(Record)]
KEY_FIELDS = ("batch_id", "shape", "backend", "variant")
_NUMBERS = [f.name for f in dataclasses.fields(Record) if f.type in ("int", "float | None")]


def _check(row: dict[str, str]) -> str | None:
    if row.get("status") not in STATUSES:
        return f"status {row.get('status')!r} is none of {list(STATUSES)}"
    return not_a_number(row, _NUMBERS)


Key = tuple[str, str, str, str]


class RecordStore:
    """The run folder's records.csv (or another file of records: `path`): append-only, one row per record; rows
    that cannot be read are skipped."""

    def __init__(self, out_dir: Path, path: Path | None = None):
        self.path = Path(path) if path is not None else Path(out_dir) / RECORDS_FILE
        self.rows = CsvRows(self.path, FIELDS, _check)

    @classmethod
    def part(cls, out_dir: Path, rank: int) -> RecordStore:
        """Rank `rank`'s part file of a spread sweep (dist/records.rank<r>.csv)."""
        (Path(out_dir) / DIST_DIR).mkdir(exist_ok=True)
        return cls(out_dir, Path(out_dir) / DIST_DIR / f"records.rank{rank}.csv")

    def keys(self, retry: Iterable[str] | None = ()) -> set[Key]:
        """Keys of the complete rows already stored (a row cut short or corrupt is skipped, never rewritten), less
        those only stored as unavailable, of a backend in `retry` (which can run now; None: any backend)."""
        rows, _ = self.rows.read()
        retry = None if retry is None else set(retry)
        return {record_key(r) for r in rows
                if not (unavailable(r) and (retry is None or r["backend"] in retry))}

    def append(self, record: Record) -> None:
        self.rows.append([dataclasses.asdict(record)])


def record_key(row: Mapping[str, str]) -> Key:
    return tuple(row[f] for f in KEY_FIELDS)  # type: ignore[return-value]


def unavailable(row: Mapping[str, str]) -> bool:
    """Whether a row is a record skipped because its backend could not run on the machine (UNAVAILABLE)."""
    return row.get("status") == "skipped" and row.get("reason", "").startswith(UNAVAILABLE)


def merge_parts(out_dir: Path, order: Mapping[Key, int] | None = None) -> dict[str, int]:
    """Move the rows of the ranks' part files into records.csv: those it lacks, sorted by `order` (each key's place
    in a single-process run; others after them), in one append; then remove the parts. Returns counts by status of
    the rows added. Kill-safe: a part is removed only after its rows are on disk, and merging again skips the rows
    records.csv already holds."""
    parts = sorted((Path(out_dir) / DIST_DIR).glob("records.rank*.csv"))
    if not parts:
        return {}
    store = RecordStore(out_dir)
    have, settled = store.keys(), store.keys(retry=None)  # settled: not merely stored as unavailable
    rows: dict[Key, dict[str, str]] = {}
    for part in parts:
        for row in CsvRows(part, FIELDS, _check).read()[0]:
            key = record_key(row)
            if key not in have or (key not in settled and not unavailable(row)):
                rows.setdefault(key, row)
    last = len(order) if order else 0
    ordered = sorted(rows.items(), key=lambda item: order.get(item[0], last) if order else 0)
    store.rows.append([row for _, row in ordered])
    for part in parts:
        part.unlink()
    try:
        parts[0].parent.rmdir()
    except OSError:
        pass  # not empty: another run's job file
    counts: dict[str, int] = {}
    for row in rows.values():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
