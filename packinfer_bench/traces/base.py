"""The `Trace`: one table of requests with a fixed schema, whatever file format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import TraceError
from packinfer_bench.traces.limits import MAX_TOKENS, TOKENS_WHY

#: Columns of `Trace.requests`, in order, with their meaning.
COLUMNS: dict[str, str] = {
    "request_id": "int64, 0..n-1 in arrival order",
    "arrival_s": "float64, seconds since the first request; NaN when the trace has no timestamps",
    "prompt_len": "int64 > 0, prompt (prefill) tokens, conversation history included",
    "output_len": "int64 > 0, generated (decode) tokens",
    "prefix_id": "int64, shared-prefix group (requests with equal ids share their first tokens); -1 = none",
    "prefix_len": "int64 >= 0, tokens at the start of the prompt shared with another request of the group",
}

#: The licence a user's own trace file is credited with (its terms are its owner's, unknown here).
USER_LICENCE = "unknown (user file)"
#: Keys of Trace.describe() that count tokens (shown as whole numbers), and those that are ratios or rates.
_TOKEN_KEYS = ("prompt_len_", "output_len_")


def user_file(kind: str) -> str:
    """The source a loader gives a file: a user's own, in a known format. load_trace credits the shipped files
    with their real source and licence instead."""
    return f"user file (format: {kind})"


@dataclass
class Trace:
    """A request trace: `requests` holds the columns of `COLUMNS`; the rest says where it came from."""

    name: str
    kind: str
    requests: pd.DataFrame
    source: str
    licence: str
    tokenizer: str
    path: str | None = None
    notes: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.requests = normalize_requests(self.requests, self.name)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def has_arrivals(self) -> bool:
        return bool(self.requests["arrival_s"].notna().all())

    def describe(self) -> dict[str, object]:
        """Summary statistics: rows, time span, length percentiles, prefix-sharing ratio."""
        df = self.requests
        out: dict[str, object] = {
            "name": self.name,
            "kind": self.kind,
            "rows": len(df),
            "source": self.source,
            "licence": self.licence,
            "tokenizer": self.tokenizer,
            "time_span_s": float(df["arrival_s"].max() - df["arrival_s"].min()) if self.has_arrivals else None,
        }
        if self.has_arrivals and len(df) > 1 and out["time_span_s"]:
            out["mean_rate_rps"] = (len(df) - 1) / out["time_span_s"]
        for col in ("prompt_len", "output_len"):
            values = df[col].to_numpy()
            for q in (50, 90, 99):
                out[f"{col}_p{q}"] = float(np.percentile(values, q))
            out[f"{col}_mean"] = float(values.mean())
            out[f"{col}_max"] = int(values.max())
        out["prefix_shared_requests"] = int((df["prefix_id"] >= 0).sum())
        out["prefix_groups"] = int(df.loc[df["prefix_id"] >= 0, "prefix_id"].nunique())
        # share of all prompt tokens that sit in a prefix some other request also has
        out["prefix_sharing_ratio"] = float(df["prefix_len"].sum() / df["prompt_len"].sum())
        return out


def describe_lines(info: dict[str, object]) -> list[str]:
    """Trace.describe()'s values as aligned `key  value` lines for people: a missing value as "-", token counts
    as whole numbers with thousands separators, never scientific notation."""
    width = max(len(k) for k in info)
    return [f"{key:<{width}}  {_shown(key, value)}" for key, value in info.items()]


def _shown(key: str, value: object) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{value:,}"
    if key.startswith(_TOKEN_KEYS) and not key.endswith("_mean"):
        return f"{round(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    if not value:
        return "0"
    decimals = max(4, 3 - int(np.floor(np.log10(abs(value)))))  # four significant digits, as a plain decimal
    return f"{value:,.{decimals}f}".rstrip("0").rstrip(".")


def normalize_requests(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Check and coerce a request table to the `COLUMNS` schema; raises TraceError naming the problem."""
    if len(df) == 0:
        raise TraceError(f"trace {name!r} is empty: it has no requests")
    df = df.copy()
    if "request_id" not in df:
        df["request_id"] = np.arange(len(df))
    if "arrival_s" not in df:
        df["arrival_s"] = np.nan
    if "prefix_id" not in df:
        df["prefix_id"] = -1
    if "prefix_len" not in df:
        df["prefix_len"] = 0
    missing = [c for c in COLUMNS if c not in df]
    if missing:
        raise TraceError(f"trace {name!r} lacks column(s) {missing}; a trace has {list(COLUMNS)}")
    for col in ("prompt_len", "output_len"):
        bad = df.index[~((df[col] > 0) & (df[col] <= MAX_TOKENS))]
        if len(bad):
            raise TraceError(
                f"trace {name!r}: {col} must lie in 1..{MAX_TOKENS} ({TOKENS_WHY}), request {int(bad[0])} has "
                f"{df.loc[bad[0], col]!r} ({len(bad)} such request(s))"
            )
    over = df.index[(df["prefix_len"] < 0) | (df["prefix_len"] > df["prompt_len"])]
    if len(over):
        raise TraceError(f"trace {name!r}: prefix_len must lie in [0, prompt_len]; request {int(over[0])} breaks it")
    df = df[list(COLUMNS)].astype(
        {"request_id": "int64", "arrival_s": "float64", "prompt_len": "int64", "output_len": "int64",
         "prefix_id": "int64", "prefix_len": "int64"}
    )
    return df.reset_index(drop=True)


def trace_path(path: str | Path) -> Path:
    """Resolve a trace file path, raising TraceError when it does not exist."""
    try:
        p = Path(path).expanduser()
        if p.is_dir():
            raise TraceError(f"trace source {p} is a directory, not a trace file: name the file inside it")
        if p.exists() and not p.is_file():
            raise TraceError(f"trace source {p} is not a regular file")
        if not p.is_file():
            raise TraceError(f"trace file not found: {p}")
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte, an unresolvable ~user
        if isinstance(e, TraceError):
            raise
        raise TraceError(f"trace source {str(path)[:200]!r} is not a usable file path: {e}") from None
    return p
