"""End-to-end results in a run folder (e2e/): summary.csv (one row per replay: model, trace, rate, backend),
requests.csv (per request latencies) and iterations.csv (per iteration composition and times). Rows are
appended as they are measured; a replay is complete when its summary row exists, and --resume drops the
partial rows of an interrupted replay before doing it again."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packinfer_bench.records import append_rows

E2E_DIR = "e2e"
SUMMARY_FILE, REQUESTS_FILE, ITERATIONS_FILE = "summary.csv", "requests.csv", "iterations.csv"
KEY_FIELDS = ("e2e", "trace", "rate", "backend")


@dataclass
class E2ERecord:
    """One replay. rate: Poisson requests/s, or 'trace' (the trace's own arrivals, time-scaled). status: ok |
    incorrect (sampled rows' final hidden states off the reference attention's) | skipped | error. Latencies in
    ms over finished requests; throughput from first arrival to last token, busy_tok_s over summed iteration
    time. prepare / launch: CPU time per iteration making the cache ready and planning / issuing the forward pass.
attention_share: attention (cache writes + kernels) / iteration time. max_rel_err / token_match: the
    first verify iterations against the float32 reference attention. schedule: open-loop (fixed by the
    scheduler's step-time model, the same for every backend; only iteration times are measured). cuda_graphs:
    'decode (piecewise)' when decode iterations replay the model between attention calls from CUDA graphs."""

    e2e: str
    trace: str
    rate: str
    backend: str
    model: str
    num_layers: int
    full_layers: int
    status: str
    reason: str = ""
    kv_layout: str = ""
    kv_access: str = ""
    kv_budget_tokens: int | None = None
    kv_capacity_tokens: int | None = None
    num_requests: int | None = None
    refused: int | None = None
    finished: int | None = None
    unfinished: int | None = None
    iterations: int | None = None
    ttft_ms_mean: float | None = None
    ttft_ms_p50: float | None = None
    ttft_ms_p90: float | None = None
    ttft_ms_p99: float | None = None
    tpot_ms_mean: float | None = None
    tpot_ms_p50: float | None = None
    tpot_ms_p90: float | None = None
    tpot_ms_p99: float | None = None
    e2e_ms_mean: float | None = None
    e2e_ms_p50: float | None = None
    e2e_ms_p90: float | None = None
    e2e_ms_p99: float | None = None
    output_tokens: int | None = None
    makespan_s: float | None = None
    throughput_tok_s: float | None = None
    throughput_req_s: float | None = None
    busy_tok_s: float | None = None
    iteration_ms_mean: float | None = None
    prepare_ms_mean: float | None = None
    launch_ms_mean: float | None = None
    attention_share: float | None = None
    room_ms_total: float | None = None
    moved_gb: float | None = None
    max_rel_err: float | None = None
    token_match: float | None = None
    schedule: str = "open-loop"
    cuda_graphs: str = ""
    timing: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.e2e, self.trace, self.rate, self.backend)


SUMMARY_FIELDS = [f.name for f in dataclasses.fields(E2ERecord)]


class E2EStore:
    """The e2e/ folder of a run: append rows, know which replays are complete."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / E2E_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self) -> set[tuple[str, str, str, str]]:
        """Keys of complete replays; rows of incomplete ones are dropped from requests and iterations."""
        keys = {tuple(r[f] for f in KEY_FIELDS) for r in self._read(SUMMARY_FILE)}
        for name in (REQUESTS_FILE, ITERATIONS_FILE):
            rows = self._read(name)
            kept = [r for r in rows if tuple(r[f] for f in KEY_FIELDS) in keys]
            if len(kept) != len(rows):
                self._rewrite(name, kept)
        return keys

    def add_summary(self, record: E2ERecord) -> None:
        self.append(SUMMARY_FILE, [dataclasses.asdict(record)], SUMMARY_FIELDS)

    def append(self, name: str, rows: Iterable[dict], fields: list[str] | None = None) -> None:
        rows = list(rows)
        if rows:
            append_rows(self.dir / name, rows, fields or list(rows[0]))

    def _read(self, name: str) -> list[dict]:
        path = self.dir / name
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return [r for r in csv.DictReader(f) if None not in r.values()]  # a row cut short is dropped

    def _rewrite(self, name: str, rows: list[dict]) -> None:
        path = self.dir / name
        with open(path, newline="", encoding="utf-8") as f:
            fields = next(csv.reader(f))
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
