"""Static replay: seeded samples of N requests from a trace, turned into prefill, decode or mixed batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from packinfer_bench.errors import ConfigError
from packinfer_bench.traces import Trace
from packinfer_bench.traces.limits import (
    MAX_BATCH_SIZE,
    MAX_COUNT,
    MAX_STATIC_ROWS,
    MAX_TOKENS,
    TOKENS_WHY,
    KeyedConfigError,
    check_float,
    check_int,
    check_seed,
    check_unique,
)
from packinfer_bench.workload.batch import Batch

PHASES = ("prefill", "decode", "mixed")


@dataclass
class StaticSpec:
    """phases: which batches to build from each sample.
    batch_sizes / batches_per_size: N requests per batch, that many independent samples per N.
    decode_points: for decode batches, how far into generation (0 = first decode step, 1 = last; one batch
      set per point): kv = prompt + 1 + floor(point * (output - 1)).
    decode_fraction, chunk_size: mixed batches: that share of requests decode (at a random point), the rest
      each run one chunk of chunk_size prompt tokens at a random chunk offset (chunked prefill).
    max_len: requests whose prompt + output exceed it are left out (reported)."""

    phases: list[str] = field(default_factory=lambda: ["prefill", "decode"])
    batch_sizes: list[int] = field(default_factory=lambda: [64])
    batches_per_size: int = 1
    decode_points: list[float] = field(default_factory=lambda: [0.5])
    decode_fraction: float = 0.75
    chunk_size: int = 512
    max_len: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for i, phase in enumerate(self.phases):
            if phase not in PHASES:
                raise KeyedConfigError(f"phases[{i}]", f"unknown phase {phase!r}; allowed: {list(PHASES)}")
        check_unique(self.phases, "phases")
        if not self.phases:
            raise KeyedConfigError("phases", f"needs at least one of {list(PHASES)}")
        if not self.batch_sizes:
            raise KeyedConfigError("batch_sizes", "needs at least one batch size")
        for i, size in enumerate(self.batch_sizes):
            check_int(size, f"batch_sizes[{i}]", 1, MAX_BATCH_SIZE, "requests in one batch: they are sampled, "
                      "stored and sent to the kernels at once; more would not fit memory sanely")
        check_unique(self.batch_sizes, "batch_sizes")
        check_int(self.batches_per_size, "batches_per_size", 1, MAX_COUNT, "independent samples per batch size")
        if not self.decode_points:
            raise KeyedConfigError("decode_points", "needs at least one point in [0, 1]")
        for i, point in enumerate(self.decode_points):
            check_float(point, f"decode_points[{i}]", 0.0, 1.0, why="0 = first decode step, 1 = last")
        check_unique(self.decode_points, "decode_points")
        check_float(self.decode_fraction, "decode_fraction", 0.0, 1.0, why="the share of decode requests")
        check_int(self.chunk_size, "chunk_size", 1, MAX_TOKENS, f"tokens of one prefill chunk; {TOKENS_WHY}")
        if self.max_len is not None:
            check_int(self.max_len, "max_len", 2, 2 * MAX_TOKENS, "prompt + output tokens of a request")
        check_seed(self.seed)
        batches = self.phases.count("prefill") + self.phases.count("mixed") + \
            self.phases.count("decode") * len(self.decode_points)
        rows = sum(self.batch_sizes) * self.batches_per_size * batches
        if rows > MAX_STATIC_ROWS:
            key = "batches_per_size" if self.batches_per_size > 1 else "batch_sizes"
            raise KeyedConfigError(key, f"{self.batches_per_size} sample(s) of batch sizes "
                                   f"{self.batch_sizes} make {rows} request rows over {batches} batch kind(s); "
                                   f"allowed: at most {MAX_STATIC_ROWS} (the run's batches are held in memory "
                                   "together)")


def static_batches(trace: Trace, spec: StaticSpec) -> Iterator[Batch]:
    """Yield the batches of `spec` in a fixed order; identical for the same trace and seed."""
    df = trace.requests
    if spec.max_len is not None:
        df = df[df["prompt_len"] + df["output_len"] <= spec.max_len]
        if len(df) == 0:
            raise ConfigError(f"max_len={spec.max_len} leaves no request of trace {trace.name!r}")
    prompt, output = df["prompt_len"].to_numpy(), df["output_len"].to_numpy()
    rng = np.random.default_rng(spec.seed)
    for size in spec.batch_sizes:
        for k in range(spec.batches_per_size):
            pick = np.sort(rng.choice(len(df), size=size, replace=size > len(df)))
            common = {"trace": trace.name, "workload": "static",
                      "request_ids": df["request_id"].to_numpy()[pick],
                      "prefix_ids": df["prefix_id"].to_numpy()[pick], "prefix_lens": df["prefix_len"].to_numpy()[pick]}
            p, o = prompt[pick], output[pick]
            tag = f"{trace.name}/b{size}/s{k}"
            if "prefill" in spec.phases:
                yield Batch(batch_id=f"{tag}/prefill", q_lens=p, kv_lens=p, **common)
            if "decode" in spec.phases:
                for point in spec.decode_points:
                    kv = p + 1 + np.floor(point * (o - 1)).astype(np.int64)
                    yield Batch(batch_id=f"{tag}/decode@{point:g}", q_lens=np.ones(size, np.int64), kv_lens=kv,
                                **common)
            if "mixed" in spec.phases:
                yield _mixed(f"{tag}/mixed", p, o, spec, rng, common)


def _mixed(batch_id: str, prompt: np.ndarray, output: np.ndarray, spec: StaticSpec, rng: np.random.Generator,
           common: dict) -> Batch:
    n = len(prompt)
    decode = rng.random(n) < spec.decode_fraction
    generated = np.floor(rng.random(n) * (output - 1)).astype(np.int64)
    chunks = -(-prompt // spec.chunk_size)
    offset = np.floor(rng.random(n) * chunks).astype(np.int64) * spec.chunk_size
    chunk_q = np.minimum(spec.chunk_size, prompt - offset)
    q = np.where(decode, 1, chunk_q)
    kv = np.where(decode, prompt + generated + 1, offset + chunk_q)
    return Batch(batch_id=batch_id, q_lens=q, kv_lens=kv, **common)
