"""A packinfer KV cache kept in step with a continuous-batching schedule, as a server's cache would be: each
iteration writes the K/V of the tokens it computes, a request leaves after its last iteration, a preempted one
starts again, and requests of a shared prefix keep one copy of it. Used to measure the grouped layout's
re-layout cost over a whole replay, not just one batch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from packinfer import KVCacheError

from packinfer_bench.workload import Batch


def token_kv(keys, positions, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V in [-1, 1) of tokens given by (sequence key, position) pairs, a key being a request id or -1 - id for
    a shared prefix: a hash of (key, position, channel), so a token's K/V is the same however the sequence is
    chunked (and looks random, like real activations, not smooth), and one call makes an iteration's tokens."""
    key = torch.as_tensor(np.asarray(keys), dtype=torch.float32).to(device)[:, None]
    pos = torch.as_tensor(np.asarray(positions), dtype=torch.float32).to(device)[:, None]
    chan = torch.arange(num_kv_heads * head_dim, device=device, dtype=torch.float32)[None, :]
    shape = (pos.shape[0], num_kv_heads, head_dim)

    def unit(salt: float) -> torch.Tensor:  # fract(sin(x) * big): the classic shader hash
        x = torch.sin(12.9898 * torch.remainder(pos, 4096) + 78.233 * chan + 37.719 * torch.remainder(key, 8191)
                      + 0.731 * torch.floor(pos / 4096) + salt) * 43758.5453
        return (2 * (x - torch.floor(x)) - 1).reshape(shape).to(dtype)

    return unit(0.0), unit(1.618)


def sequence_kv(key: int, start: int, n: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions start..start+n of one sequence."""
    return token_kv(np.full(n, key), np.arange(start, start + n), num_kv_heads, head_dim, dtype, device)


@dataclass
class StepCost:
    """What keeping the cache in step cost one iteration: bytes moved and seconds spent (CPU bookkeeping plus
    the GPU copy, synchronised) making room for the new tokens; full re-layouts and single-request relocations."""

    moved_bytes: int = 0
    room_s: float = 0.0
    relayouts: int = 0
    relocations: int = 0


class CacheFollower:
    """Keeps `cache` holding exactly the tokens the schedule `batches` has computed before each iteration's
    attention. A request with a shared prefix uses the cache's single copy of it when its first iteration
    already covers the prefix (otherwise it stores its own tokens); the prefix goes when its last user does."""

    def __init__(self, cache, batches: Sequence[Batch]):
        self.cache = cache
        self.last_seen: dict[int, int] = {}
        self.prefix_len: dict[int, int] = {}
        for i, b in enumerate(batches):
            for rid, pid, plen in zip(b.request_ids.tolist(), b.prefix_ids.tolist(), b.prefix_lens.tolist()):
                self.last_seen[rid] = i
                if pid >= 0:
                    self.prefix_len[pid] = max(self.prefix_len.get(pid, 0), plen)
        self._prefix_of: dict[int, int] = {}  # request -> prefix whose cached copy it uses

    def _kv(self, keys, positions):
        c = self.cache
        return token_kv(keys, positions, c.num_kv_heads, c.head_dim, c.dtype, c.k.device)

    def step(self, i: int, batch: Batch) -> StepCost:
        """Bring the cache to iteration i's state: its requests hold kv_len tokens each (the new ones written)."""
        cost = StepCost()
        cache = self.cache
        new = []
        for rid, q, kv, pid in zip(batch.request_ids.tolist(), batch.q_lens.tolist(), batch.kv_lens.tolist(),
                                   batch.prefix_ids.tolist()):
            if rid in cache and cache.length(rid) != kv - q:
                if kv != q:
                    raise KVCacheError(f"iteration {i}: request {rid} holds {cache.length(rid)} tokens, the "
                                       f"schedule says {kv - q}")
                self._finish(rid)  # preempted and recomputed from scratch
            if rid not in cache:
                new.append((rid, q, kv, pid))
        for rid, q, kv, pid in new:
            self._arrive(rid, kv, pid, cost)
        if cache.layout == "grouped":
            needs = {rid: q for rid, q, kv in zip(batch.request_ids.tolist(), batch.q_lens.tolist(),
                                                  batch.kv_lens.tolist()) if cache.length(rid) < kv}
            _sync(cache)  # earlier queued work is not this step's cost
            t0 = time.perf_counter()
            before = cache.relayouts, cache.relocations
            cost.moved_bytes += cache.make_room(needs)
            cost.relayouts += cache.relayouts - before[0]
            cost.relocations += cache.relocations - before[1]
            _sync(cache)
            cost.room_s += time.perf_counter() - t0
        have = {rid: cache.length(rid) for rid in batch.request_ids.tolist()}
        todo = [(rid, have[rid], kv) for rid, kv in zip(batch.request_ids.tolist(), batch.kv_lens.tolist())
                if have[rid] < kv]
        if todo:
            counts = [kv - have for _, have, kv in todo]
            k, v = self._kv(np.repeat([rid for rid, _, _ in todo], counts),
                            np.concatenate([np.arange(have, kv) for _, have, kv in todo]))
            at = 0
            for (rid, _, _), n in zip(todo, counts):
                cache.append(rid, k[at:at + n], v[at:at + n])
                at += n
        return cost

    def retire(self, i: int, batch: Batch) -> None:
        """After iteration i: requests the schedule never shows again leave the cache."""
        for rid in batch.request_ids.tolist():
            if self.last_seen[rid] == i and rid in self.cache:
                self._finish(rid)

    def _arrive(self, rid: int, kv: int, pid: int, cost: StepCost) -> None:
        cache = self.cache
        plen = self.prefix_len.get(pid, 0)
        use_prefix = pid >= 0 and 0 < plen <= kv
        if use_prefix and not cache.has_prefix(pid):
            cache.add_prefix(pid, *self._kv(np.full(plen, -1 - pid), np.arange(plen)))
        own = kv - (plen if use_prefix else 0)
        reserve = own + getattr(cache, "headroom", 0)
        try:
            cache.allocate(rid, pid if use_prefix else None, reserve=reserve)
        except KVCacheError:
            if cache.layout != "grouped":
                raise
            _sync(cache)
            t0 = time.perf_counter()
            cost.moved_bytes += cache.relayout()  # compaction makes one free range of the scattered gaps
            cost.relayouts += 1
            _sync(cache)
            cost.room_s += time.perf_counter() - t0
            cache.allocate(rid, pid if use_prefix else None, reserve=reserve)
        if use_prefix:
            self._prefix_of[rid] = pid

    def _finish(self, rid: int) -> None:
        self.cache.finish(rid)
        pid = self._prefix_of.pop(rid, None)
        if pid is not None and self.cache.prefix_users(pid) == 0:
            self.cache.release_prefix(pid)


def peak_tokens(batches: Sequence[Batch]) -> int:
    """Most KV tokens any iteration holds (each request's own copy), to size a cache for the replay."""
    return max((int(b.kv_lens.sum()) for b in batches), default=0)


def _sync(cache) -> None:
    if cache.k.device.type == "cuda":
        torch.cuda.synchronize(cache.k.device)
