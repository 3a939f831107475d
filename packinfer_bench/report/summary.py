"""`packinfer-bench report`: a run folder's tables (formats.py), figures (figures.py) and summary.md, which states
the environment (env.json), where every number comes from, each table in Markdown and links to the figures; and
the headline tables `run` and `report` print on the console (the same tables, reshaped to fit a terminal)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from packinfer_bench import envinfo
from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.report.e2e_tables import (
    e2e_compare_table,
    e2e_gains_table,
    e2e_iteration_kinds_table,
    e2e_slo_table,
    e2e_summary_table,
    has_e2e,
    load_e2e,
    load_e2e_iterations,
    with_attention_shares,
)
from packinfer_bench.report.figures import FIGURE_FORMATS, e2e_figures, save_figures, write_figures
from packinfer_bench.report.formats import FORMATS, check_formats, markdown_table, write_tables
from packinfer_bench.report.tables import (
    ABLATION_MARGIN,
    OURS_BACKEND,
    OURS_SYSTEM,
    ablation_table,
    ablation_wins_table,
    best_variant_wins_table,
    compare_table,
    correctness_table,
    load_records,
    plan_cost_table,
    speedup_table,
)
from packinfer_bench.run_folder import (
    CONFIG_FILE,
    E2E_DIR,
    ENV_FILE,
    ITERATIONS_FILE,
    RECORDS_FILE,
    REQUESTS_FILE,
    SUMMARY_FILE,
)

SUMMARY_MD = "summary.md"
#: What a CPU run's numbers are: said in summary.md and wherever `run` or `report` print them.
CPU_NOTE = ("CPU run: the kernels ran under the Triton interpreter, so these timings are not performance figures. "
            "They show that the pipeline works; speed-ups here compare interpreter and PyTorch CPU times, not GPU "
            "kernels.")
#: Timing methods of records measured without a GPU (timing.Timer.method).
CPU_TIMING = "wall-clock-cpu"


def write_report(run: Path, out: Path | None = None, formats: tuple[str, ...] = ("md", "csv"),
                 figures: tuple[str, ...] = (), compare: dict[str, Path] | None = None) -> Path:
    """Write the tables (each as <name>.csv / .md / .tex per `formats`), figures (under figures/, per
    `figures`: png, pdf), a comparison with other runs (`compare`: label -> run folder) and summary.md to `out`
    (default: <run>/report); returns summary.md's path."""
    check_formats(formats, FORMATS, "--format")
    if figures:
        check_formats(figures, FIGURE_FORMATS, "--figures")
    kernel, e2e = (run / RECORDS_FILE).is_file(), has_e2e(run)
    if not kernel and not e2e:
        raise PackinferBenchError(f"{run}: no {RECORDS_FILE} and no {E2E_DIR}/{SUMMARY_FILE} (is it a run folder?)")
    df = load_records(run) if kernel else None
    out = out or run / "report"
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    if e2e:
        e2e_summary, e2e_requests = load_e2e(run)
        e2e_iterations = load_e2e_iterations(run)
        e2e_summary = with_attention_shares(e2e_summary, e2e_iterations)
        tables.update({"e2e_compare": e2e_compare_table(e2e_summary, e2e_requests, e2e_iterations),
                       "e2e_iteration_kinds": e2e_iteration_kinds_table(e2e_iterations),
                       "e2e_slo": e2e_slo_table(e2e_summary),
                       "e2e_gains": e2e_gains_table(e2e_summary), "e2e_summary": e2e_summary_table(e2e_summary)})
    if kernel:
        tables.update({"speedups": speedup_table(df), "ablation": ablation_table(df),
                       "ablation_wins": ablation_wins_table(df), "plan_cost": plan_cost_table(df),
                       "correctness": correctness_table(df)})
        if (df["phase"] == "serving").any():
            tables["serving_wins"] = best_variant_wins_table(df[df["phase"] == "serving"])
    if compare and kernel:
        tables["compare"] = compare_table({run.name: df, **{k: load_records(p) for k, p in compare.items()}})
    write_tables(tables, out, formats)
    figure_paths = write_figures(df, run, out, figures) if figures and kernel else []
    if figures and e2e:
        figure_paths += save_figures(e2e_figures(e2e_summary, e2e_requests, e2e_iterations), out, figures)
    summary = out / SUMMARY_MD
    summary.write_text("\n".join(summary_lines(run, df, e2e, tables, figure_paths, compare)), encoding="utf-8")
    return summary


def summary_lines(run: Path, df: pd.DataFrame | None, e2e: bool, tables: dict[str, pd.DataFrame],
                  figure_paths: list[Path], compare: dict[str, Path] | None = None) -> list[str]:
    """summary.md's lines: environment, sources, each table under its title, the figures (png where drawn)."""
    lines = [f"# Report: {run}", "", f"Environment ({ENV_FILE}): {envinfo.describe(read_env(run))}.", ""]
    if is_cpu_run(run, df):
        lines += [f"> **Not performance figures.** {CPU_NOTE}", ""]
    if e2e:
        lines += [f"End-to-end numbers: {run / E2E_DIR} ({SUMMARY_FILE}, {REQUESTS_FILE}, {ITERATIONS_FILE}). A gain "
                  "compares two `ok` replays of the same schedule (the scheduler's decisions do not depend on the "
                  "backend); latency = measured iteration times laid on the schedule; every other replay is listed "
                  "in e2e_summary. Intervals: 95% percentile bootstrap (2000 resamples, seeded) over requests, "
                  "repeats or iterations, paired for ratios; an interval that spans 1.0 reads 'no difference'.", ""]
    if df is not None:
        lines += [f"Kernel numbers: {run / RECORDS_FILE} ({len(df)} records). Speed-ups compare two `ok` records "
                  "of the same batch and shape (median kernel times); other records are counted below.", ""]
    titles = {"e2e_compare": f"End to end: {OURS_BACKEND} against each peer, 95% intervals (ratio = ours / peer)",
              "e2e_iteration_kinds": "Per iteration kind: median iteration, GPU and host time (ms), launches per layer",
              "e2e_slo": "Highest swept request rate sustained within the SLO",
              "e2e_gains": f"End to end: {OURS_BACKEND} against each baseline (latency reduction, throughput gain, %)",
              "e2e_summary": "End-to-end replays (latencies in ms, throughput in output tokens/s)",
              "speedups": f"Speed-up of {OURS_SYSTEM} (other time / ours)",
              "ablation": "Ablation: slow-down with one feature off (variant time / full time)",
              "ablation_wins": f"Batches where an ablation ran more than {ABLATION_MARGIN:.0%} faster than "
                               f"{OURS_SYSTEM}",
              "plan_cost": "Plan cost (CPU, once per batch)",
              "serving_wins": f"Serving call on scheduler batches: {OURS_SYSTEM} against each peer's best variant",
              "correctness": "Records by status, largest relative error against the float32 reference",
              "compare": f"Speed-ups of {OURS_SYSTEM} across runs ({', '.join([run.name, *(compare or {})])})"}
    empty = {"ablation_wins": f"(none: every variant was within {ABLATION_MARGIN:.0%} of {OURS_SYSTEM} or slower, on "
                              "every batch where both ran)"}
    for name, table in tables.items():
        lines += [f"## {titles[name]}", "",
                  markdown_table(table) if len(table) else empty.get(name, "(no comparable records)"), ""]
    shown = [p for p in figure_paths if p.suffix == ".png"] or figure_paths
    if shown:
        lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in shown] + [""]
    return lines


def read_env(run: Path) -> dict:
    """env.json of a run folder ({} when it has none)."""
    path = run / ENV_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def is_cpu_run(run: Path, df: pd.DataFrame | None = None) -> bool:
    """Whether a run's timings come from the CPU (records timed by wall clock on the CPU, a config with device:
    cpu, or a session that saw no GPU); an analytic run, which times nothing, is not one."""
    config_path = run / CONFIG_FILE
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    device = (config or {}).get("device") if isinstance(config, dict) else None
    if device == "analytic":
        return False
    if df is not None and "timing" in df and (df["timing"] == CPU_TIMING).any():
        return True
    env = read_env(run)
    return device == "cpu" or (bool(env) and not env.get("gpu"))


def headline_tables(run: Path) -> dict[str, pd.DataFrame]:
    """The tables `run` ends with and `report` prints, title -> table, from the report's own table functions:
    the kernel speed-ups (geomean per trace and phase, one column per system) and records by status, and end to
    end the gains over each baseline (or, where no two backends both finished, each replay's latency and
    throughput)."""
    tables: dict[str, pd.DataFrame] = {}
    if (run / RECORDS_FILE).is_file():
        df = load_records(run)
        speedups = speedup_table(df)
        if len(speedups):
            wide = speedups.pivot_table(index=["trace", "phase"], columns="system", values="geomean", sort=True)
            tables[f"Speed-up of {OURS_SYSTEM} (geomean of other time / ours)"] = wide.reset_index().rename_axis(
                columns=None)
        tables["Records by status"] = correctness_table(df)
    if has_e2e(run):
        summary, _ = load_e2e(run)
        gains = e2e_gains_table(with_attention_shares(summary, load_e2e_iterations(run)))
        if len(gains):
            tables[f"End to end: {OURS_BACKEND} against each baseline (%, > 0: ours better)"] = gains
        else:
            cols = ["e2e", "trace", "rate", "backend", "repeat", "status", "e2e_ms_mean", "throughput_tok_s"]
            replays = e2e_summary_table(summary)
            ok = replays[replays["status"] == "ok"]
            title = "End-to-end replays (no two backends both ok, so no gains to show)"
            if len(ok) and len(ok) < len(replays):
                title = (f"End-to-end replays that finished ok ({len(replays) - len(ok)} others in e2e_summary; no "
                         "two backends both ok, so no gains to show)")
                replays = ok
            tables[title] = replays[[c for c in cols if c in replays]]
    return tables
