"""What both KV cache layouts share: the view attention reads, the statistics, the error, and the bookkeeping
of prefixes and requests (with the checks on every argument). A layout subclass decides where tokens live.

Both layouts store K and V as flat pools [tokens, num_kv_heads, head_dim] (a paged block is block_size
consecutive tokens of the pool), so one attention kernel reads either: contiguous ranges, or positions mapped
through a block table. A model's cache has one pool per layer (`num_layers`), all with the same token addresses:
the bookkeeping (and every move) is done once for all layers, and `extend()` + `write()` let a forward pass
write each layer's new tokens as it computes them (`append()` writes all layers at once).
An operation that fails raises KVCacheError and leaves the cache as it was.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from packinfer.kv_cache.relayout import copy_token_ranges, token_ranges


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
class Prefix:
    length: int
    serial: int
    users: int = 0
    start: int = -1  # grouped: token address
    blocks: list[int] = field(default_factory=list)  # paged


@dataclass
class Request:
    prefix_id: Hashable | None
    prefix_len: int
    length: int  # tokens visible, prefix included
    start: int = -1  # grouped: address of position prefix_len
    room: int = 0  # grouped: own tokens the extent holds
    blocks: list[int] = field(default_factory=list)  # paged: whole block table, prefix blocks first


def _check_pools(pools: tuple[torch.Tensor, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
    """Given pools (another cache's memory, reused: only one of the caches sharing it may be in use at a time)
    must be two distinct contiguous tensors of exactly the cache's shape, dtype and device."""
    if not isinstance(pools, (tuple, list)) or len(pools) != 2:
        raise KVCacheError("pools must be a (k_pools, v_pools) pair of tensors")
    for name, t in zip(("k_pools", "v_pools"), pools):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            got = (f"{tuple(t.shape)} {t.dtype}{'' if t.is_contiguous() else ' (not contiguous)'}"
                   if isinstance(t, torch.Tensor) else type(t).__name__)
            raise KVCacheError(f"pools: {name} must be a contiguous {dtype} tensor of shape {shape} "
                               "(layers, tokens, kv heads, head dim), got " + got)
        if t.device.type != device.type or (device.index is not None and t.device != device):
            raise KVCacheError(f"pools: {name} is on {t.device}, the cache on {device}")
    if pools[0].data_ptr() == pools[1].data_ptr():
        raise KVCacheError("pools: k_pools and v_pools must be different tensors")


class KVCacheBase:
    """Bookkeeping shared by both layouts: pools, prefixes, requests and the checks on every argument."""

    layout = ""

    def __init__(self, capacity_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, num_layers: int = 1,
                 pools: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if capacity_tokens <= 0 or num_kv_heads <= 0 or head_dim <= 0 or num_layers <= 0:
            raise KVCacheError(f"capacity_tokens, num_kv_heads, head_dim and num_layers must be > 0, got "
                               f"{capacity_tokens}, {num_kv_heads}, {head_dim}, {num_layers}")
        self.num_kv_heads, self.head_dim, self.dtype, self.num_layers = num_kv_heads, head_dim, dtype, num_layers
        # pools [layer, token, kv head, dim]; k / v are layer 0's (the only one of a single-layer cache)
        shape = (num_layers, capacity_tokens, num_kv_heads, head_dim)
        if pools is None:
            self.k_pools = torch.empty(shape, dtype=dtype, device=device)
            self.v_pools = torch.empty_like(self.k_pools)
        else:
            _check_pools(pools, shape, dtype, torch.device(device))
            self.k_pools, self.v_pools = pools
        self.k, self.v = self.k_pools[0], self.v_pools[0]
        self._prefixes: dict[Hashable, Prefix] = {}
        self._requests: dict[Hashable, Request] = {}
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

    def _request(self, request_id: Hashable) -> Request:
        if request_id not in self._requests:
            raise KVCacheError(f"unknown request {request_id!r}")
        return self._requests[request_id]

    def _check_tokens(self, k: torch.Tensor | None, v: torch.Tensor | None, what: str, all_layers: bool = True) -> int:
        """Token count of k/v: [tokens, Hkv, D] for one layer (all_layers=False, or a single-layer cache), else
        [num_layers, tokens, Hkv, D]. Anything else (None included) raises KVCacheError."""
        want = (self.num_kv_heads, self.head_dim)
        layered = all_layers and self.num_layers > 1
        for name, t in (("k", k), ("v", v)):
            shape = tuple(getattr(t, "shape", ()))
            if layered:
                ok = len(shape) == 4 and shape[0] == self.num_layers and shape[2:] == want
            else:
                ok = len(shape) == 3 and shape[1:] == want
            if not (ok and isinstance(t, torch.Tensor)):
                lead = f"{self.num_layers}, tokens" if layered else "tokens"
                raise KVCacheError(f"{what}: {name} must be [{lead}, {want[0]}, {want[1]}], got {shape}")
            if t.dtype != self.dtype:
                raise KVCacheError(f"{what}: {name} has dtype {t.dtype}, the cache holds {self.dtype}")
            if t.device != self.k.device:
                raise KVCacheError(f"{what}: {name} is on {t.device}, the cache on {self.k.device}")
        assert k is not None and v is not None  # the loop raised for anything but tensors
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
        if k is not None and v is not None:  # given (checked above: one without the other raised)
            self.write(addr, k, v)
        return addr

    def release_prefix(self, prefix_id: Hashable) -> None:
        """Free a prefix no live request uses."""
        if prefix_id not in self._prefixes:
            raise KVCacheError(f"unknown prefix {prefix_id!r}")
        if self._prefixes[prefix_id].users:
            raise KVCacheError(f"prefix {prefix_id!r} is still used by {self._prefixes[prefix_id].users} request(s)")
        self._free_prefix(self._prefixes.pop(prefix_id))

    def allocate(self, request_id: Hashable, prefix_id: Hashable | None = None, reserve: int = 0, *,
                 exact: bool = False) -> None:
        """Register a request, starting with a stored prefix's tokens if given; `reserve` tokens of room are
        set aside for its own tokens where the layout reserves (grouped: at least its headroom, unless exact)."""
        if request_id in self._requests:
            raise KVCacheError(f"request {request_id!r} is already allocated")
        if prefix_id is not None and prefix_id not in self._prefixes:
            raise KVCacheError(f"request {request_id!r}: unknown prefix {prefix_id!r}")
        if reserve < 0:
            raise KVCacheError(f"request {request_id!r}: reserve must be >= 0, got {reserve}")
        prefix = self._prefixes.get(prefix_id)
        req = Request(prefix_id, prefix.length if prefix else 0, prefix.length if prefix else 0)
        self._place(request_id, req, reserve, exact)
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

    def reset(self) -> None:
        """Empty the cache (every request and prefix dropped, move counters zeroed) and keep its pools, so that
        anything pointing into them (a captured CUDA graph) stays valid for the next use."""
        for rid in list(self._requests):
            self.finish(rid)
        for pid in list(self._prefixes):
            self.release_prefix(pid)
        self.moved_bytes = self.relayouts = self.relocations = 0
        self._reset_layout()

    def _reset_layout(self) -> None:
        """Layout state beyond requests and prefixes, back to empty."""

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
        ranges = token_ranges(src.repeat(layers) + shift, dst.repeat(layers) + shift, lengths.repeat(layers),
                              self.k.device)
        for pool in (self.k_pools, self.v_pools):
            flat = pool.view(layers * cap, -1)
            copy_token_ranges(flat, flat, ranges)

    # layout-specific parts
    def _store_prefix(self, n: int) -> Prefix:
        raise NotImplementedError

    def _prefix_addresses(self, prefix: Prefix) -> np.ndarray:
        raise NotImplementedError

    def _free_prefix(self, prefix: Prefix) -> None:
        raise NotImplementedError

    def _place(self, request_id: Hashable, req: Request, reserve: int, exact: bool) -> None:
        raise NotImplementedError

    def _extend(self, request_id: Hashable, req: Request, n: int) -> np.ndarray:
        raise NotImplementedError

    def _free_request(self, req: Request) -> None:
        raise NotImplementedError

    def _addresses(self, req: Request) -> np.ndarray:
        raise NotImplementedError

    def _view_fields(self, reqs: list[Request]) -> dict:
        raise NotImplementedError

    def _reserved_tokens(self) -> int:
        raise NotImplementedError
