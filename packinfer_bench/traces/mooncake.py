"""Prefix-aware traces in Mooncake's format: JSON lines with timestamp (ms), input_length, output_length and
`hash_ids`, one id per 512-token prompt block; equal ids are the same (reusable) KV block.

Shared-prefix groups are derived from the blocks (ids name whole prefixes, so equal ids mean equal prefixes up
to that block): a request's `prefix_len` is its leading run of blocks that some other request also holds
(capped at its prompt), and its `prefix_id` is the last block of that run, so the requests of one group share
the same prefix. Block 0 is held by every request of the shipped trace (a common system prompt), so grouping by
the first block would put the whole trace in one group.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import TraceError
from packinfer_bench.traces.base import USER_LICENCE, Trace, user_file
from packinfer_bench.traces.limits import MAX_TOKENS, TOKENS_WHY, check_int
from packinfer_bench.traces.tabular import iter_json_lines, read_text_start

FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
#: Block ids become prefix ids (int64; -1 means none).
MAX_HASH_ID = 2**63 - 1
#: Timestamps (ms) beyond this size are not times (1e15 ms: 31,700 years).
MAX_TIMESTAMP_MS = 1e15


def sniff(path: Path) -> bool:
    if path.suffix.lower() not in (".jsonl", ".json"):
        return False
    try:
        first = next(iter_json_lines(path, read_text_start(path)), None)
    except TraceError:  # the first line is not a JSON object: not this format
        return False
    return first is not None and "hash_ids" in first[1] and "input_length" in first[1]


def check_options(options: dict, error) -> None:
    """block_size: tokens per hash_ids block."""
    if "block_size" in options:
        check_int(options["block_size"], "block_size", 1, 1 << 20, "tokens per KV block", error)


def load(path: Path, *, name: str, block_size: int = 512) -> Trace:
    check_options({"block_size": block_size}, lambda key, detail: TraceError(f"trace {name!r}: {key}: {detail}"))
    rows = []
    for line, obj in iter_json_lines(path):
        missing = [f for f in FIELDS if f not in obj]
        if missing:
            raise TraceError(f"{path}:{line}: missing field(s) {missing}; a record has {list(FIELDS)}")
        rows.append((*_record(path, line, obj), line))
    if not rows:
        raise TraceError(f"{path}:1: no records (the file holds only blank lines)")
    rows.sort(key=lambda r: r[0])  # stable: equal times keep file order
    holders = Counter(h for r in rows for h in set(r[3]))
    prefix_id = np.full(len(rows), -1, dtype=np.int64)
    prefix_len = np.zeros(len(rows), dtype=np.int64)
    for i, (_, prompt, _, blocks, _) in enumerate(rows):
        shared = 0
        while shared < len(blocks) and holders[blocks[shared]] >= 2:
            shared += 1
        if shared:
            prefix_id[i] = blocks[shared - 1]
            prefix_len[i] = min(prompt, shared * block_size)
    stamps_ms = np.asarray([r[0] for r in rows], dtype=np.float64)
    requests = pd.DataFrame({
        "arrival_s": (stamps_ms - stamps_ms[0]) / 1000.0,
        "prompt_len": [r[1] for r in rows],
        "output_len": [r[2] for r in rows],
        "prefix_id": prefix_id,
        "prefix_len": prefix_len,
    })
    total_blocks = sum(len(r[3]) for r in rows)
    return Trace(
        name=name,
        kind="mooncake",
        requests=requests,
        source=user_file("mooncake"),
        licence=USER_LICENCE,
        tokenizer="as recorded in the file (input_length / output_length)",
        path=str(path),
        notes={"block_size": block_size, "blocks": total_blocks, "distinct_blocks": len(holders)},
    )


def _record(path: Path, line: int, obj: dict) -> tuple[float, int, int, list[int]]:
    """(timestamp ms, input length, output length, hash ids) of one record; TraceError naming file:line."""
    stamp = obj["timestamp"]
    if not isinstance(stamp, (int, float)) or isinstance(stamp, bool):
        raise TraceError(f"{path}:{line}: field 'timestamp' must be a number, got {stamp!r:.80}")
    if not math.isfinite(stamp) or abs(stamp) > MAX_TIMESTAMP_MS:
        raise TraceError(f"{path}:{line}: field 'timestamp' must be a finite number of milliseconds within "
                         f"+-{MAX_TIMESTAMP_MS:g}, got {stamp!r}")
    lengths = []
    for f in ("input_length", "output_length"):
        v = obj[f]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TraceError(f"{path}:{line}: field {f!r} must be a number, got {v!r:.80}")
        if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
            raise TraceError(f"{path}:{line}: field {f!r} must be a whole number of tokens, got {v!r}")
        if v <= 0:
            raise TraceError(f"{path}:{line}: field {f!r} must be > 0, got {v!r}")
        if v > MAX_TOKENS:
            raise TraceError(f"{path}:{line}: field {f!r}: {v!r} is above the limit of {MAX_TOKENS} tokens "
                             f"({TOKENS_WHY})")
        lengths.append(int(v))
    blocks = obj["hash_ids"]
    if not isinstance(blocks, list):
        raise TraceError(f"{path}:{line}: field 'hash_ids' must be a list, got {blocks!r:.80}")
    for i, h in enumerate(blocks):
        if not isinstance(h, int) or isinstance(h, bool) or not 0 <= h <= MAX_HASH_ID:
            raise TraceError(f"{path}:{line}: field 'hash_ids' must be a list of block ids (integers in "
                             f"0..2**63-1), element {i} is {h!r:.80}")
    return float(stamp), lengths[0], lengths[1], blocks
