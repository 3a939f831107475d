"""End-to-end results in a run folder (e2e/): summary.csv (one row per replay: model, trace, rate, backend),
requests.csv (per request latencies) and iterations.csv (per iteration composition and times). Rows are
appended as they are measured, each with its replay's `attempt` (unique per try); a replay is complete when its
summary row exists, and readers keep the request and iteration rows of the attempt that the summary row names, so
an interrupted replay done again leaves its partial rows in place, unread."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packinfer_bench.run_folder.files import E2E_DIR, SUMMARY_FILE
from packinfer_bench.run_folder.store import CsvRows

KEY_FIELDS = ("e2e", "trace", "rate", "backend")


@dataclass
class E2ERecord:
    """One replay. rate: Poisson requests/s, or 'trace' (the trace's own arrivals, time-scaled). status: ok |
    incorrect (sampled rows' final hidden states off the reference attention's) | skipped | error | refused
    (the scheduler ran none of the requests: each is larger than its limits). Latencies in
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
    attempt: str = ""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.e2e, self.trace, self.rate, self.backend)


SUMMARY_FIELDS = [f.name for f in dataclasses.fields(E2ERecord)]


def new_attempt() -> str:
    """A label unique to one try of one replay (time and process)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.perf_counter_ns() % 10**9}"


class E2EStore:
    """The e2e/ folder of a run: append rows, know which replays are complete, read the rows of complete ones."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / E2E_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self) -> set[tuple[str, str, str, str]]:
        """Keys of complete replays."""
        return {tuple(r[f] for f in KEY_FIELDS) for r in self.summaries()}

    def summaries(self) -> list[dict[str, str]]:
        return CsvRows(self.dir / SUMMARY_FILE).read()[0]

    def add_summary(self, record: E2ERecord) -> None:
        CsvRows(self.dir / SUMMARY_FILE, SUMMARY_FIELDS).append([dataclasses.asdict(record)])

    def append(self, name: str, rows: Iterable[dict]) -> None:
        CsvRows(self.dir / name).append(rows)

    def rows(self, name: str) -> list[dict[str, str]]:
        """The rows of `name` (requests or iterations) that belong to the attempt each summary row names (files
        written before attempts were recorded: every row of a complete replay)."""
        return complete_rows(CsvRows(self.dir / name).read()[0], self.summaries())


def complete_rows(rows: list[dict[str, str]], summaries: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows whose replay has a summary row, from the attempt that summary row names."""
    attempt = {tuple(s[f] for f in KEY_FIELDS): s.get("attempt", "") for s in summaries}
    return [r for r in rows if attempt.get(tuple(r[f] for f in KEY_FIELDS), None) == r.get("attempt", "")]
