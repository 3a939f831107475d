"""result.json: one self-describing file per run folder - schema version, experiment and resolved config, every
session that measured into the folder (its start, and end where it finished; commit, torch.utils.collect_env's
report and GPU clocks, as sessions.jsonl recorded them when it began, so a killed session keeps its environment),
and every headline metric the report computes (kernel speed-ups, ablation, serving-call wins; end-to-end
comparisons with intervals, iteration kinds, sustained rates)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import yaml

from packinfer_bench.report.e2e_tables import (
    e2e_compare_table,
    e2e_iteration_kinds_table,
    e2e_slo_table,
    has_e2e,
    load_e2e,
    load_e2e_iterations,
)
from packinfer_bench.report.tables import (
    ablation_table,
    ablation_wins_table,
    best_variant_wins_table,
    load_records,
    speedup_table,
)
from packinfer_bench.run_folder import CONFIG_FILE, RECORDS_FILE, JsonLines, write_atomic
from packinfer_bench.run_folder.files import SESSIONS_FILE

RESULT_FILE = "result.json"
SCHEMA_VERSION = 1


def write_result(run: Path, finished: float | None = None) -> Path:
    """Write (or refresh) run/result.json: every session of sessions.jsonl (the last one finished at `finished`
    when given; ends already recorded are kept) and the metrics now."""
    path = run / RESULT_FILE
    old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config = yaml.safe_load((run / CONFIG_FILE).read_text(encoding="utf-8")) if (run / CONFIG_FILE).is_file() else {}
    ends = {s.get("started"): s.get("finished_at") for s in old.get("sessions", [])}
    sessions = [{**s, "finished_at": ends.get(s.get("started"))} for s in JsonLines(run / SESSIONS_FILE).read()[0]]
    if finished is not None and sessions:
        sessions[-1]["finished_at"] = _iso(finished)
    result = {"schema_version": SCHEMA_VERSION, "experiment": (config or {}).get("name"), "config": config,
              "sessions": sessions, "metrics": metrics(run)}
    write_atomic(path, json.dumps(_clean(result), indent=1, default=str) + "\n")
    return path


def metrics(run: Path) -> dict:
    """Every table the headline rests on, as lists of rows."""
    out: dict[str, list] = {}
    if (run / RECORDS_FILE).is_file():
        df = load_records(run)
        out.update(kernel_speedups=_rows(speedup_table(df)), kernel_ablation=_rows(ablation_table(df)),
                   kernel_ablation_wins=_rows(ablation_wins_table(df)), serving_wins=_rows(best_variant_wins_table(df)))
    if has_e2e(run):
        summary, requests = load_e2e(run)
        iterations = load_e2e_iterations(run)
        out.update(e2e_compare=_rows(e2e_compare_table(summary, requests, iterations)),
                   e2e_iteration_kinds=_rows(e2e_iteration_kinds_table(iterations)),
                   e2e_slo=_rows(e2e_slo_table(summary)), e2e_replays=_rows(summary))
    return out


def _rows(table: pd.DataFrame) -> list[dict]:
    return table.to_dict("records")


def _clean(value):
    """NaN and inf as null (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))
