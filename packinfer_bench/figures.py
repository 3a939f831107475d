"""The kernel-level figures of a run: speed-up against length heterogeneity, per-batch time CDFs, achieved
throughput against the GPU's ceilings, ablation bars and plan cost against batch size. Each function takes the
records (report.load_records) and returns a matplotlib Figure; write_figures saves them all. The same
functions serve the report command and notebooks/paper_figures.ipynb."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; a notebook shows the returned figures itself
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml

from packinfer_bench.report import OURS, ablation_table, paired_speedups

FIGURE_FORMATS = ("png", "pdf")
#: The baselines drawn against packinfer (when the run has them).
BASELINES = ("fa2:varlen", "flashinfer:fa2", "flashinfer:fa3", "flashinfer:decode", "triton_unpacked:fa2-grid")
_PHASE_MARK = {"prefill": "o", "mixed": "s", "decode": "^"}


def _style() -> None:
    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 120,
                         "savefig.bbox": "tight"})


def speedup_vs_heterogeneity(df: pd.DataFrame, workload: pd.DataFrame) -> plt.Figure:
    """Speed-up of packinfer:full over each baseline per batch against the batch's KV-length coefficient of
    variation (from the run's workload.csv): does packing pay more as lengths spread?"""
    _style()
    pairs = paired_speedups(df, ":".join(OURS)).merge(workload[["batch_id", "kv_len_cv"]], on="batch_id")
    systems = [s for s in BASELINES if s in set(pairs["system"])]
    fig, axes = plt.subplots(1, max(len(systems), 1), figsize=(3.2 * max(len(systems), 1), 3.0), sharey=False,
                             squeeze=False)
    for ax, system in zip(axes[0], systems):
        sub = pairs[pairs["system"] == system]
        for phase, part in sub.groupby("phase"):
            ax.scatter(part["kv_len_cv"], part["speedup"], s=14, marker=_PHASE_MARK.get(phase, "o"), label=phase)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"vs {system}")
        ax.set_xlabel("KV length CV of the batch")
    axes[0][0].set_ylabel("speed-up of packinfer (x)")
    axes[0][0].legend(fontsize=7)
    return fig


def latency_cdf(df: pd.DataFrame) -> plt.Figure:
    """Per phase, the CDF of per-batch kernel time for packinfer and each baseline (ok records only)."""
    _style()
    ok = df[(df["status"] == "ok") & df["system"].isin((":".join(OURS), *BASELINES))]
    phases = [p for p in ("prefill", "mixed", "decode") if p in set(ok["phase"])]
    fig, axes = plt.subplots(1, max(len(phases), 1), figsize=(3.4 * max(len(phases), 1), 3.0), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for system, part in ok[ok["phase"] == phase].groupby("system"):
            t = np.sort(part["kernel_ms"].to_numpy(float))
            ax.step(t, np.arange(1, len(t) + 1) / len(t), where="post", label=system,
                    lw=2.0 if system == ":".join(OURS) else 1.0)
        ax.set_xscale("log")
        ax.set_title(phase)
        ax.set_xlabel("kernel time per batch (ms)")
    axes[0][0].set_ylabel("fraction of batches")
    axes[0][-1].legend(fontsize=6)
    return fig


def roofline(df: pd.DataFrame, gpu: dict | None) -> plt.Figure:
    """Achieved TFLOP/s (prefill and mixed) and KV TB/s (decode) per system, against the GPU's peak from the
    run's config (drawn when given)."""
    _style()
    ok = df[(df["status"] == "ok") & df["system"].isin((":".join(OURS), *BASELINES))]
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    for ax, phases, col, peak_key, label in (
            (axes[0], ("prefill", "mixed"), "tflops", "bf16_tflops", "TFLOP/s (causal FLOPs / time)"),
            (axes[1], ("decode",), "kv_tbps", "hbm_tbps", "TB/s (KV bytes / time)")):
        part = ok[ok["phase"].isin(phases)]
        systems = sorted(set(part["system"]))
        data = [part[part["system"] == s][col].to_numpy(float) for s in systems]
        if data:
            ax.boxplot(data, showfliers=False)
            ax.set_xticks(range(1, len(systems) + 1), systems, rotation=30, ha="right", fontsize=7)
        peak = (gpu or {}).get(peak_key)
        if peak:
            ax.axhline(peak, color="r", ls="--", lw=1, label=f"{(gpu or {}).get('name', 'GPU')} peak {peak} (config)")
            ax.legend(fontsize=7)
        ax.set_ylabel(label)
        ax.set_title(" + ".join(phases))
    return fig


def ablation_bars(df: pd.DataFrame) -> plt.Figure:
    """Geomean slow-down with one packinfer feature off, per phase (> 1: the feature helps)."""
    _style()
    table = ablation_table(df)
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    if len(table):
        pivot = table.pivot(index="system", columns="phase", values="slowdown_geomean")
        pivot.index = [s.split(":", 1)[1] for s in pivot.index]
        pivot.plot.bar(ax=ax, rot=30)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("time / full packinfer (geomean)")
    ax.set_title("ablation")
    return fig


def plan_cost(df: pd.DataFrame) -> plt.Figure:
    """packinfer's plan cost (CPU, once per batch) against batch size, per phase."""
    _style()
    ours = df[(df["status"] == "ok") & (df["system"] == ":".join(OURS))].dropna(subset=["plan_ms"])
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    if ours.empty:
        ax.text(0.5, 0.5, "no plan times recorded", ha="center", transform=ax.transAxes)
        return fig
    for phase, part in ours.groupby("phase"):
        ax.scatter(part["batch_size"], part["plan_ms"], s=14, marker=_PHASE_MARK.get(phase, "o"),
                   label=phase)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in the batch")
    ax.set_ylabel("plan time (ms, CPU)")
    ax.legend(fontsize=7)
    return fig


def run_gpu(run: Path) -> dict | None:
    """The `gpu` section of the run's config.yaml (name, sms, peaks), if any."""
    path = run / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("gpu") if path.is_file() else None


def all_figures(df: pd.DataFrame, run: Path) -> dict[str, plt.Figure]:
    """Every figure the run's files allow, by name (speed-up vs heterogeneity needs workload.csv)."""
    figs = {"latency_cdf": latency_cdf(df), "roofline": roofline(df, run_gpu(run)), "ablation": ablation_bars(df),
            "plan_cost": plan_cost(df)}
    workload = run / "workload.csv"
    if workload.is_file():
        figs["speedup_vs_cv"] = speedup_vs_heterogeneity(df, pd.read_csv(workload))
    return figs


def write_figures(df: pd.DataFrame, run: Path, out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Save every kernel figure under out/figures in each format; returns the paths."""
    return save_figures(all_figures(df, run), out, formats)


def save_figures(figs: dict[str, plt.Figure], out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Save figures by name under out/figures in each format (and close them); returns the paths."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        for fmt in formats:
            path = out / "figures" / f"{name}.{fmt}"
            fig.savefig(path)
            paths.append(path)
        plt.close(fig)
    return paths
