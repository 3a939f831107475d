"""A run folder never loses what it holds: rows are only appended, a torn or corrupt row costs that row alone, one
writer at a time, and a resume with another config is refused. The kill test interrupts real runs at random
moments (start-up reading a 100k-row records file included) and compares key sets."""

import csv
import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, REPO

from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.run_folder import RECORDS_FILE, CsvRows, JsonLines, new_run_path, open_run_folder
from packinfer_bench.run_folder.e2e import complete_rows
from packinfer_bench.run_folder.folder import LOCK_FILE, changed_keys
from packinfer_bench.run_folder.records import FIELDS, KEY_FIELDS, Record, RecordStore


def _record(i: int, **kw) -> Record:
    return Record("t", "w", "prefill", f"fake/b{i}", 4, 100, 200, "s", "packinfer", "full", "ok", kernel_ms=0.1,
                  rel_err=1e-3, timing="cuda-events", **kw)


def _keys(folder) -> list[tuple]:
    rows, _ = RecordStore(folder).rows.read()
    return [tuple(r[f] for f in KEY_FIELDS) for r in rows]


def test_a_torn_last_row_is_cut_off_before_the_next_append_and_nothing_before_it_changes(tmp_path):
    store = RecordStore(tmp_path)
    for i in range(3):
        store.append(_record(i))
    finished = store.path.read_bytes()
    with open(store.path, "ab") as f:
        f.write(b"fake/b3,s,packinfer,fu")  # killed mid-write
    assert len(store.keys()) == 3
    store.append(_record(4))
    assert store.path.read_bytes().startswith(finished)
    assert _keys(tmp_path) == [("fake/b0", "s", "packinfer", "full"), ("fake/b1", "s", "packinfer", "full"),
                               ("fake/b2", "s", "packinfer", "full"), ("fake/b4", "s", "packinfer", "full")]


@pytest.mark.parametrize("bad", [
    '"unbalanced,quote,' + "x," * (len(FIELDS) - 3) + "x",   # used to swallow every row after it
    "fake/b9,s\0,packinfer," + "x," * (len(FIELDS) - 4) + "x",  # a NUL byte
    "too,few,fields",
    ",".join(["x"] * len(FIELDS)),  # right width, status is not a status
])
def test_a_corrupt_row_costs_that_row_alone(tmp_path, bad):
    store = RecordStore(tmp_path)
    store.append(_record(0))
    with open(store.path, "a", encoding="utf-8") as f:
        f.write(bad + "\n")
    for i in (1, 2):
        store.append(_record(i))
    rows, skipped = store.rows.read()
    assert [r["batch_id"] for r in rows] == ["fake/b0", "fake/b1", "fake/b2"]
    assert [n for n, _ in skipped.lines] == [3]  # header is line 1


def test_text_with_line_breaks_stays_one_row(tmp_path):
    store = CsvRows(tmp_path / "x.csv", ["a", "reason"])
    store.append([{"a": 1, "reason": "first line\nsecond line"}, {"a": 2, "reason": "ok"}])
    rows, bad = store.read()
    assert [r["a"] for r in rows] == ["1", "2"] and not bad and rows[0]["reason"] == "first line second line"


def test_jsonl_skips_unreadable_lines_and_cuts_a_torn_tail(tmp_path):
    store = JsonLines(tmp_path / "b.jsonl")
    store.append([{"batch_id": "a"}])
    with open(store.path, "a") as f:
        f.write("{not json}\n[1, 2]\n{\"batch_id\": \"b\"")
    store.append([{"batch_id": "c"}])
    items, bad = store.read()
    assert [i["batch_id"] for i in items] == ["a", "c"] and len(bad.lines) == 2


def test_e2e_readers_keep_the_rows_of_the_attempt_the_summary_names():
    key = {"e2e": "m", "trace": "t", "rate": "4", "backend": "packinfer"}
    rows = [{**key, "attempt": "1", "i": "0"}, {**key, "attempt": "2", "i": "0"}, {**key, "attempt": "2", "i": "1"},
            {**key, "backend": "fa2", "attempt": "3", "i": "0"}]  # fa2: interrupted, no summary yet
    assert [r["i"] for r in complete_rows(rows, [{**key, "attempt": "2"}])] == ["0", "1"]


def test_a_second_writer_is_refused_with_the_holder_named_and_a_stale_lock_taken_over(tmp_path):
    with open_run_folder(tmp_path / "run", {"name": "x"}, {}, resume=False, log=lambda _: None):
        with pytest.raises(PackinferBenchError, match=rf"in use by another run \(pid {os.getpid()} on "
                                                      rf"{socket.gethostname()}, started "):
            open_run_folder(tmp_path / "run", {"name": "x"}, {}, resume=True)
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run" / LOCK_FILE).write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}", '
                                              '"started": "then"}')
    messages = []
    open_run_folder(tmp_path / "run", {"name": "x"}, {}, resume=True, log=messages.append).close()
    assert "stale lock" in messages[0]


def test_resume_with_another_config_is_refused_naming_the_keys(tmp_path):
    cfg = {"name": "x", "timing": {"repeats": 50, "warmup": 10}, "backends": ["fa2", "packinfer"]}
    open_run_folder(tmp_path / "run", cfg, {}, resume=False).close()
    changed = {**cfg, "timing": {"repeats": 5, "warmup": 10}, "backends": ["fa2"]}
    with pytest.raises(PackinferBenchError, match=r"changed backends, timing.repeats"):
        open_run_folder(tmp_path / "run", changed, {}, resume=True)
    open_run_folder(tmp_path / "run", {**cfg, "output": {"dir": "elsewhere"}}, {}, resume=True).close()
    assert changed_keys({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}], "c": 1}) == ["a[1].b", "c"]


def test_env_json_keeps_the_first_session_and_every_session_is_listed(tmp_path):
    open_run_folder(tmp_path / "run", {"name": "x"}, {"gpu": "first"}, resume=False).close()
    open_run_folder(tmp_path / "run", {"name": "x"}, {"gpu": "second"}, resume=True).close()
    assert '"first"' in (tmp_path / "run" / "env.json").read_text()
    sessions, _ = JsonLines(tmp_path / "run" / "sessions.jsonl").read()
    assert [s["env"]["gpu"] for s in sessions] == ["first", "second"]


def test_a_dry_run_leaves_env_json_to_the_session_that_measures(tmp_path):
    """`run --dry-run` on a laptop, then the GPU run resumes the folder: env.json must describe the GPU."""
    open_run_folder(tmp_path / "run", {"name": "x"}, {"gpu": None}, resume=False, measures=False).close()
    assert not (tmp_path / "run" / "env.json").exists()
    open_run_folder(tmp_path / "run", {"name": "x"}, {"gpu": "H100"}, resume=True).close()
    open_run_folder(tmp_path / "run", {"name": "x"}, {"gpu": "H200"}, resume=True).close()
    assert '"H100"' in (tmp_path / "run" / "env.json").read_text()
    sessions, _ = JsonLines(tmp_path / "run" / "sessions.jsonl").read()
    assert [(s["env"]["gpu"], s.get("dry_run", False)) for s in sessions] == [(None, True), ("H100", False),
                                                                               ("H200", False)]


def test_run_ids_are_unique_and_bad_output_paths_are_clear_errors(tmp_path):
    paths = {new_run_path(tmp_path / "exp") for _ in range(5)}
    assert len(paths) == 5 and all(p.is_dir() for p in paths)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PackinferBenchError, match="is a file"):
        open_run_folder(tmp_path / "file", {}, {}, resume=False)
    with pytest.raises(PackinferBenchError, match="a part of the path is a file"):
        open_run_folder(tmp_path / "file" / "sub", {}, {}, resume=False)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(PackinferBenchError, match="permission denied"):
            open_run_folder(locked / "run", {}, {}, resume=False)


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "packinfer_bench.cli", "run", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _big_run_folder(tmp_path, rows: int = 100_000):
    """A run folder of the tiny experiment (batches made, nothing measured) whose records.csv already holds
    `rows` finished records of other batches."""
    out = tmp_path / "run"
    proc = _cli(str(FIXTURES / "tiny.yaml"), "--out", str(out), "--dry-run")
    assert proc.wait(120) == 0, proc.stdout.read()
    with open(out / RECORDS_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(dataclasses.asdict(_record(i)) for i in range(rows))
    return out


def test_kills_at_random_moments_lose_and_duplicate_nothing(tmp_path):
    out = _big_run_folder(tmp_path)
    finished = (out / RECORDS_FILE).read_bytes()
    before = set(_keys(out))
    rng = random.Random(14)
    for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGKILL, signal.SIGKILL, signal.SIGINT):
        proc = _cli(str(FIXTURES / "tiny.yaml"), "--out", str(out), "--resume")
        time.sleep(rng.uniform(0.3, 9.0))  # start-up (imports, reading 100k rows) or measuring
        proc.send_signal(sig)
        proc.wait(60)
        keys = _keys(out)
        assert len(keys) == len(set(keys)), "a record was stored twice"
        assert before <= set(keys), "a finished record was lost"
        assert (out / RECORDS_FILE).read_bytes().startswith(finished)
    proc = _cli(str(FIXTURES / "tiny.yaml"), "--out", str(out), "--resume")
    assert proc.wait(300) == 0, proc.stdout.read()
    keys = _keys(out)
    measured = set(keys) - before
    assert len(keys) == len(set(keys)) and len(measured) == 18  # 2 batches x (sdpa + 7 packinfer + fa2)
    assert all(k[0].startswith("k/") for k in measured)


def test_a_second_run_on_a_held_folder_exits_with_the_holder_named(tmp_path):
    out = tmp_path / "run"
    with open_run_folder(out, {"name": "held"}, {}, resume=False):
        proc = _cli(str(FIXTURES / "tiny.yaml"), "--out", str(out), "--resume")
        text = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and f"in use by another run (pid {os.getpid()}" in text


def test_two_concurrent_resumes_never_store_a_record_twice(tmp_path):
    out = _big_run_folder(tmp_path, rows=1000)
    procs = [_cli(str(FIXTURES / "tiny.yaml"), "--out", str(out), "--resume") for _ in range(2)]
    texts = [p.communicate(timeout=300)[0] for p in procs]
    assert any(p.returncode == 0 for p in procs), texts
    for p, text in zip(procs, texts):
        assert p.returncode == 0 or "in use by another run" in text, text
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 1000 + 18


def test_an_archived_file_reads_as_the_file_and_refuses_appends(tmp_path):
    """Committed reference runs may keep a large finished file gzip-compressed beside its name."""
    import gzip

    rows = CsvRows(tmp_path / "iterations.csv")
    rows.append([{"a": "1", "b": "x"}, {"a": "2", "b": "y"}])
    plain = rows.read()[0]
    data = (tmp_path / "iterations.csv").read_bytes()
    (tmp_path / "iterations.csv").unlink()
    (tmp_path / "iterations.csv.gz").write_bytes(gzip.compress(data))
    assert rows.exists() and rows.header() == ["a", "b"] and rows.read()[0] == plain
    with pytest.raises(PackinferBenchError, match="archived .compressed. file is read-only"):
        rows.append([{"a": "3", "b": "z"}])
