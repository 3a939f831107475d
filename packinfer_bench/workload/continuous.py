"""Continuous batching: an iteration-level scheduler like vLLM's, fed by trace arrivals, yielding the exact
sequence of per-iteration attention batches.

Every iteration each scheduled request computes q new tokens over kv = computed + q keys; when a request has
computed all its known tokens it samples one more (its first output token ends the prefill). The clock
advances by a step-time model, not by measured kernel time, so the schedule is identical for every backend
(open loop) and deterministic for a seed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from packinfer_bench.errors import ConfigError
from packinfer_bench.traces import Trace
from packinfer_bench.traces.limits import (
    MAX_BATCH_SIZE,
    MAX_COUNT,
    MAX_RATE,
    MAX_TOKENS,
    MAX_TRACE_ROWS,
    MIN_RATE,
    TOKENS_WHY,
    KeyedConfigError,
    check_float,
    check_int,
    check_seed,
)
from packinfer_bench.workload.batch import Batch


@dataclass
class StepTime:
    """Modelled iteration time: base + per scheduled token + per KV token read."""

    base_ms: float = 5.0
    per_token_us: float = 30.0
    per_kv_token_ns: float = 10.0

    def __post_init__(self) -> None:
        for key in ("base_ms", "per_token_us", "per_kv_token_ns"):
            check_float(getattr(self, key), key, 0.0, 1e6, why="modelled time of an iteration: non-negative; "
                        "1e6 already models a step of minutes")

    def seconds(self, q_tokens: int, kv_tokens: int) -> float:
        return self.base_ms * 1e-3 + self.per_token_us * 1e-6 * q_tokens + self.per_kv_token_ns * 1e-9 * kv_tokens


@dataclass
class ContinuousSpec:
    """arrivals: 'trace' (the trace's timestamps times time_scale) or 'poisson' (at `rate` requests/s; gaps
      gamma-distributed with shape `burstiness`: 1.0 is Poisson, below 1 burstier, above 1 more regular, as
      `vllm bench serve --burstiness`).
    max_concurrency: at most this many requests in flight (sent and not finished), as a benchmark client with a
      concurrency limit holds them: a request is sent at its arrival or when an earlier one finishes, whichever
      is later (none: no limit, open loop). With a high rate this is the closed-loop mode throughput is quoted in.
    start, num_requests: which requests of the trace to replay.
    max_num_seqs, max_num_batched_tokens: vLLM's per-iteration limits.
    chunked_prefill: split prompts across iterations, decodes first (vLLM v1 / Sarathi); off: an iteration is
      either all prefills (whole prompts, prefill first) or all decodes (vLLM v0).
    max_kv_tokens: KV cache budget in tokens (none: unlimited); over it the newest request is preempted and
      recomputed later.
    max_iterations: stop after this many iterations (none: until every request finishes).
    every: yield only every n-th iteration's batch (the schedule itself is unchanged), to measure a long replay
      by a sample of its iterations."""

    arrivals: str = "trace"
    rate: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None
    time_scale: float = 1.0
    start: int = 0
    num_requests: int | None = 256
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    chunked_prefill: bool = True
    max_kv_tokens: int | None = None
    max_iterations: int | None = None
    step_time: StepTime = field(default_factory=StepTime)
    every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arrivals not in ("trace", "poisson"):
            raise KeyedConfigError("arrivals", f"{self.arrivals!r} not allowed; allowed: ['trace', 'poisson']")
        if self.arrivals == "poisson" and self.rate is None:
            raise KeyedConfigError("rate", "must be > 0 requests/s with poisson arrivals, got None")
        if self.rate is not None:
            check_float(self.rate, "rate", MIN_RATE, MAX_RATE, why="Poisson arrivals, requests/s")
        check_float(self.burstiness, "burstiness", 0.0, 1000.0, lo_open=True, why="gamma shape of the gaps "
                    "between arrivals: 1.0 is Poisson")
        if self.max_concurrency is not None:
            check_int(self.max_concurrency, "max_concurrency", 1, MAX_BATCH_SIZE, "requests in flight at once")
        check_float(self.time_scale, "time_scale", 0.0, 1e6, lo_open=True, why="factor on the trace's arrival times")
        check_int(self.start, "start", 0, MAX_TRACE_ROWS, "first trace row replayed")
        if self.num_requests is not None:
            check_int(self.num_requests, "num_requests", 1, MAX_TRACE_ROWS, "trace rows replayed; null: to the "
                      "end of the trace")
        check_int(self.max_num_seqs, "max_num_seqs", 1, MAX_BATCH_SIZE, "requests in one iteration's batch")
        check_int(self.max_num_batched_tokens, "max_num_batched_tokens", 1, MAX_TOKENS,
                  f"tokens in one iteration; {TOKENS_WHY}")
        if self.max_kv_tokens is not None:
            check_int(self.max_kv_tokens, "max_kv_tokens", 2, 1 << 40, "the KV budget in tokens; at least one "
                      "prompt token and one output token")
        if self.max_iterations is not None:
            check_int(self.max_iterations, "max_iterations", 1, MAX_COUNT, "0 iterations would replay nothing")
        check_int(self.every, "every", 1, MAX_COUNT, "yield every n-th iteration")
        check_seed(self.seed)


@dataclass
class _Request:
    rid: int
    arrival: float
    prompt: int
    output: int
    prefix_id: int
    prefix_len: int
    generated: int = 0
    computed: int = 0  # tokens whose KV is in the cache

    @property
    def todo(self) -> int:  # known tokens not yet in the cache
        return self.prompt + self.generated - self.computed


def arrival_times(trace: Trace, spec: ContinuousSpec, n: int) -> np.ndarray:
    """Arrival time of each replayed request, seconds from the first."""
    if spec.arrivals == "poisson":  # gamma gaps of mean 1 / rate (shape 1: exponential, i.e. Poisson arrivals)
        gaps = np.random.default_rng(spec.seed).gamma(spec.burstiness, 1.0 / (spec.rate * spec.burstiness), size=n)
        return np.cumsum(gaps) - gaps[0]
    if not trace.has_arrivals:
        raise ConfigError(f"trace {trace.name!r} has no timestamps: use arrivals: poisson with a rate")
    t = trace.requests["arrival_s"].to_numpy()[spec.start:spec.start + n]
    return (t - t[0]) * spec.time_scale


def replayed_requests(trace: Trace, spec: ContinuousSpec) -> tuple[pd.DataFrame, np.ndarray]:
    """The trace rows the spec replays and their arrival times (seconds from the first)."""
    df = trace.requests.iloc[spec.start:]
    if spec.num_requests is not None:
        df = df.iloc[:spec.num_requests]
    if len(df) == 0:
        raise ConfigError(f"start={spec.start} is past the end of trace {trace.name!r} ({len(trace)} rows)")
    return df, arrival_times(trace, spec, len(df))


def continuous_batches(trace: Trace, spec: ContinuousSpec,
                       sent_after: dict[int, int] | None = None) -> Iterator[Batch]:
    """Yield one Batch per scheduler iteration, with `iteration`, modelled start `time_s` and `sampled` (which
    requests emit an output token: their last prompt chunk or a decode step).

    With max_concurrency, a request waits at the client until fewer than that many are in flight; `sent_after`
    (if given) is filled with request -> the request whose finish let it be sent (absent: sent at its arrival),
    so that a replay with measured iteration times can lay the same dependencies on its own clock."""
    df, arrivals = replayed_requests(trace, spec)
    _check_schedulable(trace, df, spec)
    pending = deque(_Request(int(r.request_id), float(t), int(r.prompt_len), int(r.output_len), int(r.prefix_id),
                             int(r.prefix_len)) for r, t in zip(df.itertuples(), arrivals))
    waiting: deque[_Request] = deque()
    running: list[_Request] = []
    in_flight = 0
    freed: deque[int] = deque()  # requests whose finish freed a slot of a full client, oldest first
    limit = spec.max_concurrency or len(pending) + 1
    clock, iteration = 0.0, 0
    while pending or waiting or running:
        if spec.max_iterations is not None and iteration >= spec.max_iterations:
            return
        if not waiting and not running:
            clock = max(clock, pending[0].arrival)
        while pending and pending[0].arrival <= clock and in_flight < limit:
            req = pending.popleft()
            if _fits_ever(req, spec):
                waiting.append(req)
                in_flight += 1
                if freed and sent_after is not None:
                    sent_after[req.rid] = freed.popleft()
        freed.clear()
        scheduled = _schedule(waiting, running, spec)
        if not scheduled:
            if not pending or in_flight >= limit:
                return  # nothing can ever run (all left waiting are too large for the limits)
            clock = pending[0].arrival
            continue
        q = np.array([n for _, n in scheduled], np.int64)
        kv = np.array([r.computed + n for r, n in scheduled], np.int64)
        if iteration % spec.every == 0:
            yield Batch(batch_id=f"{trace.name}/it{iteration}", trace=trace.name, workload="continuous",
                        q_lens=q, kv_lens=kv, request_ids=[r.rid for r, _ in scheduled],
                        prefix_ids=[r.prefix_id for r, _ in scheduled],
                        prefix_lens=[r.prefix_len for r, _ in scheduled], iteration=iteration, time_s=clock,
                        sampled=[r.todo == n for r, n in scheduled])
        for req, n in scheduled:
            req.computed += n
            if req.todo == 0:
                req.generated += 1
        done = [r.rid for r in running if r.generated >= r.output]
        running[:] = [r for r in running if r.generated < r.output]
        if in_flight >= limit:  # the client was full: the requests sent next wait for these finishes
            freed.extend(done)
        in_flight -= len(done)
        clock += spec.step_time.seconds(int(q.sum()), int(kv.sum()))
        iteration += 1


def _check_schedulable(trace: Trace, df: pd.DataFrame, spec: ContinuousSpec) -> None:
    """ConfigError naming the key when no replayed request can ever be scheduled (the replay would be empty)."""
    need = df["prompt_len"] + df["output_len"]
    if spec.max_kv_tokens is not None and not (need <= spec.max_kv_tokens).any():
        raise KeyedConfigError("continuous.max_kv_tokens", f"{spec.max_kv_tokens} is smaller than the smallest "
                               f"replayed request of trace {trace.name!r} (prompt + output = {int(need.min())} "
                               "tokens): no request could ever be scheduled")
    if not spec.chunked_prefill and not (df["prompt_len"] <= spec.max_num_batched_tokens).any():
        raise KeyedConfigError("continuous.max_num_batched_tokens", f"{spec.max_num_batched_tokens} is smaller than "
                               f"the shortest replayed prompt of trace {trace.name!r} ({int(df['prompt_len'].min())} "
                               "tokens) and chunked_prefill is off: no request could ever be scheduled")
    fits = need <= (spec.max_kv_tokens if spec.max_kv_tokens is not None else np.inf)
    if not spec.chunked_prefill:
        fits &= df["prompt_len"] <= spec.max_num_batched_tokens
    if not fits.any():
        raise KeyedConfigError("continuous", f"no replayed request of trace {trace.name!r} fits both max_kv_tokens "
                               f"({spec.max_kv_tokens}) and max_num_batched_tokens ({spec.max_num_batched_tokens}) "
                               "with chunked_prefill off: no request could ever be scheduled")


def _fits_ever(req: _Request, spec: ContinuousSpec) -> bool:
    """A request that can never be scheduled under the limits is dropped (as vLLM rejects it)."""
    if not spec.chunked_prefill and req.prompt > spec.max_num_batched_tokens:
        return False
    return spec.max_kv_tokens is None or req.prompt + req.output <= spec.max_kv_tokens


def _schedule(waiting: deque[_Request], running: list[_Request], spec: ContinuousSpec) -> list[tuple[_Request, int]]:
    """Pick (request, new tokens) for one iteration, moving admitted requests from waiting to running."""
    budget = spec.max_num_batched_tokens
    kv_budget = spec.max_kv_tokens if spec.max_kv_tokens is not None else float("inf")
    # grow-or-preempt: running requests need room for their next tokens; evict the newest until they fit
    while running and sum(r.computed + min(r.todo, budget) for r in running) > kv_budget:
        victim = running.pop()
        victim.computed = 0
        waiting.appendleft(victim)
    used = sum(r.computed for r in running)
    if not spec.chunked_prefill:
        admitted: list[tuple[_Request, int]] = []
        while waiting and len(running) < spec.max_num_seqs and waiting[0].todo <= budget \
                and used + waiting[0].todo + 1 <= kv_budget:
            req = waiting.popleft()
            budget -= req.todo
            used += req.todo
            running.append(req)
            admitted.append((req, req.todo))
        if admitted:
            return admitted
        return [(r, r.todo) for r in running[:budget]]
    scheduled = []
    for req in sorted(running, key=lambda r: r.todo > 1):  # decodes first, then prefill chunks (stable)
        if budget == 0:
            break
        n = min(req.todo, budget)
        scheduled.append((req, n))
        budget -= n
        used += n
    while waiting and budget > 0 and len(running) < spec.max_num_seqs:
        n = min(waiting[0].todo, budget)
        if used + n > kv_budget:
            break
        req = waiting.popleft()
        running.append(req)
        scheduled.append((req, n))
        budget -= n
        used += n
    return scheduled
