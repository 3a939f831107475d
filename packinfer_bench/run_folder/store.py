"""The one way a run folder's row files are written and read: append only, one row per physical line.

Finished rows are never rewritten. A write is one row per line, flushed and fsynced before the call returns; a
row cut short by a kill (the file does not end in a newline) is cut off before the next append, which touches
nothing before it. Reading parses each line on its own, so a corrupt line (a torn row, an unbalanced quote, a
NUL byte, a wrong number of fields, a value that fails the file's check) costs that line alone: it is skipped
and reported, never allowed to swallow the rows after it. Whole files (config, env, workload statistics) are
written to a temporary file and renamed into place.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from packinfer_bench.errors import PackinferBenchError

log = logging.getLogger(__name__)


@dataclass
class BadLines:
    """Lines of a file that were skipped on reading, with why (1-based line numbers)."""

    path: Path
    lines: list[tuple[int, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.lines)

    def describe(self, limit: int = 5) -> str:
        shown = ", ".join(f"line {n} ({why})" for n, why in self.lines[:limit])
        more = f" and {len(self.lines) - limit} more" if len(self.lines) > limit else ""
        return f"{self.path}: skipped {len(self.lines)} unreadable row(s): {shown}{more}"


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file so that a reader (or a kill) sees either the old content or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cut_torn_tail(path: Path) -> None:
    """A file whose last line has no newline ends in a row cut short by a kill: cut that partial row off (the
    rows before it stay byte for byte)."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        chunk, end = 1 << 16, size
        while end > 0:  # find the last newline
            start = max(0, end - chunk)
            f.seek(start)
            data = f.read(end - start)
            i = data.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        else:
            keep = 0
        log.warning("%s: dropped a row cut short by an interruption (%d bytes)", path, size - keep)
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def _one_line(value: object) -> object:
    """A value as it may go into a one-row-per-line file: line breaks in text become spaces."""
    if isinstance(value, str) and ("\n" in value or "\r" in value):
        return value.replace("\r", " ").replace("\n", " ")
    return value


def last_per_key(rows: list[dict[str, str]], key: Callable[[dict[str, str]], tuple]) -> list[dict[str, str]]:
    """Each key's last row, in the order the keys first appear: an append-only file where a later row stands for
    an earlier one (a record or replay skipped as unavailable, measured by a later session)."""
    last = {key(r): r for r in rows}
    return [last[k] for k in dict.fromkeys(key(r) for r in rows)]


def not_a_number(row: dict[str, str], columns) -> str | None:
    """Why a row is unusable: the first of `columns` that holds something other than a number (empty is fine)."""
    for name in columns:
        value = row.get(name, "")
        if value:
            try:
                float(value)
            except ValueError:
                return f"{name} {value[:20]!r} is not a number"
    return None


class CsvRows:
    """An append-only CSV file of rows with a fixed header. check(row) -> None or why the row is unusable.
    A finished file may be archived gzip-compressed beside its name (`<name>.gz`, for committed reference runs):
    it is read as the file itself, and appending to it is refused."""

    def __init__(self, path: Path, fields: list[str] | None = None,
                 check: Callable[[dict[str, str]], str | None] | None = None):
        self.path, self.fields, self.check = Path(path), fields, check
        self.archived = self.path.with_name(self.path.name + ".gz")

    def _open(self):
        if not self.path.exists() and self.archived.exists():
            return gzip.open(self.archived, "rt", encoding="utf-8", errors="replace", newline="")
        return open(self.path, encoding="utf-8", errors="replace", newline="")

    def exists(self) -> bool:
        return self.path.exists() or self.archived.exists()

    def header(self) -> list[str] | None:
        """The file's header (None when the file is missing or has none yet)."""
        if not self.exists():
            return None
        with self._open() as f:
            first = f.readline()
        if not first.endswith("\n"):
            return None
        return next(csv.reader([first.rstrip("\r\n")]), None)

    def append(self, rows: Iterable[dict]) -> None:
        """Append rows (the header first when the file is new), flushed to disk before returning."""
        rows = list(rows)
        if not rows:
            return
        if self.archived.exists():
            raise PackinferBenchError(f"{self.archived}: an archived (compressed) file is read-only; gunzip it to "
                                      "add to this run folder")
        fields = self.fields or list(rows[0])
        if self.path.exists():
            _cut_torn_tail(self.path)
        header = self.header()
        if header is not None:
            extra = sorted({k for r in rows for k in r} - set(header))
            if extra:
                raise PackinferBenchError(f"{self.path}: written by another version of packinfer-bench (no column "
                                          f"{', '.join(extra)}); start a new run folder")
            fields = header
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", restval="")
        if header is None:
            writer.writeheader()
        writer.writerows({k: _one_line(v) for k, v in r.items()} for r in rows)
        mode = "a" if header is not None else "w"
        with open(self.path, mode, encoding="utf-8", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> tuple[list[dict[str, str]], BadLines]:
        """The file's usable rows in order, and the lines skipped (logged as a warning)."""
        bad = BadLines(self.path)
        rows = list(self._rows(bad))
        if bad:
            log.warning(bad.describe())
        return rows, bad

    def _rows(self, bad: BadLines) -> Iterator[dict[str, str]]:
        if not self.exists():
            return
        with self._open() as f:
            header = None
            for n, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    bad.lines.append((n, "cut short"))
                    break
                text = line.rstrip("\r\n")
                if header is None:
                    header = next(csv.reader([text]), [])
                    continue
                if not text:
                    continue
                cells, why = _cells(text, len(header))
                if why is None:
                    row = dict(zip(header, cells))
                    why = self.check(row) if self.check else None
                    if why is None:
                        yield row
                        continue
                bad.lines.append((n, why))


def _cells(text: str, width: int) -> tuple[list[str], str | None]:
    """One line's fields, or why the line is not a row of `width` fields."""
    if "\0" in text or "\ufffd" in text:
        return [], "unreadable bytes"
    if '"' in text and text.count('"') % 2:
        return [], "unbalanced quote"
    try:
        cells = next(csv.reader([text], strict=True))
    except csv.Error as e:
        return [], f"malformed: {e}"
    if len(cells) != width:
        return [], f"{len(cells)} fields, expected {width}"
    return cells, None


class JsonLines:
    """An append-only file of JSON objects, one per line (batches.jsonl)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, items: Iterable[dict]) -> None:
        text = "".join(json.dumps(item) + "\n" for item in items)
        if not text:
            return
        if self.path.exists():
            _cut_torn_tail(self.path)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> tuple[list[dict], BadLines]:
        bad = BadLines(self.path)
        items = []
        if self.path.exists():
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.endswith("\n"):
                        bad.lines.append((n, "cut short"))
                        break
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        bad.lines.append((n, f"not JSON: {e.msg}"))
                        continue
                    if not isinstance(item, dict):
                        bad.lines.append((n, "not a JSON object"))
                        continue
                    items.append(item)
        if bad:
            log.warning(bad.describe())
        return items, bad
