"""Azure LLM inference trace (AzurePublicDataset): CSV with TIMESTAMP, ContextTokens, GeneratedTokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import TraceError
from packinfer_bench.traces.base import Trace
from packinfer_bench.traces.tabular import parse_ints, read_csv_columns, read_header, require_positive

COLUMNS = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]


def sniff(path: Path) -> bool:
    return path.suffix.lower() == ".csv" and set(COLUMNS) <= {h.strip() for h in read_header(path)}


def load(path: Path, *, name: str) -> Trace:
    cols, lines = read_csv_columns(path, COLUMNS)
    stamps = pd.to_datetime(pd.Series(cols["TIMESTAMP"]), errors="coerce", format="mixed")
    if stamps.isna().any():
        i = int(np.argmax(stamps.isna().to_numpy()))
        raise TraceError(f"{path}:{lines[i]}: column 'TIMESTAMP' is not a date-time: {cols['TIMESTAMP'][i]!r}")
    seconds = (stamps - stamps.min()).dt.total_seconds().to_numpy()
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
        source="Azure LLM inference trace (AzurePublicDataset), Patel et al., Splitwise, ISCA 2024",
        licence="CC-BY-4.0",
        tokenizer="as recorded by the service (ContextTokens / GeneratedTokens)",
        path=str(path),
    )

