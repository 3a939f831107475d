"""Bounds on the numbers a trace or an experiment config may hold, and the checks that enforce them.

Every check names the key (or file:line), the bad value and the allowed range; the upper bounds are there to
keep memory and run time sane, and each says why. Config checks raise `KeyedConfigError`, a ConfigError that
carries its key so that the config loader can prefix the path it sits under
(`workloads[0].static.batch_sizes[0]: ...`); a caller may pass its own `error(key, detail)` to raise another
error type (trace loaders raise TraceError).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from numbers import Integral, Real
from typing import Any

from packinfer_bench.errors import ConfigError

#: One request's prompt or output tokens: above every model's context window (16.8M tokens); also keeps sums of
#: lengths over a batch far from int64 overflow.
MAX_TOKENS = 1 << 24
TOKENS_WHY = "a bound above every model's context window"
#: Requests one synthetic trace generates (all held in memory as a table at once).
MAX_SYNTHETIC_REQUESTS = 1_000_000
#: Requests in one batch: every request of a batch is sampled, stored in batches.jsonl and sent to the kernels at
#: once (real servers cap a batch at a few hundred to a few thousand sequences).
MAX_BATCH_SIZE = 65536
#: Request rows of a whole static workload (batch sizes x samples x batches per sample): the run folder's batches
#: are read back into memory together.
MAX_STATIC_ROWS = 4_000_000
#: Trace rows a continuous replay may select (start, num_requests): above any trace this harness can hold.
MAX_TRACE_ROWS = 100_000_000
#: Counts of iterations, samples, repeats: a bound that still finishes in days, not in the age of the universe.
MAX_COUNT = 1_000_000_000
#: Seeds: numpy's and torch's generators take any non-negative 64-bit integer.
MAX_SEED = 2**63 - 1
#: Requests per second (Poisson arrivals): 1e-6 (one in 11 days) to 1e6.
MIN_RATE, MAX_RATE = 1e-6, 1e6

#: A name that becomes a folder name: letters, digits, '_', '-', '.', '+'; not starting with '.'.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]{0,99}")


class KeyedConfigError(ConfigError):
    """A ConfigError about one key: `key` (a path such as `static.batch_sizes[0]`) and `detail`."""

    def __init__(self, key: str, detail: str):
        self.key, self.detail = key, detail
        super().__init__(f"{key}: {detail}")

    def under(self, where: str) -> KeyedConfigError:
        """The same error with its key under the path `where` (empty: unchanged)."""
        return KeyedConfigError(join(where, self.key), self.detail)


Error = Callable[[str, str], Exception]


def join(where: str, key: str) -> str:
    """`where.key`, or `where[0]` for an index key."""
    if not where:
        return key
    return f"{where}{key}" if key.startswith("[") else f"{where}.{key}"


def _why(why: str) -> str:
    return f" ({why})" if why else ""


def _num(x: float) -> str:
    if x == MAX_SEED:
        return "2**63-1"
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}"


def show(value: Any, limit: int = 60) -> str:
    """repr of a value, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_int(value: Any, key: str, lo: int, hi: int, why: str = "", error: Error = KeyedConfigError) -> int:
    """`value` as an int in [lo, hi]; else `error(key, ...)` naming the value and the range."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise error(key, f"expected an integer, got {show(value)} ({type(value).__name__})")
    if not lo <= value <= hi:
        raise error(key, f"{show(value)} not allowed; allowed: {_num(lo)}..{_num(hi)}{_why(why)}")
    return int(value)


def check_float(value: Any, key: str, lo: float, hi: float, *, lo_open: bool = False, why: str = "",
                error: Error = KeyedConfigError) -> float:
    """`value` as a finite float in [lo, hi] ((lo, hi] with lo_open); else `error(key, ...)`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise error(key, f"expected a number, got {show(value)} ({type(value).__name__})")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    interval = f"{'(' if lo_open else '['}{_num(lo)}, {_num(hi)}]"
    if not math.isfinite(x) or x > hi or x < lo or (lo_open and x == lo):
        shown = f"{x}" if not math.isfinite(x) else show(value)
        raise error(key, f"{shown} not allowed; allowed: a finite number in {interval}{_why(why)}")
    return x


def check_seed(value: Any, key: str = "seed", error: Error = KeyedConfigError) -> int:
    return check_int(value, key, 0, MAX_SEED, "the random generators take a non-negative 64-bit integer", error)


def check_unique(values: list, key: str, error: Error = KeyedConfigError) -> None:
    """Every value of a list at most once (a repeat would write the same result key twice)."""
    seen: list = []
    for i, v in enumerate(values):
        if v in seen:
            raise error(f"{key}[{i}]", f"{show(v)} repeats {key}[{seen.index(v)}]; each value may appear once "
                                       "(a repeat would produce results under the same key twice)")
        seen.append(v)


def check_mapping(value: Any, key: str, error: Error = KeyedConfigError) -> Mapping:
    if not isinstance(value, Mapping):
        raise error(key, f"expected a mapping, got {show(value)} ({type(value).__name__})")
    return value


def check_name(value: Any, key: str = "name", *, folder: bool = False, error: Error = KeyedConfigError) -> str:
    """A label used in batch ids and file paths: no '/' or '\\' or control characters; with folder=True a
    plain folder name (letters, digits, '_', '-', '.', '+', not starting with '.', at most 100 characters)."""
    if not isinstance(value, str):
        raise error(key, f"expected str, got {show(value)} ({type(value).__name__})")
    if folder:
        if not PLAIN_NAME.fullmatch(value) or value.startswith("."):
            raise error(key, f"{show(value)} not allowed; allowed: a plain folder name of letters, digits, '_', '-', "
                             "'.', '+' (not starting with '.', at most 100 characters): the run folder is "
                             "<output.dir>/<name>/<run-id>")
        return value
    if not value.strip() or len(value) > 200 or any(c in value for c in "/\\") or \
            any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise error(key, f"{show(value)} not allowed; allowed: a non-empty name of at most 200 characters without "
                         "'/', '\\' or control characters (batch ids join names with '/')")
    return value
