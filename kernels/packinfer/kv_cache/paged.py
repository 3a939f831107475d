"""The paged layout (vLLM's, the baseline): fixed-size blocks from a free list, one block table row per request,
a shared prefix's full blocks referenced (not copied) by every request that starts with it."""

from __future__ import annotations

import numpy as np
import torch

from packinfer.kv_cache.base import KVCacheBase, KVCacheError, Prefix


class PagedKVCache(KVCacheBase):
    """Fixed-size blocks (vLLM's paged layout). A request starting with a shared prefix references the prefix's
    full blocks and gets a private copy of its last, partly filled block (copy on write)."""

    layout = "paged"

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", num_layers: int = 1,
                 pools: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if block_size <= 0 or num_blocks <= 0:
            raise KVCacheError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        super().__init__(num_blocks * block_size, num_kv_heads, head_dim, dtype, device, num_layers, pools)
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
        return Prefix(n, self._next_serial(), blocks=self._take(-(-n // self.block_size), "prefix"))

    def _prefix_addresses(self, prefix):
        return self._token_addresses(prefix.blocks, 0, prefix.length)

    def _free_prefix(self, prefix):
        self._release(prefix.blocks)

    def _place(self, request_id, req, reserve, exact):
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
