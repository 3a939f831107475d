"""Serving latency from a replayed schedule and measured iteration times: when each iteration ran, when each
request was sent, got its first and later tokens, and the run's statistics as `vllm bench serve` reports them
(TTFT, TPOT, ITL, end-to-end latency: mean, median, std, percentiles; request and output-token throughput;
goodput under an SLO). Pure arithmetic on arrays (the clock is an input), so it is tested on made-up times."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from packinfer_bench.workload import Batch

#: Percentiles reported by default (the `vllm bench serve` set).
PERCENTILES = (50, 90, 99)
#: Quantiles of the pooled inter-token latencies kept per replay (for CDFs): every 5%.
ITL_QUANTILES = tuple(range(0, 101, 5))


@dataclass(frozen=True)
class Slo:
    """A request meets the SLO when its TTFT and TPOT are within these bounds (None: not bounded); a rate is
    sustained when at least `attainment` of the finished requests meet it."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    attainment: float = 0.9


def timeline(schedule: Sequence[Batch], arrivals: Mapping[int, float], durations: Sequence[float],
             sent_after: Mapping[int, int] | None = None,
             cold: Sequence[float] | None = None) -> tuple[np.ndarray, dict[int, float]]:
    """End time of each iteration, and when each request was sent. An iteration starts when the previous one
    ends, and not before its requests were sent; a request is sent at its arrival, or (with a client concurrency
    limit) when the request it waited for finished, whichever is later. The schedule is fixed; only how long
    each iteration takes is measured: `durations` back to back, `cold[i]` for the first iteration and one that
    starts after the engine sat idle (its host work could not overlap a previous iteration; default: the same)."""
    sent_after = sent_after or {}
    last = {}
    for i, batch in enumerate(schedule):
        for rid in batch.request_ids.tolist():
            last[rid] = i
    finish: dict[int, float] = {}
    sent: dict[int, float] = {}
    ends = np.zeros(len(schedule))
    end = 0.0
    for i, (batch, took) in enumerate(zip(schedule, durations)):
        start = end
        for rid in batch.request_ids.tolist():
            if rid not in sent:
                before = sent_after.get(rid)
                sent[rid] = max(arrivals[rid], finish.get(before, 0.0) if before is not None else 0.0)
            start = max(start, sent[rid])
        if cold is not None and (i == 0 or start > end):
            took = cold[i]
        end = start + took
        ends[i] = end
        for rid in batch.request_ids.tolist():
            if last[rid] == i:
                finish[rid] = end
    return ends, sent


def token_times(schedule: Sequence[Batch], ends: np.ndarray) -> dict[int, list[float]]:
    """Each request's output token times (the end of every iteration that samples it), in order."""
    times: dict[int, list[float]] = {}
    for batch, end in zip(schedule, ends):
        for rid in batch.request_ids[batch.sampled].tolist():
            times.setdefault(rid, []).append(float(end))
    return times


def request_latencies(schedule: Sequence[Batch], sent: Mapping[int, float], ends: np.ndarray) -> pd.DataFrame:
    """Per request: sent, first and last token times, output tokens, TTFT, TPOT (mean gap between its later
    tokens), its mean and largest inter-token gap, end-to-end latency; seconds. Requests never run are left out."""
    rows = []
    for rid, times in token_times(schedule, ends).items():
        n, t0 = len(times), sent[rid]
        gaps = np.diff(times)
        rows.append({"request_id": rid, "arrival_s": t0, "first_token_s": times[0], "finish_s": times[-1],
                     "output_tokens": n, "ttft_s": times[0] - t0,
                     "tpot_s": (times[-1] - times[0]) / (n - 1) if n > 1 else np.nan,
                     "itl_max_s": float(gaps.max()) if n > 1 else np.nan, "e2e_s": times[-1] - t0})
    return pd.DataFrame(rows, columns=["request_id", "arrival_s", "first_token_s", "finish_s", "output_tokens",
                                       "ttft_s", "tpot_s", "itl_max_s", "e2e_s"])


def meets_slo(requests: pd.DataFrame, slo: Slo) -> np.ndarray:
    """Which requests meet the SLO (a request with one token has no TPOT and meets any TPOT bound)."""
    ok = np.ones(len(requests), bool)
    if slo.ttft_ms is not None:
        ok &= requests["ttft_s"].to_numpy() * 1e3 <= slo.ttft_ms
    if slo.tpot_ms is not None:
        tpot = requests["tpot_s"].to_numpy() * 1e3
        ok &= np.isnan(tpot) | (tpot <= slo.tpot_ms)
    return ok


def distribution(values: np.ndarray, name: str, percentiles: Sequence[int] = PERCENTILES) -> dict[str, float]:
    """mean, median, std and percentiles of values (ms) as `<name>_ms_<stat>` (NaN when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    some = len(v) > 0
    out = {f"{name}_ms_mean": float(v.mean()) if some else np.nan,
           f"{name}_ms_median": float(np.median(v)) if some else np.nan,
           f"{name}_ms_std": float(v.std()) if some else np.nan}
    for p in percentiles:
        out[f"{name}_ms_p{p:g}"] = float(np.percentile(v, p)) if some else np.nan
    return out


def summarize(requests: pd.DataFrame, durations: Sequence[float], expected_tokens: Mapping[int, int], *,
              itl_s: np.ndarray | None = None, slo: Slo = Slo(),
              percentiles: Sequence[int] = PERCENTILES) -> dict:
    """Run metrics over finished requests: TTFT, TPOT, ITL (every gap between two tokens of a request, pooled),
    end-to-end latency (ms: mean, median, std, percentiles); throughput in output tokens/s and requests/s from
    the first send to the last token; goodput (requests/s meeting the SLO) and SLO attainment; busy throughput
    (output tokens / summed iteration time: the schedule-free rate)."""
    done = requests[[expected_tokens.get(r, -1) == n for r, n in zip(requests["request_id"],
                                                                     requests["output_tokens"])]]
    out: dict[str, float | int | str] = {"finished": len(done), "unfinished": len(expected_tokens) - len(done)}
    for name in ("ttft", "tpot", "e2e"):
        out.update(distribution(done[f"{name}_s"].to_numpy() * 1e3, name, percentiles))
    itl = np.asarray(itl_s if itl_s is not None else [], dtype=np.float64) * 1e3
    out.update(distribution(itl, "itl", percentiles))
    out["itl_ms_quantiles"] = " ".join(f"{x:.4g}" for x in np.percentile(itl, ITL_QUANTILES)) if len(itl) else ""
    tokens = int(requests["output_tokens"].sum())
    span = float(requests["finish_s"].max() - requests["arrival_s"].min()) if len(requests) else np.nan
    good = int(meets_slo(done, slo).sum())
    out["output_tokens"] = tokens
    out["makespan_s"] = span
    out["throughput_tok_s"] = tokens / span if span and span > 0 else np.nan
    out["throughput_req_s"] = len(done) / span if span and span > 0 else np.nan
    out["goodput_req_s"] = good / span if span and span > 0 else np.nan
    out["slo_attainment"] = good / len(done) if len(done) else np.nan
    busy = float(np.sum(durations))
    out["busy_tok_s"] = tokens / busy if busy > 0 else np.nan
    return out


def inter_token_gaps(schedule: Sequence[Batch], ends: np.ndarray, finished: set[int]) -> np.ndarray:
    """Every gap (s) between two consecutive output tokens of the finished requests, pooled."""
    gaps = [np.diff(t) for rid, t in token_times(schedule, ends).items() if rid in finished and len(t) > 1]
    return np.concatenate(gaps) if gaps else np.zeros(0)
