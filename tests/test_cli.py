"""The command line: traces list/describe, env, and `run --dry-run` with resume."""

import json
import shutil

import pandas as pd
from click.testing import CliRunner
from conftest import FIXTURES, REPO

from packinfer_bench.cli import main
from packinfer_bench.run_folder import BATCHES_FILE, WORKLOAD_FILE
from packinfer_bench.run_folder import RECORDS_FILE

SMOKE = str(REPO / "experiments" / "smoke.yaml")


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_traces_list_names_shipped_traces_and_kinds():
    result = invoke("traces", "list")
    assert result.exit_code == 0
    for word in ("azure-conv", "sharegpt", "mooncake-conv", "synthetic"):
        assert word in result.output


def test_traces_describe_a_renamed_file_detects_its_kind(tmp_path):
    copy = tmp_path / "my_trace.jsonl"
    shutil.copy(REPO / "traces" / "mooncake_conversation_trace.jsonl", copy)
    result = invoke("traces", "describe", str(copy), "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["kind"] == "mooncake" and info["rows"] == 12031 and info["prompt_len_max"] == 126195
    assert 3536 < info["time_span_s"] < 3538


def test_traces_describe_errors_are_one_clear_line(tmp_path):
    result = invoke("traces", "describe", str(tmp_path / "missing.csv"))
    assert result.exit_code == 1 and "Error: trace file not found" in result.output
    result = invoke("traces", "describe", "sharegpt", "--kind", "parquet")
    assert result.exit_code == 2 and "'parquet' is not one of" in result.output


def test_env_prints_json():
    info = json.loads(invoke("env").output)
    assert {"python", "torch", "cuda_available", "git_sha", "packages"} <= set(info)


def test_run_dry_run_writes_the_workload_and_resume_adds_nothing(tmp_path):
    out = tmp_path / "run"
    result = invoke("run", SMOKE, "--dry-run", "--out", str(out))
    assert result.exit_code == 0, result.output
    for name in ("config.yaml", "env.json", "traces.json", BATCHES_FILE, WORKLOAD_FILE):
        assert (out / name).exists(), name
    stats = pd.read_csv(out / WORKLOAD_FILE)
    assert set(stats["phase"]) == {"prefill", "decode", "mixed"}
    assert stats["batch_id"].is_unique and (stats["num_kv_tokens"] >= stats["num_q_tokens"]).all()
    first = (out / BATCHES_FILE).read_text()

    again = invoke("run", SMOKE, "--dry-run", "--out", str(out))
    assert again.exit_code == 1 and "not empty: pass --resume" in again.output

    resumed = invoke("run", SMOKE, "--dry-run", "--out", str(out), "--resume")
    assert resumed.exit_code == 0 and f"0 new batch(es), {len(stats)} already stored" in resumed.output
    assert (out / BATCHES_FILE).read_text() == first


def test_resume_after_interruption_completes_without_duplicates(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    invoke("run", SMOKE, "--dry-run", "--out", str(full))
    lines = (full / BATCHES_FILE).read_text().splitlines(keepends=True)
    cut.mkdir()
    # an interrupted run: the first ten batches stored, the eleventh cut mid-write
    (cut / BATCHES_FILE).write_text("".join(lines[:10]) + lines[10][:40])
    result = invoke("run", SMOKE, "--dry-run", "--out", str(cut), "--resume")
    assert result.exit_code == 0 and f"{len(lines) - 10} new batch(es), 10 already stored" in result.output
    assert sorted((cut / BATCHES_FILE).read_text().splitlines()) == sorted(line.rstrip("\n") for line in lines)


def test_run_measures_and_writes_records(tmp_path):
    result = invoke("run", str(FIXTURES / "tiny.yaml"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    assert "backend fa2: skipped (needs a CUDA device)" in result.output
    assert "records: 14 ok, 0 incorrect, 4 skipped, 0 error" in result.output
    assert len(pd.read_csv(tmp_path / "r" / RECORDS_FILE)) == 18


def test_run_with_a_bad_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(SMOKE).read().replace("timing: {", "timing: {repeatz: 3, "))
    result = invoke("run", str(bad), "--dry-run", "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "timing.repeatz: unknown key" in result.output
