"""A run folder's files read into DataFrames, and the report's tables computed from them.

Kernel level (records.csv): speed-ups of ours per trace and phase, ablation, plan cost, correctness, and several
runs side by side (the end-to-end tables are in e2e_tables.py). A speed-up only ever compares two `ok` rows of
the same batch and shape; incorrect, skipped and failed rows are counted, never folded in.

Files are read one row per line (run_folder.store): a row that cannot be read (an unbalanced quote, a NUL byte, a
wrong number of fields, a non-number where a number belongs) is skipped with a warning naming the file and line;
a file without a column the report needs is a PackinferBenchError naming the file and the column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.run_folder import RECORDS_FILE, WORKLOAD_FILE
from packinfer_bench.run_folder.records import record_key
from packinfer_bench.run_folder.store import CsvRows, last_per_key, not_a_number

#: "Ours": the backend every other one is compared with. End to end it is the backend; at kernel level its full
#: variant (its other variants are ablations, each with one feature off).
OURS_BACKEND = "packinfer"
OURS = (OURS_BACKEND, "full")
OURS_SYSTEM = ":".join(OURS)

#: records.csv: the numeric columns that may be empty, and every column the tables read.
RECORD_NUMBERS = ("plan_ms", "kernel_ms", "kernel_ms_p10", "kernel_ms_p90", "tflops", "kv_tbps", "max_abs_err",
                  "rel_err")
RECORD_COLUMNS = ("trace", "phase", "batch_id", "shape", "backend", "variant", "status", "plan_ms", "kernel_ms",
                  "rel_err")
#: workload.csv: what the speed-up-against-heterogeneity figure reads.
WORKLOAD_COLUMNS = ("batch_id", "kv_len_cv")


# -- reading ------------------------------------------------------------------------------------------------------

def require_columns(columns: Iterable[str], required: Iterable[str], path: Path) -> None:
    """A PackinferBenchError naming the file and every required column it lacks."""
    have = set(columns)
    missing = [c for c in required if c not in have]
    if missing:
        raise PackinferBenchError(f"{path}: no column {', '.join(missing)} (a file written by another version of "
                                  "packinfer-bench, or edited by hand?)")


def _numbers_check(columns: Iterable[str]) -> Callable[[dict[str, str]], str | None]:
    """A row check (run_folder.store): each of `columns` is empty or a number."""
    columns = tuple(columns)

    return lambda row: not_a_number(row, columns)


def read_rows(path: Path, required: Iterable[str],
               numbers: Iterable[str] = ()) -> tuple[list[str], list[dict[str, str]]]:
    """(header, readable rows) of a CSV file; unreadable rows are skipped, with a warning naming file and lines."""
    rows_file = CsvRows(path, check=_numbers_check(numbers))
    header = rows_file.header()
    if header is None:
        raise PackinferBenchError(f"{path}: empty (no header line)")
    require_columns(header, required, path)
    rows, _ = rows_file.read()
    return header, rows


def frame(header: list[str], rows: list[dict[str, str]], **read_csv: object) -> pd.DataFrame:
    """The rows as a DataFrame, parsed by pandas exactly as the file itself would be (types, empty cells)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([row.get(c, "") for c in header] for row in rows)
    buf.seek(0)
    return pd.read_csv(buf, **read_csv)


def load_records(run: Path) -> pd.DataFrame:
    """records.csv of a run folder, with a `system` column (backend:variant)."""
    path = run / RECORDS_FILE
    if not path.is_file():
        raise PackinferBenchError(f"{run}: no {RECORDS_FILE} (is it a run folder?)")
    header, rows = read_rows(path, RECORD_COLUMNS, (*RECORD_NUMBERS, "batch_size"))
    df = frame(header, last_per_key(rows, record_key), keep_default_na=False,
               na_values={c: [""] for c in RECORD_NUMBERS})
    df["system"] = df["backend"] + ":" + df["variant"]
    return df


def load_workload(run: Path) -> pd.DataFrame | None:
    """workload.csv of a run folder (per batch statistics such as kv_len_cv), or None when it has none."""
    path = run / WORKLOAD_FILE
    if not path.is_file():
        return None
    return frame(*read_rows(path, WORKLOAD_COLUMNS))


# -- kernel-level tables ------------------------------------------------------------------------------------------

def paired_speedups(df: pd.DataFrame, ours: str = OURS_SYSTEM) -> pd.DataFrame:
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


def _ablation_pairs(df: pd.DataFrame, ours: tuple[str, str]) -> pd.DataFrame:
    """paired_speedups of the full system against its own variants only."""
    pairs = paired_speedups(df, ":".join(ours))
    return pairs[pairs["system"].str.startswith(ours[0] + ":")]


def ablation_table(df: pd.DataFrame, ours: tuple[str, str] = OURS) -> pd.DataFrame:
    """Slow-down of each ablation variant of `ours` against the full system, per phase (> 1: the feature helps)."""
    pairs = _ablation_pairs(df, ours)
    return _geomean_table(pairs, ["phase", "system"]).rename(columns={"geomean": "slowdown_geomean"})


#: A variant of ours this much faster than the full system on a batch is listed: its planner switches (issue 16
#: bounds them at 3%) and its other choices (layout, loads, where the K/V is stored) alike.
ABLATION_MARGIN = 0.03


def ablation_wins_table(df: pd.DataFrame, ours: tuple[str, str] = OURS,
                        margin: float = ABLATION_MARGIN) -> pd.DataFrame:
    """Every batch where an ablation variant of `ours` ran more than `margin` faster than the full system: its
    time and the full system's (ms), and variant time / full time (< 1 - margin); empty when the full system
    is within the margin of every variant on every batch."""
    pairs = _ablation_pairs(df, ours)
    wins = pairs[pairs["speedup"] < 1.0 - margin]
    table = wins.rename(columns={"kernel_ms_ours": "full_ms", "kernel_ms_other": "variant_ms",
                                 "speedup": "variant_over_full"})
    columns = ["trace", "phase", "batch_id", "shape", "system", "full_ms", "variant_ms", "variant_over_full"]
    return table[columns].sort_values("variant_over_full").reset_index(drop=True)


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


def best_variant_wins_table(df: pd.DataFrame, ours: tuple[str, str] = OURS) -> pd.DataFrame:
    """Per trace and phase and peer backend: on how many batches `ours` is faster than the peer's best variant
    on that batch (its fastest ok variant), and the geomean / min of that speed-up (batches where both ran)."""
    ok = df[df["status"] == "ok"]
    mine = ok[ok["system"] == ":".join(ours)][["trace", "phase", "batch_id", "shape", "kernel_ms"]]
    peers = ok[ok["backend"] != ours[0]]
    best = peers.groupby(["trace", "phase", "batch_id", "shape", "backend"], as_index=False)["kernel_ms"].min()
    pairs = mine.merge(best, on=["trace", "phase", "batch_id", "shape"], suffixes=("_ours", "_peer"))
    pairs["speedup"] = pairs["kernel_ms_peer"] / pairs["kernel_ms_ours"]
    g = pairs.groupby(["trace", "phase", "backend"])["speedup"]
    table = pd.DataFrame({"batches": g.size(), "wins": g.apply(lambda s: int((s > 1.0).sum())),
                          "geomean": g.apply(lambda s: float(np.exp(np.log(s).mean()))), "min": g.min()})
    table["win_share"] = table["wins"] / table["batches"]
    return table.reset_index().rename(columns={"backend": "peer"})
