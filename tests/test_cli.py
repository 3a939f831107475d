"""The command line: a cheap start, traces list/describe, env, `run` (--dry-run, resume, --backends/--skip,
--list-backends, --set), run.log, the tables a run ends with, and CPU runs named as such."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from click.testing import CliRunner
from conftest import FIXTURES, REPO

from packinfer_bench import envinfo, logs
from packinfer_bench.cli import main
from packinfer_bench.run_folder import BATCHES_FILE, CONFIG_FILE, RECORDS_FILE, WORKLOAD_FILE

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
    for name in ("config.yaml", "traces.json", BATCHES_FILE, WORKLOAD_FILE):
        assert (out / name).exists(), name
    assert not (out / "env.json").exists()  # written by the session that measures, whose machine it describes
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


def test_run_measures_writes_records_and_ends_with_the_report_tables(tmp_path):
    run = tmp_path / "r"
    result = invoke("run", str(FIXTURES / "tiny.yaml"), "--out", str(run))
    assert result.exit_code == 0, result.output
    assert "backend fa2: skipped (needs a CUDA device)" in result.output
    assert "records: 14 ok, 0 incorrect, 4 skipped, 0 error" in result.output
    assert len(pd.read_csv(run / RECORDS_FILE)) == 18
    # the end: the report's speed-up table (one row per trace and phase), the CPU note, what to run next
    speedups = re.findall(r"^\s*mix\s+(prefill|mixed)\s+(\S+)\s*$", result.stdout, re.MULTILINE)
    assert sorted(phase for phase, _ in speedups) == ["mixed", "prefill"] and all(float(v) > 0 for _, v in speedups)
    assert "Speed-up of packinfer:full" in result.stdout and "not performance figures" in result.stdout
    assert result.stdout.rstrip().endswith(f"run folder: {run}\nnext: packinfer-bench report {run}")

    (run / "result.json").unlink()  # as a run stopped before its end leaves the folder: the report writes it
    report = invoke("report", str(run), "--figures", "")
    assert report.exit_code == 0, report.output
    assert json.loads((run / "result.json").read_text())["metrics"]
    assert "not performance figures" in report.stdout and "Speed-up of packinfer:full" in report.stdout
    summary = (run / "report" / "summary.md").read_text()
    assert "CPU (Triton interpreter)" in summary and "not performance figures" in summary and "?" not in summary


def test_a_run_stopped_by_its_time_limit_exits_3_and_resume_finishes_it(tmp_path):
    run = tmp_path / "r"
    stopped = invoke("run", str(FIXTURES / "tiny.yaml"), "--out", str(run), "--time-limit", "1e-9")
    assert stopped.exit_code == 3, stopped.output
    assert "stopped at the time limit, before batch " in stopped.output and "--resume --out" in stopped.output
    resumed = invoke("run", str(FIXTURES / "tiny.yaml"), "--out", str(run), "--resume", "--time-limit", "3600")
    assert resumed.exit_code == 0, resumed.output
    assert "records: 14 ok, 0 incorrect, 4 skipped, 0 error" in resumed.output
    bad = invoke("run", str(FIXTURES / "tiny.yaml"), "--out", str(tmp_path / "b"), "--time-limit", "0")
    assert bad.exit_code == 2 and "--time-limit" in bad.output


def test_run_with_a_bad_config_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(SMOKE).read_text().replace("timing: {", "timing: {repeatz: 3, "))
    result = invoke("run", str(bad), "--dry-run", "--out", str(tmp_path / "r"))
    assert result.exit_code == 1 and "timing.repeatz: unknown key" in result.output


def imported_after(*args: str, env: dict | None = None,
                   start: str = "runpy.run_module('packinfer_bench', run_name='__main__', alter_sys=True)") -> dict:
    """Run `python -m packinfer_bench ARGS` (or `start`) in a fresh interpreter with `env` added; at its exit,
    which heavy modules it had imported, whether TRITON_INTERPRET was set (it starts unset) and what it printed."""
    probe = ("import atexit, json, os, runpy, sys\n"
             "atexit.register(lambda: print('PROBE ' + json.dumps({'heavy': sorted(m for m in ('torch', 'pandas', "
             "'matplotlib', 'triton') if m in sys.modules), 'interpret': 'TRITON_INTERPRET' in os.environ})))\n"
             f"sys.argv = ['packinfer-bench', *{list(args)!r}]\n"
             f"{start}\n")
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **(env or {})}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    printed, state = out.stdout.rsplit("PROBE ", 1)
    return {**json.loads(state), "printed": printed}


def test_help_and_traces_list_import_no_torch_pandas_or_matplotlib():
    for args in (["--help"], ["traces", "list"], ["run", "--help"]):
        state = imported_after(*args)
        assert state["heavy"] == [] and state["interpret"] is False, (args, state)
        assert ("shipped traces" if "traces" in args else "Usage: ") in state["printed"]


def test_shell_completion_offers_the_trace_kinds_without_loading_torch():
    # as the packinfer-bench script starts it
    state = imported_after(env={"_PACKINFER_BENCH_COMPLETE": "bash_complete", "COMP_CWORD": "5",
                                "COMP_WORDS": "packinfer-bench traces describe x --kind "},
                           start="from packinfer_bench.cli import main; main(prog_name='packinfer-bench')")
    assert state["printed"].split() == ["plain,azure", "plain,mooncake", "plain,sharegpt", "plain,synthetic"]
    assert state["heavy"] == []


def test_a_command_that_runs_kernels_sets_the_interpreter_only_without_a_gpu():
    import torch

    state = imported_after("run", "--list-backends")
    assert "torch" in state["heavy"] and state["interpret"] is (not torch.cuda.is_available())


def test_list_backends_names_each_backend_its_variants_and_whether_it_runs_here():
    import torch

    from packinfer_bench.backends import BACKENDS

    result = invoke("run", "--list-backends")
    assert result.exit_code == 0, result.output
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ ") and line.split()[1]
            in BACKENDS}
    assert set(rows) == set(BACKENDS)
    for name, backend in BACKENDS.items():
        reason = backend.available(device)
        assert (f"no: {reason}" if reason else "│ yes") in rows[name], rows[name]
        assert backend.variants[0] in rows[name]


def config_of(run) -> dict:
    return yaml.safe_load((run / CONFIG_FILE).read_text())


def test_backends_and_skip_filter_the_configs_backends_and_the_run_folder_records_it(tmp_path):
    result = invoke("run", SMOKE, "--dry-run", "--out", str(tmp_path / "a"), "--backends", "packinfer,fa2")
    assert result.exit_code == 0, result.output
    config = config_of(tmp_path / "a")
    assert config["backends"] == ["fa2", "packinfer"] and config["e2e"][0]["backends"] == ["fa2", "packinfer"]

    result = invoke("run", SMOKE, "--dry-run", "--out", str(tmp_path / "b"), "--skip", "fa2,flashinfer")
    assert result.exit_code == 0, result.output
    config = config_of(tmp_path / "b")
    assert config["backends"] == ["sdpa_padded", "flex", "triton_unpacked", "packinfer"]
    assert config["e2e"][0]["backends"] == ["packinfer"]


def test_backends_and_skip_errors_list_the_allowed_names(tmp_path):
    tiny = str(FIXTURES / "tiny.yaml")
    for flag, value in (("--backends", "packinfer,fa3"), ("--skip", "nope")):
        result = invoke("run", tiny, "--dry-run", "--out", str(tmp_path / "r"), flag, value)
        assert result.exit_code == 1 and f"{flag}: {value.split(',')[-1]} not among this config's backends; " \
            "allowed: sdpa_padded, packinfer, fa2" in result.output, result.output
    result = invoke("run", tiny, "--dry-run", "--out", str(tmp_path / "r"), "--backends", "fa2", "--skip", "fa2")
    assert result.exit_code == 1 and "leave no backend to run" in result.output
    assert not (tmp_path / "r").exists()


def test_set_overrides_config_keys_and_resume_checks_them(tmp_path):
    tiny, run = str(FIXTURES / "tiny.yaml"), tmp_path / "r"
    sets = ["--set", "timing.repeats=7", "--set", "shapes[0].dtype=bf16", "--set", "traces.0.options.num_requests=5"]
    result = invoke("run", tiny, "--dry-run", "--out", str(run), *sets)
    assert result.exit_code == 0, result.output
    config = config_of(run)
    assert config["timing"]["repeats"] == 7 and config["shapes"][0]["dtype"] == "bf16"
    assert config["traces"][0]["options"]["num_requests"] == 5

    without = invoke("run", tiny, "--dry-run", "--out", str(run), "--resume")
    assert without.exit_code == 1 and "the config differs" in without.output and "timing.repeats" in without.output
    again = invoke("run", tiny, "--dry-run", "--out", str(run), "--resume", *sets)
    assert again.exit_code == 0, again.output


def test_set_errors_name_the_key_and_what_is_allowed(tmp_path):
    tiny = str(FIXTURES / "tiny.yaml")
    for item, message in (
            ("timing.repeatz=3", ("timing.repeatz: unknown key; allowed keys: ['warmup', 'repeats', 'flush_l2', "
                                  "'cuda_graphs']")),
            ("device=gpu", "device: 'gpu' not allowed; allowed: ['auto', 'cuda', 'cpu', 'analytic']"),
            ("timing.repeats=0", "timing.repeats"),
            ("shapes[3].dtype=bf16", "shapes is a list of 1; allowed: an index 0 to 0"),
            ("timing.repeats", "expected KEY=VALUE")):
        result = invoke("run", tiny, "--dry-run", "--out", str(tmp_path / "r"), "--set", item)
        assert result.exit_code == 1 and message in result.output, (item, result.output)


def test_run_log_holds_timestamped_lines_and_is_appended_on_resume(tmp_path):
    run = tmp_path / "r"
    invoke("run", str(FIXTURES / "tiny.yaml"), "--dry-run", "--out", str(run))
    invoke("run", str(FIXTURES / "tiny.yaml"), "--dry-run", "--out", str(run), "--resume")
    lines = (run / logs.RUN_LOG).read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ", line) for line in lines)
    assert [line.split(": ", 1)[1] for line in lines if "session:" in line] == ["session: tiny started",
                                                                                "session: tiny resumed"]
    assert sum("workload: 2 new batch(es), 0 already stored" in line for line in lines) == 1
    assert sum("workload: 0 new batch(es), 2 already stored" in line for line in lines) == 1


def test_a_traceback_goes_to_run_log_and_one_line_to_the_console(tmp_path, capsys):
    logs.setup_console()
    log = logs.get_logger("packinfer_bench.test")
    with logs.run_log(tmp_path):
        try:
            raise ValueError("bad tile\nsecond line")
        except ValueError:
            log.warning("backend x failed", exc_info=True)
    shown = capsys.readouterr().err
    assert shown == "warning: backend x failed (ValueError: bad tile; traceback in run.log)\n"
    text = (tmp_path / logs.RUN_LOG).read_text()
    assert "WARNING packinfer_bench.test: backend x failed" in text and "Traceback (most recent call last)" in text
    assert logging.getLogger("packinfer_bench").level == logging.INFO


def test_environment_line_names_a_cpu_run_and_only_known_gpu_facts():
    assert envinfo.describe({"torch": "2.13.0+cpu", "packages": {"triton": "3.9.0", "flashinfer-python": None},
                             "git_sha": "abc"}) == ("CPU (Triton interpreter), torch 2.13.0+cpu, triton 3.9.0, "
                                                    "commit abc")
    gpu = {"name": "NVIDIA H100", "sms": 132, "driver": None}
    assert envinfo.describe({"gpu": gpu, "torch": "2.11"}).startswith("NVIDIA H100 (132 SMs), torch 2.11, commit ")
