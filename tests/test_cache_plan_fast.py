"""The cache planner weighs its candidates (rows per item x KV chunk) from per-piece closed forms instead of
building each one's items; on random batches the closed forms must give exactly what the items give."""

import numpy as np
import torch
from packinfer import KVView
from packinfer.cache_plan import (
    _batch_segments,
    _build_items,
    _closed_form_work,
    _item_keys,
    _pieces,
    _split_from,
    _split_rows,
)


def _random_view(rng: np.random.Generator, layout: str) -> tuple[KVView, np.ndarray]:
    """Decode rows, prompt chunks, fresh prompts and rows past kv_len, some sharing prefixes (grouped layout:
    also unshared prefixes kept apart)."""
    n = int(rng.integers(1, 30))
    kv = rng.integers(1, 1500, n)
    kind = rng.integers(0, 4, n)
    q = np.select([kind == 0, kind == 1, kind == 2], [1, rng.integers(1, kv + 1), np.minimum(kv, 300)],
                  kv + rng.integers(1, 20, n))
    prefix_ids = np.where(rng.random(n) < 0.6, rng.integers(0, 4, n), -1)
    prefix_lens = np.where(prefix_ids >= 0, np.minimum(rng.choice([1, 16, 100, 900], n), kv), 0)
    empty = torch.empty(0, 2, 64)
    if layout == "grouped":
        view = KVView("grouped", empty, empty, list(range(n)), kv, prefix_ids, prefix_lens,
                      prefix_addr=rng.integers(0, 10**6, n), own_addr=rng.integers(0, 10**6, n))
    else:
        view = KVView("paged", empty, empty, list(range(n)), kv, prefix_ids, prefix_lens,
                      block_table=np.zeros((n, 1), np.int64), page_size=16)
    return view, q.astype(np.int64)


def test_closed_form_work_equals_the_items_work():
    rng = np.random.default_rng(0)
    rows_per_item = [1, 4, 16, 64]
    for trial in range(80):
        view, q = _random_view(rng, "grouped" if trial % 2 else "paged")
        right = int(rng.choice([0, 0, -1, 5]))  # causal; not causal, unbounded or with a right window side
        segs = _batch_segments(view, q, prefix_grouping=bool(rng.random() < 0.8), left=-1, right=right)[4]
        longest = int(segs.table[:, 4].max())
        for kv_chunk in {-(-longest // 16) * 16, 64, 16 * int(rng.integers(5, 100))}:
            pieces = _pieces(segs.table, kv_chunk, 16, windowed=False, longest=longest)
            split_from = _split_from(segs, pieces)
            for r, work in zip(rows_per_item, _closed_form_work(pieces, rows_per_item, split_from)):
                items, keys = _build_items(pieces, r, windowed=False)
                expect = (len(items), int(keys.sum()), int(keys.max()), _split_rows(items, int(q.sum()))[1])
                assert tuple(work) == expect, (trial, kv_chunk, r)
                assert np.array_equal(_item_keys(pieces, r, windowed=False), keys), "the estimate weighs these keys"


def test_stopping_the_chunk_ladder_early_picks_what_weighing_every_chunk_picks(monkeypatch):
    """The planner stops weighing finer KV chunks of a tile once one is estimated 25% past that tile's best (the
    estimate falls, then rises): on random batches it picks the plan weighing every chunk would."""
    from packinfer import cache_plan, plan_cache_attention

    rng = np.random.default_rng(1)
    for trial in range(150):
        view, q = _random_view(rng, "grouped" if trial % 2 else "paged")
        q = np.clip(q, 1, view.kv_lens)
        picked = plan_cache_attention(view, q, 4, num_sms=132)
        monkeypatch.setattr(cache_plan, "STOP_ABOVE_BEST", float("inf"))
        every = plan_cache_attention(view, q, 4, num_sms=132)
        monkeypatch.undo()
        assert (picked.slots, picked.kv_chunk) == (every.slots, every.kv_chunk), trial
