"""CSV and JSON reading that reports bad rows, bad bytes and bad numbers by file and line number."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import TraceError
from packinfer_bench.traces.limits import MAX_TOKENS, TOKENS_WHY

#: Bytes read to detect a file's kind (the header row, the first JSON line).
SNIFF_BYTES = 1 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode_text(path: Path, data: bytes, *, complete: bool = True) -> str:
    """The bytes of a trace file as text (UTF-8, a leading UTF-8 byte order mark dropped); TraceError naming the
    file and line for UTF-16/32, binary data or bytes that are not UTF-8. complete=False: `data` is the start of
    the file only (a character cut at its end is not an error)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE)):
        raise TraceError(f"{path}:1: UTF-16 or UTF-32 text (it starts with a byte order mark); trace files must be "
                         "UTF-8: save it as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:
        raise TraceError(f"{path}:{_line_of(data, nul)}: NUL byte: a binary file, or UTF-16 text? trace files are "
                         "UTF-8 text (CSV or JSON)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not complete and e.reason == "unexpected end of data" and e.start >= len(data) - 3:
            text = data[:e.start].decode("utf-8")
        else:
            raise TraceError(f"{path}:{_line_of(data, e.start)}: not UTF-8 text (byte 0x{data[e.start]:02x} at "
                             f"byte offset {e.start}): a binary file, or another encoding? trace files are UTF-8 "
                             "text (CSV or JSON)") from None
    return text.removeprefix("\ufeff")


def read_text(path: Path, limit: int | None = None) -> str:
    """A trace file's text (the first `limit` bytes only, when given); see decode_text."""
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit)
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, not a trace file") from None
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from None
    return decode_text(path, data, complete=limit is None or len(data) < limit)


def read_text_start(path: Path) -> str:
    """The whole lines among the first SNIFF_BYTES bytes of a trace file (to detect its kind)."""
    text = read_text(path, SNIFF_BYTES)
    if len(text.encode("utf-8")) >= SNIFF_BYTES - 4 and "\n" in text:
        text = text[:text.rfind("\n") + 1]
    return text


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise TraceError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
        yield reader.line_num, row


def read_header(path: Path) -> list[str]:
    """First row of a CSV file (empty list for an empty file, or one whose first row is not valid CSV)."""
    try:
        return next(csv.reader(io.StringIO(read_text_start(path), newline="")), [])
    except csv.Error:
        return []


def read_csv_columns(path: Path, columns: list[str]) -> tuple[dict[str, list[str]], np.ndarray]:
    """Read the named columns of a CSV as strings, with the file line number of every row.

    Raises TraceError for a missing column or a row with the wrong number of fields (truncated file).
    """
    rows = _csv_rows(path, read_text(path))
    first = next(rows, None)
    if first is None:
        raise TraceError(f"{path}:1: empty file, expected a CSV header with {columns}")
    header = [h.strip() for h in first[1]]
    missing = [c for c in columns if c not in header]
    if missing:
        raise TraceError(f"{path}:{first[0]}: missing column(s) {missing}; the header has {header}")
    dup = sorted({c for c in columns if header.count(c) > 1})
    if dup:
        raise TraceError(f"{path}:{first[0]}: column(s) {dup} appear more than once in the header")
    idx = [header.index(c) for c in columns]
    out: dict[str, list[str]] = {c: [] for c in columns}
    lines: list[int] = []
    for line_num, row in rows:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise TraceError(
                f"{path}:{line_num}: expected {len(header)} fields ({','.join(header)}), "
                f"got {len(row)}: {','.join(row)[:200]!r} (truncated or malformed row)"
            )
        for c, i in zip(columns, idx):
            out[c].append(row[i])
        lines.append(line_num)
    if not lines:
        raise TraceError(f"{path}:{first[0]}: empty trace: no data rows after the header")
    return out, np.asarray(lines, dtype=np.int64)


def parse_ints(values: list[str], path: Path, lines: np.ndarray, column: str, limit: int = MAX_TOKENS,
               why: str = TOKENS_WHY) -> np.ndarray:
    """Parse a column of integer strings; a value that is not an integer, or is above `limit`, raises TraceError
    naming file, line and column."""
    numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers))
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"{path}:{lines[i]}: column {column!r} must be an integer, got {values[i][:100]!r}")
    over = numbers > limit
    if over.any():
        i = int(np.argmax(over))
        raise TraceError(f"{path}:{lines[i]}: column {column!r}: {values[i][:100]} is above the limit of {limit} "
                         f"tokens ({why})")
    return numbers.astype(np.int64)


def require_positive(values: np.ndarray, path: Path, lines: np.ndarray, column: str) -> None:
    """Raise TraceError naming file, line and column for the first value <= 0."""
    bad = values <= 0
    if bad.any():
        i = int(np.argmax(bad))
        raise TraceError(f"{path}:{lines[i]}: column {column!r} must be > 0, got {values[i]}")


def _loads(path: Path, line_no: int, text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}:{line_no}: not valid JSON ({e.msg}); truncated line?") from None
    except RecursionError:
        raise TraceError(f"{path}:{line_no}: JSON nested too deeply") from None


def iter_json_lines(path: Path, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSON-lines file (or of `text`, its start)."""
    for line_no, line in enumerate(io.StringIO(read_text(path) if text is None else text, newline=None), start=1):
        if not line.strip():
            continue
        obj = _loads(path, line_no, line)
        if not isinstance(obj, dict):
            raise TraceError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        yield line_no, obj


def iter_json_list(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line number, element) for each element of a file holding one JSON list; TraceError naming the line
    for anything else."""
    text = read_text(path)
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, 0).end()
    line = 1 + text.count("\n", 0, pos)

    def fail(at: int, what: str) -> TraceError:
        return TraceError(f"{path}:{1 + text.count(chr(10), 0, at)}: {what}")

    if pos == len(text):
        raise fail(pos, "empty file, expected a JSON list of conversations")
    if text[pos] != "[":
        try:
            obj, _ = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError):
            raise fail(pos, "not valid JSON: expected a JSON list of conversations") from None
        raise fail(pos, f"expected a JSON list of conversations, got {type(obj).__name__}")
    pos = _WHITESPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    last = 0
    while True:
        line += text.count("\n", last, pos)
        last = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise TraceError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise fail(pos, "JSON nested too deeply") from None
        yield line, obj
        pos = _WHITESPACE.match(text, end).end()
        if text.startswith("]", pos):
            rest = _WHITESPACE.match(text, pos + 1).end()
            if rest != len(text):
                raise fail(rest, "not valid JSON (extra data after the list)")
            return
        if not text.startswith(",", pos):
            raise fail(pos, "not valid JSON (expected ',' or ']' after a list element)")
        pos = _WHITESPACE.match(text, pos + 1).end()
