"""Measurement records and their store: one CSV row per (batch, shape, backend, variant), appended and flushed as
it is measured, so an interrupted run loses nothing finished and --resume skips what is stored."""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

RECORDS_FILE = "records.csv"
STATUSES = ("ok", "incorrect", "skipped", "error")


@dataclass
class Record:
    """trace/workload/phase/batch_id/batch_size/num_tokens/num_kv_tokens: the batch (num_tokens = query tokens);
    shape: the attention shape's name; backend/variant: what ran; status: ok | incorrect (output off the float32
    reference) | skipped (cannot run here: reason) | error (it raised: reason); plan_ms: CPU/prepare time, once;
    kernel_ms(_p10/_p90): median (10th/90th percentile) of the timed call; tflops: causal-area FLOPs / median;
    kv_tbps: K and V bytes read once / median; max_abs_err, rel_err (L2): against the reference; timing:
    cuda-events, cuda-graph (replays of a captured graph), or wall-clock-cpu (not representative)."""

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

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.batch_id, self.shape, self.backend, self.variant)


FIELDS = [f.name for f in dataclasses.fields(Record)]


class RecordStore:
    """Append-only CSV of records in a run folder."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / RECORDS_FILE

    def keys(self) -> set[tuple[str, str, str, str]]:
        """Keys of the complete rows already stored (a row cut short by an interruption is dropped)."""
        if not self.path.exists():
            return set()
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("timing") is not None and r.get("status") in STATUSES]
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        return {(r["batch_id"], r["shape"], r["backend"], r["variant"]) for r in rows}

    def append(self, record: Record) -> None:
        append_rows(self.path, [dataclasses.asdict(record)], FIELDS)


def append_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Append rows to a CSV file (header first when the file is new), flushed to disk before returning."""
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
