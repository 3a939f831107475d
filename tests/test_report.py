"""`packinfer-bench report`: tables from records, numbers checked against values computed here by hand, and
incorrect / skipped / failed records counted but never folded into a speed-up."""

import math

import pandas as pd
import pytest
from click.testing import CliRunner

from packinfer_bench.cli import main
from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.records import FIELDS, RECORDS_FILE
from packinfer_bench.report import ablation_table, correctness_table, load_records, speedup_table, write_report


def _record(batch, backend, variant, status="ok", kernel_ms=None, phase="prefill", rel_err=1e-3):
    row = dict.fromkeys(FIELDS, "")
    row.update(trace="t", workload="k", phase=phase, batch_id=batch, batch_size=4, num_tokens=8, num_kv_tokens=8,
               shape="s", backend=backend, variant=variant, status=status,
               kernel_ms="" if kernel_ms is None else kernel_ms, rel_err=rel_err if status == "ok" else "")
    return row


@pytest.fixture
def run(tmp_path):
    rows = [
        _record("b1", "packinfer", "full", kernel_ms=1.0), _record("b1", "fa2", "varlen", kernel_ms=2.0),
        _record("b1", "packinfer", "no-packing", kernel_ms=1.1),
        _record("b2", "packinfer", "full", kernel_ms=2.0), _record("b2", "fa2", "varlen", kernel_ms=8.0),
        _record("b2", "packinfer", "no-packing", kernel_ms=2.2),
        # never part of a speed-up: a wrong fa2 output, a skipped baseline, a failed packinfer
        _record("b3", "packinfer", "full", kernel_ms=1.0), _record("b3", "fa2", "varlen", "incorrect", 0.1),
        _record("b3", "flashinfer", "fa2", "skipped"),
        _record("b4", "packinfer", "full", "error"), _record("b4", "fa2", "varlen", kernel_ms=3.0),
        _record("d1", "packinfer", "full", kernel_ms=0.5, phase="decode", rel_err=4e-3),
        _record("d1", "fa2", "varlen", kernel_ms=2.5, phase="decode"),
    ]
    pd.DataFrame(rows, columns=FIELDS).to_csv(tmp_path / RECORDS_FILE, index=False)
    return tmp_path


def test_speedups_are_geomeans_over_batches_where_both_are_ok(run):
    table = speedup_table(load_records(run)).set_index(["phase", "system"])
    prefill = table.loc[("prefill", "fa2:varlen")]
    assert prefill["batches"] == 2  # b3 (fa2 incorrect) and b4 (packinfer error) are left out
    assert prefill["geomean"] == pytest.approx(math.sqrt(2.0 * 4.0))
    assert (prefill["min"], prefill["max"]) == (2.0, 4.0)
    assert table.loc[("decode", "fa2:varlen")]["geomean"] == pytest.approx(5.0)
    assert "flashinfer:fa2" not in table.index.get_level_values("system")
    assert not table.index.get_level_values("system").str.startswith("packinfer").any()


def test_ablation_is_the_variants_slowdown_against_full(run):
    row = ablation_table(load_records(run)).set_index("system").loc["packinfer:no-packing"]
    assert row["batches"] == 2 and row["slowdown_geomean"] == pytest.approx(1.1)


def test_correctness_counts_every_status(run):
    table = correctness_table(load_records(run)).set_index("system")
    assert table.loc["fa2:varlen", ["ok", "incorrect", "skipped", "error"]].tolist() == [4, 1, 0, 0]
    assert table.loc["packinfer:full", ["ok", "error"]].tolist() == [4, 1]
    assert table.loc["flashinfer:fa2", "skipped"] == 1
    assert table.loc["packinfer:full", "max_rel_err"] == pytest.approx(4e-3)


def test_report_command_writes_tables_and_summary(run, tmp_path):
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    for name in ("speedups", "ablation", "correctness"):
        assert (tmp_path / "rep" / f"{name}.csv").is_file() and (tmp_path / "rep" / f"{name}.md").is_file()
    summary = (tmp_path / "rep" / "summary.md").read_text()
    assert "Speed-up of packinfer:full" in summary and "| prefill | fa2:varlen | 2 | 2.83 |" in summary


def test_bad_report_requests_name_the_problem(run, tmp_path):
    with pytest.raises(PackinferBenchError, match=r"unknown format\(s\) \['pdf'\]"):
        write_report(run, tmp_path / "r", ("md", "pdf"))
    with pytest.raises(PackinferBenchError, match="no records.csv"):
        write_report(tmp_path / "r", tmp_path / "r2")
