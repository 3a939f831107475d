"""The attention batch: what one kernel call sees, per request (q_len, kv_len, prefix group, phase)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Per-request phases: a fresh prompt (q = kv), a chunk of a prompt or an append (1 < q < kv), one decode step.
REQUEST_PHASES = ("prefill", "append", "decode")
#: Batch phases: all prefill, all decode, anything else.
BATCH_PHASES = ("prefill", "decode", "mixed")


@dataclass
class Batch:
    """One attention call over a ragged batch. Causal attention is aligned bottom-right: query i of a request
    sees keys <= kv_len - q_len + i, so q = kv is prefill, 1 < q < kv a chunk or append, q = 1 decode."""

    batch_id: str
    trace: str
    workload: str
    q_lens: np.ndarray
    kv_lens: np.ndarray
    request_ids: np.ndarray
    prefix_ids: np.ndarray = field(default=None)  # -1 = no shared prefix
    prefix_lens: np.ndarray = field(default=None)
    iteration: int | None = None
    time_s: float | None = None
    sampled: np.ndarray | None = None  # continuous batching: the requests that emit an output token after this call

    def __post_init__(self) -> None:
        n = len(self.q_lens)
        self.q_lens = np.asarray(self.q_lens, dtype=np.int64)
        self.kv_lens = np.asarray(self.kv_lens, dtype=np.int64)
        self.request_ids = np.asarray(self.request_ids, dtype=np.int64)
        self.prefix_ids = np.full(n, -1, np.int64) if self.prefix_ids is None else np.asarray(self.prefix_ids, np.int64)
        self.prefix_lens = np.zeros(n, np.int64) if self.prefix_lens is None else np.asarray(self.prefix_lens, np.int64)
        if n == 0:
            raise ValueError(f"batch {self.batch_id}: no requests")
        if not all(len(a) == n for a in (self.kv_lens, self.request_ids, self.prefix_ids, self.prefix_lens)):
            raise ValueError(f"batch {self.batch_id}: per-request arrays differ in length")
        if (self.q_lens < 1).any() or (self.q_lens > self.kv_lens).any():
            raise ValueError(f"batch {self.batch_id}: need 1 <= q_len <= kv_len for every request")
        if self.sampled is not None:
            self.sampled = np.asarray(self.sampled, dtype=bool)
            if self.sampled.shape != (n,):
                raise ValueError(f"batch {self.batch_id}: sampled must have one flag per request")
        # a shared prefix only counts for the part of it already in the KV cache
        self.prefix_lens = np.minimum(self.prefix_lens, self.kv_lens)

    def __len__(self) -> int:
        return len(self.q_lens)

    @property
    def request_phases(self) -> np.ndarray:
        return np.where(self.q_lens == self.kv_lens, "prefill", np.where(self.q_lens == 1, "decode", "append"))

    @property
    def phase(self) -> str:
        phases = set(self.request_phases.tolist())
        if phases == {"prefill"}:
            return "prefill"
        if phases == {"decode"}:
            return "decode"
        return "mixed"

    def cu_seqlens(self) -> tuple[np.ndarray, np.ndarray]:
        """FlashAttention-varlen offsets (cu_seqlens_q, cu_seqlens_k), int32 [B+1]."""
        zero = np.zeros(1, np.int64)
        return (np.concatenate([zero, np.cumsum(self.q_lens)]).astype(np.int32),
                np.concatenate([zero, np.cumsum(self.kv_lens)]).astype(np.int32))

    def query_positions(self) -> np.ndarray:
        """Position in its sequence of every query row, requests in order (the last q_len of each kv_len)."""
        return np.concatenate([np.arange(kv - q, kv) for q, kv in zip(self.q_lens.tolist(), self.kv_lens.tolist())])

    def causal_pairs(self) -> int:
        """(query, key) pairs attended under bottom-right causal masking; FLOPs = 4 * pairs * heads * head_dim."""
        q, kv = self.q_lens, self.kv_lens
        return int((q * (kv - q) + q * (q + 1) // 2).sum())

    def shared_prefixes(self) -> list[tuple[int, np.ndarray, int]]:
        """(first member, other members, shared length) of each prefix group with two or more members in this
        batch; members share the group's smallest prefix_len (only what is already in the KV cache)."""
        groups = []
        for gid in np.unique(self.prefix_ids[self.prefix_ids >= 0]):
            members = np.flatnonzero(self.prefix_ids == gid)
            length = int(self.prefix_lens[members].min())
            if len(members) > 1 and length > 0:
                groups.append((int(members[0]), members[1:], length))
        return groups

    def dedup_kv_tokens(self) -> int:
        """KV tokens that need not be read again if each shared prefix group of this batch reads its common
        prefix once."""
        return sum(length * len(others) for _, others, length in self.shared_prefixes())

    def stats(self) -> dict[str, object]:
        """One row describing the batch (the workload the kernels will see)."""
        q, kv = self.q_lens, self.kv_lens
        phases = self.request_phases
        return {
            "batch_id": self.batch_id, "trace": self.trace, "workload": self.workload, "phase": self.phase,
            "iteration": self.iteration, "time_s": self.time_s,
            "batch_size": len(self), "num_q_tokens": int(q.sum()), "num_kv_tokens": int(kv.sum()),
            "num_prefill": int((phases == "prefill").sum()), "num_append": int((phases == "append").sum()),
            "num_decode": int((phases == "decode").sum()),
            "q_len_min": int(q.min()), "q_len_p50": float(np.median(q)), "q_len_max": int(q.max()),
            "kv_len_min": int(kv.min()), "kv_len_p50": float(np.median(kv)), "kv_len_max": int(kv.max()),
            "kv_len_cv": float(kv.std() / kv.mean()),
            "causal_pairs": self.causal_pairs(), "dedup_kv_tokens": self.dedup_kv_tokens(),
        }

    def to_record(self) -> dict[str, object]:
        """JSON-serialisable form, lengths included, so a later stage can rebuild exactly this batch."""
        return {"batch_id": self.batch_id, "trace": self.trace, "workload": self.workload,
                "iteration": self.iteration, "time_s": self.time_s,
                "q_lens": self.q_lens.tolist(), "kv_lens": self.kv_lens.tolist(),
                "request_ids": self.request_ids.tolist(), "prefix_ids": self.prefix_ids.tolist(),
                "prefix_lens": self.prefix_lens.tolist(),
                **({} if self.sampled is None else {"sampled": self.sampled.tolist()})}

    @classmethod
    def from_record(cls, rec: dict[str, object]) -> Batch:
        return cls(**rec)
