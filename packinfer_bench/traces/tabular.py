"""CSV and JSON-lines reading that reports bad rows by file and line number."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import TraceError


def read_header(path: Path) -> list[str]:
    """First row of a CSV file (empty list for an empty file)."""
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def read_csv_columns(path: Path, columns: list[str]) -> tuple[dict[str, list[str]], np.ndarray]:
    """Read the named columns of a CSV as strings, with the file line number of every row.

    Raises TraceError for a missing column or a row with the wrong number of fields (truncated file).
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path}: empty file, expected a CSV header with {columns}")
        header = [h.strip() for h in header]
        missing = [c for c in columns if c not in header]
        if missing:
            raise TraceError(f"{path}:1: missing column(s) {missing}; the header has {header}")
        idx = [header.index(c) for c in columns]
        out: dict[str, list[str]] = {c: [] for c in columns}
        lines: list[int] = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise TraceError(
                    f"{path}:{reader.line_num}: expected {len(header)} fields ({','.join(header)}), "
                    f"got {len(row)}: {','.join(row)!r} (truncated or malformed row)"
                )
            for c, i in zip(columns, idx):
                out[c].append(row[i])
            lines.append(reader.line_num)
    return out, np.asarray(lines, dtype=np.int64)


def parse_ints(values: list[str], path: Path, lines: np.ndarray, column: str) -> np.ndarray:
    """Parse a column of integer strings; a non-integer value raises TraceError naming file, line and column."""
    numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numbers) | (numbers != np.round(numbers))
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"{path}:{lines[i]}: column {column!r} must be an integer, got {values[i]!r}")
    return numbers.astype(np.int64)


def require_positive(values: np.ndarray, path: Path, lines: np.ndarray, column: str) -> None:
    """Raise TraceError naming file, line and column for the first value <= 0."""
    bad = values <= 0
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"{path}:{lines[i]}: column {column!r} must be > 0, got {values[i]}")


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{line_no}: not valid JSON ({e.msg}); truncated line?") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj
