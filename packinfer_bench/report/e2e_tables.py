"""The end-to-end tables: a run's e2e/ files (summary.csv, requests.csv, iterations.csv) read into DataFrames,
and what a serving engineer reads from them.

- e2e_compare: ours against each peer per load point, every metric with its 95% bootstrap interval and the
  paired ratio ours / peer with its interval (requests paired by (repeat, request), repeats by repeat,
  iterations by (repeat, iteration): the same schedule replayed by both); a ratio whose interval spans 1.0
  reads "no difference", one over a single unit (a throughput of one repeat) "one sample".
- e2e_iteration_kinds: per backend and iteration kind (decode, mixed, prefill) the median iteration, GPU and
  host time and the launches per layer: the stable signal beside latency under a queue.
- e2e_slo: per backend the highest swept rate it sustains within the SLO, and its goodput there.
- e2e_gains / e2e_summary: the point estimates (means over repeats) and every replay with its status.
Only replays that are `ok` for both sides are ever paired."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.report.tables import OURS_BACKEND, frame, read_rows
from packinfer_bench.run_folder import E2E_DIR, ITERATIONS_FILE, REQUESTS_FILE, SUMMARY_FILE
from packinfer_bench.run_folder.e2e import KEY_DEFAULTS, attention_share, complete_rows, row_key
from packinfer_bench.run_folder.store import CsvRows, last_per_key
from packinfer_bench.stats import bootstrap, paired_ratio, verdict

#: An end-to-end load point's key, and the columns of e2e/summary.csv and e2e/requests.csv the report reads.
E2E_KEY = ["e2e", "model", "num_layers", "trace", "rate"]
E2E_GAIN_METRICS = ("e2e_ms_mean", "ttft_ms_mean", "tpot_ms_mean", "throughput_tok_s", "busy_tok_s")
E2E_SUMMARY_COLUMNS = (*E2E_KEY, "backend", "status", *E2E_GAIN_METRICS)
E2E_REQUEST_COLUMNS = ("e2e", "trace", "rate", "backend", "e2e_s")
E2E_ITERATION_COLUMNS = ("e2e", "trace", "rate", "backend", "iteration", "iteration_ms")
_POINT = ["e2e", "trace", "rate"]


def has_e2e(run: Path) -> bool:
    return (run / E2E_DIR / SUMMARY_FILE).is_file()


def load_e2e(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, requests) of a run's end-to-end replays; requests are those of the attempt each summary row
    names (empty when none finished)."""
    path = run / E2E_DIR / SUMMARY_FILE
    header, summary_rows = read_rows(path, E2E_SUMMARY_COLUMNS, E2E_GAIN_METRICS)
    summary_rows = last_per_key(summary_rows, row_key)
    summary = frame(header, summary_rows, keep_default_na=False, na_values=[""], dtype={"rate": str, "reason": str})
    path = run / E2E_DIR / REQUESTS_FILE
    if CsvRows(path).exists():  # also when archived as requests.csv.gz
        header, rows = read_rows(path, E2E_REQUEST_COLUMNS, ("e2e_s", "ttft_s", "tpot_s"))
        requests = frame(header, complete_rows(rows, summary_rows), dtype={"rate": str})
    else:
        requests = pd.DataFrame(columns=["e2e", "trace", "rate", "backend", "e2e_s", "ttft_s", "tpot_s"])
    return summary, requests


def load_e2e_iterations(run: Path) -> pd.DataFrame:
    """iterations.csv rows of the complete replays, with a `kind` (decode, mixed, prefill) and `host_ms` even
    where an older file lacks them (kind from the request counts, host time = prepare + launch)."""
    path = run / E2E_DIR / ITERATIONS_FILE
    summary_rows = last_per_key(read_rows(run / E2E_DIR / SUMMARY_FILE, E2E_SUMMARY_COLUMNS)[1], row_key)
    if not CsvRows(path).exists():
        return pd.DataFrame(columns=[*E2E_ITERATION_COLUMNS, "repeat", "kind", "host_ms", "gpu_ms"])
    header, rows = read_rows(path, E2E_ITERATION_COLUMNS, ("iteration_ms",))
    df = frame(header, complete_rows(rows, summary_rows), dtype={"rate": str})
    if "kind" not in df:
        df["kind"] = np.where(df["num_prefill"] == 0, "decode", np.where(df["num_decode"] == 0, "prefill", "mixed"))
    if "host_ms" not in df:
        df["host_ms"] = df["prepare_ms"] + df["launch_ms"]
    for name in ("gpu_ms", "launches_per_layer", "graph"):
        if name not in df:
            df[name] = np.nan if name != "graph" else ""
    return _with_repeat(df)


def _with_repeat(df: pd.DataFrame) -> pd.DataFrame:
    if "repeat" not in df:
        df = df.assign(repeat=int(KEY_DEFAULTS["repeat"]))
    df["repeat"] = pd.to_numeric(df["repeat"], errors="coerce").fillna(0).astype(int)
    return df


def with_attention_shares(summary: pd.DataFrame, iterations: pd.DataFrame | None) -> pd.DataFrame:
    """The summary rows with attention_share recomputed from `iterations` where given: a row written before the
    probe existed holds the share of the iterations outside full graphs only, which the iterations correct
    (to none, where full-graph iterations ran unprobed); a replay without iteration rows keeps its own."""
    if iterations is None or not len(iterations) or "attention_ms" not in iterations:
        return summary
    key = [*_POINT, "backend", "repeat"]
    shares = _attention_shares(iterations).rename(columns={"attention_share": "_share"})
    out = _with_repeat(summary.assign(rate=summary["rate"].astype(str))).merge(
        shares.assign(rate=shares["rate"].astype(str), _seen=True), how="left", on=key)
    seen = out.pop("_seen").notna()
    share = out.pop("_share")
    out["attention_share"] = share.where(seen, out["attention_share"] if "attention_share" in out else np.nan)
    return out


def _attention_shares(iterations: pd.DataFrame) -> pd.DataFrame:
    """attention_share of every replay in `iterations` (run_folder.e2e.attention_share)."""
    rows = [(*key, attention_share(g["graph"].astype(str).tolist(), g["iteration_ms"].to_numpy(float),
                                   pd.to_numeric(g["attention_ms"], errors="coerce").to_numpy(float)))
            for key, g in iterations.groupby([*_POINT, "backend", "repeat"], sort=False)]
    return pd.DataFrame(rows, columns=[*_POINT, "backend", "repeat", "attention_share"])


# -- point estimates ----------------------------------------------------------------------------------------------

def e2e_summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every replay: status, latency (mean, p50, p99 end to end; mean TTFT and TPOT), throughput, attention share."""
    cols = E2E_KEY + ["backend", "repeat", "status", "finished", "e2e_ms_mean", "e2e_ms_p50", "e2e_ms_p99",
                      "ttft_ms_mean", "tpot_ms_mean", "itl_ms_p99", "throughput_tok_s", "busy_tok_s", "goodput_req_s",
                      "attention_share", "graphs", "max_rel_err", "reason"]
    order = E2E_KEY + ["backend"] + (["repeat"] if "repeat" in summary else [])
    return summary[[c for c in cols if c in summary]].sort_values(order).reset_index(drop=True)


def e2e_gains_table(summary: pd.DataFrame, ours: str = OURS_BACKEND) -> pd.DataFrame:
    """Per model, trace, rate and baseline (both ok; metrics averaged over their ok repeats): reduction of mean
    end-to-end latency, TTFT and TPOT (%, > 0: ours is faster) and gain in throughput and busy throughput (%,
    > 0: ours serves more). Point estimates: e2e_compare has their intervals. Where replays measured attention's
    share of iteration time (with_attention_shares): both backends' shares (%) and what attention bounds: the
    busy-throughput gain over the baseline if ours took no time in attention at all and matched the baseline
    everywhere else."""
    ok = summary[summary["status"] == "ok"]
    metrics = [*E2E_GAIN_METRICS, *(["attention_share"] if "attention_share" in ok else [])]
    ok = ok.assign(**{m: pd.to_numeric(ok[m], errors="coerce") for m in metrics})
    means = ok.groupby([*E2E_KEY, "backend"], sort=False)[metrics].mean().reset_index()
    mine = means[means["backend"] == ours]
    others = means[means["backend"] != ours]
    pairs = mine.merge(others, on=E2E_KEY, suffixes=("_ours", "_base"))
    out = pairs[E2E_KEY].copy()
    out["baseline"] = pairs["backend_base"]
    for name in ("e2e_ms_mean", "ttft_ms_mean", "tpot_ms_mean"):
        out[name.replace("_ms_mean", "_reduction_pct")] = 100 * (1 - pairs[f"{name}_ours"] / pairs[f"{name}_base"])
    for name in ("throughput_tok_s", "busy_tok_s"):
        out[name.replace("_tok_s", "_gain_pct")] = 100 * (pairs[f"{name}_ours"] / pairs[f"{name}_base"] - 1)
    if "attention_share" in metrics:
        out["attention_pct_ours"] = 100 * pairs["attention_share_ours"]
        out["attention_pct_base"] = 100 * pairs["attention_share_base"]
        base = pairs["attention_share_base"].where(pairs["attention_share_base"] < 1)
        out["attention_bound_pct"] = 100 * (1 / (1 - base) - 1)
    return out.sort_values(E2E_KEY + ["baseline"]).reset_index(drop=True)


# -- intervals ----------------------------------------------------------------------------------------------------

#: (metric, unit, lower is better): latencies over requests, throughputs over repeats, iteration medians.
_REQUEST_METRICS = (("e2e latency", "ms", "e2e_s"), ("TTFT", "ms", "ttft_s"), ("TPOT", "ms", "tpot_s"))
_REPEAT_METRICS = (("throughput", "tok/s", "throughput_tok_s"), ("goodput", "req/s", "goodput_req_s"))


def e2e_compare_table(summary: pd.DataFrame, requests: pd.DataFrame, iterations: pd.DataFrame,
                      ours: str = OURS_BACKEND) -> pd.DataFrame:
    """Ours against each peer per load point: every metric's value with its 95% bootstrap interval for both,
    the paired ratio ours / peer with its interval, and the verdict ('better', 'worse', 'no difference',
    'one sample')."""
    summary, requests, iterations = _with_repeat(summary.copy()), _with_repeat(requests.copy()), iterations
    ok = summary[summary["status"] == "ok"]
    rows = []
    for point, runs in ok.groupby(_POINT, sort=True):
        mine = runs[runs["backend"] == ours]
        if mine.empty:
            continue
        head = dict(zip(_POINT, point), model=mine["model"].iloc[0], num_layers=mine["num_layers"].iloc[0])
        for peer in sorted(set(runs["backend"]) - {ours}):
            repeats = sorted(set(mine["repeat"]) & set(runs[runs["backend"] == peer]["repeat"]))
            if not repeats:
                continue
            base = {**head, "peer": peer, "repeats": len(repeats)}
            rows += _request_rows(requests, point, ours, peer, repeats, base)
            rows += _repeat_rows(runs, ours, peer, repeats, base)
            rows += _iteration_rows(iterations, point, ours, peer, repeats, base)
    cols = [*E2E_KEY, "peer", "repeats", "metric", "unit", "better", "units", "ours", "ours_low", "ours_high",
            "peer_value", "peer_low", "peer_high", "ratio", "ratio_low", "ratio_high", "verdict"]
    return pd.DataFrame(rows, columns=cols)


def _row(base: dict, metric: str, unit: str, lower: bool, a: np.ndarray, b: np.ndarray,
         statistic: str = "mean") -> dict:
    stat = np.mean if statistic == "mean" else np.median
    mine, theirs = (bootstrap(x, stat) for x in (a, b))
    ratio = paired_ratio(a, b, statistic=statistic)
    return {**base, "metric": metric, "unit": unit, "better": "lower" if lower else "higher", "units": len(a),
            "ours": mine.value, "ours_low": mine.low, "ours_high": mine.high, "peer_value": theirs.value,
            "peer_low": theirs.low, "peer_high": theirs.high, "ratio": ratio.value, "ratio_low": ratio.low,
            "ratio_high": ratio.high, "verdict": verdict(ratio, lower_is_better=lower)}


def _at(df: pd.DataFrame, point: tuple) -> pd.Series:
    """Rows of one load point (e2e, trace, rate)."""
    mask = pd.Series(True, index=df.index)
    for column, value in zip(_POINT, point):
        mask &= df[column].astype(str) == str(value)
    return mask


def _request_rows(requests, point, ours, peer, repeats, base) -> list[dict]:
    sub = requests[_at(requests, point) & requests["repeat"].isin(repeats)]
    pair = sub[sub["backend"] == ours].merge(sub[sub["backend"] == peer], on=["repeat", "request_id"],
                                             suffixes=("_a", "_b"))
    rows = []
    for metric, unit, col in _REQUEST_METRICS:
        if f"{col}_a" not in pair:
            continue
        both = pair[[f"{col}_a", f"{col}_b"]].dropna().to_numpy() * 1e3
        if len(both):
            rows.append(_row(base, metric, unit, True, both[:, 0], both[:, 1]))
    return rows


def _repeat_rows(runs, ours, peer, repeats, base) -> list[dict]:
    a = runs[runs["backend"] == ours].set_index("repeat").loc[repeats]
    b = runs[runs["backend"] == peer].set_index("repeat").loc[repeats]
    return [_row(base, metric, unit, False, a[col].to_numpy(float), b[col].to_numpy(float))
            for metric, unit, col in _REPEAT_METRICS if col in a and np.isfinite(a[col].to_numpy(float)).any()]


def _iteration_rows(iterations, point, ours, peer, repeats, base) -> list[dict]:
    if iterations is None or iterations.empty:
        return []
    sub = iterations[_at(iterations, point) & iterations["repeat"].isin(repeats)]
    pair = sub[sub["backend"] == ours].merge(sub[sub["backend"] == peer], on=["repeat", "iteration"],
                                             suffixes=("_a", "_b"))
    rows = []
    if len(pair):  # summed iteration time of the same iterations: the schedule-free throughput's inverse ratio
        rows.append(_row(base, "busy throughput", "tok/s (ratio: peer time / ours)", False,
                         pair["iteration_ms_b"].to_numpy(), pair["iteration_ms_a"].to_numpy()))
        rows[-1].update(ours=np.nan, ours_low=np.nan, ours_high=np.nan, peer_value=np.nan, peer_low=np.nan,
                        peer_high=np.nan)
    for kind, part in pair.groupby("kind_a"):
        for what in ("iteration_ms", "gpu_ms", "host_ms"):
            a, b = part[f"{what}_a"].to_numpy(float), part[f"{what}_b"].to_numpy(float)
            if np.isfinite(a).any() and np.isfinite(b).any():
                rows.append(_row(base, f"{kind} {what.removesuffix('_ms')} (median)", "ms", True, a, b, "median"))
    return rows


def e2e_iteration_kinds_table(iterations: pd.DataFrame) -> pd.DataFrame:
    """Per load point, backend and iteration kind: iterations (over repeats), median iteration / GPU / host /
    attention time (ms), mean launches per layer and how the iterations ran (graph modes)."""
    if iterations.empty:
        return pd.DataFrame(columns=[*_POINT, "backend", "kind", "iterations"])
    g = iterations.groupby([*_POINT, "backend", "kind"])
    out = pd.DataFrame({"iterations": g.size(), "iteration_ms_median": g["iteration_ms"].median(),
                        "gpu_ms_median": g["gpu_ms"].median(), "host_ms_median": g["host_ms"].median(),
                        "attention_ms_median": g["attention_ms"].median(),
                        "launches_per_layer": g["launches_per_layer"].mean(),
                        "graph": g["graph"].agg(_modes)})
    return out.reset_index()


def _modes(graph: pd.Series) -> str:
    """'full:12 piecewise:3': iterations per graph mode ('' where the file did not record it)."""
    counts = graph.dropna().astype(str)
    return " ".join(f"{k}:{v}" for k, v in sorted(counts[counts != ""].value_counts().items()))


def e2e_slo_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per e2e entry, trace and backend over its swept request rates (ok repeats): the highest rate whose mean
    SLO attainment reaches the target (the SLO named in the summary), and goodput and attainment there."""
    ok = _with_repeat(summary[(summary["status"] == "ok")].copy())
    if "slo_attainment" not in ok or ok.empty:
        return pd.DataFrame(columns=["e2e", "trace", "backend", "rates", "max_rate_within_slo"])
    ok = ok[pd.to_numeric(ok["rate"], errors="coerce").notna()].assign(rate_rps=lambda d: d["rate"].astype(float))
    rows = []
    for (e2e, trace, backend), part in ok.groupby(["e2e", "trace", "backend"]):
        target = _attainment_target(part["slo"].iloc[0] if "slo" in part else "")
        by_rate = part.groupby("rate_rps").agg(attainment=("slo_attainment", "mean"), goodput=("goodput_req_s", "mean"))
        held = by_rate[by_rate["attainment"] >= target]
        best = held.index.max() if len(held) else np.nan
        rows.append({"e2e": e2e, "trace": trace, "backend": backend, "slo": part["slo"].iloc[0] if "slo" in part
                     else "", "rates": " ".join(f"{r:g}" for r in by_rate.index),
                     "max_rate_within_slo": best,
                     "attainment_there": by_rate.loc[best, "attainment"] if len(held) else np.nan,
                     "goodput_there": by_rate.loc[best, "goodput"] if len(held) else np.nan})
    return pd.DataFrame(rows)


def _attainment_target(slo: str) -> float:
    found = re.search(r"attainment>=([0-9.]+)", str(slo))
    return float(found.group(1)) if found else 0.9
