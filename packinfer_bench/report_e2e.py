"""End-to-end reports: the paper's headline table (latency reduction and throughput gain of packinfer over each
baseline per model, trace and rate), the replays' summary, and the figures (end-to-end latency CDF, TTFT and
TPOT against request rate) from a run folder's e2e/ files. A gain only compares two `ok` replays of the same
schedule; skipped, failed and incorrect replays are listed, never folded in."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from packinfer_bench.serving.results import E2E_DIR, REQUESTS_FILE, SUMMARY_FILE

OURS = "packinfer"
_KEY = ["e2e", "model", "num_layers", "trace", "rate"]


def has_e2e(run: Path) -> bool:
    return (run / E2E_DIR / SUMMARY_FILE).is_file()


def load_e2e(run: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, requests) of a run's end-to-end replays (requests empty when none finished)."""
    summary = pd.read_csv(run / E2E_DIR / SUMMARY_FILE, keep_default_na=False, na_values=[""],
                          dtype={"rate": str, "reason": str})
    path = run / E2E_DIR / REQUESTS_FILE
    requests = pd.read_csv(path, dtype={"rate": str}) if path.is_file() else pd.DataFrame(
        columns=["e2e", "trace", "rate", "backend", "e2e_s", "ttft_s", "tpot_s"])
    return summary, requests


def e2e_summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Every replay: status, latency (mean, p50, p99 end to end; mean TTFT and TPOT), throughput, attention share."""
    cols = _KEY + ["backend", "status", "finished", "e2e_ms_mean", "e2e_ms_p50", "e2e_ms_p99", "ttft_ms_mean",
                   "tpot_ms_mean", "throughput_tok_s", "busy_tok_s", "attention_share", "max_rel_err", "reason"]
    return summary[[c for c in cols if c in summary]].sort_values(_KEY + ["backend"]).reset_index(drop=True)


def e2e_gains_table(summary: pd.DataFrame, ours: str = OURS) -> pd.DataFrame:
    """Per model, trace, rate and baseline (both replays ok): reduction of mean end-to-end latency, TTFT and TPOT
    (%, > 0: ours is faster) and gain in throughput and busy throughput (%, > 0: ours serves more)."""
    ok = summary[summary["status"] == "ok"]
    mine = ok[ok["backend"] == ours]
    others = ok[ok["backend"] != ours]
    pairs = mine.merge(others, on=_KEY, suffixes=("_ours", "_base"))
    out = pairs[_KEY].copy()
    out["baseline"] = pairs["backend_base"]
    for name in ("e2e_ms_mean", "ttft_ms_mean", "tpot_ms_mean"):
        out[name.replace("_ms_mean", "_reduction_pct")] = 100 * (1 - pairs[f"{name}_ours"] / pairs[f"{name}_base"])
    for name in ("throughput_tok_s", "busy_tok_s"):
        out[name.replace("_tok_s", "_gain_pct")] = 100 * (pairs[f"{name}_ours"] / pairs[f"{name}_base"] - 1)
    return out.sort_values(_KEY + ["baseline"]).reset_index(drop=True)


def latency_cdf(requests: pd.DataFrame) -> plt.Figure:
    """Per trace and rate: the CDF of end-to-end request latency, one line per backend."""
    def order(panel):
        trace, rate = panel
        return trace, float(rate) if rate != "trace" else float("inf")

    panels = sorted(requests.groupby(["trace", "rate"]).groups, key=order) if len(requests) else []
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 2.8), squeeze=False)
    for ax, (trace, rate) in zip(axes[0], panels):
        sub = requests[(requests["trace"] == trace) & (requests["rate"] == rate)]
        for backend, part in sub.groupby("backend"):
            x = np.sort(part["e2e_s"].to_numpy())
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=backend)
        ax.set_title(f"{trace}, {rate} req/s" if rate != "trace" else f"{trace}, trace arrivals")
        ax.set_xlabel("end-to-end latency (s)")
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def latency_vs_rate(summary: pd.DataFrame) -> plt.Figure:
    """Mean TTFT and TPOT against the request rate, per trace, one line per backend (ok replays at Poisson
    rates)."""
    ok = summary[(summary["status"] == "ok") & (summary["rate"] != "trace")].copy()
    ok["rate_rps"] = ok["rate"].astype(float)
    traces = sorted(ok["trace"].unique())
    fig, axes = plt.subplots(2, max(len(traces), 1), figsize=(3.2 * max(len(traces), 1), 5.0), squeeze=False)
    for col, trace in enumerate(traces):
        for backend, part in ok[ok["trace"] == trace].sort_values("rate_rps").groupby("backend"):
            axes[0][col].plot(part["rate_rps"], part["ttft_ms_mean"], marker="o", label=backend)
            axes[1][col].plot(part["rate_rps"], part["tpot_ms_mean"], marker="o", label=backend)
        axes[0][col].set_title(trace)
        axes[1][col].set_xlabel("request rate (req/s)")
    axes[0][0].set_ylabel("mean TTFT (ms)")
    axes[1][0].set_ylabel("mean TPOT (ms)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def e2e_figures(summary: pd.DataFrame, requests: pd.DataFrame) -> dict[str, plt.Figure]:
    ok = summary[summary["status"] == "ok"][["e2e", "trace", "rate", "backend"]]
    finished = requests.merge(ok.astype({"rate": str}), on=["e2e", "trace", "rate", "backend"]) if len(requests) \
        else requests
    return {"e2e_latency_cdf": latency_cdf(finished), "e2e_latency_vs_rate": latency_vs_rate(summary)}
