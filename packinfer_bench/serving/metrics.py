"""Serving latency from a replayed schedule and measured iteration times: when each iteration ran, when each
request got its first and last token, and the run's percentiles and throughput. Pure arithmetic on arrays (the
clock is an input), so it is tested on made-up times."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from packinfer_bench.workload import Batch


def timeline(schedule: Sequence[Batch], arrivals: Mapping[int, float], durations: Sequence[float]) -> np.ndarray:
    """End time of each iteration: it starts when the previous one ends, and not before its requests arrived
    (the schedule is fixed; only how long each iteration takes is measured)."""
    ends = np.zeros(len(schedule))
    end = 0.0
    for i, (batch, took) in enumerate(zip(schedule, durations)):
        start = max([end, *(arrivals[r] for r in batch.request_ids.tolist())])
        end = start + took
        ends[i] = end
    return ends


def request_latencies(schedule: Sequence[Batch], arrivals: Mapping[int, float], ends: np.ndarray) -> pd.DataFrame:
    """Per request: arrival, first and last token times, output tokens, TTFT, TPOT (mean gap between its later
    tokens) and end-to-end latency, seconds. Requests the schedule never ran are left out."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    tokens: dict[int, int] = {}
    for batch, end in zip(schedule, ends):
        for rid in batch.request_ids[batch.sampled].tolist():
            first.setdefault(rid, end)
            last[rid] = end
            tokens[rid] = tokens.get(rid, 0) + 1
    rows = []
    for rid, t_first in first.items():
        n, arrival = tokens[rid], arrivals[rid]
        rows.append({"request_id": rid, "arrival_s": arrival, "first_token_s": t_first, "finish_s": last[rid],
                     "output_tokens": n, "ttft_s": t_first - arrival,
                     "tpot_s": (last[rid] - t_first) / (n - 1) if n > 1 else np.nan,
                     "e2e_s": last[rid] - arrival})
    return pd.DataFrame(rows, columns=["request_id", "arrival_s", "first_token_s", "finish_s", "output_tokens",
                                       "ttft_s", "tpot_s", "e2e_s"])


def summarize(requests: pd.DataFrame, durations: Sequence[float], expected_tokens: Mapping[int, int]) -> dict:
    """Run metrics: mean and p50/p90/p99 of TTFT, TPOT and end-to-end latency (ms) over finished requests;
    throughput in output tokens/s and requests/s from the first arrival to the last token; busy throughput
    (output tokens / summed iteration time, the rate at saturation)."""
    done = requests[[expected_tokens.get(r, -1) == n for r, n in zip(requests["request_id"],
                                                                     requests["output_tokens"])]]
    out: dict[str, float | int] = {"finished": len(done), "unfinished": len(expected_tokens) - len(done)}
    for name in ("ttft", "tpot", "e2e"):
        values = done[f"{name}_s"].dropna().to_numpy() * 1e3
        out[f"{name}_ms_mean"] = float(values.mean()) if len(values) else np.nan
        for p in (50, 90, 99):
            out[f"{name}_ms_p{p}"] = float(np.percentile(values, p)) if len(values) else np.nan
    tokens = int(requests["output_tokens"].sum())
    span = float(requests["finish_s"].max() - requests["arrival_s"].min()) if len(requests) else np.nan
    out["output_tokens"] = tokens
    out["makespan_s"] = span
    out["throughput_tok_s"] = tokens / span if span and span > 0 else np.nan
    out["throughput_req_s"] = len(done) / span if span and span > 0 else np.nan
    busy = float(np.sum(durations))
    out["busy_tok_s"] = tokens / busy if busy > 0 else np.nan
    return out
