"""Reports from a run folder: its records turned into the kernel-level tables (speed-ups per trace and phase,
ablation, plan cost, correctness; optionally side by side with other runs) and its end-to-end replays into the
headline latency/throughput table, as CSV, Markdown and LaTeX, figures, and a summary.md stating the environment.

tables.py   reading a run folder's files; the kernel-level tables (pandas only)
e2e_tables.py  the end-to-end tables: intervals, paired ratios, iteration kinds, SLO
formats.py  the table writers: md, csv, tex
figures.py  the kernel and end-to-end figures (matplotlib), one colour per backend throughout
summary.py  write_report (what `packinfer-bench report` runs) and summary.md

Imports go one way: summary -> figures -> tables, formats. The report reads files only: it imports the run
folder's names and reader (packinfer_bench.run_folder), never the code that measures."""

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
from packinfer_bench.report.figures import FIGURE_FORMATS, all_figures, e2e_figures, save_figures, write_figures
from packinfer_bench.report.formats import FORMATS, write_tables
from packinfer_bench.report.summary import write_report
from packinfer_bench.report.tables import (
    OURS,
    OURS_BACKEND,
    OURS_SYSTEM,
    ablation_table,
    ablation_wins_table,
    compare_table,
    correctness_table,
    load_records,
    load_workload,
    paired_speedups,
    plan_cost_table,
    speedup_table,
)

__all__ = ["FIGURE_FORMATS", "FORMATS", "OURS", "OURS_BACKEND", "OURS_SYSTEM", "ablation_table",
           "ablation_wins_table", "all_figures",
           "compare_table", "correctness_table", "e2e_compare_table", "e2e_figures", "e2e_gains_table",
           "e2e_iteration_kinds_table", "e2e_slo_table", "e2e_summary_table", "has_e2e", "load_e2e",
           "load_e2e_iterations", "load_records", "load_workload", "paired_speedups", "plan_cost_table",
           "save_figures", "speedup_table", "with_attention_shares", "write_figures", "write_report", "write_tables"]
