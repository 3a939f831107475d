"""Reports: a run folder's records turned into the kernel-level tables (speed-ups per trace and phase, ablation,
plan cost, correctness; optionally side by side with other runs) and its end-to-end replays into the headline
latency/throughput table (report_e2e.py), as CSV, Markdown and LaTeX, figures (see figures.py) and a summary.md
stating the environment. A speed-up only ever compares two
`ok` records of the same batch and shape; incorrect, skipped and failed records are counted, never folded in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.records import RECORDS_FILE
from packinfer_bench.report_e2e import OURS as E2E_OURS
from packinfer_bench.report_e2e import e2e_figures, e2e_gains_table, e2e_summary_table, has_e2e, load_e2e
from packinfer_bench.serving.results import E2E_DIR

OURS = ("packinfer", "full")
FORMATS = ("md", "csv", "tex")


def load_records(run: Path) -> pd.DataFrame:
    """records.csv of a run folder, with a `system` column (backend:variant)."""
    path = run / RECORDS_FILE
    if not path.is_file():
        raise PackinferBenchError(f"{run}: no {RECORDS_FILE} (is it a run folder?)")
    numeric = ("plan_ms", "kernel_ms", "kernel_ms_p10", "kernel_ms_p90", "tflops", "kv_tbps", "max_abs_err", "rel_err")
    df = pd.read_csv(path, keep_default_na=False, na_values={c: [""] for c in numeric})
    df["system"] = df["backend"] + ":" + df["variant"]
    return df


def paired_speedups(df: pd.DataFrame, ours: str) -> pd.DataFrame:
    """One row per (batch, shape, other system) where both ours and the other are ok: the speed-up ours gives."""
    ok = df[df["status"] == "ok"]
    mine = ok[ok["system"] == ours][["batch_id", "shape", "trace", "phase", "kernel_ms"]]
    others = ok[ok["system"] != ours][["batch_id", "shape", "system", "kernel_ms"]]
    pairs = mine.merge(others, on=["batch_id", "shape"], suffixes=("_ours", "_other"))
    pairs["speedup"] = pairs["kernel_ms_other"] / pairs["kernel_ms_ours"]
    return pairs


def _geomean_table(pairs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    g = pairs.groupby(by)["speedup"]
    table = pd.DataFrame({"batches": g.size(), "geomean": g.apply(lambda s: float(np.exp(np.log(s).mean()))),
                          "min": g.min(), "max": g.max()})
    return table.reset_index()


def speedup_table(df: pd.DataFrame, ours: tuple[str, str] = OURS) -> pd.DataFrame:
    """Speed-up of `ours` over every other system (excluding its own ablations), per trace and phase."""
    pairs = paired_speedups(df, ":".join(ours))
    pairs = pairs[~pairs["system"].str.startswith(ours[0] + ":")]
    return _geomean_table(pairs, ["trace", "phase", "system"])


def ablation_table(df: pd.DataFrame, ours: tuple[str, str] = OURS) -> pd.DataFrame:
    """Slow-down of each ablation variant of `ours` against the full system, per phase (> 1: the feature helps)."""
    pairs = paired_speedups(df, ":".join(ours))
    pairs = pairs[pairs["system"].str.startswith(ours[0] + ":")]
    return _geomean_table(pairs, ["phase", "system"]).rename(columns={"geomean": "slowdown_geomean"})


def correctness_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per system: records by status and the largest relative error of its ok records."""
    counts = df.pivot_table(index="system", columns="status", values="batch_id", aggfunc="count", fill_value=0)
    for status in ("ok", "incorrect", "skipped", "error"):
        if status not in counts:
            counts[status] = 0
    table = counts[["ok", "incorrect", "skipped", "error"]].copy()
    table["max_rel_err"] = df[df["status"] == "ok"].groupby("system")["rel_err"].max()
    return table.reset_index()


def plan_cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Plan cost (CPU, ms) of each system that plans, per phase: median and max over its ok records."""
    ok = df[df["status"] == "ok"]
    g = ok.groupby(["phase", "system"])["plan_ms"]
    return pd.DataFrame({"batches": g.size(), "median_ms": g.median(), "max_ms": g.max()}).reset_index()


def compare_table(runs: dict[str, pd.DataFrame], ours: tuple[str, str] = OURS) -> pd.DataFrame:
    """Speed-ups of `ours` per trace, phase and system side by side for several runs (e.g. two GPUs): one
    geomean column and one batch-count column per run label; a row missing from a run is left empty."""
    merged = None
    for label, df in runs.items():
        t = speedup_table(df, ours)[["trace", "phase", "system", "batches", "geomean"]]
        t = t.rename(columns={"batches": f"batches_{label}", "geomean": f"geomean_{label}"})
        merged = t if merged is None else merged.merge(t, on=["trace", "phase", "system"], how="outer")
    return merged.sort_values(["trace", "phase", "system"]).reset_index(drop=True)


def write_tables(tables: dict[str, pd.DataFrame], out: Path, formats: tuple[str, ...]) -> None:
    """Each table as <name>.csv / .md / .tex per `formats`."""
    for name, table in tables.items():
        if "csv" in formats:
            table.to_csv(out / f"{name}.csv", index=False)
        if "md" in formats:
            (out / f"{name}.md").write_text(_markdown(table) + "\n", encoding="utf-8")
        if "tex" in formats:
            (out / f"{name}.tex").write_text(_latex(table) + "\n", encoding="utf-8")


def check_formats(formats: tuple[str, ...], allowed: tuple[str, ...], option: str) -> None:
    bad = [f for f in formats if f not in allowed]
    if bad:
        raise PackinferBenchError(f"{option}: unknown format(s) {bad}; allowed: {list(allowed)}")


def write_report(run: Path, out: Path | None = None, formats: tuple[str, ...] = ("md", "csv"),
                 figures: tuple[str, ...] = (), compare: dict[str, Path] | None = None) -> Path:
    """Write the tables (each as <name>.csv / .md / .tex per `formats`), figures (under figures/, per
    `figures`: png, pdf), a comparison with other runs (`compare`: label -> run folder) and summary.md to `out`
    (default: <run>/report); returns summary.md's path."""
    check_formats(formats, FORMATS, "--format")
    if figures:
        from packinfer_bench.figures import FIGURE_FORMATS, write_figures
        check_formats(figures, FIGURE_FORMATS, "--figures")
    kernel, e2e = (run / RECORDS_FILE).is_file(), has_e2e(run)
    if not kernel and not e2e:
        raise PackinferBenchError(f"{run}: no {RECORDS_FILE} and no e2e/summary.csv (is it a run folder?)")
    df = load_records(run) if kernel else None
    out = out or run / "report"
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    if e2e:
        e2e_summary, e2e_requests = load_e2e(run)
        tables.update({"e2e_gains": e2e_gains_table(e2e_summary), "e2e_summary": e2e_summary_table(e2e_summary)})
    if kernel:
        tables.update({"speedups": speedup_table(df), "ablation": ablation_table(df),
                       "plan_cost": plan_cost_table(df), "correctness": correctness_table(df)})
    if compare and kernel:
        tables["compare"] = compare_table({run.name: df, **{k: load_records(p) for k, p in compare.items()}})
    write_tables(tables, out, formats)
    figure_paths = write_figures(df, run, out, figures) if figures and kernel else []
    if figures and e2e:
        from packinfer_bench.figures import save_figures
        figure_paths += save_figures(e2e_figures(e2e_summary, e2e_requests), out, figures)
    env_path = run / "env.json"
    env = json.loads(env_path.read_text(encoding="utf-8")) if env_path.is_file() else {}
    gpu = env.get("gpu") or {}
    packages = env.get("packages") or {}
    lines = [f"# Report: {run}", "",
             f"Environment (env.json): {gpu.get('name', 'no GPU')} ({gpu.get('sms', '?')} SMs, driver "
             f"{gpu.get('driver', '?')}), torch {env.get('torch', '?')}, triton {packages.get('triton', '?')}, "
             f"flashinfer {packages.get('flashinfer-python')}, commit {env.get('git_sha', '?')}.",
             ""]
    if e2e:
        lines += [f"End-to-end numbers: {run / E2E_DIR} (summary.csv, requests.csv, iterations.csv). A gain compares "
                  "two `ok` replays of the same schedule (open loop: the scheduler's decisions do not depend on the "
                  "backend); latency = measured iteration times laid on the schedule; every other replay is "
                  "listed in e2e_summary.", ""]
    if kernel:
        lines += [f"Kernel numbers: {run / RECORDS_FILE} ({len(df)} records). Speed-ups compare two `ok` records "
                  "of the same batch and shape (median kernel times); other records are counted below.", ""]
    titles = {"e2e_gains": f"End to end: {E2E_OURS} against each baseline (latency reduction, throughput gain, %)",
              "e2e_summary": "End-to-end replays (latencies in ms, throughput in output tokens/s)",
              "speedups": f"Speed-up of {':'.join(OURS)} (other time / ours)",
              "ablation": "Ablation: slow-down with one feature off (variant time / full time)",
              "plan_cost": "Plan cost (CPU, once per batch)",
              "correctness": "Records by status, largest relative error against the float32 reference",
              "compare": f"Speed-ups of {':'.join(OURS)} across runs ({', '.join([run.name, *(compare or {})])})"}
    for name, table in tables.items():
        lines += [f"## {titles[name]}", "", _markdown(table) if len(table) else "(no comparable records)", ""]
    shown = [p for p in figure_paths if p.suffix == ".png"] or figure_paths
    if shown:
        lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in shown] + [""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines), encoding="utf-8")
    return summary


def _latex(table: pd.DataFrame) -> str:
    def cell(v) -> str:
        text = f"{v:.3g}" if isinstance(v, float) else str(v)
        return "" if text == "nan" else text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    lines = [r"\begin{tabular}{" + "l" * len(table.columns) + "}", r"\hline",
             " & ".join(cell(c) for c in table.columns) + r" \\", r"\hline"]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    return "\n".join(lines + [r"\hline", r"\end{tabular}"])


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    rows = [["" if isinstance(v, float) and np.isnan(v) else f"{v:.3g}" if isinstance(v, float) else str(v)
             for v in row] for row in table.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                     + ["| " + " | ".join(r) + " |" for r in rows])
