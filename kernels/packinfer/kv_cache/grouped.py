"""PackInfer's group-contiguous layout: one flat token pool where a shared prefix is stored once and the
requests of its group follow it, each in one contiguous extent with headroom to grow into; when a request
outgrows its room (or finishes, or arrives) `relayout()` packs the live data again, group by group, with a GPU
copy kernel, and counts the bytes it moved."""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Mapping

import numpy as np
import torch

from packinfer.kv_cache.base import KVCacheBase, KVCacheError, Prefix, Request
from packinfer.kv_cache.relayout import copy_token_ranges, token_ranges

#: Where a new or moved request's extent goes: "spread" (while at most SPREAD_BELOW of the cache is reserved, the
#: middle of the largest free range, so that it and the extent before it can both grow in place: decode steps
#: rarely move a request; fuller, the lowest free range) or "first-fit" (always the lowest free range).
PLACEMENTS = ("spread", "first-fit")
SPREAD_BELOW = 0.5


class GroupedKVCache(KVCacheBase):
    """Group-contiguous layout: a prefix stored once, each request one contiguous extent of own tokens with
    headroom (`headroom` tokens, or what allocate/relayout reserve). Appending past the room raises unless the
    extent can grow in place; `make_room()` grows or moves the requests that need it, `relayout()` packs
    everything again, groups together."""

    layout = "grouped"

    def __init__(self, capacity_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", headroom: int = 64, num_layers: int = 1,
                 placement: str = "spread", relayout_slack: float = 0.5,
                 pools: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(capacity_tokens, num_kv_heads, head_dim, dtype, device, num_layers, pools)
        if headroom < 0:
            raise KVCacheError(f"headroom must be >= 0, got {headroom}")
        if placement not in PLACEMENTS:
            raise KVCacheError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if not 0.0 <= relayout_slack <= 1.0:
            raise KVCacheError(f"relayout_slack must be in [0, 1], got {relayout_slack}")
        self.headroom, self.placement, self.relayout_slack = headroom, placement, relayout_slack
        self._held: list[tuple[int, int]] = []  # ranges vacated by relocations whose copy is not issued yet

    def _reset_layout(self) -> None:
        self._held = []

    # free-space search over the sorted extents and held ranges: right after a given address (a request next to
    # its prefix group), else first fit or, for an extent that may grow, the middle of the largest free range
    def _gaps(self) -> list[tuple[int, int]]:
        gaps, cursor = [], 0
        for start, end, _ in sorted([*self.extents(), *((s, e, "held") for s, e in self._held)]):
            if start > cursor:
                gaps.append((cursor, start))
            cursor = max(cursor, end)
        if cursor < self.capacity_tokens:
            gaps.append((cursor, self.capacity_tokens))
        return gaps

    def _find(self, n: int, what: str, near: int | None = None, grows: bool = True) -> int:
        gaps = [g for g in self._gaps() if g[1] - g[0] >= n]
        if not gaps:
            raise KVCacheError(f"{what}: no free range of {n} tokens (capacity {self.capacity_tokens}, "
                               f"{self._reserved_tokens()} reserved); finish requests or relayout()")
        after = [g for g in gaps if near is not None and g[0] >= near]
        if (after or not grows or self.placement == "first-fit"
                or self._reserved_tokens() > SPREAD_BELOW * self.capacity_tokens):
            return (after or gaps)[0][0]
        start, end = max(gaps, key=lambda g: g[1] - g[0])
        return start + (end - start - n) // 2

    def extents(self):
        ext = [(p.start, p.start + p.length, ("prefix", pid)) for pid, p in self._prefixes.items()]
        ext += [(r.start, r.start + r.room, ("request", rid)) for rid, r in self._requests.items() if r.room]
        return sorted(ext)

    def _store_prefix(self, n):
        return Prefix(n, self._next_serial(), start=self._find(n, "prefix", grows=False))

    def _prefix_addresses(self, prefix):
        return np.arange(prefix.start, prefix.start + prefix.length, dtype=np.int64)

    def _free_prefix(self, prefix):
        pass  # its extent disappears with it

    def _place(self, request_id, req, reserve, exact):
        room = reserve if exact else max(reserve, self.headroom)
        if room:
            near = None
            if req.prefix_id is not None:
                group = [r.start + r.room for r in self._requests.values() if r.prefix_id == req.prefix_id]
                p = self._prefixes[req.prefix_id]
                near = max(group, default=p.start + p.length)
            req.start, req.room = self._find(room, f"request {request_id!r}", near, grows=not exact), room

    def _grow_in_place(self, req: Request, want: int, target: int | None = None,
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

    def _relocate(self, req: Request, start: int, room: int, moves: list[tuple[int, int, int]]) -> int:
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

    def relayout(self, reserve: Mapping[Hashable, int] | None = None, keep_free: int = 0) -> int:
        """Pack prefixes and requests from address 0, each group's requests right after its prefix, every request
        with room for its tokens plus max(reserve.get(request, 0), headroom) plus its share (by its tokens) of
        `relayout_slack` of the space left free beyond `keep_free` tokens (what the allocation that asked for the
        re-layout needs): packed tight, a full cache would be re-laid out again within a few steps. Moves data
        with one GPU copy kernel through a scratch buffer of the moved tokens. Returns the bytes of K+V moved."""
        reserve = dict(reserve or {})
        for rid in reserve:
            self._request(rid)
        order: list[tuple[str, Hashable]] = []
        for pid in self._prefixes:
            order.append(("prefix", pid))
            order += [("request", rid) for rid, r in self._requests.items() if r.prefix_id == pid]
        order += [("request", rid) for rid, r in self._requests.items() if r.prefix_id is None]

        def room(rid) -> int:
            return max(reserve.get(rid, 0), self.headroom)

        own = {rid: r.length - r.prefix_len for rid, r in self._requests.items()}
        needed = sum(p.length for p in self._prefixes.values()) + sum(own[k] + room(k) for k in self._requests)
        slack = max(self.capacity_tokens - needed - keep_free, 0) * self.relayout_slack / max(sum(own.values()), 1)
        plan, cursor = [], 0
        for kind, key in order:
            if kind == "prefix":
                size = used = self._prefixes[key].length
                old = self._prefixes[key].start
            else:
                r = self._requests[key]
                used = r.length - r.prefix_len
                size = used + room(key) + int(slack * used)
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
            out, back = (token_ranges(a, b, lens, self.k.device) for a, b in ((src, scratch_at), (scratch_at, dst)))
            scratch = torch.empty(moved, self.num_kv_heads * self.head_dim, dtype=self.dtype, device=self.k.device)
            for pool in (self.k_pools, self.v_pools):
                for layer in pool:  # through the scratch buffer of one layer's moved tokens
                    flat = layer.view(layer.shape[0], -1)
                    copy_token_ranges(flat, scratch, out)
                    copy_token_ranges(scratch, flat, back)
        for kind, key, _, new, _, size in plan:
            if kind == "prefix":
                self._prefixes[key].start = new
            else:
                self._requests[key].start, self._requests[key].room = new, size
        self.relayouts += 1
        self.moved_bytes += moved * self.token_bytes
        return moved * self.token_bytes
