"""KV caches for decode and append attention, in two layouts behind one interface.

`PagedKVCache` is the vLLM-style baseline: fixed-size blocks from a free list, one block table row per request,
a shared prefix's full blocks referenced (not copied) by every request that starts with it.
`GroupedKVCache` is PackInfer's group-contiguous layout: one flat token pool where a shared prefix is stored
once and the requests of its group follow it, each in one contiguous extent with headroom to grow into; when a
request outgrows its room (or finishes, or arrives) `relayout()` packs the live data again, group by group,
with a GPU copy kernel, and counts the bytes it moved.

Both store K and V as flat pools [tokens, num_kv_heads, head_dim] (a paged block is block_size consecutive
tokens of the pool), so one attention kernel reads either: contiguous ranges, or positions mapped through a
block table. A model's cache has one pool per layer (`num_layers`), all with the same token addresses: the
bookkeeping (and every move) is done once for all layers, and `extend()` + `write()` let a forward pass write
each layer's new tokens as it computes them (`append()` writes all layers at once).
An operation that fails raises KVCacheError and leaves the cache as it was.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from packinfer.relayout import copy_token_ranges

LAYOUTS = ("paged", "grouped")


class KVCacheError(ValueError):
    """A cache operation that cannot be done (unknown request, no room, wrong tensor); the cache is unchanged."""


@dataclass
class KVView:
    """What attention over some requests of a cache needs, in the order given: per request its visible length
    (prefix included), shared prefix id (-1 none) and length, and where its tokens lie. grouped: token address of
    the prefix (-1 none) and of position prefix_len (the request's own tokens). paged: block table rows, whose
    entry j is the block holding positions [j * page_size, (j + 1) * page_size)."""

    layout: str
    k: torch.Tensor
    v: torch.Tensor
    request_ids: list
    kv_lens: np.ndarray
    prefix_ids: np.ndarray
    prefix_lens: np.ndarray
    prefix_addr: np.ndarray | None = None
    own_addr: np.ndarray | None = None
    block_table: np.ndarray | None = None
    page_size: int = 0


@dataclass
class CacheStats:
    """Bytes of K+V: capacity of the pools, reserved for requests and prefixes, holding live tokens (a prefix
    counted once), moved so far by full re-layouts (how many) and by single requests' relocations (how many)."""

    capacity_bytes: int
    reserved_bytes: int
    live_bytes: int
    moved_bytes: int = 0
    relayouts: int = 0
    relocations: int = 0

    @property
    def fragmentation(self) -> float:
        """Share of the reserved bytes that hold no live token."""
        return 1.0 - self.live_bytes / self.reserved_bytes if self.reserved_bytes else 0.0


@dataclass
class _Prefix:
    length: int
    serial: int
    users: int = 0
    start: int = -1  # grouped: token address
    blocks: list[int] = field(default_factory=list)  # paged


@dataclass
class _Request:
    prefix_id: Hashable | None
    prefix_len: int
    length: int  # tokens visible, prefix included
    start: int = -1  # grouped: address of position prefix_len
    room: int = 0  # grouped: own tokens the extent holds
    blocks: list[int] = field(default_factory=list)  # paged: whole block table, prefix blocks first


class _KVCacheBase:
    """Bookkeeping shared by both layouts: pools, prefixes, requests and the checks on every argument."""

    layout = ""

    def __init__(self, capacity_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, num_layers: int = 1) -> None:
        if capacity_tokens <= 0 or num_kv_heads <= 0 or head_dim <= 0 or num_layers <= 0:
            raise KVCacheError(f"capacity_tokens, num_kv_heads, head_dim and num_layers must be > 0, got "
                               f"{capacity_tokens}, {num_kv_heads}, {head_dim}, {num_layers}")
        self.num_kv_heads, self.head_dim, self.dtype, self.num_layers = num_kv_heads, head_dim, dtype, num_layers
        # pools [layer, token, kv head, dim]; k / v are layer 0's (the only one of a single-layer cache)
        self.k_pools = torch.empty(num_layers, capacity_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v_pools = torch.empty_like(self.k_pools)
        self.k, self.v = self.k_pools[0], self.v_pools[0]
        self._prefixes: dict[Hashable, _Prefix] = {}
        self._requests: dict[Hashable, _Request] = {}
        self.moved_bytes = 0
        self.relayouts = 0
        self.relocations = 0  # single requests moved to a larger free range (grouped)
        self._serials = 0

    @property
    def capacity_tokens(self) -> int:
        return self.k.shape[0]

    @property
    def token_bytes(self) -> int:
        """Bytes of K plus V for one token, all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()

    @property
    def request_ids(self) -> list:
        return list(self._requests)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._requests

    def has_prefix(self, prefix_id: Hashable) -> bool:
        return prefix_id in self._prefixes

    def prefix_users(self, prefix_id: Hashable) -> int:
        """Live requests allocated on a stored prefix."""
        if prefix_id not in self._prefixes:
            raise KVCacheError(f"unknown prefix {prefix_id!r}")
        return self._prefixes[prefix_id].users

    def length(self, request_id: Hashable) -> int:
        """Tokens visible to the request (its prefix included)."""
        return self._request(request_id).length

    def _request(self, request_id: Hashable) -> _Request:
        if request_id not in self._requests:
            raise KVCacheError(f"unknown request {request_id!r}")
        return self._requests[request_id]

    def _check_tokens(self, k: torch.Tensor, v: torch.Tensor, what: str, all_layers: bool = True) -> int:
        """Token count of k/v: [tokens, Hkv, D] for one layer (all_layers=False, or a single-layer cache), else
        [num_layers, tokens, Hkv, D]."""
        want = (self.num_kv_heads, self.head_dim)
        layered = all_layers and self.num_layers > 1
        for name, t in (("k", k), ("v", v)):
            shape = tuple(getattr(t, "shape", ()))
            if layered:
                ok = len(shape) == 4 and shape[0] == self.num_layers and shape[2:] == want
            else:
                ok = len(shape) == 3 and shape[1:] == want
            ok = ok and isinstance(t, torch.Tensor)
            if not ok:
                lead = f"{self.num_layers}, tokens" if layered else "tokens"
                raise KVCacheError(f"{what}: {name} must be [{lead}, {want[0]}, {want[1]}], got {shape}")
            if t.dtype != self.dtype:
                raise KVCacheError(f"{what}: {name} has dtype {t.dtype}, the cache holds {self.dtype}")
            if t.device != self.k.device:
                raise KVCacheError(f"{what}: {name} is on {t.device}, the cache on {self.k.device}")
        if k.shape[-3] != v.shape[-3]:
            raise KVCacheError(f"{what}: k has {k.shape[-3]} tokens but v has {v.shape[-3]}")
        return k.shape[-3]

    def add_prefix(self, prefix_id: Hashable, k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                   length: int | None = None) -> np.ndarray:
        """Store a shared prefix (system prompt, few-shot examples) once; requests allocated with its id start
        with these tokens. Give its K/V (all layers), or only its `length` and write() the layers later.
        Returns the token addresses of its positions."""
        if k is None and v is None:
            if length is None or length <= 0:
                raise KVCacheError(f"prefix {prefix_id!r}: give k and v, or a length > 0 (got {length})")
            n = length
        else:
            n = self._check_tokens(k, v, f"prefix {prefix_id!r}")
        if prefix_id in self._prefixes:
            raise KVCacheError(f"prefix {prefix_id!r} is already stored")
        if n == 0:
            raise KVCacheError(f"prefix {prefix_id!r} has no tokens")
        prefix = self._store_prefix(n)
        self._prefixes[prefix_id] = prefix
        addr = self._prefix_addresses(prefix)
        if k is not None:
            self.write(addr, k, v)
        return addr

    def release_prefix(self, prefix_id: Hashable) -> None:
        """Free a prefix no live request uses."""
        if prefix_id not in self._prefixes:
            raise KVCacheError(f"unknown prefix {prefix_id!r}")
        if self._prefixes[prefix_id].users:
            raise KVCacheError(f"prefix {prefix_id!r} is still used by {self._prefixes[prefix_id].users} request(s)")
        self._free_prefix(self._prefixes.pop(prefix_id))

    def allocate(self, request_id: Hashable, prefix_id: Hashable | None = None, reserve: int = 0) -> None:
        """Register a request, starting with a stored prefix's tokens if given; `reserve` tokens of room are
        set aside for its own tokens where the layout reserves (grouped)."""
        if request_id in self._requests:
            raise KVCacheError(f"request {request_id!r} is already allocated")
        if prefix_id is not None and prefix_id not in self._prefixes:
            raise KVCacheError(f"request {request_id!r}: unknown prefix {prefix_id!r}")
        if reserve < 0:
            raise KVCacheError(f"request {request_id!r}: reserve must be >= 0, got {reserve}")
        prefix = self._prefixes.get(prefix_id)
        req = _Request(prefix_id, prefix.length if prefix else 0, prefix.length if prefix else 0)
        self._place(request_id, req, reserve)
        self._requests[request_id] = req
        if prefix:
            prefix.users += 1

    def append(self, request_id: Hashable, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the request's next tokens: k, v [n, num_kv_heads, head_dim] ([num_layers, n, ...] for a cache of
        several layers)."""
        self._request(request_id)
        n = self._check_tokens(k, v, f"append to request {request_id!r}")
        if n:
            self.write(self.extend(request_id, n), k, v)

    def extend(self, request_id: Hashable, n: int) -> np.ndarray:
        """Make the request `n` tokens longer and return the token addresses of its new positions, for write() to
        fill layer by layer (a forward pass computes each layer's K/V in turn). Grows its storage as append does."""
        req = self._request(request_id)
        if n < 0:
            raise KVCacheError(f"extend request {request_id!r}: n must be >= 0, got {n}")
        addr = self._extend(request_id, req, n) if n else np.zeros(0, np.int64)
        req.length += n
        return addr

    def write(self, addresses, k: torch.Tensor, v: torch.Tensor, layer: int | None = None) -> None:
        """Store K/V of tokens at `addresses` (from extend / add_prefix; numpy or a tensor on the cache's device):
        one layer's [n, Hkv, D] when `layer` is given, else every layer's ([num_layers, n, Hkv, D], or [n, Hkv, D]
        for a single-layer cache). No checks beyond shapes: this is the forward pass's hot path."""
        self._check_tokens(k, v, "write", all_layers=layer is None)
        if not isinstance(addresses, torch.Tensor):
            addresses = torch.from_numpy(np.asarray(addresses, np.int64))
        addresses = addresses.to(self.k.device)
        if layer is not None:
            self.k_pools[layer].index_copy_(0, addresses, k)
            self.v_pools[layer].index_copy_(0, addresses, v)
            return
        self.k_pools.index_copy_(1, addresses, k.reshape(self.num_layers, *k.shape[-3:]))
        self.v_pools.index_copy_(1, addresses, v.reshape(self.num_layers, *v.shape[-3:]))

    def finish(self, request_id: Hashable) -> None:
        """Drop a request; its space is reused (its prefix stays until released)."""
        req = self._request(request_id)
        self._free_request(req)
        del self._requests[request_id]
        if req.prefix_id is not None:
            self._prefixes[req.prefix_id].users -= 1

    def read(self, request_id: Hashable, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the request's K and V in one layer, all visible positions in order (for checks, not speed)."""
        addr = torch.from_numpy(self.addresses(request_id)).to(self.k.device)
        return self.k_pools[layer][addr], self.v_pools[layer][addr]

    def addresses(self, request_id: Hashable) -> np.ndarray:
        """Token addresses of the request's visible positions, in order."""
        return self._addresses(self._request(request_id))

    def view(self, request_ids: Iterable[Hashable], layer: int = 0) -> KVView:
        """What attention over these requests (in this order) needs, reading `layer`'s pools."""
        ids = list(request_ids)
        if not ids:
            raise KVCacheError("view needs at least one request")
        if not 0 <= layer < self.num_layers:
            raise KVCacheError(f"layer {layer} out of range: the cache has {self.num_layers} layer(s)")
        reqs = [self._request(r) for r in ids]
        return KVView(self.layout, self.k_pools[layer], self.v_pools[layer], ids,
                      np.array([r.length for r in reqs], np.int64),
                      np.array([-1 if r.prefix_id is None else self._prefixes[r.prefix_id].serial for r in reqs],
                               np.int64),
                      np.array([r.prefix_len for r in reqs], np.int64), **self._view_fields(reqs))

    def _next_serial(self) -> int:
        self._serials += 1
        return self._serials

    def stats(self) -> CacheStats:
        live = sum(p.length for p in self._prefixes.values())
        live += sum(r.length - r.prefix_len for r in self._requests.values())
        return CacheStats(self.capacity_tokens * self.token_bytes, self._reserved_tokens() * self.token_bytes,
                          live * self.token_bytes, self.moved_bytes, self.relayouts, self.relocations)

    def extents(self) -> list[tuple[int, int, Hashable]]:
        """(first token address, end, owner) of every reserved range: the storage map, for checks."""
        raise NotImplementedError

    def _copy_tokens(self, src, dst, lengths) -> None:
        """Copy token ranges (src[i], dst[i], lengths[i]: int64 tensors) of every layer's K and V pools in one
        launch each; ranges of one call must not overlap."""
        cap, layers = self.capacity_tokens, self.num_layers
        shift = torch.arange(layers, dtype=torch.int64).repeat_interleave(len(src)) * cap
        src, dst, lengths = src.repeat(layers) + shift, dst.repeat(layers) + shift, lengths.repeat(layers)
        for pool in (self.k_pools, self.v_pools):
            flat = pool.view(layers * cap, -1)
            copy_token_ranges(flat, flat, src, dst, lengths)

    # layout-specific parts
    def _store_prefix(self, n: int) -> _Prefix:
        raise NotImplementedError

    def _prefix_addresses(self, prefix: _Prefix) -> np.ndarray:
        raise NotImplementedError

    def _free_prefix(self, prefix: _Prefix) -> None:
        raise NotImplementedError

    def _place(self, request_id: Hashable, req: _Request, reserve: int) -> None:
        raise NotImplementedError

    def _extend(self, request_id: Hashable, req: _Request, n: int) -> np.ndarray:
        raise NotImplementedError

    def _free_request(self, req: _Request) -> None:
        raise NotImplementedError

    def _addresses(self, req: _Request) -> np.ndarray:
        raise NotImplementedError

    def _view_fields(self, reqs: list[_Request]) -> dict:
        raise NotImplementedError

    def _reserved_tokens(self) -> int:
        raise NotImplementedError


class PagedKVCache(_KVCacheBase):
    """Fixed-size blocks (vLLM's paged layout). A request starting with a shared prefix references the prefix's
    full blocks and gets a private copy of its last, partly filled block (copy on write)."""

    layout = "paged"

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", num_layers: int = 1) -> None:
        if block_size <= 0 or num_blocks <= 0:
            raise KVCacheError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        super().__init__(num_blocks * block_size, num_kv_heads, head_dim, dtype, device, num_layers)
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the block freed last is reused first
        self._refs = np.zeros(num_blocks, np.int64)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def _take(self, count: int, what: str) -> list[int]:
        if count > len(self._free):
            raise KVCacheError(f"{what}: needs {count} more block(s) of {self.block_size} tokens, "
                               f"{len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        self._refs[blocks] += 1
        return blocks

    def _release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def _token_addresses(self, blocks: list[int], first: int, n: int) -> np.ndarray:
        pos = np.arange(first, first + n)
        return np.asarray(blocks, np.int64)[pos // self.block_size] * self.block_size + pos % self.block_size

    def _store_prefix(self, n):
        return _Prefix(n, self._next_serial(), blocks=self._take(-(-n // self.block_size), "prefix"))

    def _prefix_addresses(self, prefix):
        return self._token_addresses(prefix.blocks, 0, prefix.length)

    def _free_prefix(self, prefix):
        self._release(prefix.blocks)

    def _place(self, request_id, req, reserve):
        if req.prefix_id is None:
            return
        prefix = self._prefixes[req.prefix_id]
        full = prefix.length // self.block_size
        tail = self._take(1, f"request {request_id!r}") if prefix.length % self.block_size else []
        if tail:  # copy on write: the partly filled last block becomes the request's own
            src = prefix.blocks[full] * self.block_size
            dst = tail[0] * self.block_size
            n = prefix.length - full * self.block_size
            for pool in (self.k_pools, self.v_pools):
                pool[:, dst:dst + n] = pool[:, src:src + n]
        shared = prefix.blocks[:full]
        self._refs[shared] += 1
        req.blocks = shared + tail

    def _extend(self, request_id, req, n):
        need = -(-(req.length + n) // self.block_size) - len(req.blocks)
        if need > 0:
            req.blocks = req.blocks + self._take(need, f"append to request {request_id!r}")
        return self._token_addresses(req.blocks, req.length, n)

    def _free_request(self, req):
        self._release(req.blocks)

    def _addresses(self, req):
        return self._token_addresses(req.blocks, 0, req.length)

    def _view_fields(self, reqs):
        width = max(max(len(r.blocks) for r in reqs), 1)
        table = np.zeros((len(reqs), width), np.int32)
        for i, r in enumerate(reqs):
            table[i, :len(r.blocks)] = r.blocks
        return {"block_table": table, "page_size": self.block_size}

    def _reserved_tokens(self):
        return int((self._refs > 0).sum()) * self.block_size

    def extents(self):
        owners = {}
        for pid, p in self._prefixes.items():
            for b in p.blocks:
                owners.setdefault(b, ("prefix", pid))
        for rid, r in self._requests.items():
            for b in r.blocks:
                owners.setdefault(b, ("request", rid))
        return sorted((b * self.block_size, (b + 1) * self.block_size, o) for b, o in owners.items())


class GroupedKVCache(_KVCacheBase):
    """Group-contiguous layout: a prefix stored once, each request one contiguous extent of own tokens with
    headroom (`headroom` tokens, or what allocate/relayout reserve). Appending past the room raises unless the
    extent can grow in place; `make_room()` grows or moves the requests that need it, `relayout()` packs
    everything again, groups together."""

    layout = "grouped"

    def __init__(self, capacity_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", headroom: int = 64, num_layers: int = 1) -> None:
        super().__init__(capacity_tokens, num_kv_heads, head_dim, dtype, device, num_layers)
        if headroom < 0:
            raise KVCacheError(f"headroom must be >= 0, got {headroom}")
        self.headroom = headroom
        self._held: list[tuple[int, int]] = []  # ranges vacated by relocations whose copy is not issued yet

    # free-space search over the sorted extents and held ranges (first fit, or right after a given address)
    def _gaps(self) -> list[tuple[int, int]]:
        gaps, cursor = [], 0
        for start, end, _ in sorted([*self.extents(), *((s, e, "held") for s, e in self._held)]):
            if start > cursor:
                gaps.append((cursor, start))
            cursor = max(cursor, end)
        if cursor < self.capacity_tokens:
            gaps.append((cursor, self.capacity_tokens))
        return gaps

    def _find(self, n: int, what: str, near: int | None = None) -> int:
        gaps = [g for g in self._gaps() if g[1] - g[0] >= n]
        if not gaps:
            raise KVCacheError(f"{what}: no free range of {n} tokens (capacity {self.capacity_tokens}, "
                               f"{self._reserved_tokens()} reserved); finish requests or relayout()")
        after = [g for g in gaps if near is not None and g[0] >= near]
        return (after or gaps)[0][0]  # next to its group when possible

    def extents(self):
        ext = [(p.start, p.start + p.length, ("prefix", pid)) for pid, p in self._prefixes.items()]
        ext += [(r.start, r.start + r.room, ("request", rid)) for rid, r in self._requests.items() if r.room]
        return sorted(ext)

    def _store_prefix(self, n):
        return _Prefix(n, self._next_serial(), start=self._find(n, "prefix"))

    def _prefix_addresses(self, prefix):
        return np.arange(prefix.start, prefix.start + prefix.length, dtype=np.int64)

    def _free_prefix(self, prefix):
        pass  # its extent disappears with it

    def _place(self, request_id, req, reserve):
        room = max(reserve, self.headroom)
        if room:
            near = None
            if req.prefix_id is not None:
                group = [r.start + r.room for r in self._requests.values() if r.prefix_id == req.prefix_id]
                p = self._prefixes[req.prefix_id]
                near = max(group, default=p.start + p.length)
            req.start, req.room = self._find(room, f"request {request_id!r}", near), room

    def _grow_in_place(self, req: _Request, want: int, target: int | None = None,
                       starts: list[int] | None = None) -> bool:
        """Extend a request's room to `target` (default: `want`) tokens, or as far as the next reserved range
        allows if that still holds `want`; False (nothing changed) when it does not. `starts`: the sorted first
        addresses of the reserved ranges, when the caller keeps them."""
        if req.room == 0:
            return False
        if starts is None:
            starts = sorted(s for s, _, _ in self.extents())
        after = bisect.bisect_right(starts, req.start)
        limit = (starts[after] if after < len(starts) else self.capacity_tokens) - req.start
        if limit < want:
            return False
        req.room = min(want if target is None else target, limit)
        return True

    def _extend(self, request_id, req, n):
        own = req.length - req.prefix_len
        if own + n > req.room and not self._grow_in_place(req, own + n):
            raise KVCacheError(f"append to request {request_id!r}: {n} token(s) past its room ({own} of "
                               f"{req.room} used); call make_room({{{request_id!r}: {n}}}) or relayout() first")
        return np.arange(req.start + own, req.start + own + n, dtype=np.int64)

    def _free_request(self, req):
        pass

    def _addresses(self, req):
        own = np.arange(req.start, req.start + req.length - req.prefix_len)
        if req.prefix_id is None:
            return own
        p = self._prefixes[req.prefix_id]
        return np.concatenate([np.arange(p.start, p.start + p.length), own])

    def _view_fields(self, reqs):
        prefix = [self._prefixes[r.prefix_id].start if r.prefix_id is not None else -1 for r in reqs]
        return {"prefix_addr": np.array(prefix, np.int64), "own_addr": np.array([r.start for r in reqs], np.int64)}

    def _reserved_tokens(self):
        return sum(e - s for s, e, _ in self.extents())

    def make_room(self, needs: Mapping[Hashable, int]) -> int:
        """Make sure each request can take `needs[request]` more tokens: grow its extent in place where the space
        after it is free, else move it alone to a free range with a quarter more room than it needs (so a growing
        request moves O(1) times its final size in all), and only when no free range is large enough, relayout
        everything. All relocations of one call are one copy launch. Returns the bytes moved (0 when nothing
        moved)."""
        for rid, n in needs.items():
            if n < 0:
                raise KVCacheError(f"make_room: request {rid!r} needs {n} < 0 tokens")
        wants = {rid: self._request(rid).length - self._request(rid).prefix_len + n for rid, n in needs.items()}
        starts = None  # where each reserved range begins (built when first needed, then kept up to date)
        moves: list[tuple[int, int, int]] = []  # (from, to, tokens) of this call's relocations: one copy launch
        moved = 0
        try:
            for rid, want in wants.items():
                req = self._requests[rid]
                if want <= req.room:
                    continue
                if starts is None:
                    starts = sorted(s for s, _, _ in self.extents())
                target = want + max(self.headroom, want // 4)
                if self._grow_in_place(req, want, target, starts):
                    continue
                try:
                    start = self._find(target, f"request {rid!r}", near=req.start)
                except KVCacheError:  # no free range fits: compaction makes one
                    self._copy_moves(moves)
                    self._held = []
                    return moved + self.relayout(reserve=needs)
                if req.room:  # the old range stays taken (its start stays in `starts`) until the copy is issued
                    self._held.append((req.start, req.start + req.room))
                moved += self._relocate(req, start, target, moves)
                bisect.insort(starts, start)
            self._copy_moves(moves)
        finally:
            self._held = []
        return moved

    def _relocate(self, req: _Request, start: int, room: int, moves: list[tuple[int, int, int]]) -> int:
        """Give a request the free range at `start` and queue the move of its own tokens there."""
        own = req.length - req.prefix_len
        if own:
            moves.append((req.start, start, own))
        req.start, req.room = start, room
        self.relocations += 1
        self.moved_bytes += own * self.token_bytes
        return own * self.token_bytes

    def _copy_moves(self, moves: list[tuple[int, int, int]]) -> None:
        """Issue the queued relocations as one copy (their sources and destinations are all disjoint: a range
        vacated by a move stays held until this copy)."""
        if moves:
            src, dst, n = (torch.tensor(col, dtype=torch.int64) for col in zip(*moves))
            self._copy_tokens(src, dst, n)
            moves.clear()

    def relayout(self, reserve: Mapping[Hashable, int] | None = None) -> int:
        """Pack prefixes and requests from address 0, each group's requests right after its prefix, every request
        with room for its tokens plus max(reserve.get(request, 0), headroom). Moves data with one GPU copy kernel
        through a scratch buffer of the moved tokens. Returns the bytes of K+V moved."""
        reserve = dict(reserve or {})
        for rid in reserve:
            self._request(rid)
        order: list[tuple[str, Hashable]] = []
        for pid in self._prefixes:
            order.append(("prefix", pid))
            order += [("request", rid) for rid, r in self._requests.items() if r.prefix_id == pid]
        order += [("request", rid) for rid, r in self._requests.items() if r.prefix_id is None]
        plan, cursor = [], 0
        for kind, key in order:
            if kind == "prefix":
                size = used = self._prefixes[key].length
                old = self._prefixes[key].start
            else:
                r = self._requests[key]
                used = r.length - r.prefix_len
                size = used + max(reserve.get(key, 0), self.headroom)
                old = r.start
            plan.append((kind, key, old, cursor, used, size))
            cursor += size
        if cursor > self.capacity_tokens:
            raise KVCacheError(f"relayout: live tokens plus room need {cursor} tokens, capacity is "
                               f"{self.capacity_tokens}")
        moves = [(old, new, used) for _, _, old, new, used, _ in plan if used and old != new]
        moved = sum(m[2] for m in moves)
        if moves:
            src, dst, lens = (torch.tensor([m[i] for m in moves], dtype=torch.int64) for i in range(3))
            scratch_at = torch.cumsum(lens, 0) - lens
            for pool in (self.k_pools, self.v_pools):
                for layer in pool:  # through a scratch buffer of one layer's moved tokens
                    flat = layer.view(layer.shape[0], -1)
                    scratch = torch.empty(moved, flat.shape[1], dtype=pool.dtype, device=pool.device)
                    copy_token_ranges(flat, scratch, src, scratch_at, lens)
                    copy_token_ranges(scratch, flat, scratch_at, dst, lens)
        for kind, key, _, new, _, size in plan:
            if kind == "prefix":
                self._prefixes[key].start = new
            else:
                self._requests[key].start, self._requests[key].room = new, size
        self.relayouts += 1
        self.moved_bytes += moved * self.token_bytes
        return moved * self.token_bytes


def make_cache(layout: str, capacity_tokens: int, num_kv_heads: int, head_dim: int, *, dtype=torch.bfloat16,
               device="cpu", block_size: int = 16, headroom: int = 64, num_layers: int = 1):
    """A cache of `layout` ('paged' or 'grouped') holding capacity_tokens tokens in each of num_layers layers."""
    if layout == "paged":
        return PagedKVCache(-(-capacity_tokens // block_size), block_size, num_kv_heads, head_dim, dtype, device,
                            num_layers)
    if layout == "grouped":
        return GroupedKVCache(capacity_tokens, num_kv_heads, head_dim, dtype, device, headroom, num_layers)
    raise KVCacheError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
