"""Static replay: seeded samples of N requests from a trace, turned into prefill, decode or mixed batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from packinfer_bench.errors import ConfigError
from packinfer_bench.traces import Trace
from packinfer_bench.workload.batch import Batch


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
        bad = [p for p in self.phases if p not in ("prefill", "decode", "mixed")]
        if bad:
            raise ConfigError(f"phases: unknown phase(s) {bad}; allowed: ['prefill', 'decode', 'mixed']")
        if any(b <= 0 for b in self.batch_sizes) or self.batches_per_size <= 0:
            raise ConfigError(f"batch_sizes and batches_per_size must be > 0, got {self.batch_sizes}, "
                              f"{self.batches_per_size}")
        if any(not 0.0 <= p <= 1.0 for p in self.decode_points):
            raise ConfigError(f"decode_points must lie in [0, 1], got {self.decode_points}")
        if not 0.0 <= self.decode_fraction <= 1.0:
            raise ConfigError(f"decode_fraction must lie in [0, 1], got {self.decode_fraction}")
        if self.chunk_size <= 0:
            raise ConfigError(f"chunk_size must be > 0, got {self.chunk_size}")


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
