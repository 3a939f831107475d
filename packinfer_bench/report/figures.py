"""The report's figures. Kernel level (from the records, report.tables.load_records): speed-up against length
heterogeneity, per-batch time CDFs, a roofline (arithmetic intensity against achieved FLOP/s under the GPU's
memory and compute ceilings), ablation bars and plan cost against batch size. End to end (report.e2e_tables):
the latency CDF, latency and goodput against request rate with confidence intervals, TTFT and inter-token
latency CDFs, and per-iteration-kind GPU / host time bars. Each function returns a matplotlib Figure;
save_figures writes them. The same functions serve the report command and notebooks/paper_figures.ipynb.

A backend has one colour in every figure and panel (COLOURS, fixed: it does not depend on which backends a run
has); the variants of one backend differ by line style (lines) or by shade (points and bars). Panels that
compare one quantity share its axis.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import pandas as pd
import yaml
from matplotlib.colors import to_rgba

from packinfer_bench.report.tables import (
    OURS_BACKEND,
    OURS_SYSTEM,
    WORKLOAD_COLUMNS,
    ablation_table,
    load_workload,
    paired_speedups,
)
from packinfer_bench.run_folder import CONFIG_FILE, ENV_FILE
from packinfer_bench.stats import bootstrap

if TYPE_CHECKING:
    from matplotlib.figure import Figure

matplotlib.use("Agg")  # files only; the notebook renders the returned figures to PNG itself

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
_VARIANT_STYLES = {"fa3": "--", "decode": ":", "cascade": "-.", "serving-fa2": "--"}
#: Variants drawn in their backend's own colour; any other variant is a lighter shade of it (by its name).
_MAIN_VARIANTS = ("full", "varlen", "fa2", "auto", "fa2-grid", "serving", "doc-mask")
_PHASE_MARK = {"prefill": "o", "mixed": "s", "decode": "^", "serving": "D"}
#: Shades of one colour for the phases in a bar chart of one backend.
_PHASE_ALPHA = {"prefill": 1.0, "mixed": 0.6, "decode": 0.3, "serving": 0.8}


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


def shade(system: str) -> tuple[float, float, float, float]:
    """The backend's colour for its main variants, a lighter shade of it (fixed by the variant's name) for
    the others, so variants drawn as points or bars stay apart yet read as one backend."""
    variant = system.split(":", 1)[1] if ":" in system else ""
    r, g, b, _ = to_rgba(colour(system))
    if not variant or variant in _MAIN_VARIANTS:
        return r, g, b, 1.0
    mix = 0.3 + 0.3 * (zlib.crc32(variant.encode()) % 3) / 2  # 0.3, 0.45 or 0.6 of white
    return r + (1 - r) * mix, g + (1 - g) * mix, b + (1 - b) * mix, 1.0


def line_style(system: str) -> str:
    """The line style of a system (backend:variant) by its variant."""
    return _VARIANT_STYLES.get(system.split(":", 1)[1] if ":" in system else "", "-")


def _style() -> None:
    matplotlib.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100,
                                "savefig.dpi": 100, "savefig.bbox": "tight"})


def _figure_legend(fig: Figure, axes, **kwargs) -> None:
    """One legend for the whole figure, right of the panels, naming every labelled artist of any panel once
    (a per-panel legend would list only that panel's systems)."""
    handles: dict[str, object] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   fontsize=7, frameon=False, **kwargs)


def _compared(df: pd.DataFrame) -> pd.DataFrame:
    """The ok records of packinfer:full and of every other backend (packinfer's ablations left out)."""
    ok = df[df["status"] == "ok"]
    return ok[(ok["system"] == OURS_SYSTEM) | ~ok["system"].str.startswith(OURS_BACKEND + ":")]


def _system_order(systems) -> list[str]:
    """packinfer first, then the others by name."""
    return sorted(set(systems), key=lambda s: (s not in (OURS_SYSTEM, OURS_BACKEND), s))


# -- kernel level -------------------------------------------------------------------------------------------------

def speedup_vs_heterogeneity(df: pd.DataFrame, workload: pd.DataFrame) -> Figure:
    """Speed-up of packinfer:full over each baseline per batch against the batch's KV-length coefficient of
    variation (from the run's workload.csv): does packing pay more as lengths spread? One log scale for all
    panels."""
    plt = _pyplot()
    _style()
    pairs = paired_speedups(df, OURS_SYSTEM).merge(workload[list(WORKLOAD_COLUMNS)], on="batch_id")
    present = set(pairs["system"])
    systems = [s for s in BASELINES if s in present] or _system_order(
        s for s in present if not s.startswith(OURS_BACKEND + ":"))
    n = max(len(systems), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), sharex=True, sharey=True, squeeze=False)
    for ax, system in zip(axes[0], systems):
        sub = pairs[pairs["system"] == system]
        for phase, part in sub.groupby("phase"):
            ax.scatter(part["kv_len_cv"], part["speedup"], s=12, marker=_PHASE_MARK.get(phase, "o"),
                       color=colour(system), label=phase)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"vs {system}")
        ax.set_xlabel("KV length CV of the batch")
    axes[0][0].set_ylabel("speed-up of packinfer (x)")
    if systems:
        axes[0][0].legend(fontsize=7)
    return fig


def latency_cdf(df: pd.DataFrame) -> Figure:
    """Per phase, the CDF of per-batch kernel time for packinfer and each other backend (ok records only);
    one legend for all panels."""
    plt = _pyplot()
    _style()
    ok = _compared(df)
    phases = [p for p in ("prefill", "mixed", "decode", "serving") if p in set(ok["phase"])]
    n = max(len(phases), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 2.8), sharey=True, squeeze=False)
    for ax, phase in zip(axes[0], phases):
        part_of = ok[ok["phase"] == phase]
        for system in _system_order(part_of["system"]):
            t = np.sort(part_of.loc[part_of["system"] == system, "kernel_ms"].to_numpy(float))
            ax.step(t, np.arange(1, len(t) + 1) / len(t), where="post", label=system, color=colour(system),
                    ls=line_style(system), lw=2.0 if system == OURS_SYSTEM else 1.0)
        ax.set_xscale("log")
        ax.set_title(phase)
        ax.set_xlabel("kernel time per batch (ms)")
    axes[0][0].set_ylabel("fraction of batches")
    fig.tight_layout()
    _figure_legend(fig, axes)
    return fig


@dataclass(frozen=True)
class Ceilings:
    """A GPU's roofline ceilings: dense bf16 peak (TFLOP/s) and memory bandwidth (TB/s), and where they come
    from (the run's config, or KNOWN_GPUS for the GPU env.json names)."""

    name: str
    peak_tflops: float
    hbm_tbps: float
    source: str

    @property
    def ridge(self) -> float:
        """The arithmetic intensity (FLOP/byte) where the memory ceiling meets the compute ceiling."""
        return self.peak_tflops / self.hbm_tbps


#: Data-sheet ceilings of the GPUs this project ran on, matched by every word in the GPU's name (first match
#: wins): dense bf16 tensor-core TFLOP/s (no sparsity) and HBM TB/s.
KNOWN_GPUS = (
    (("h200",), 989.0, 4.8),
    (("h100", "pcie"), 756.0, 2.0),
    (("h100",), 989.0, 3.35),  # SXM5, HBM3
    (("a100", "80gb"), 312.0, 2.039),  # SXM4
    (("a100",), 312.0, 1.555),  # 40 GB
)


def known_ceilings(name: str) -> Ceilings | None:
    """KNOWN_GPUS's ceilings for a GPU name (as torch reports it), or None."""
    lowered = name.lower()
    for words, tflops, tbps in KNOWN_GPUS:
        if all(w in lowered for w in words):
            return Ceilings(name, tflops, tbps, "data sheet")
    return None


def run_gpu(run: Path) -> dict | None:
    """The `gpu` section of the run's config.yaml (name, sms, peaks), if any."""
    path = run / CONFIG_FILE
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("gpu") if path.is_file() else None


def gpu_ceilings(run: Path, df: pd.DataFrame | None = None) -> Ceilings | str:
    """The roofline ceilings of the GPU a run measured, or why there are none. The GPU is the one env.json
    records; its peaks are the config's `gpu` section when that names the same GPU (or env.json names none),
    else the data sheet's (KNOWN_GPUS). A run on the CPU (env.json records no GPU, or every timing is
    wall-clock-cpu) has no roofline."""
    env_path = run / ENV_FILE
    env = json.loads(env_path.read_text(encoding="utf-8")) if env_path.is_file() else None
    cpu_timing = df is not None and len(df) and "timing" in df and (df["timing"] == "wall-clock-cpu").all()
    if (env is not None and not env.get("gpu")) or cpu_timing:
        return "no roofline: a CPU run (interpreter timings are not performance figures)"
    name = ((env or {}).get("gpu") or {}).get("name")
    config = run_gpu(run) or {}
    if config.get("bf16_tflops") and config.get("hbm_tbps") and (name is None or config.get("name") == name):
        return Ceilings(config.get("name") or "GPU", float(config["bf16_tflops"]), float(config["hbm_tbps"]),
                        "config")
    known = known_ceilings(name) if name else None
    if known is not None:
        return known
    return (f"no roofline: no peak figures for {name or 'this GPU'}; give gpu.bf16_tflops and gpu.hbm_tbps "
            "in the config")


def roofline(df: pd.DataFrame, ceilings: Ceilings | str) -> Figure:
    """The roofline: per batch, arithmetic intensity (causal FLOPs per K/V byte read once) against achieved
    FLOP/s, one colour per backend (shades for its variants), one marker per phase, the median of each
    (system, phase) drawn large; under the memory ceiling (bandwidth x intensity) and the compute ceiling
    (dense bf16 peak). `ceilings` a string: why there is none, said in the figure instead."""
    plt = _pyplot()
    _style()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    if isinstance(ceilings, str):
        ax.set_axis_off()
        ax.text(0.5, 0.5, ceilings, ha="center", va="center", wrap=True, transform=ax.transAxes)
        return fig
    ok = _compared(df).dropna(subset=["tflops", "kv_tbps"])
    ok = ok[(ok["tflops"] > 0) & (ok["kv_tbps"] > 0)]
    intensity = ok["tflops"] / ok["kv_tbps"]  # FLOP/s over byte/s of one timed call: FLOP per byte
    lo = min(float(intensity.min()) if len(ok) else ceilings.ridge, ceilings.ridge) / 4
    hi = max(float(intensity.max()) if len(ok) else ceilings.ridge, ceilings.ridge) * 4
    x = np.geomspace(lo, hi, 200)
    ax.plot(x, np.minimum(ceilings.hbm_tbps * 1e12 * x, ceilings.peak_tflops * 1e12), color="k", lw=1.2)
    at = np.sqrt(lo * ceilings.ridge)  # halfway up the memory ceiling (log scale), written above it
    ax.text(at, ceilings.hbm_tbps * 1e12 * at * 2.5, f"memory: {ceilings.hbm_tbps:g} TB/s", fontsize=7,
            ha="right")
    ax.text(hi / 1.2, ceilings.peak_tflops * 1e12 * 1.15, f"compute: {ceilings.peak_tflops:g} TFLOP/s bf16",
            fontsize=7, ha="right")
    for system in _system_order(ok["system"]):
        for phase in (p for p in _PHASE_MARK if p in set(ok.loc[ok["system"] == system, "phase"])):
            sel = (ok["system"] == system) & (ok["phase"] == phase)
            marker = _PHASE_MARK[phase]
            ax.scatter(intensity[sel], ok.loc[sel, "tflops"] * 1e12, s=6, marker=marker, color=shade(system),
                       alpha=0.25, lw=0)
            ax.scatter([intensity[sel].median()], [ok.loc[sel, "tflops"].median() * 1e12], s=40, marker=marker,
                       color=shade(system), edgecolors="k", linewidths=0.6, zorder=3)
    for system in _system_order(ok["system"]):
        ax.scatter([], [], marker="o", color=shade(system), label=system)
    for phase in (p for p in _PHASE_MARK if p in set(ok["phase"])):
        ax.scatter([], [], marker=_PHASE_MARK[phase], color="0.5", label=phase)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (causal FLOPs per K/V byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(f"{ceilings.name} (ceilings: {ceilings.source}); large marks: medians", fontsize=8)
    fig.tight_layout()
    _figure_legend(fig, [ax])
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


def all_figures(df: pd.DataFrame, run: Path) -> dict[str, Figure]:
    """Every kernel figure the run's files allow, by name (speed-up vs heterogeneity needs workload.csv)."""
    figs = {"latency_cdf": latency_cdf(df), "roofline": roofline(df, gpu_ceilings(run, df)),
            "ablation": ablation_bars(df), "plan_cost": plan_cost(df)}
    workload = load_workload(run)
    if workload is not None:
        figs["speedup_vs_cv"] = speedup_vs_heterogeneity(df, workload)
    return figs


# -- end to end ---------------------------------------------------------------------------------------------------

def e2e_latency_cdf(requests: pd.DataFrame) -> Figure:
    """Per trace and rate: the CDF of end-to-end request latency, one line per backend; the panels share both
    axes, so load points compare at a glance."""
    plt = _pyplot()
    _style()
    panels = sorted(requests.groupby(["trace", "rate"]).groups, key=_panel_order) if len(requests) else []
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n, 2.6), sharex=True, sharey=True, squeeze=False)
    for ax, (trace, rate) in zip(axes[0], panels):
        sub = requests[(requests["trace"] == trace) & (requests["rate"] == rate)]
        for backend in _system_order(sub["backend"]):
            x = np.sort(sub.loc[sub["backend"] == backend, "e2e_s"].to_numpy(float))
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=backend, color=colour(backend),
                    lw=2.0 if backend == OURS_BACKEND else 1.2)
        ax.set_title(_panel_title(trace, rate))
        ax.set_xlabel("end-to-end latency (s)")
    axes[0][0].set_ylabel("fraction of requests")
    fig.tight_layout()
    _figure_legend(fig, axes)
    return fig


def _rate_panels(summary: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    ok = summary[(summary["status"] == "ok") & pd.to_numeric(summary["rate"], errors="coerce").notna()].copy()
    ok["rate_rps"] = ok["rate"].astype(float)
    return ok, sorted(ok["trace"].unique())


def e2e_latency_vs_rate(summary: pd.DataFrame, requests: pd.DataFrame | None = None) -> Figure:
    """Per trace against the request rate: mean end-to-end latency, mean TTFT and TPOT with 95% bootstrap
    intervals (over requests, repeats pooled) and goodput (requests/s within the SLO; interval over repeats);
    a marker on every measured rate, an error bar where the interval has width; one colour per backend. Each
    row shares its metric's axis across traces."""
    plt = _pyplot()
    _style()
    ok, traces = _rate_panels(summary)
    rows = ("e2e_ms_mean", "ttft_ms_mean", "tpot_ms_mean", "goodput_req_s")
    labels = ("mean e2e latency (ms)", "mean TTFT (ms)", "mean TPOT (ms)", "goodput (req/s)")
    n = max(len(traces), 1)
    fig, axes = plt.subplots(len(rows), n, figsize=(3.0 * n, 8.0), squeeze=False, sharex="col", sharey="row")
    for col, trace in enumerate(traces):
        of_trace = ok[ok["trace"] == trace]
        for backend in _system_order(of_trace["backend"]):
            part = of_trace[of_trace["backend"] == backend]
            for row, metric in enumerate(rows):
                if metric not in part or part[metric].isna().all():
                    continue
                band = np.array([_band(part, requests, metric, rate) for rate in sorted(part["rate_rps"].unique())],
                                dtype=float)
                x, y, low, high = band.T
                ax = axes[row][col]
                ax.fill_between(x, low, high, color=colour(backend), alpha=0.15, lw=0)
                ax.errorbar(x, y, yerr=[np.clip(y - low, 0, None), np.clip(high - y, 0, None)], marker="o", ms=4,
                            capsize=2, lw=2.0 if backend == OURS_BACKEND else 1.2, label=backend,
                            color=colour(backend))
        axes[0][col].set_title(trace)
        axes[-1][col].set_xlabel("request rate (req/s)")
    for row, label in enumerate(labels):
        axes[row][0].set_ylabel(label)
    fig.tight_layout()
    _figure_legend(fig, axes)
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
    backend; each row shares its axes across load points."""
    plt = _pyplot()
    _style()
    points = sorted(summary[summary["status"] == "ok"].groupby(["trace", "rate"]).groups, key=_panel_order)
    n = max(len(points), 1)
    fig, axes = plt.subplots(2, n, figsize=(2.8 * n, 5.0), squeeze=False, sharex="row", sharey="row")
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
        if not axes[1][col].get_lines():
            axes[1][col].text(0.5, 0.5, "no ITL quantiles recorded", ha="center", transform=axes[1][col].transAxes)
        axes[0][col].set_title(_panel_title(trace, rate))
        axes[0][col].set_xlabel("TTFT (ms)")
        axes[1][col].set_xlabel("inter-token latency (ms)")
        axes[1][col].set_xscale("log")
    axes[0][0].set_ylabel("fraction of requests")
    axes[1][0].set_ylabel("fraction of token gaps")
    fig.tight_layout()
    _figure_legend(fig, axes)
    return fig


def e2e_iteration_kinds(iterations: pd.DataFrame) -> Figure:
    """Per trace and load point, per iteration kind: median GPU time and host time of an iteration per backend
    (bars: GPU solid, host hatched); one colour per backend."""
    plt = _pyplot()
    _style()
    if iterations is None or iterations.empty:
        fig, ax = plt.subplots(figsize=(3.2, 2.8))
        ax.set_title("no iterations recorded")
        return fig
    points = sorted(iterations.groupby(["trace", "rate"]).groups, key=_panel_order)
    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 2.8), squeeze=False, sharey=True)
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
    axes[0][0].set_ylabel("median ms per iteration (hatched: host)")
    fig.tight_layout()
    _figure_legend(fig, axes)
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
