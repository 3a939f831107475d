"""The report's tables regenerated from every committed run folder equal the committed ones byte for byte; a
file without a column the report needs is a clear error; unreadable rows are skipped with a warning, never
allowed to break the report or swallow the rows after them; a backend has one colour in every figure."""

import logging
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO

from packinfer_bench.cli import main
from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.report import e2e_figures, load_e2e, load_records, write_report
from packinfer_bench.report.figures import COLOURS, colour, latency_cdf
from packinfer_bench.run_folder import E2E_DIR, RECORDS_FILE, SUMMARY_FILE

RESULTS = REPO / "results"
TABLE_SUFFIXES = (".md", ".csv", ".tex")
#: Committed run folders with a report/ (summary.md is not compared: it was written with figures and its
#: wording predates the end-to-end part).
REPORTED = sorted(p.parent for p in RESULTS.rglob("report") if p.is_dir() and (
    (p.parent / RECORDS_FILE).is_file() or (p.parent / E2E_DIR / SUMMARY_FILE).is_file()))
#: Small committed run folders to break on purpose.
KERNEL_RUN = RESULTS / "gpu-check" / "h100-20261124"
E2E_RUN = RESULTS / "gpu-check" / "e2e-h100"

# The committed tables were written where numpy computes log/exp with its scalar loops. Where it dispatches them
# to AVX-512 (this CPU may), a geomean can differ in its 17th significant digit, which shows in the .csv files
# (speedups.csv of sweep-h100: 5 of 72 rows). So the tables are regenerated in a process with numpy's AVX-512
# kernels switched off (NPY_DISABLE_CPU_FEATURES is read when numpy is imported); nothing else differs.
_REGENERATE = """
import sys
from pathlib import Path
from packinfer_bench.report import write_report
write_report(Path(sys.argv[1]), Path(sys.argv[2]), ("md", "csv", "tex"), ())
"""


def _avx512_features() -> str:
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__
    return " ".join(f for f in __cpu_dispatch__ if f.startswith("AVX512") or f == "X86_V4")


def test_every_committed_report_is_found():
    assert {p.relative_to(RESULTS).as_posix() for p in REPORTED} >= {"sweep-h100", "e2e-h100"}


@pytest.mark.parametrize("run", REPORTED, ids=[p.relative_to(RESULTS).as_posix() for p in REPORTED])
def test_committed_tables_are_regenerated_byte_for_byte(run, tmp_path):
    env = {**os.environ, "NPY_DISABLE_CPU_FEATURES": _avx512_features()}
    subprocess.run([sys.executable, "-c", _REGENERATE, str(run), str(tmp_path)], check=True, env=env, cwd=REPO)
    committed = {p.name for p in (run / "report").iterdir() if p.suffix in TABLE_SUFFIXES and p.name != "summary.md"}
    regenerated = {p.name for p in tmp_path.iterdir() if p.suffix in TABLE_SUFFIXES and p.name != "summary.md"}
    assert committed and regenerated == committed
    differ = [name for name in sorted(committed)
              if (tmp_path / name).read_bytes() != (run / "report" / name).read_bytes()]
    assert not differ


def _without_column(src, dst, column):
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    drop = lines[0].rstrip("\n").split(",").index(column)  # the committed rows quote no comma before it
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(",".join(c for i, c in enumerate(line.rstrip("\n").split(",")) if i != drop) + "\n"
                           for line in lines), encoding="utf-8")


def test_records_without_a_column_name_the_file_and_column(tmp_path):
    _without_column(KERNEL_RUN / RECORDS_FILE, tmp_path / "run" / RECORDS_FILE, "kernel_ms")
    with pytest.raises(PackinferBenchError, match=rf"{RECORDS_FILE}: no column kernel_ms\b"):
        write_report(tmp_path / "run", tmp_path / "rep")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "run"), "--figures", ""])
    assert result.exit_code == 1 and "no column kernel_ms" in result.output and "Traceback" not in result.output


def test_e2e_summary_without_a_column_names_the_file_and_column(tmp_path):
    run = tmp_path / "run"
    _without_column(E2E_RUN / E2E_DIR / SUMMARY_FILE, run / E2E_DIR / SUMMARY_FILE, "busy_tok_s")
    with pytest.raises(PackinferBenchError, match=rf"{E2E_DIR}/{SUMMARY_FILE}: no column busy_tok_s\b"):
        write_report(run, tmp_path / "rep")


def test_unreadable_record_rows_are_skipped_with_a_warning(tmp_path, caplog):
    lines = (KERNEL_RUN / RECORDS_FILE).read_text(encoding="utf-8").splitlines(keepends=True)
    lines[20] = lines[20].replace(",ok,,", ',ok,"a reason, quoted",')  # a quote later on: not to be swallowed
    bad = {3: lines[3].replace("cuda-events", '"cuda-events'),  # unbalanced quote
           7: lines[7].replace("llama3-8b", "llama3\0-8b"),  # NUL byte
           12: lines[12].rstrip("\n") + ",extra\n"}  # a field too many
    broken, clean = tmp_path / "broken", tmp_path / "clean"
    broken.mkdir()
    clean.mkdir()
    (broken / RECORDS_FILE).write_text("".join(bad.get(i, line) for i, line in enumerate(lines)), encoding="utf-8")
    (clean / RECORDS_FILE).write_text("".join(line for i, line in enumerate(lines) if i not in bad),
                                      encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        write_report(broken, tmp_path / "rep-broken", ("md", "csv", "tex"))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(broken / RECORDS_FILE) in warning and re.search(r"\b3\b", warning)  # the file, how many
    assert all(f"line {i + 1} " in warning for i in bad)  # 1-based, counting the header
    assert len(load_records(broken)) == len(lines) - 1 - len(bad)  # nothing after a bad row is swallowed
    write_report(clean, tmp_path / "rep-clean", ("md", "csv", "tex"))
    for name in ("speedups", "ablation", "plan_cost", "correctness"):
        for fmt in ("md", "csv", "tex"):
            assert (tmp_path / "rep-broken" / f"{name}.{fmt}").read_bytes() == \
                (tmp_path / "rep-clean" / f"{name}.{fmt}").read_bytes()


def test_a_backend_has_one_colour_in_every_figure():
    summary, requests = load_e2e(RESULTS / "e2e-h100")
    figs = [latency_cdf(load_records(KERNEL_RUN)), *e2e_figures(summary, requests).values()]
    lines = [line for fig in figs for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert {line.get_label().split(":")[0] for line in lines} >= {"packinfer", "fa2", "flashinfer"}
    for line in lines:
        assert line.get_color() == colour(line.get_label()) == COLOURS[line.get_label().split(":")[0]]
    assert len(set(COLOURS.values())) == len(COLOURS)
