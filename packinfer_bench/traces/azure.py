"""Azure LLM inference trace (AzurePublicDataset): CSV with TIMESTAMP, ContextTokens, GeneratedTokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import TraceError
from packinfer_bench.traces.base import USER_LICENCE, Trace, user_file
from packinfer_bench.traces.tabular import parse_ints, read_csv_columns, read_header, require_positive

COLUMNS = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]


def sniff(path: Path) -> bool:
    return path.suffix.lower() == ".csv" and set(COLUMNS) <= {h.strip() for h in read_header(path)}


def load(path: Path, *, name: str) -> Trace:
    cols, lines = read_csv_columns(path, COLUMNS)
    seconds = _seconds(cols["TIMESTAMP"], path, lines)
    prompt = parse_ints(cols["ContextTokens"], path, lines, "ContextTokens")
    output = parse_ints(cols["GeneratedTokens"], path, lines, "GeneratedTokens")
    require_positive(prompt, path, lines, "ContextTokens")
    require_positive(output, path, lines, "GeneratedTokens")
    order = np.argsort(seconds, kind="stable")
    requests = pd.DataFrame({"arrival_s": seconds[order], "prompt_len": prompt[order], "output_len": output[order]})
    return Trace(
        name=name,
        kind="azure",
        requests=requests,
        source=user_file("azure"),
        licence=USER_LICENCE,
        tokenizer="as recorded in the file (ContextTokens / GeneratedTokens)",
        path=str(path),
    )



def _seconds(values: list[str], path: Path, lines: np.ndarray) -> np.ndarray:
    """Seconds since the earliest TIMESTAMP; TraceError naming the line of a value that is not a date-time."""
    try:
        stamps = pd.to_datetime(pd.Series(values, dtype=object), errors="coerce", format="mixed")
    except (ValueError, TypeError, OverflowError):  # e.g. time zones mixed with naive times: find the row
        stamps = None
    if stamps is None or not pd.api.types.is_datetime64_any_dtype(stamps) or stamps.isna().any():
        first_tz = None
        for i, value in enumerate(values):
            try:
                one = pd.Timestamp(value)
            except (ValueError, TypeError, OverflowError):
                one = pd.NaT
            if one is pd.NaT or pd.isna(one):
                raise TraceError(f"{path}:{lines[i]}: column 'TIMESTAMP' is not a date-time: {value[:100]!r}")
            if i == 0:
                first_tz = one.tzinfo is not None
            elif (one.tzinfo is not None) != first_tz:
                raise TraceError(f"{path}:{lines[i]}: column 'TIMESTAMP' mixes times with and without a time zone: "
                                 f"{value[:100]!r}")
        raise TraceError(f"{path}: column 'TIMESTAMP' could not be read as date-times")
    return (stamps - stamps.min()).dt.total_seconds().to_numpy()
