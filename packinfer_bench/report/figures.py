"""The report's figures. Kernel level (from the records, report.tables.load_records): speed-up against length
heterogeneity, per-batch time CDFs, achieved throughput against the GPU's ceilings, ablation bars and plan cost
against batch size. End to end (report.e2e_tables): the latency CDF, latency and goodput against request rate with
confidence bands, TTFT and inter-token latency CDFs, and per-iteration-kind GPU / host time bars. Each function returns a matplotlib Figure; save_figures writes them. The same functions serve the report
command and notebooks/paper_figures.ipynb.

A backend has one colour in every figure and panel (COLOURS); the variants of one backend drawn side by side
differ by line style.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import pandas as pd
import yaml
from matplotlib.colors import to_rgba

from packinfer_bench.report.tables import (OURS_BACKEND, OURS_SYSTEM, WORKLOAD_COLUMNS, ablation_table,
                                           load_workload, paired_speedups)
from packinfer_bench.run_folder import CONFIG_FILE
from packinfer_bench.stats import bootstrap

if TYPE_CHECKING:
    from matplotlib.figure import Figure

matplotlib.use("Agg")  # files only; a notebook shows the returned figures itself (after %matplotlib inline)

FIGURE_FORMATS = ("png", "pdf")
#: The baselines drawn against packinfer (when the run has them).
BASELINES = ("fa2:varlen", "flashinfer:fa2", "flashinfer:fa3", "flashinfer:decode", "triton_unpacked:fa2-grid")
#: One colour per backend, the same in every figure and panel.
COLOURS = {OURS_BACKEND: "tab:red", "fa2": "tab:blue", "fa3": "tab:cyan", "flashinfer": "tab:green",
           "flex": "tab:purple", "sdpa_padded": "tab:brown", "triton_unpacked": "tab:orange",
           "reference": "tab:gray"}
#: Colours for a backend not in COLOURS (picked by its name, so the same one every time).
_SPARE_COLOURS = ("tab:pink", "tab:olive", "black", "gold", "navy", "teal")
#: Line styles of the variants of one backend drawn in one panel (any other variant: solid).
_VARIANT_STYLES = {"fa3": "--", "decode": ":", "cascade": "-."}
_PHASE_MARK = {"prefill": "o", "mixed": "s", "decode": "^"}
#: Shades of one colour for the phases in a bar chart of one backend.
_PHASE_ALPHA = {"prefill": 1.0, "mixed": 0.6, "decode": 0.3}


def _pyplot():
    """matplotlib.pyplot, imported on first use (it is slow to import; most commands draw nothing)."""
    import matplotlib.pyplot as plt

    return plt


def colour(system: str) -> str:
    """The colour of a backend, or of a system (backend:variant) by its backend."""
    backend = system.split(":", 1)[0]
    if backend in COLOURS:
        return COLOURS[backend]
    return _SPARE_COLOURS[zlib.crc32(backend.encode()) % len(_SPARE_COLOURS)]


def line_style(system: str) -> str:
    """The line style of a system (backend:variant) by its variant."""
    return _VARIANT_STYLES.get(system.split(":", 1)[1] if ":" in system else "", "-")


def _style() -> None:
    matplotlib.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 120,
                                "savefig.bbox": "tight"})


# -- kernel level -------------------------------------------------------------------------------------------------

def speedup_vs_heterogeneity(df: pd.DataFrame, workload: pd.DataFrame) -> Figure:
    """Speed-up of packinfer:full over each baseline per batch against the batch's KV-length coefficient of
    variation (from the run's workload.csv): does packing pay more as lengths spread?"""
    plt = _pyplot()
    _style()
    pairs = paired_speedups(df, OURS_SYSTEM).merge(workload[list(WORKLOAD_COLUMNS)], on="batch_id")
    systems = [s for s in BASELINES if s in set(pairs["system"])]
    fig, axes = plt.subplots(1, max(len(systems), 1), figsize=(3.2 * max(len(systems), 1), 3.0), sharey=False,
                             squeeze=False)
    for ax, system in zip(axes[0], systems):
        sub = pairs[pairs["system"] == system]
        for phase, part in sub.groupby("phase"):
            ax.scatter(part["kv_len_cv"], part["speedup"], s=14, marker=_PHASE_MARK.get(phase, "o"),
                       color=colour(system), label=phase)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"vs {system}")
        ax.set_xlabel("KV length CV of the batch")
    axes[0][0].set_ylabel("speed-up of packinfer (x)")
    axes[0][0].legend(fontsize=7)
    return fig


def latency_cdf(df: pd.DataFrame) -> Figure:
    """Per phase, the CDF of per-batch kernel time for packinfer and each baseline (ok records only)."""
    plt = _pyplot()
    _style()
    ok = df[(df["status"] == "ok") & df["system"].isin((OURS_SYSTEM, *BASELINES))]
    phases = [p for p in ("prefill", "mixed", "decode") if p in set(ok["phase"])]
    fig, axes = plt.subplots(1, max(len(phases), 1), figsize=(3.4 * max(len(phases), 1), 3.0), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for system, part in ok[ok["phase"] == phase].groupby("system"):
            t = np.sort(part["kernel_ms"].to_numpy(float))
            ax.step(t, np.arange(1, len(t) + 1) / len(t), where="post", label=system, color=colour(system),
                    ls=line_style(system), lw=2.0 if system == OURS_SYSTEM else 1.0)
        ax.set_xscale("log")
        ax.set_title(phase)
        ax.set_xlabel("kernel time per batch (ms)")
    axes[0][0].set_ylabel("fraction of batches")
    axes[0][-1].legend(fontsize=6)
    return fig


def roofline(df: pd.DataFrame, gpu: dict | None) -> Figure:
    """Achieved TFLOP/s (prefill and mixed) and KV TB/s (decode) per system, against the GPU's peak from the
    run's config (drawn when given)."""
    plt = _pyplot()
    _style()
    ok = df[(df["status"] == "ok") & df["system"].isin((OURS_SYSTEM, *BASELINES))]
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    for ax, phases, col, peak_key, label in (
            (axes[0], ("prefill", "mixed"), "tflops", "bf16_tflops", "TFLOP/s (causal FLOPs / time)"),
            (axes[1], ("decode",), "kv_tbps", "hbm_tbps", "TB/s (KV bytes / time)")):
        part = ok[ok["phase"].isin(phases)]
        systems = sorted(set(part["system"]))
        data = [part[part["system"] == s][col].to_numpy(float) for s in systems]
        if data:
            boxes = ax.boxplot(data, showfliers=False, patch_artist=True, medianprops={"color": "k"})
            for box, system in zip(boxes["boxes"], systems):
                box.set_facecolor(to_rgba(colour(system), 0.5))
                box.set_edgecolor(colour(system))
            ax.set_xticks(range(1, len(systems) + 1), systems, rotation=30, ha="right", fontsize=7)
        peak = (gpu or {}).get(peak_key)
        if peak:
            ax.axhline(peak, color="r", ls="--", lw=1, label=f"{(gpu or {}).get('name', 'GPU')} peak {peak} (config)")
            ax.legend(fontsize=7)
        ax.set_ylabel(label)
        ax.set_title(" + ".join(phases))
    return fig


def ablation_bars(df: pd.DataFrame) -> Figure:
    """Geomean slow-down with one packinfer feature off, per phase (> 1: the feature helps)."""
    plt = _pyplot()
    _style()
    table = ablation_table(df)
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    if len(table):
        pivot = table.pivot(index="system", columns="phase", values="slowdown_geomean")
        pivot.index = [s.split(":", 1)[1] for s in pivot.index]
        shades = [to_rgba(colour(OURS_BACKEND), _PHASE_ALPHA.get(p, 0.8)) for p in pivot.columns]
        pivot.plot.bar(ax=ax, rot=30, color=shades, edgecolor=colour(OURS_BACKEND))
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("time / full packinfer (geomean)")
    ax.set_title("ablation")
    return fig


def plan_cost(df: pd.DataFrame) -> Figure:
    """packinfer's plan cost (CPU, once per batch) against batch size, per phase."""
    plt = _pyplot()
    _style()
    ours = df[(df["status"] == "ok") & (df["system"] == OURS_SYSTEM)].dropna(subset=["plan_ms"])
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    if ours.empty:
        ax.text(0.5, 0.5, "no plan times recorded", ha="center", transform=ax.transAxes)
        return fig
    for phase, part in ours.groupby("phase"):
        ax.scatter(part["batch_size"], part["plan_ms"], s=14, marker=_PHASE_MARK.get(phase, "o"),
                   color=colour(OURS_SYSTEM), label=phase)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in the batch")
    ax.set_ylabel("plan time (ms, CPU)")
    ax.legend(fontsize=7)
    return fig


def run_gpu(run: Path) -> dict | None:
    """The `gpu` section of the run's config.yaml (name, sms, peaks), if any."""
    path = run / CONFIG_FILE
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("gpu") if path.is_file() else None


def all_figures(df: pd.DataFrame, run: Path) -> dict[str, Figure]:
    """Every kernel figure the run's files allow, by name (speed-up vs heterogeneity needs workload.csv)."""
    figs = {"latency_cdf": latency_cdf(df), "roofline": roofline(df, run_gpu(run)), "ablation": ablation_bars(df),
            "plan_cost": plan_cost(df)}
    workload = load_workload(run)
    if workload is not None:
        figs["speedup_vs_cv"] = speedup_vs_heterogeneity(df, workload)
    return figs


# -- end to end ---------------------------------------------------------------------------------------------------

def e2e_latency_cdf(requests: pd.DataFrame) -> Figure:
    """Per trace and rate: the CDF of end-to-end request latency, one line per backend."""
    plt = _pyplot()
    panels = sorted(requests.groupby(["trace", "rate"]).groups, key=_panel_order) if len(requests) else []
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 2.8), squeeze=False)
    for ax, (trace, rate) in zip(axes[0], panels):
        sub = requests[(requests["trace"] == trace) & (requests["rate"] == rate)]
        for backend, part in sub.groupby("backend"):
            x = np.sort(part["e2e_s"].to_numpy())
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=backend, color=colour(backend))
        ax.set_title(_panel_title(trace, rate))
        ax.set_xlabel("end-to-end latency (s)")
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _rate_panels(summary: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    ok = summary[(summary["status"] == "ok") & pd.to_numeric(summary["rate"], errors="coerce").notna()].copy()
    ok["rate_rps"] = ok["rate"].astype(float)
    return ok, sorted(ok["trace"].unique())


def e2e_latency_vs_rate(summary: pd.DataFrame, requests: pd.DataFrame | None = None) -> Figure:
    """Per trace against the request rate: mean end-to-end latency with its 95% bootstrap band (over requests,
    repeats pooled), mean TTFT and TPOT, and goodput (requests/s within the SLO; band over repeats); one colour
    per backend."""
    plt = _pyplot()
    ok, traces = _rate_panels(summary)
    rows = ("e2e_ms_mean", "ttft_ms_mean", "tpot_ms_mean", "goodput_req_s")
    labels = ("mean e2e latency (ms)", "mean TTFT (ms)", "mean TPOT (ms)", "goodput (req/s)")
    fig, axes = plt.subplots(len(rows), max(len(traces), 1), figsize=(3.2 * max(len(traces), 1), 9.0),
                             squeeze=False, sharex="col")
    for col, trace in enumerate(traces):
        for backend, part in ok[ok["trace"] == trace].groupby("backend"):
            for row, metric in enumerate(rows):
                if metric not in part or part[metric].isna().all():
                    continue
                band = [_band(part, requests, metric, rate) for rate in sorted(part["rate_rps"].unique())]
                x = [b[0] for b in band]
                axes[row][col].plot(x, [b[1] for b in band], marker="o", ms=3, label=backend, color=colour(backend))
                axes[row][col].fill_between(x, [b[2] for b in band], [b[3] for b in band], color=colour(backend),
                                            alpha=0.2, lw=0)
        axes[0][col].set_title(trace)
        axes[-1][col].set_xlabel("request rate (req/s)")
    for row, label in enumerate(labels):
        axes[row][0].set_ylabel(label)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _band(part: pd.DataFrame, requests: pd.DataFrame | None, metric: str, rate: float):
    """(rate, mean, low, high) of a metric at one rate: the latency mean over the requests of every repeat when
    they are at hand, else the metric's mean over repeats."""
    at = part[part["rate_rps"] == rate]
    column = {"e2e_ms_mean": "e2e_s", "ttft_ms_mean": "ttft_s", "tpot_ms_mean": "tpot_s"}.get(metric)
    if column and requests is not None and len(requests) and column in requests:
        sub = requests[(requests["trace"] == at["trace"].iloc[0]) & (requests["backend"] == at["backend"].iloc[0])
                       & (pd.to_numeric(requests["rate"], errors="coerce") == rate)]
        if len(sub):
            ci = bootstrap(sub[column].to_numpy(float) * 1e3)
            return rate, ci.value, ci.low, ci.high
    ci = bootstrap(at[metric].to_numpy(float))
    return rate, ci.value, ci.low, ci.high


def e2e_ttft_itl_cdf(summary: pd.DataFrame, requests: pd.DataFrame) -> Figure:
    """Per trace and load point: the CDF of TTFT over requests (repeats pooled) and of the inter-token latency
    (every gap between two tokens; from each replay's stored ITL quantiles, repeats averaged); one colour per
    backend."""
    plt = _pyplot()
    points = sorted(summary[summary["status"] == "ok"].groupby(["trace", "rate"]).groups, key=_panel_order)
    n = max(len(points), 1)
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 5.2), squeeze=False)
    for col, (trace, rate) in enumerate(points):
        sub = requests[(requests["trace"] == trace) & (requests["rate"] == rate)] if len(requests) else requests
        for backend, part in sub.groupby("backend") if len(sub) else ():
            x = np.sort(part["ttft_s"].to_numpy(float) * 1e3)
            axes[0][col].plot(x, np.arange(1, len(x) + 1) / len(x), label=backend, color=colour(backend))
        rows = summary[(summary["status"] == "ok") & (summary["trace"] == trace) & (summary["rate"] == rate)]
        for backend, part in rows.groupby("backend"):
            q = [np.array(v.split(), float) for v in part.get("itl_ms_quantiles", pd.Series(dtype=str)).dropna()
                 if isinstance(v, str) and v.strip()]
            if q:
                values = np.mean(q, axis=0)
                axes[1][col].plot(values, np.linspace(0, 1, len(values)), label=backend, color=colour(backend))
        axes[0][col].set_title(_panel_title(trace, rate))
        axes[0][col].set_xlabel("TTFT (ms)")
        axes[1][col].set_xlabel("inter-token latency (ms)")
        axes[1][col].set_xscale("log")
    axes[0][0].set_ylabel("fraction of requests")
    axes[1][0].set_ylabel("fraction of token gaps")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def e2e_iteration_kinds(iterations: pd.DataFrame) -> Figure:
    """Per trace and load point, per iteration kind: median GPU time and host time of an iteration per backend
    (bars: GPU solid, host hatched); one colour per backend."""
    plt = _pyplot()
    if iterations is None or iterations.empty:
        fig, ax = plt.subplots(figsize=(3.2, 2.8))
        ax.set_title("no iterations recorded")
        return fig
    points = sorted(iterations.groupby(["trace", "rate"]).groups, key=_panel_order)
    fig, axes = plt.subplots(1, len(points), figsize=(3.6 * len(points), 3.0), squeeze=False)
    for ax, (trace, rate) in zip(axes[0], points):
        sub = iterations[(iterations["trace"] == trace) & (iterations["rate"] == rate)]
        kinds = [k for k in ("decode", "mixed", "prefill") if k in set(sub["kind"])]
        backends = sorted(sub["backend"].unique(), key=lambda b: (b != OURS_BACKEND, b))
        width = 0.8 / max(len(backends), 1)
        for j, backend in enumerate(backends):
            part = sub[sub["backend"] == backend].groupby("kind")
            gpu = [part["gpu_ms"].median().get(k, np.nan) for k in kinds]
            host = [part["host_ms"].median().get(k, np.nan) for k in kinds]
            x = np.arange(len(kinds)) + j * width
            ax.bar(x, gpu, width, color=colour(backend), label=backend)
            ax.bar(x, host, width * 0.45, color="none", edgecolor=colour(backend), hatch="//")
        ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
        ax.set_title(_panel_title(trace, rate))
        ax.set_ylabel("median ms per iteration")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _panel_order(panel):
    trace, rate = panel
    try:
        return trace, float(rate)
    except ValueError:
        return trace, float("inf")


def _panel_title(trace: str, rate: str) -> str:
    if rate == "trace":
        return f"{trace}, trace arrivals"
    if str(rate).startswith("c"):
        return f"{trace}, {rate[1:]} in flight"
    return f"{trace}, {rate} req/s"


def e2e_figures(summary: pd.DataFrame, requests: pd.DataFrame,
                iterations: pd.DataFrame | None = None) -> dict[str, Figure]:
    """The end-to-end figures by name (request CDFs over the requests of ok replays only)."""
    ok = summary[summary["status"] == "ok"][["e2e", "trace", "rate", "backend"]].drop_duplicates()
    finished = requests.merge(ok.astype({"rate": str}), on=["e2e", "trace", "rate", "backend"]) if len(requests) \
        else requests
    figs = {"e2e_latency_cdf": e2e_latency_cdf(finished), "e2e_latency_vs_rate": e2e_latency_vs_rate(summary, finished),
            "e2e_ttft_itl_cdf": e2e_ttft_itl_cdf(summary, finished)}
    if iterations is not None:
        figs["e2e_iteration_kinds"] = e2e_iteration_kinds(iterations)
    return figs


# -- files --------------------------------------------------------------------------------------------------------

def write_figures(df: pd.DataFrame, run: Path, out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Save every kernel figure under out/figures in each format; returns the paths."""
    return save_figures(all_figures(df, run), out, formats)


def save_figures(figs: dict[str, Figure], out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Save figures by name under out/figures in each format (and close them); returns the paths."""
    plt = _pyplot()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        for fmt in formats:
            path = out / "figures" / f"{name}.{fmt}"
            fig.savefig(path)
            paths.append(path)
        plt.close(fig)
    return paths
