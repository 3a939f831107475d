"""PackInfer (ours) and its ablations. Prefill, append and mixed batches go through the packed varlen kernel;
decode batches (every request at most DECODE_MAX_Q new rows) through cache attention over the grouped KV cache.
Variants switch one feature off each: balancing, packing (prefill tiles), GQA packing, prefix grouping, KV
splitting, and the grouped layout (paged instead); a variant that does not touch a batch's path is skipped.
triton_unpacked is the packed varlen kernel on FlashAttention-2's grid with fixed 128x64 tiles.
Planning is the plan cost (built once, reused by every call, as across layers)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import packinfer
import torch
from packinfer.cache_attention import launch as launch_cache

from packinfer_bench.backends.base import Backend, Inputs, NotApplicable, ServingAttention
from packinfer_bench.backends.kv_layouts import cache_for

PACKINFER_VARIANTS = ("full", "no-balancing", "no-packing", "no-gqa-packing", "no-prefix-grouping", "no-split",
                      "paged")
#: Batches whose requests all have at most this many query rows are decode batches (cache attention).
DECODE_MAX_Q = 16
_PREFILL_ONLY = {"no-packing"}  # fa2-grid (triton_unpacked) always takes the varlen path
_DECODE_ONLY = {"no-prefix-grouping", "no-split", "paged"}


def _available(device: torch.device) -> str | None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on the CPU Triton kernels need TRITON_INTERPRET=1 (set before triton is imported)"
    return None


def is_decode(x: Inputs) -> bool:
    return int(x.batch.q_lens.max()) <= DECODE_MAX_Q


def _varlen_plan(x: Inputs, variant: str) -> packinfer.Plan:
    s, b = x.shape, x.batch
    if variant == "fa2-grid":
        return packinfer.plan_for(x.cu_q_cpu, x.cu_k_cpu, s.num_heads, s.num_kv_heads, s.head_dim, causal=True,
                                  packing=False, balancing=False, config=packinfer.FA2_LIKE)
    config = packinfer.choose_config(b.q_lens, b.kv_lens, s.num_heads, s.num_kv_heads, s.head_dim)
    if variant == "no-gqa-packing":
        config = dataclasses.replace(config, pack_gqa=False)
    return packinfer.plan_for(x.cu_q_cpu, x.cu_k_cpu, s.num_heads, s.num_kv_heads, s.head_dim, causal=True,
                              config=config, packing=variant != "no-packing", balancing=variant != "no-balancing")


def prepare(x: Inputs, variant: str, use_tma: bool | None = None):
    decode = is_decode(x) and variant != "fa2-grid"
    if decode and variant in _PREFILL_ONLY:
        raise NotApplicable(f"variant {variant!r} changes prefill tiles; this is a decode batch")
    if not decode and variant in _DECODE_ONLY:
        raise NotApplicable(f"variant {variant!r} changes decode attention; this batch has up to "
                            f"{int(x.batch.q_lens.max())} query rows per request (> {DECODE_MAX_Q})")
    checked = [False]
    if decode:
        _, view = cache_for(x, "paged" if variant == "paged" else "grouped")
        plan = packinfer.plan_cache_attention(
            view, x.batch.q_lens, x.shape.num_heads, prefix_grouping=variant != "no-prefix-grouping",
            split=variant != "no-split", balancing=variant != "no-balancing", num_sms=packinfer.num_sms(x.q.device),
            pack_gqa=False if variant == "no-gqa-packing" else None)

        def run() -> torch.Tensor:
            out = packinfer.cache_attention(x.q, view, plan, validate=not checked[0], use_tma=use_tma)
            checked[0] = True
            return out

        return run
    plan = _varlen_plan(x, variant)

    def run() -> torch.Tensor:  # arguments checked on the first call only, as a serving loop would
        out = packinfer.varlen_attention(x.q, x.k, x.v, x.cu_q, x.cu_k, x.max_q, x.max_k, causal=True,
                                         plan=plan, validate=not checked[0], use_tma=use_tma)
        checked[0] = True
        return out

    return run


#: Iterations whose requests have at most this many new rows each store their K/V in the attention launch, which
#: reads those keys from k_new / v_new (whole blocks of new keys unmasked, the diagonal blocks masked) and so saves
#: the two K/V write launches: 7.7-13.2 us per decode call on an H100 (results/serving-h100). So do iterations of
#: fresh prompts only (every key they read is new, so none comes from the cache), at any length (fuses()). Same
#: GPU, variant fuse-all against the default (results/serving-h100-v2): a 374-token fresh prompt 25% less fused,
#: a 6758-token one the same (0.994); long chunks or prompts among decode rows 2-9% more on Mooncake's batches
#: and -2%..+3% on ShareGPT's and Azure's, so those keep the two writes.
FUSE_MAX_Q = 256


def fuses(batch, fuse_max_q: int | None = None) -> bool:
    """Whether the serving call stores the iteration's K/V in its attention launch: at most fuse_max_q
    (default FUSE_MAX_Q) new rows per request, or (fuse_max_q > 0) fresh prompts only - each request's rows are
    its whole sequence."""
    fuse_max_q = FUSE_MAX_Q if fuse_max_q is None else fuse_max_q
    q = batch.q_lens
    return int(q.max()) <= fuse_max_q or (fuse_max_q > 0 and bool((q == batch.kv_lens).all()))


class PackinferAttention(ServingAttention):
    """Serving: the grouped (group-contiguous) cache; every iteration - decode rows, prompt chunks, fresh prompts
    (their K/V written first), shared prefixes read once - is one cache-attention launch per layer over the cache
    in place, planned once per iteration (the planner picks tile shape and splitting). The K/V of an iteration
    of up to FUSE_MAX_Q rows per request (decode, short prompts and chunks), or of fresh prompts only, is stored
    by that same launch (k_new / v_new: one launch per layer in all; variant "unfused" writes it first, as other
    iterations do).
    In a CUDA graph (decode, mixed and prefill iterations alike) the plan goes into fixed buffers of the tile
    shape the graph was captured with, decided once per (padded size, iteration kind) by the planner on the
    first such iteration."""

    name, layout = "packinfer", "grouped"
    graph_kinds = frozenset({"decode", "mixed", "prefill"})
    kernel = ("packinfer cache attention (1 launch: packed tiles + split-KV merged by the last program; iterations "
              f"of up to {FUSE_MAX_Q} rows per request or of fresh prompts only store their K/V in it)")

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.layout = options.get("layout", "grouped")  # variant "paged": vLLM's layout instead
        self._use_tma = options.get("use_tma")
        self._planner = {k: options[k] for k in ("split", "prefix_grouping", "balancing", "pack_gqa")
                         if k in options}
        self._fixed_slots = options.get("slots")
        self._fuse_max_q = options.get("fuse_max_q", FUSE_MAX_Q)  # 0: never (variant "unfused")
        self._fresh = False  # this iteration's launch stores the new K/V itself
        self._sms = packinfer.num_sms(self.device)
        self._tiles: dict[tuple[int, str], int] = {}  # (padded, kind) -> slots of its graph
        self._buffers: dict[tuple, packinfer.PlanBuffers] = {}
        self._limits = {"max_rows": 8192, "max_seqs": 256, "max_pages": 1}
        self._plan = self._bufs = self._grid_items = None
        self.launches_per_layer = 3  # K and V writes, one attention kernel

    def configure(self, *, max_rows, max_seqs, max_kv_len, capacity_tokens):
        self._limits = {"max_rows": max_rows, "max_seqs": max_seqs,
                        "max_pages": -(-max_kv_len // max(self.page_size, 1))}

    def _capacity(self, slots: int, padded: int | None = None) -> tuple[int, int]:
        """(max_items, max_partials) of an iteration of `padded` rows (default: the largest) with this tile:
        every row block twice (a row reads its own tokens and at most one prefix segment, shared or not), one
        more per segment for its last partial block (three segments per request: prefix, unshared prefix, own
        tokens), splits for twice the WAVES-per-SM target; partial rows for twice every row plus the splits'.
        The launch grid of a graph covers its size's item capacity: a decode graph of 16 rows launches ~200
        items' programs, not the largest iteration's thousands (each launched program costs time even when it
        returns at once)."""
        group = self.num_heads // self.num_kv_heads
        pack = self._planner.get("pack_gqa", group & (group - 1) == 0 and group <= 64)
        rows_per_item = max(slots // group, 1) if pack else slots
        rows = padded or self._limits["max_rows"]
        seqs = min(rows, self._limits["max_seqs"])
        splits = 2 * -(-packinfer.cache_plan.WAVES * self._sms // (self.num_kv_heads if pack else self.num_heads))
        items = 2 * -(-rows // rows_per_item) + 3 * seqs + splits
        return items, 2 * rows + splits * rows_per_item

    def _plan_step(self, view, q_lens, slots: int | None, capacity: tuple[int, int] | None):
        return packinfer.plan_cache_attention(view, q_lens, self.num_heads, num_sms=self._sms,
                                              slots=slots or self._fixed_slots,
                                              max_items=capacity[0] if capacity else None,
                                              max_partials=capacity[1] if capacity else None, **self._planner)

    def graph_key(self, step):
        """(slots of the graph's tile shape, whether its launch stores the K/V: _fusable iterations whose rows
        are their requests' own positions)."""
        key = (step.padded, step.kind)
        if key not in self._tiles:  # the planner's own choice for the first iteration of this size and kind
            view = _view_like(step.batch, self.num_kv_heads, self.head_dim, self.device)
            self._tiles[key] = self._plan_step(view, step.batch.q_lens, None, None).slots
        b = step.batch  # (the cache may not hold the batch yet; a request's stored prefix is at most its prefix_len)
        fresh = self._fusable(b) and bool((b.kv_lens - b.q_lens >= b.prefix_lens).all())
        return self._tiles[key], fresh

    def variant_skip(self, batch) -> str | None:
        """A variant that runs the default's code on `batch`: the same K/V store (fuses the batch as the default
        does), or a planner switch whose plan is the default's, item for item (its time would be the
        default's measured twice)."""
        fused = self._fusable(batch)
        if "fuse_max_q" in self.options and fused == fuses(batch):
            return (f"stores this batch's K/V as the default does, {'in' if fused else 'before'} the attention "
                    f"launch (up to {int(batch.q_lens.max())} rows per request)")
        if self.options and set(self.options) <= PLANNER_OPTIONS:
            view = _view_like(batch, self.num_kv_heads, self.head_dim, self.device)
            mine = self._plan_step(view, batch.q_lens, None, None)
            default = packinfer.plan_cache_attention(view, batch.q_lens, self.num_heads, num_sms=self._sms)
            if same_launch(mine, default):
                return (f"plans this batch as the default does ({mine.slots} slots, KV chunk {mine.kv_chunk}, "
                        f"{mine.num_items} items)")
        return None

    def _fusable(self, batch) -> bool:
        """Whether the attention launch stores this iteration's K/V (fuses, with this variant's fuse_max_q)."""
        return fuses(batch, self._fuse_max_q)

    def _buffers_for(self, slots: int, cache) -> packinfer.PlanBuffers:
        """The plan buffers of the tile shape the planner gives plans of `slots` slots over this cache."""
        group = self.num_heads // self.num_kv_heads
        pack = self._planner.get("pack_gqa", group & (group - 1) == 0 and group <= 64)
        block_n = packinfer.cache_plan.BLOCK_N
        launch = packinfer.cache_plan.launch_config(slots, block_n, self.head_dim, cache.k.element_size(),
                                                    packinfer.device.shared_memory(self.device))
        if launch is None:
            raise NotApplicable(f"{slots} slots at head dim {self.head_dim} do not fit in this GPU's shared memory")
        tile = (slots, block_n, pack, *launch)
        if tile not in self._buffers:
            items, partials = self._capacity(slots)
            share = max(self._buffers.values(), key=lambda b: b.max_partials, default=None)
            self._buffers[tile] = packinfer.PlanBuffers(
                self.device, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                tile=tile, max_items=items, max_rows=self._limits["max_rows"], max_partials=partials,
                layout=self.layout, page_size=self.page_size, max_table_rows=self._limits["max_seqs"],
                max_table_pages=self._limits["max_pages"] if self.layout == "paged" else 1, share=share)
        return self._buffers[tile]

    def begin(self, step):
        super().begin(step)
        view = step.cache.view(self._request_order())
        if step.padded is None:
            self._plan, self._bufs = self._plan_step(view, step.batch.q_lens, None, None), None
            self._set_fresh(self._fusable(step.batch) and step.rows is None and self._plan.writes_new)
            return
        slots, fresh = self.graph_key(step)
        capacity = self._capacity(slots, step.padded)
        plan = self._plan_step(view, step.batch.q_lens, slots, capacity)
        if fresh and not plan.writes_new:
            raise RuntimeError("graph_key said the launch stores the K/V, but the plan has writes_new False")
        self._bufs, self._grid_items = self._buffers_for(slots, step.cache), capacity[0]
        self._bufs.load(plan)
        self._plan = plan
        self._set_fresh(fresh)

    def capture_begin(self, padded, key, cache):
        slots, fresh = key
        self._bufs, self._grid_items = self._buffers_for(slots, cache), self._capacity(slots, padded)[0]
        self._bufs.clear()
        self._plan = None
        self._set_fresh(fresh)

    def _set_fresh(self, fresh: bool) -> None:
        self._fresh = fresh
        self.launches_per_layer = 1 if fresh else 3

    def __call__(self, layer, q, k, v):
        if not self._fresh:  # write the K/V (two launches), then attend
            return super().__call__(layer, q, k, v)
        return self._launch(layer, q, k_new=k, v_new=v)

    def attend(self, layer, q):
        return self._launch(layer, q)

    def _launch(self, layer, q, **new):
        c = self.step.cache
        out = torch.empty_like(q)
        launch_cache(q, c.k_pools[layer], c.v_pools[layer], out, self._plan, self.head_dim ** -0.5,
                     use_tma=self._use_tma, buffers=self._bufs, grid_items=self._grid_items, **new)
        return out


def same_launch(a: packinfer.CachePlan, b: packinfer.CachePlan) -> bool:
    """Whether two plans of one view make the same launch: tile shape, items in order, rows and merge lists."""
    return a.tile == b.tile and all(np.array_equal(getattr(a, f), getattr(b, f))
                                    for f in ("items", "rows", "merge_idx"))


def _view_like(batch, num_kv_heads: int, head_dim: int, device: torch.device | str = "cpu") -> packinfer.KVView:
    """A grouped-layout view with the batch's lengths and prefix groups (addresses made up) on `device`, whose
    shared memory bounds the tile shapes: what the planner's choices depend on, for deciding a graph's tile
    shape before the cache holds the batch."""
    n = len(batch)
    ids, lens = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    cached = batch.kv_lens - batch.q_lens
    for first, others, _ in batch.shared_prefixes():  # stored once, as serving_call's cache and the replay hold it
        members = [first, *others.tolist()]
        length = int(min(min(batch.prefix_lens[m], cached[m]) for m in members))
        if length > 0:
            ids[members], lens[members] = first, length
    empty = torch.empty(0, num_kv_heads, head_dim, dtype=torch.bfloat16, device=device)
    return packinfer.KVView("grouped", empty, empty, list(range(n)), batch.kv_lens.copy(), ids, lens,
                            prefix_addr=np.zeros(n, np.int64), own_addr=np.cumsum(batch.kv_lens) - batch.kv_lens)


#: The serving call's variants (kernel sweep, scheduler batches): the full planner, one switch off each, the tile
#: shape fixed (16 or 128 slots: what the cost model chooses between), TMA loads off (on by default on Hopper),
#: the K/V written by two launches before attention instead of by the attention launch ("unfused"), or by the
#: attention launch on every iteration, long chunks among decode rows too ("fuse-all").
SERVING_VARIANTS = {"full": {}, "no-split": {"split": False}, "no-prefix-grouping": {"prefix_grouping": False},
                    "no-balancing": {"balancing": False}, "no-gqa-packing": {"pack_gqa": False},
                    "paged": {"layout": "paged"}, "tiles-16": {"slots": 16}, "tiles-128": {"slots": 128},
                    "no-tma": {"use_tma": False}, "unfused": {"fuse_max_q": 0},
                    "fuse-all": {"fuse_max_q": 1 << 30}}
#: The options of SERVING_VARIANTS that change only the plan (variant_skip compares such a variant's plan with
#: the default's).
PLANNER_OPTIONS = {"split", "prefix_grouping", "balancing", "pack_gqa", "slots"}
BACKEND = Backend("packinfer", PACKINFER_VARIANTS, _available, prepare, serving=PackinferAttention,
                  serving_variants=SERVING_VARIANTS)
UNPACKED = Backend("triton_unpacked", ("fa2-grid",), _available, prepare)
