"""Reports: a run folder's records turned into the kernel-level tables (speed-ups per trace and phase, ablation,
correctness), as CSV and Markdown with a summary.md stating the environment. A speed-up only ever compares two
`ok` records of the same batch and shape; incorrect, skipped and failed records are counted, never folded in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import PackinferBenchError
from packinfer_bench.records import RECORDS_FILE

OURS = ("packinfer", "full")
FORMATS = ("md", "csv")


def load_records(run: Path) -> pd.DataFrame:
    """records.csv of a run folder, with a `system` column (backend:variant)."""
    path = run / RECORDS_FILE
    if not path.is_file():
        raise PackinferBenchError(f"{run}: no {RECORDS_FILE} (is it a run folder?)")
    df = pd.read_csv(path, keep_default_na=False, na_values={"kernel_ms": [""], "rel_err": [""]})
    df["system"] = df["backend"] + ":" + df["variant"]
    return df


def _paired(df: pd.DataFrame, ours: str) -> pd.DataFrame:
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
    pairs = _paired(df, ":".join(ours))
    pairs = pairs[~pairs["system"].str.startswith(ours[0] + ":")]
    return _geomean_table(pairs, ["trace", "phase", "system"])


def ablation_table(df: pd.DataFrame, ours: tuple[str, str] = OURS) -> pd.DataFrame:
    """Slow-down of each ablation variant of `ours` against the full system, per phase (> 1: the feature helps)."""
    pairs = _paired(df, ":".join(ours))
    pairs = pairs[pairs["system"].str.startswith(ours[0] + ":")]
    return _geomean_table(pairs, ["phase", "system"]).rename(columns={"geomean": "slowdown_geomean"})


def correctness_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per system: records by status and the largest relative error of its ok records."""
    counts = df.pivot_table(index="system", columns="status", values="batch_id", aggfunc="count", fill_value=0)
    for status in ("ok", "incorrect", "skipped", "error"):
        if status not in counts:
            counts[status] = 0
    table = counts[["ok", "incorrect", "skipped", "error"]].copy()
    table["max_rel_err"] = df[df["status"] == "ok"].groupby("system")["rel_err"].max()
    return table.reset_index()


def write_report(run: Path, out: Path | None = None, formats: tuple[str, ...] = FORMATS) -> Path:
    """Write the tables (each as <name>.csv / .md per `formats`) and summary.md to `out` (default: <run>/report);
    returns summary.md's path."""
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise PackinferBenchError(f"--format: unknown format(s) {bad}; allowed: {list(FORMATS)}")
    df = load_records(run)
    out = out or run / "report"
    out.mkdir(parents=True, exist_ok=True)
    tables = {"speedups": speedup_table(df), "ablation": ablation_table(df), "correctness": correctness_table(df)}
    for name, table in tables.items():
        if "csv" in formats:
            table.to_csv(out / f"{name}.csv", index=False)
        if "md" in formats:
            (out / f"{name}.md").write_text(_markdown(table) + "\n", encoding="utf-8")
    env_path = run / "env.json"
    env = json.loads(env_path.read_text(encoding="utf-8")) if env_path.is_file() else {}
    gpu = env.get("gpu") or {}
    packages = env.get("packages") or {}
    lines = [f"# Report: {run}", "",
             f"Environment (env.json): {gpu.get('name', 'no GPU')} ({gpu.get('sms', '?')} SMs, driver "
             f"{gpu.get('driver', '?')}), torch {env.get('torch', '?')}, triton {packages.get('triton', '?')}, "
             f"flashinfer {packages.get('flashinfer-python')}, commit {env.get('git_sha', '?')}.",
             f"Source of every number: {run / RECORDS_FILE} ({len(df)} records). Speed-ups compare two `ok` "
             "records of the same batch and shape (median kernel times); other records are counted below.", ""]
    titles = {"speedups": f"Speed-up of {':'.join(OURS)} (other time / ours)",
              "ablation": "Ablation: slow-down with one feature off (variant time / full time)",
              "correctness": "Records by status, largest relative error against the float32 reference"}
    for name, table in tables.items():
        lines += [f"## {titles[name]}", "", _markdown(table) if len(table) else "(no comparable records)", ""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines), encoding="utf-8")
    return summary


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    rows = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
                     + ["| " + " | ".join(r) + " |" for r in rows])
