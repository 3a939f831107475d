"""Prefix-aware traces in Mooncake's format: JSON lines with timestamp (ms), input_length, output_length and
`hash_ids`, one id per 512-token prompt block; equal ids are the same (reusable) KV block.

Shared-prefix groups are derived from the blocks (ids name whole prefixes, so equal ids mean equal prefixes up
to that block): a request's `prefix_len` is its leading run of blocks that some other request also holds
(capped at its prompt), and its `prefix_id` is the last block of that run, so the requests of one group share
the same prefix. Block 0 is held by every request of the shipped trace (a common system prompt), so grouping by
the first block would put the whole trace in one group.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from packinfer_bench.errors import TraceError
from packinfer_bench.traces.base import Trace
from packinfer_bench.traces.tabular import iter_json_lines

FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


def sniff(path: Path) -> bool:
    if path.suffix.lower() not in (".jsonl", ".json"):
        return False
    first = next(iter_json_lines(path), None)
    return first is not None and "hash_ids" in first[1] and "input_length" in first[1]


def load(path: Path, *, name: str, block_size: int = 512) -> Trace:
    rows = []
    for line, obj in iter_json_lines(path):
        missing = [f for f in FIELDS if f not in obj]
        if missing:
            raise TraceError(f"{path}:{line}: missing field(s) {missing}; a record has {list(FIELDS)}")
        for f in ("timestamp", "input_length", "output_length"):
            if not isinstance(obj[f], (int, float)) or isinstance(obj[f], bool):
                raise TraceError(f"{path}:{line}: field {f!r} must be a number, got {obj[f]!r}")
        for f in ("input_length", "output_length"):
            if obj[f] <= 0:
                raise TraceError(f"{path}:{line}: field {f!r} must be > 0, got {obj[f]!r}")
        if not isinstance(obj["hash_ids"], list):
            raise TraceError(f"{path}:{line}: field 'hash_ids' must be a list, got {obj['hash_ids']!r}")
        rows.append((obj["timestamp"], int(obj["input_length"]), int(obj["output_length"]), obj["hash_ids"]))
    if not rows:
        raise TraceError(f"{path}: no records")
    rows.sort(key=lambda r: r[0])
    holders = Counter(h for r in rows for h in set(r[3]))
    prefix_id = np.full(len(rows), -1, dtype=np.int64)
    prefix_len = np.zeros(len(rows), dtype=np.int64)
    for i, (_, prompt, _, blocks) in enumerate(rows):
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
        source="Mooncake traces (kvcache-ai/Mooncake), Qin et al., Mooncake, FAST 2025",
        licence="Apache-2.0",
        tokenizer="as recorded by the service (input_length / output_length)",
        path=str(path),
        notes={"block_size": block_size, "blocks": total_blocks, "distinct_blocks": len(holders)},
    )
