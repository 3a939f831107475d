"""End-to-end results in a run folder (e2e/): summary.csv (one row per replay: model, trace, rate, backend),
requests.csv (per request latencies) and iterations.csv (per iteration composition and times). Rows are
appended as they are measured, each with its replay's `attempt` (unique per try); a replay is complete when its
summary row exists, and readers keep the request and iteration rows of the attempt that the summary row names, so
an interrupted replay done again leaves its partial rows in place, unread. A replay skipped because its backend
was not installed is run again by a later session that has it (`done(retry=...)`); its new summary row, the
later one, is the replay's (`store.last_per_key`)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packinfer_bench.run_folder.files import E2E_DIR, SUMMARY_FILE
from packinfer_bench.run_folder.store import CsvRows, last_per_key

KEY_FIELDS = ("e2e", "trace", "rate", "backend", "repeat")
#: Key fields a file written before a field existed lacks, with the value they stand for.
KEY_DEFAULTS = {"repeat": "0"}


@dataclass
class E2ERecord:
    """One replay of one load point by one backend (repeat: which of the entry's repeats; every repeat replays
    the same schedule). rate: requests/s (gamma arrivals of shape `burstiness`), 'cN' (closed loop: N requests
    in flight), or 'trace' (the trace's own arrivals, time-scaled). status: ok | incorrect (sampled rows' final
    hidden states off the reference attention's) | skipped | error | refused (the scheduler ran none of the
    requests: each is larger than its limits). Latencies in ms over finished requests (mean, median, std,
    p50/p90/p99; other configured percentiles in `percentiles`), ITL over every gap between two tokens of a
    request (itl_ms_quantiles: its 0, 5, ..., 100th percentiles), throughput from the first send to the last
    token, busy_tok_s over summed iteration time (the schedule-free rate), goodput: requests/s within the SLO
    (`slo`), slo_attainment: their share. iteration/gpu/host means in ms (replay.IterationResult);
    launches_per_layer, attn_host_us_per_layer: means over iterations. attention_share: attention GPU time /
    iteration time (inside full graphs estimated from probed iterations: serving.replay.AttentionProbe; rows
    written before the probe existed leave full-graph iterations out). max_rel_err / token_match: the first verify
    iterations against the float32 reference attention. schedule: how requests arrive (open or closed loop);
    graphs: iterations per graph mode; kernel: what the backend ran; step_time: the scheduler's model; tp: the
    tensor-parallel degree (ranks the model is sharded over; times are rank 0's)."""

    e2e: str
    trace: str
    rate: str
    backend: str
    model: str
    num_layers: int
    full_layers: int
    status: str
    repeat: int = 0
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
    ttft_ms_median: float | None = None
    ttft_ms_std: float | None = None
    ttft_ms_p50: float | None = None
    ttft_ms_p90: float | None = None
    ttft_ms_p99: float | None = None
    tpot_ms_mean: float | None = None
    tpot_ms_median: float | None = None
    tpot_ms_std: float | None = None
    tpot_ms_p50: float | None = None
    tpot_ms_p90: float | None = None
    tpot_ms_p99: float | None = None
    itl_ms_mean: float | None = None
    itl_ms_median: float | None = None
    itl_ms_std: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p90: float | None = None
    itl_ms_p99: float | None = None
    e2e_ms_mean: float | None = None
    e2e_ms_median: float | None = None
    e2e_ms_std: float | None = None
    e2e_ms_p50: float | None = None
    e2e_ms_p90: float | None = None
    e2e_ms_p99: float | None = None
    percentiles: str = ""
    itl_ms_quantiles: str = ""
    output_tokens: int | None = None
    makespan_s: float | None = None
    throughput_tok_s: float | None = None
    throughput_req_s: float | None = None
    busy_tok_s: float | None = None
    goodput_req_s: float | None = None
    slo_attainment: float | None = None
    slo: str = ""
    iteration_ms_mean: float | None = None
    gpu_ms_mean: float | None = None
    host_ms_mean: float | None = None
    prepare_ms_mean: float | None = None
    launch_ms_mean: float | None = None
    launches_per_layer: float | None = None
    attn_host_us_per_layer: float | None = None
    attention_share: float | None = None
    room_ms_total: float | None = None
    moved_gb: float | None = None
    max_rel_err: float | None = None
    token_match: float | None = None
    schedule: str = "open-loop"
    burstiness: float | None = None
    max_concurrency: int | None = None
    cuda_graphs: str = ""
    graphs: str = ""
    kernel: str = ""
    step_time: str = ""
    timing: str = ""
    commit: str = ""
    measured_at: str = ""
    attempt: str = ""
    tp: int = 1

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.e2e, self.trace, self.rate, self.backend, str(self.repeat))


SUMMARY_FIELDS = [f.name for f in dataclasses.fields(E2ERecord)]


def new_attempt() -> str:
    """A label unique to one try of one replay (time and process)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.perf_counter_ns() % 10**9}"


class E2EStore:
    """The e2e/ folder of a run: append rows, know which replays are complete, read the rows of complete ones.
    writer=False: a store that reads but drops what it is given (the ranks of a tensor-parallel replay but the
    first)."""

    def __init__(self, out_dir: Path, writer: bool = True):
        self.dir = Path(out_dir) / E2E_DIR
        self.writer = writer
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, retry: Iterable[str] = ()) -> set[tuple[str, ...]]:
        """Keys of complete replays (KEY_FIELDS), less those skipped with a backend in `retry` (installed now)."""
        retry = set(retry)
        return {row_key(r) for r in self.summaries() if not (r.get("status") == "skipped" and r["backend"] in retry)}

    def summaries(self) -> list[dict[str, str]]:
        """The summary row of each replay (the latest where a skipped replay was run again)."""
        return last_per_key(CsvRows(self.dir / SUMMARY_FILE).read()[0], row_key)

    def add_summary(self, record: E2ERecord) -> None:
        if not self.writer:
            return
        rows = CsvRows(self.dir / SUMMARY_FILE, SUMMARY_FIELDS)
        row = dataclasses.asdict(record)
        header = rows.header()
        if header is not None and "tp" not in header and row["tp"] == 1:
            del row["tp"]  # a folder begun before the column existed: degree 1 is what its rows mean
        rows.append([row])

    def append(self, name: str, rows: Iterable[dict]) -> None:
        if self.writer:
            CsvRows(self.dir / name).append(rows)

    def rows(self, name: str) -> list[dict[str, str]]:
        """The rows of `name` (requests or iterations) that belong to the attempt each summary row names (files
        written before attempts were recorded: every row of a complete replay)."""
        return complete_rows(CsvRows(self.dir / name).read()[0], self.summaries())


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    """A row's replay key (KEY_FIELDS; a field an older file lacks takes its KEY_DEFAULTS value)."""
    return tuple(row.get(f) or KEY_DEFAULTS.get(f, "") for f in KEY_FIELDS)


def complete_rows(rows: list[dict[str, str]], summaries: list[dict[str, str]]) -> list[dict[str, str]]:
    """The rows whose replay has a summary row, from the attempt that summary row names."""
    attempt = {row_key(s): s.get("attempt", "") for s in summaries}
    return [r for r in rows if attempt.get(row_key(r), None) == r.get("attempt", "")]


def attention_share(graph: Sequence[str], iteration_ms: Sequence[float], attention_ms: Sequence[float]) -> float | None:
    """Attention's share of a replay's iteration time from its iterations (graph mode, iteration and attention
    ms each): measured in every iteration outside full graphs, and in full-graph iterations estimated from the
    probed ones (their attention per iteration ms, times all full iterations' time); None where full-graph
    iterations ran but none was probed (replays from before the probe existed)."""
    rest_attention = rest_time = full_time = probed_attention = probed_time = 0.0
    full = False
    for mode, it_ms, at_ms in zip(graph, iteration_ms, attention_ms):
        seen = not math.isnan(at_ms)
        if mode == "full":
            full, full_time = True, full_time + it_ms
            if seen:
                probed_attention, probed_time = probed_attention + at_ms, probed_time + it_ms
        elif seen:
            rest_attention, rest_time = rest_attention + at_ms, rest_time + it_ms
    if full and probed_time <= 0:
        return None
    attention = rest_attention + (probed_attention / probed_time * full_time if full else 0.0)
    total = rest_time + full_time
    return attention / total if total > 0 else None
