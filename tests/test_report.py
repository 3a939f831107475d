"""`packinfer-bench report`: tables from records, numbers checked against values computed here by hand, and
incorrect / skipped / failed records counted but never folded into a speed-up."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import REPO

from packinfer_bench.cli import main
from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.report import (
    ablation_table,
    ablation_wins_table,
    compare_table,
    correctness_table,
    e2e_gains_table,
    load_e2e,
    load_e2e_iterations,
    load_records,
    plan_cost_table,
    speedup_table,
    with_attention_shares,
    write_report,
)
from packinfer_bench.run_folder import E2E_DIR, ITERATIONS_FILE, RECORDS_FILE, REQUESTS_FILE
from packinfer_bench.run_folder.e2e import E2ERecord, E2EStore, attention_share
from packinfer_bench.run_folder.records import FIELDS


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
    pd.DataFrame({"batch_id": ["b1", "b2", "b3", "b4", "d1"], "kv_len_cv": [0.1, 0.9, 0.5, 0.3, 1.2]}).to_csv(
        tmp_path / "workload.csv", index=False)
    (tmp_path / "config.yaml").write_text("gpu: {name: Test GPU, sms: 4, hbm_tbps: 1.0, bf16_tflops: 10.0}\n")
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


def test_ablation_wins_list_each_batch_where_a_variant_beat_full_by_more_than_the_margin(tmp_path):
    rows = [_record("b1", "packinfer", "full", kernel_ms=1.0), _record("b1", "packinfer", "tiles-16", kernel_ms=0.9),
            _record("b1", "packinfer", "no-split", kernel_ms=0.98), _record("b1", "fa2", "varlen", kernel_ms=0.5),
            _record("b2", "packinfer", "full", kernel_ms=2.0), _record("b2", "packinfer", "tiles-16", kernel_ms=2.4),
            _record("b2", "packinfer", "no-split", kernel_ms=1.9),
            _record("b3", "packinfer", "full", "error"), _record("b3", "packinfer", "tiles-16", kernel_ms=0.1)]
    pd.DataFrame(rows, columns=FIELDS).to_csv(tmp_path / RECORDS_FILE, index=False)
    table = ablation_wins_table(load_records(tmp_path))
    # b1's no-split is within 3%; fa2 is a peer, not an ablation; b3's full did not run
    assert table[["batch_id", "system"]].values.tolist() == [["b1", "packinfer:tiles-16"], ["b2", "packinfer:no-split"]]
    assert table["variant_over_full"].tolist() == pytest.approx([0.9, 0.95])
    assert ablation_wins_table(load_records(tmp_path), margin=0.2).empty


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
    with pytest.raises(PackinferBenchError, match=r"--format: unknown format\(s\) \['pdf'\]"):
        write_report(run, tmp_path / "r", ("md", "pdf"))
    with pytest.raises(PackinferBenchError, match=r"--figures: unknown format\(s\) \['svg'\]"):
        write_report(run, tmp_path / "r", ("md",), ("svg",))
    with pytest.raises(PackinferBenchError, match="no records.csv"):
        write_report(tmp_path / "r", tmp_path / "r2")


def test_every_figure_and_latex_table_is_written_and_linked(run, tmp_path):
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "rep"), "--format", "md,tex",
                                       "--figures", "png,pdf"])
    assert result.exit_code == 0, result.output
    for name in ("speedup_vs_cv", "latency_cdf", "roofline", "ablation", "plan_cost"):
        for fmt in ("png", "pdf"):
            assert (tmp_path / "rep" / "figures" / f"{name}.{fmt}").stat().st_size > 1000
        assert f"(figures/{name}.png)" in (tmp_path / "rep" / "summary.md").read_text()
    tex = (tmp_path / "rep" / "speedups.tex").read_text()
    assert tex.startswith("\\begin{tabular}") and "prefill & fa2:varlen & 2 & 2.83" in tex


def test_two_runs_side_by_side(run, tmp_path):
    other = tmp_path / "a100"
    other.mkdir()
    df = pd.read_csv(run / RECORDS_FILE)
    df.loc[(df["batch_id"] == "b1") & (df["backend"] == "fa2"), "kernel_ms"] = 3.0  # 3x there instead of 2x
    df.to_csv(other / RECORDS_FILE, index=False)
    table = compare_table({"h100": load_records(run), "a100": load_records(other)}).set_index(["phase", "system"])
    row = table.loc[("prefill", "fa2:varlen")]
    assert row["geomean_h100"] == pytest.approx(math.sqrt(2.0 * 4.0))
    assert row["geomean_a100"] == pytest.approx(math.sqrt(3.0 * 4.0))
    assert row["batches_h100"] == row["batches_a100"] == 2
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "rep"), "--figures", "",
                                       "--compare", str(other)])
    assert result.exit_code == 0, result.output
    assert "geomean_a100" in (tmp_path / "rep" / "compare.md").read_text()


def test_plan_cost_table_summarises_plan_time_per_system(tmp_path):
    rows = [_record(f"b{i}", "packinfer", "full", kernel_ms=1.0) | {"plan_ms": ms}
            for i, ms in enumerate([0.2, 0.4, 0.9])]
    pd.DataFrame(rows, columns=FIELDS).to_csv(tmp_path / RECORDS_FILE, index=False)
    row = plan_cost_table(load_records(tmp_path)).set_index("system").loc["packinfer:full"]
    assert (row["batches"], row["median_ms"], row["max_ms"]) == (3, 0.4, 0.9)


NOTEBOOK = REPO / "notebooks" / "paper_figures.ipynb"
#: The figures the notebook draws: every kernel figure and the end-to-end ones (figures.py's names).
NOTEBOOK_FIGURES = ("latency_cdf", "roofline", "ablation", "plan_cost", "speedup_vs_cv", "e2e_latency_cdf",
                    "e2e_latency_vs_rate", "e2e_ttft_itl_cdf")


def _images(nb):
    return [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]


def test_the_paper_figures_notebook_runs_top_to_bottom_from_any_folder(run, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("PACKINFER_RUN", str(run))
    monkeypatch.setenv("PACKINFER_E2E_RUN", str(_e2e_run(tmp_path / "e2e-run")))
    elsewhere = tmp_path / "elsewhere"  # neither notebooks/ nor the repository
    elsewhere.mkdir()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(elsewhere)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    names = [o["data"]["text/markdown"].strip("*") for o in outputs if "text/markdown" in o.get("data", {})]
    assert names == list(NOTEBOOK_FIGURES)  # each figure once, none twice
    assert len(_images(nb)) == len(NOTEBOOK_FIGURES) == len(set(_images(nb)))


def test_the_committed_notebook_holds_its_outputs_small_and_portable():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count and c.outputs for c in code)  # executed, as committed
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert len(_images(nb)) == len(NOTEBOOK_FIGURES)
    text = NOTEBOOK.read_text(encoding="utf-8")
    assert len(text) < 1_000_000 and str(REPO) not in text and "../results" not in text


def _e2e_run(tmp_path):
    """A run folder with end-to-end replays only: two traces x one rate, packinfer ok everywhere, fa2 ok,
    flashinfer skipped on one trace and incorrect on the other."""
    store = E2EStore(tmp_path)
    rows = [("sharegpt", "fa2", "ok", 1000.0, 2000.0, 0.5), ("sharegpt", "packinfer", "ok", 800.0, 2500.0, 0.3),
            ("sharegpt", "flashinfer", "skipped", None, None, None), ("azure", "fa2", "ok", 500.0, 4000.0, None),
            ("azure", "packinfer", "ok", 400.0, 5000.0, 0.25), ("azure", "flashinfer", "incorrect", 300.0, 9000.0, 0.2)]
    for trace, backend, status, e2e_ms, tok_s, share in rows:
        store.add_summary(E2ERecord("m", trace, "4", backend, "llama-3.1-8b", 32, 32, status, e2e_ms_mean=e2e_ms,
                                    ttft_ms_mean=e2e_ms and e2e_ms / 10, tpot_ms_mean=e2e_ms and e2e_ms / 100,
                                    throughput_tok_s=tok_s, busy_tok_s=tok_s and 2 * tok_s, attention_share=share))
        if status == "ok":
            store.append(REQUESTS_FILE, [{"e2e": "m", "trace": trace, "rate": "4", "backend": backend,
                                          "request_id": i, "e2e_s": e2e_ms / 1e3 * (0.5 + i / 4), "ttft_s": 0.1,
                                          "tpot_s": 0.01} for i in range(5)])
    return tmp_path


def test_e2e_gains_pair_only_ok_replays_of_the_same_schedule(tmp_path):
    summary, _ = load_e2e(_e2e_run(tmp_path))
    gains = e2e_gains_table(summary).set_index(["trace", "baseline"])
    assert sorted(gains.index) == [("azure", "fa2"), ("sharegpt", "fa2")]  # skipped / incorrect never paired
    assert gains.loc[("sharegpt", "fa2"), "e2e_reduction_pct"] == pytest.approx(20.0)
    assert gains.loc[("sharegpt", "fa2"), "throughput_gain_pct"] == pytest.approx(25.0)
    assert gains.loc[("azure", "fa2"), "tpot_reduction_pct"] == pytest.approx(20.0)
    assert gains.loc[("azure", "fa2"), "busy_gain_pct"] == pytest.approx(25.0)
    # fa2 spends half its time in attention: no attention kernel can serve more than twice its tokens
    assert gains.loc[("sharegpt", "fa2"), "attention_bound_pct"] == pytest.approx(100.0)
    assert gains.loc[("sharegpt", "fa2"), "attention_pct_ours"] == pytest.approx(30.0)
    assert np.isnan(gains.loc[("azure", "fa2"), "attention_bound_pct"]), "not measured: no bound"


def test_attention_share_estimates_full_graph_iterations_from_the_probed_ones():
    nan = math.nan
    # piecewise: 3 of 10 ms; full: the probed iteration spends half of its 8 ms in attention, so the unprobed
    # one's 12 ms count 6 ms more
    graph, iteration, attention = ["piecewise", "full", "full"], [10.0, 8.0, 12.0], [3.0, 4.0, nan]
    assert attention_share(graph, iteration, attention) == pytest.approx((3 + 4 + 6) / 30)
    assert attention_share(graph[:1], iteration[:1], attention[:1]) == pytest.approx(0.3)
    assert attention_share(["piecewise", "full"], [10.0, 12.0], [3.0, nan]) is None, "full ran, none probed"
    assert attention_share([], [], []) is None


def test_e2e_gains_take_attention_shares_from_the_iterations(tmp_path):
    """The iterations decide: a replay whose full-graph iterations were never probed (written before the probe
    existed) has no share, whatever its summary row says."""
    run = _e2e_run(tmp_path)
    its = [{"e2e": "m", "trace": "sharegpt", "rate": "4", "backend": backend, "repeat": 0, "iteration": i,
            "kind": "decode", "graph": graph, "iteration_ms": 10.0, "host_ms": 1.0, "attention_ms": attention}
           for backend, graph, attention in (("fa2", "piecewise", 4.0), ("packinfer", "full", ""))
           for i in range(2)]
    E2EStore(run).append(ITERATIONS_FILE, its)
    summary, _ = load_e2e(run)
    gains = e2e_gains_table(with_attention_shares(summary, load_e2e_iterations(run))).set_index(["trace", "baseline"])
    assert gains.loc[("sharegpt", "fa2"), "attention_pct_base"] == pytest.approx(40.0)
    assert np.isnan(gains.loc[("sharegpt", "fa2"), "attention_pct_ours"])
    assert gains.loc[("sharegpt", "fa2"), "attention_bound_pct"] == pytest.approx(100 / 0.6 - 100)
    assert gains.loc[("azure", "fa2"), "attention_pct_ours"] == pytest.approx(25.0), "no iteration rows: its own"


def test_a_committed_run_reads_its_archived_requests_as_the_file(tmp_path):
    """Committed reference runs keep large finished files gzip-compressed (requests.csv.gz); the report reads them."""
    import gzip

    run = _e2e_run(tmp_path)
    plain = load_e2e(run)[1]
    path = run / E2E_DIR / REQUESTS_FILE
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    archived = load_e2e(run)[1]
    assert len(plain) == 20 and archived.equals(plain)


def test_report_of_an_e2e_run_writes_the_headline_table_and_figures(tmp_path):
    run = _e2e_run(tmp_path / "run")
    result = CliRunner().invoke(main, ["report", str(run), "--format", "md,csv,tex", "--figures", "png,pdf"])
    assert result.exit_code == 0, result.output
    report = run / "report"
    for name in ("e2e_gains", "e2e_summary"):
        assert all((report / f"{name}.{fmt}").is_file() for fmt in ("md", "csv", "tex"))
    for name in ("e2e_latency_cdf", "e2e_latency_vs_rate"):
        assert all((report / "figures" / f"{name}.{fmt}").stat().st_size > 1000 for fmt in ("png", "pdf"))
    summary = (report / "summary.md").read_text()
    assert "End to end: packinfer against each baseline" in summary and "incorrect" in summary
    assert "| m | llama-3.1-8b | 32 | sharegpt | 4 | fa2 | 20 |" in summary


# -- figures: colours, roofline ceilings, the notebook ---------------------------------------------------------------

def _lines_by_label(fig):
    return {line.get_label(): line for ax in fig.axes for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_a_backend_keeps_its_colour_whatever_other_backends_a_run_has(run):
    from packinfer_bench.report.figures import colour, latency_cdf

    records = load_records(run)
    records.loc[records["system"] == "flashinfer:fa2", ["status", "kernel_ms"]] = ["ok", 1.5]
    few = records[records["backend"] != "fa2"]  # the same run without fa2
    small, full = _lines_by_label(latency_cdf(few)), _lines_by_label(latency_cdf(records))
    assert set(small) == {"packinfer:full", "flashinfer:fa2"} and "fa2:varlen" in full
    for system in small:
        assert small[system].get_color() == full[system].get_color() == colour(system)
    assert colour("flashinfer:fa2") != colour("fa2:varlen") != colour("packinfer:full")


def test_latency_cdf_has_one_legend_naming_every_panels_systems(run):
    from packinfer_bench.report.figures import latency_cdf

    fig = latency_cdf(load_records(run))
    assert not any(ax.get_legend() for ax in fig.axes) and len(fig.legends) == 1
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"packinfer:full", "fa2:varlen"}
    assert fig.axes[0].get_shared_y_axes().joined(fig.axes[0], fig.axes[1])  # prefill and decode, one scale


def _with_env(run, gpu):
    (run / "env.json").write_text(json.dumps({"python": "3", "gpu": gpu}))
    return run


def test_roofline_ceilings_come_from_the_gpu_the_run_measured(run):
    from packinfer_bench.report.figures import gpu_ceilings, roofline

    # no env.json: the config's gpu section (Test GPU, 1 TB/s, 10 TFLOP/s)
    ceilings = gpu_ceilings(run)
    assert (ceilings.name, ceilings.hbm_tbps, ceilings.peak_tflops, ceilings.source) == ("Test GPU", 1.0, 10.0,
                                                                                        "config")
    # env.json names another GPU than the config: the data sheet of the one measured, not the config's numbers
    ceilings = gpu_ceilings(_with_env(run, {"name": "NVIDIA H200", "sms": 132}))
    assert (ceilings.hbm_tbps, ceilings.peak_tflops, ceilings.source) == (4.8, 989.0, "data sheet")
    assert gpu_ceilings(_with_env(run, {"name": "NVIDIA A100-SXM4-80GB"})).hbm_tbps == 2.039
    roof = max(roofline(load_records(run), ceilings).axes[0].get_lines(), key=lambda line: len(line.get_xdata()))
    x, y = np.asarray(roof.get_xdata()), np.asarray(roof.get_ydata())
    assert y.max() == pytest.approx(989e12)  # compute ceiling: the peak
    assert y[0] == pytest.approx(4.8e12 * x[0])  # memory ceiling: bandwidth x intensity
    assert "no peak figures for Mystery GPU" in gpu_ceilings(_with_env(run, {"name": "Mystery GPU"}))


def test_a_cpu_run_has_no_roofline_rather_than_an_invented_one(run):
    from packinfer_bench.report.figures import gpu_ceilings, roofline

    why = gpu_ceilings(_with_env(run, None))
    assert isinstance(why, str) and "CPU" in why
    fig = roofline(load_records(run), why)
    assert [t.get_text() for t in fig.axes[0].texts] == [why] and not fig.axes[0].collections
