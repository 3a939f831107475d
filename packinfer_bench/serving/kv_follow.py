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
    already covers the prefix (otherwise it stores its own tokens); the prefix goes when its last user does.

    step() does the bookkeeping and, by default, writes synthetic K/V (token_kv) for the iteration's new tokens;
    with write=False it only leaves `rows` and `slots`: query row rows[j] of the batch (rows in batch order) goes
    to token address slots[j], so a model's forward pass can write each layer's K/V there itself. A row at a
    prefix position whose shared copy is already stored has no slot; one that stores a new prefix may have two."""

    def __init__(self, cache, batches: Sequence[Batch], share_prefixes: bool = True, synchronize: bool = True):
        self.cache = cache
        self.synchronize = synchronize  # time making room from synchronised starts (False: host time only)
        self.last_seen: dict[int, int] = {}
        self.prefix_len: dict[int, int] = {}  # empty when prefixes are not shared: every request stores its own
        for i, b in enumerate(batches):
            for rid, pid, plen in zip(b.request_ids.tolist(), b.prefix_ids.tolist(), b.prefix_lens.tolist()):
                self.last_seen[rid] = i
                if pid >= 0 and share_prefixes:
                    self.prefix_len[pid] = max(self.prefix_len.get(pid, 0), plen)
        self._prefix_of: dict[int, int] = {}  # request -> prefix whose cached copy it uses
        self.rows = self.slots = np.zeros(0, np.int64)

    def step(self, i: int, batch: Batch, write: bool = True) -> StepCost:
        """Bring the cache to iteration i's state: its requests hold kv_len tokens each (the new ones written when
        `write`, else addressed by `rows` and `slots`)."""
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
        created = {}  # prefix stored this iteration -> (the request that fills it, its addresses)
        for rid, _, kv, pid in new:
            addr = self._arrive(rid, kv, pid, cost)
            if addr is not None:
                created[pid] = (rid, addr)
        if cache.layout == "grouped":
            needs = {rid: q for rid, q, kv in zip(batch.request_ids.tolist(), batch.q_lens.tolist(),
                                                  batch.kv_lens.tolist()) if cache.length(rid) < kv}
            self._sync()  # earlier queued work is not this step's cost
            t0 = time.perf_counter()
            before = cache.relayouts, cache.relocations
            cost.moved_bytes += cache.make_room(needs)
            cost.relayouts += cache.relayouts - before[0]
            cost.relocations += cache.relocations - before[1]
            self._sync()
            cost.room_s += time.perf_counter() - t0
        rows, slots, keys, at = [], [], [], 0
        for rid, q, kv, pid in zip(batch.request_ids.tolist(), batch.q_lens.tolist(), batch.kv_lens.tolist(),
                                   batch.prefix_ids.tolist()):
            shared = q - (kv - cache.length(rid))  # leading rows at prefix positions the cache already holds
            own = cache.extend(rid, q - shared)
            if shared and pid in created:  # a prefix stored this iteration: its first user's rows fill it; the
                filler, stored = created[pid]  # paged layout's copy-on-write last block of each user, too
                seen = cache.addresses(rid)[:shared]
                fill = np.arange(shared) if filler == rid else np.zeros(0, np.int64)
                differ = np.flatnonzero(seen != stored)
                rows += [at + fill, at + differ]
                slots += [stored[fill], seen[differ]]
                keys.append(np.full(len(fill) + len(differ), -1 - pid))
            rows.append(at + shared + np.arange(len(own)))
            slots.append(own)
            keys.append(np.full(len(own), rid))
            at += q
        self.rows = np.concatenate(rows).astype(np.int64)
        self.slots = np.concatenate(slots).astype(np.int64)
        if write and len(self.rows):
            cache.write(self.slots, *self._kv(np.concatenate(keys), batch.query_positions()[self.rows]))
        return cost

    def retire(self, i: int, batch: Batch) -> None:
        """After iteration i: requests the schedule never shows again leave the cache."""
        for rid in batch.request_ids.tolist():
            if self.last_seen[rid] == i and rid in self.cache:
                self._finish(rid)

    def _kv(self, keys, positions):
        c = self.cache
        return token_kv(keys, positions, c.num_kv_heads, c.head_dim, c.dtype, c.k.device)

    def _arrive(self, rid: int, kv: int, pid: int, cost: StepCost) -> np.ndarray | None:
        """Allocate a request; returns the addresses of its shared prefix when this request stores it first."""
        cache = self.cache
        plen = self.prefix_len.get(pid, 0)
        use_prefix = pid >= 0 and 0 < plen <= kv
        created = None
        if use_prefix and not cache.has_prefix(pid):
            created = self._room(cost, lambda: cache.add_prefix(pid, length=plen), plen)
        own = kv - (plen if use_prefix else 0)
        reserve = own + getattr(cache, "headroom", 0)
        self._room(cost, lambda: cache.allocate(rid, pid if use_prefix else None, reserve=reserve), reserve)
        if use_prefix:
            self._prefix_of[rid] = pid
        return created

    def _room(self, cost: StepCost, op, tokens: int):
        """Run an allocation of `tokens`; in the grouped layout, when no free range fits, compact once (keeping
        that much free) and try again."""
        cache = self.cache
        try:
            return op()
        except KVCacheError:
            if cache.layout != "grouped":
                raise
            self._sync()
            t0 = time.perf_counter()
            cost.moved_bytes += cache.relayout(keep_free=tokens)  # one free range of the scattered gaps
            cost.relayouts += 1
            self._sync()
            cost.room_s += time.perf_counter() - t0
            return op()

    def _sync(self) -> None:
        if self.synchronize and self.cache.k.device.type == "cuda":
            torch.cuda.synchronize(self.cache.k.device)

    def _finish(self, rid: int) -> None:
        self.cache.finish(rid)
        pid = self._prefix_of.pop(rid, None)
        if pid is not None and self.cache.prefix_users(pid) == 0:
            self.cache.release_prefix(pid)


def peak_tokens(batches: Sequence[Batch]) -> int:
    """Most KV tokens any iteration holds (each request's own copy), to size a cache for the replay."""
    return max((int(b.kv_lens.sum()) for b in batches), default=0)

