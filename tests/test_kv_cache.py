"""The two KV cache layouts: contents survive any sequence of operations, storage never overlaps, freed space is
reused, re-layouts are counted, and a rejected operation changes nothing."""

import numpy as np
import pytest
import torch
from packinfer import GroupedKVCache, KVCacheError, PagedKVCache, make_cache
from packinfer.kv_cache.relayout import BLOCK_T, copy_token_ranges, token_ranges

HKV, D = 2, 8


def _tokens(gen, n, dtype=torch.float16):
    return torch.randn(n, HKV, D, generator=gen).to(dtype), torch.randn(n, HKV, D, generator=gen).to(dtype)


def _assert_consistent(cache, shadow, prefixes):
    """Every live request reads back byte-identical; no two owners share a storage address."""
    for rid, (k, v) in shadow.items():
        got_k, got_v = cache.read(rid)
        assert torch.equal(got_k, k) and torch.equal(got_v, v), f"request {rid} reads back wrong data"
    ext = cache.extents()
    for (s0, e0, o0), (s1, e1, o1) in zip(ext, ext[1:]):
        assert e0 <= s1, f"{o0} [{s0}, {e0}) overlaps {o1} [{s1}, {e1})"
    assert all(0 <= s < e <= cache.capacity_tokens for s, e, _ in ext)
    stats = cache.stats()
    live = sum(p[0].shape[0] for p in prefixes.values())
    live += sum(k.shape[0] - (prefixes[cache._requests[r].prefix_id][0].shape[0] if cache._requests[r].prefix_id
                              is not None else 0) for r, (k, _) in shadow.items())
    assert stats.live_bytes == live * cache.token_bytes
    assert stats.live_bytes <= stats.reserved_bytes <= stats.capacity_bytes


@pytest.mark.parametrize("layout", ["paged", "grouped"])
def test_random_operations_keep_every_request_intact(layout):
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    cache = make_cache(layout, 2048, HKV, D, dtype=torch.float16, block_size=16, headroom=32)
    prefixes = {p: _tokens(gen, n) for p, n in (("sys-a", 37), ("sys-b", 16))}
    for p, (k, v) in prefixes.items():
        cache.add_prefix(p, k, v)
    shadow, next_id, rejected = {}, 0, 0
    for _ in range(400):
        op = rng.choice(["arrive", "append", "append", "append", "finish", "relayout"], p=[.2, .2, .2, .2, .15, .05])
        if op == "arrive" or not shadow:
            pid = rng.choice([None, "sys-a", "sys-b"])
            try:
                cache.allocate(next_id, pid, reserve=int(rng.integers(0, 20)))
            except KVCacheError:
                rejected += 1
                continue
            k0, v0 = prefixes[pid] if pid else (torch.empty(0, HKV, D, dtype=torch.float16),) * 2
            shadow[next_id] = (k0.clone(), v0.clone())
            next_id += 1
        elif op == "append":
            rid = int(rng.choice(list(shadow)))
            k, v = _tokens(gen, int(rng.integers(1, 40)))
            if layout == "grouped" and rng.random() < 0.7:
                try:
                    cache.make_room({rid: k.shape[0]})
                except KVCacheError:
                    pass
            try:
                cache.append(rid, k, v)
            except KVCacheError:
                rejected += 1
            else:
                shadow[rid] = (torch.cat([shadow[rid][0], k]), torch.cat([shadow[rid][1], v]))
        elif op == "finish":
            rid = int(rng.choice(list(shadow)))
            cache.finish(rid)
            del shadow[rid]
        elif layout == "grouped":
            try:
                cache.relayout()
            except KVCacheError:
                rejected += 1
        _assert_consistent(cache, shadow, prefixes)
    assert next_id > 40 and rejected < 200
    if layout == "grouped":
        assert cache.stats().relayouts > 0 and cache.stats().moved_bytes > 0


def test_paged_freed_blocks_are_reused_and_prefix_blocks_shared():
    gen = torch.Generator().manual_seed(0)
    cache = PagedKVCache(num_blocks=6, block_size=4, num_kv_heads=HKV, head_dim=D, dtype=torch.float16)
    cache.add_prefix("p", *_tokens(gen, 8))  # two full blocks, held once
    cache.allocate("a", "p")
    cache.allocate("b", "p")
    assert cache.free_blocks == 4, "prefix blocks are shared, not copied"
    cache.append("a", *_tokens(gen, 12))
    assert cache.free_blocks == 1
    with pytest.raises(KVCacheError, match="needs 2 more block"):
        cache.append("b", *_tokens(gen, 5))
    cache.finish("a")
    assert cache.free_blocks == 4
    cache.append("b", *_tokens(gen, 5))
    assert cache.free_blocks == 2
    view = cache.view(["b"])
    assert view.block_table[0, :2].tolist() == cache._prefixes["p"].blocks


def test_paged_prefix_with_a_partial_last_block_is_copied_on_write():
    gen = torch.Generator().manual_seed(1)
    cache = PagedKVCache(8, 4, HKV, D, dtype=torch.float16)
    pk, pv = _tokens(gen, 6)
    cache.add_prefix("p", pk, pv)
    cache.allocate("a", "p")
    cache.allocate("b", "p")
    ka, va = _tokens(gen, 3)
    cache.append("a", ka, va)
    assert torch.equal(cache.read("b")[0], pk), "b's prefix tail changed when a appended"
    assert torch.equal(cache.read("a")[0], torch.cat([pk, ka]))


def test_grouped_keeps_a_group_contiguous_after_relayout():
    gen = torch.Generator().manual_seed(2)
    cache = GroupedKVCache(512, HKV, D, dtype=torch.float16, headroom=4, relayout_slack=0.0)
    cache.add_prefix("p", *_tokens(gen, 20))
    for rid, pid in [(0, None), (1, "p"), (2, None), (3, "p")]:
        cache.allocate(rid, pid)
        cache.append(rid, *_tokens(gen, 3))
    moved = cache.relayout(reserve={1: 10})
    owners = [o for _, _, o in cache.extents()]
    assert owners[:3] == [("prefix", "p"), ("request", 1), ("request", 3)]
    assert moved == cache.stats().moved_bytes > 0
    s, e, _ = cache.extents()[1]
    assert e - s == 3 + 10, "request 1 got its reserve"
    view = cache.view([1, 3, 0])
    assert view.prefix_addr.tolist() == [0, 0, -1] and view.own_addr[0] == 20


def test_grouped_append_past_room_asks_for_relayout_and_changes_nothing():
    gen = torch.Generator().manual_seed(3)
    cache = GroupedKVCache(64, HKV, D, dtype=torch.float16, headroom=4, placement="first-fit")
    cache.allocate("a")
    cache.allocate("b")
    before = cache.read("a")[0].clone(), cache.extents(), cache.stats()
    with pytest.raises(KVCacheError, match=r"past its room.*make_room"):
        cache.append("a", *_tokens(gen, 5))  # "b" sits right after "a": no growing in place
    assert torch.equal(cache.read("a")[0], before[0]) and cache.extents() == before[1] and cache.stats() == before[2]
    assert cache.make_room({"a": 5}) == 0, "nothing to move: a is empty"
    cache.append("a", *_tokens(gen, 5))
    assert cache.length("a") == 5


def test_spread_placement_lets_decode_growth_happen_in_place_and_still_packs_when_full():
    """The default placement puts each request in the middle of the largest free range: requests that grow a
    token at a time while the cache has room never move (first fit moves every one that outgrows its room), and a
    request larger than any free range still gets in through one re-layout."""
    gen = torch.Generator().manual_seed(4)
    moved = {}
    for placement in ("spread", "first-fit"):
        cache = GroupedKVCache(1024, HKV, D, dtype=torch.float16, headroom=4, placement=placement)
        data = {}
        for rid in range(6):
            cache.allocate(rid, reserve=20)
            data[rid] = _tokens(gen, 20)
            cache.append(rid, *data[rid])
        for _ in range(40):  # 40 decode steps of every request
            cache.make_room({rid: 1 for rid in data})
            for rid in data:
                new = _tokens(gen, 1)
                cache.append(rid, *new)
                data[rid] = tuple(torch.cat([x, y]) for x, y in zip(data[rid], new))
        for rid, (k, v) in data.items():
            assert torch.equal(cache.read(rid)[0], k) and torch.equal(cache.read(rid)[1], v)
        moved[placement] = cache.stats().moved_bytes
    assert moved["spread"] == 0 < moved["first-fit"]
    spread = GroupedKVCache(256, HKV, D, dtype=torch.float16, headroom=4, relayout_slack=0.0)
    for rid in range(3):
        spread.allocate(rid, reserve=30)
        spread.append(rid, *_tokens(gen, 30))
    with pytest.raises(KVCacheError, match="no free range"):  # three extents spread over 256 tokens
        spread.allocate("big", reserve=120)
    spread.relayout()  # what a follower does when allocate finds no free range: pack, then it fits
    spread.allocate("big", reserve=120)
    assert spread.length(0) == 30
    slack = GroupedKVCache(256, HKV, D, dtype=torch.float16, headroom=4)  # re-layout leaves each request room
    for rid, n in ((0, 10), (1, 30)):
        slack.allocate(rid, reserve=n)
        slack.append(rid, *_tokens(gen, n))
    slack.relayout()
    rooms = {o[1]: e - s for s, e, o in slack.extents()}
    free = 256 - 10 - 30 - 2 * 4  # half of it goes to the requests, by their sizes: 13 and 39 more tokens
    assert rooms == {0: 10 + 4 + free // 2 * 10 // 40, 1: 30 + 4 + free // 2 * 30 // 40}
    slack.relayout(keep_free=100)  # an allocation of 100 tokens asked for it: the slack comes only from the rest
    rooms = {o[1]: e - s for s, e, o in slack.extents()}
    assert rooms == {0: 10 + 4 + (free - 100) // 2 * 10 // 40, 1: 30 + 4 + (free - 100) // 2 * 30 // 40}
    slack.allocate("scratch", reserve=50, exact=True)  # an exact reserve never grows: first fit, not the middle
    assert [s for s, _, o in slack.extents() if o[1] == "scratch"] == [max(e for s, e, o in slack.extents()
                                                                           if o[1] != "scratch")]
    with pytest.raises(KVCacheError, match=r"placement must be one of \('spread', 'first-fit'\)"):
        GroupedKVCache(64, HKV, D, placement="best")


def test_grouped_make_room_moves_only_the_growing_request_and_compacts_when_nothing_fits():
    gen = torch.Generator().manual_seed(5)
    cache = GroupedKVCache(100, HKV, D, dtype=torch.float16, headroom=4, placement="first-fit")
    data = {}
    for rid in "abc":
        cache.allocate(rid, reserve=10)
        data[rid] = _tokens(gen, 10)
        cache.append(rid, *data[rid])  # a, b, c packed at 0, 10, 20: none can grow in place but c
    b_at = [e for e in cache.extents() if e[2] == ("request", "b")]
    moved = cache.make_room({"a": 6})
    assert moved == 10 * cache.token_bytes and cache.stats().relocations == 1 and cache.stats().relayouts == 0
    assert [e for e in cache.extents() if e[2] == ("request", "b")] == b_at, "b did not move"
    more = _tokens(gen, 6)
    cache.append("a", *more)
    data["a"] = tuple(torch.cat([x, y]) for x, y in zip(data["a"], more))
    for rid, (k, v) in data.items():
        assert torch.equal(cache.read(rid)[0], k) and torch.equal(cache.read(rid)[1], v)
    cache.make_room({"b": 40})  # 50 tokens with room: no free range holds them, so everything is packed again
    assert cache.stats().relayouts == 1
    for rid, (k, v) in data.items():
        assert torch.equal(cache.read(rid)[0], k) and torch.equal(cache.read(rid)[1], v)


@pytest.mark.parametrize("layout", ["paged", "grouped"])
def test_bad_operations_name_the_problem_and_leave_the_cache_unchanged(layout):
    gen = torch.Generator().manual_seed(4)
    cache = make_cache(layout, 64, HKV, D, dtype=torch.float16, block_size=8, headroom=8)
    cache.add_prefix("p", *_tokens(gen, 8))
    cache.allocate("a", "p")
    snapshot = cache.extents(), cache.stats(), cache.length("a")
    k, v = _tokens(gen, 2)
    cases = [
        (lambda: cache.append("zz", k, v), "unknown request 'zz'"),
        (lambda: cache.allocate("a"), "already allocated"),
        (lambda: cache.allocate("c", "nope"), "unknown prefix 'nope'"),
        (lambda: cache.append("a", k.float(), v.float()), "dtype torch.float32"),
        (lambda: cache.append("a", k[:, :1], v[:, :1]), r"must be \[tokens, 2, 8\]"),
        (lambda: cache.append("a", k, v[:1]), "k has 2 tokens but v has 1"),
        (lambda: cache.release_prefix("p"), "still used by 1 request"),
        (lambda: cache.add_prefix("p", k, v), "already stored"),
        (lambda: cache.append("a", *_tokens(gen, 200)), "block|room"),
        (lambda: cache.view([]), "at least one request"),
        (lambda: make_cache("ring", 64, HKV, D), r"layout must be one of \['paged', 'grouped'\]"),
    ]
    for call, message in cases:
        with pytest.raises(KVCacheError, match=message):
            call()
        assert (cache.extents(), cache.stats(), cache.length("a")) == snapshot
    cache.finish("a")
    cache.release_prefix("p")
    assert cache.stats().reserved_bytes == 0


@pytest.mark.parametrize("layout", ["paged", "grouped"])
def test_a_model_cache_keeps_every_layer_at_the_same_addresses_through_moves(layout):
    """A cache of several layers: a forward pass extends a request once and writes each layer's K/V in turn;
    every layer reads back its own data, also after a copy-on-write prefix, growth, relocation and re-layout."""
    gen = torch.Generator().manual_seed(3)
    layers = 3
    cache = make_cache(layout, 256, HKV, D, dtype=torch.float16, block_size=8, headroom=4, num_layers=layers,
                       placement="first-fit")  # packed tight: every growth moves
    assert cache.k_pools.shape == (layers, cache.capacity_tokens, HKV, D)
    assert cache.token_bytes == layers * 2 * HKV * D * 2
    pk, pv = (torch.randn(layers, 13, HKV, D, generator=gen).half() for _ in range(2))
    cache.add_prefix("sys", pk, pv)
    want = {"a": [pk.clone(), pv.clone()], "b": [pk[:, :0].clone(), pv[:, :0].clone()]}
    cache.allocate("a", "sys", reserve=4)
    cache.allocate("b", reserve=4)
    for step in range(6):
        for rid in ("a", "b"):
            n = 5 + step
            if layout == "grouped":
                cache.make_room({rid: n})
            addr = cache.extend(rid, n)
            assert len(addr) == n
            k, v = (torch.randn(layers, n, HKV, D, generator=gen).half() for _ in range(2))
            for layer in range(layers):  # as a forward pass does: one layer at a time
                cache.write(addr, k[layer], v[layer], layer=layer)
            want[rid] = [torch.cat([want[rid][0], k], 1), torch.cat([want[rid][1], v], 1)]
    if layout == "grouped":
        cache.relayout()
        assert cache.relocations + cache.relayouts > 1
    for rid, (k, v) in want.items():
        assert cache.length(rid) == k.shape[1]
        for layer in range(layers):
            got_k, got_v = cache.read(rid, layer)
            assert torch.equal(got_k, k[layer]) and torch.equal(got_v, v[layer]), (rid, layer)
        view = cache.view([rid], layer=2)
        assert view.k.data_ptr() == cache.k_pools[2].data_ptr()
    with pytest.raises(KVCacheError, match=r"must be \[3, tokens, 2, 8\]"):
        cache.append("a", k[0], v[0])  # one layer's tokens where every layer's are due
    with pytest.raises(KVCacheError, match="layer 3 out of range"):
        cache.view(["a"], layer=3)


def test_grouped_make_room_copies_all_relocations_at_once_without_reusing_a_vacated_range():
    """Two requests outgrow their room in one call: the first moves to the free tail; its old range stays held
    until the single copy is issued, so the second cannot land on data not yet moved (here it then needs a
    re-layout), and every request reads back intact."""
    gen = torch.Generator().manual_seed(5)
    cache = GroupedKVCache(70, HKV, D, dtype=torch.float16, headroom=4, placement="first-fit")
    data = {}
    for rid, n, reserve in (("a", 20, 20), ("b", 8, 8), ("c", 6, 12)):
        cache.allocate(rid, reserve=reserve)
        data[rid] = _tokens(gen, n)
        cache.append(rid, *data[rid])
    assert [(s, e) for s, e, _ in cache.extents()] == [(0, 20), (20, 28), (28, 40)]
    cache.make_room({"a": 2, "b": 2})
    assert cache.relocations == 1 and cache.relayouts == 1  # a moved; b found no free range but a's old one
    for rid, (k, v) in data.items():
        got_k, got_v = cache.read(rid)
        assert torch.equal(got_k, k) and torch.equal(got_v, v), rid
    cache.make_room({"c": 3})  # and a plain relocation still works afterwards
    for rid, (k, _) in data.items():
        assert torch.equal(cache.read(rid)[0], k)


@pytest.mark.parametrize("layout", ["paged", "grouped"])
def test_reset_empties_the_cache_and_keeps_its_pools(layout):
    """A serving engine replays many schedules over one cache whose pools CUDA graphs point into."""
    cache = make_cache(layout, 256, 2, 16, dtype=torch.float16, block_size=8, headroom=4, num_layers=2)
    pools = cache.k_pools.data_ptr(), cache.v_pools.data_ptr()
    cache.add_prefix("p", length=10)
    cache.allocate(0, "p", reserve=20)
    cache.extend(0, 12)
    cache.allocate(1, reserve=30)
    cache.extend(1, 30)
    cache.reset()
    assert cache.request_ids == [] and not cache.has_prefix("p") and cache.stats().reserved_bytes == 0
    assert (cache.k_pools.data_ptr(), cache.v_pools.data_ptr()) == pools
    cache.allocate(0, reserve=200)  # all the room is there again
    assert len(cache.extend(0, 200)) == 200


@pytest.mark.parametrize("layout", ["paged", "grouped"])
def test_a_cache_over_given_pools_uses_that_memory_and_bad_pools_are_named(layout):
    """Caches used one at a time (a benchmark's backends, replayed in turn) can share one allocation."""
    first = make_cache("grouped", 256, 2, 16, dtype=torch.float16, num_layers=2)
    cache = make_cache(layout, 256, 2, 16, dtype=torch.float16, block_size=8, num_layers=2,
                       pools=(first.k_pools, first.v_pools))
    assert cache.k_pools.data_ptr() == first.k_pools.data_ptr() and cache.v_pools.data_ptr() == first.v_pools.data_ptr()
    cache.allocate(0, reserve=16)
    addr = cache.extend(0, 5)
    k = torch.randn(5, 2, 16, dtype=torch.float16)
    cache.write(addr, k, -k, layer=0)
    assert torch.equal(first.k_pools[0][torch.as_tensor(addr)], k)  # the same memory
    k16 = first.k_pools
    with pytest.raises(KVCacheError, match=r"pools: k_pools must be a contiguous torch.float16 tensor of shape "
                                           r"\(2, 128, 2, 16\)"):
        make_cache(layout, 128, 2, 16, dtype=torch.float16, block_size=8, num_layers=2, pools=(k16, first.v_pools))
    with pytest.raises(KVCacheError, match="k_pools and v_pools must be different tensors"):
        make_cache(layout, 256, 2, 16, dtype=torch.float16, block_size=8, num_layers=2, pools=(k16, k16))
    with pytest.raises(KVCacheError, match=r"torch.float32 tensor .* got \(2, 256, 2, 16\) torch.float16"):
        make_cache(layout, 256, 2, 16, dtype=torch.float32, block_size=8, num_layers=2, pools=(k16, first.v_pools))
    if layout == "paged":
        with pytest.raises(KVCacheError, match=r"capacity_tokens \(250\) to be a multiple of block_size \(8\)"):
            make_cache(layout, 250, 2, 16, dtype=torch.float16, block_size=8, num_layers=2, pools=(k16, first.v_pools))


@pytest.mark.parametrize("path", ["kernel", "host"])
def test_copy_token_ranges_moves_exactly_the_ranges_and_names_bad_ranges(path, device, monkeypatch):
    """The re-layout copy on ranges of length 0, 1 and the token block +-1, to a buffer poisoned first: the Triton
    kernel on the test device, and the torch copy a CPU pool takes outside the interpreter."""
    if path == "host":
        device = torch.device("cpu")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(7)
    src = torch.randn(400, 24, generator=gen).to(device)
    dst = torch.full((400, 24), float("nan"), device=device)
    starts, lengths, to = [0, 5, 40, 100, 300], [1, 0, BLOCK_T - 1, BLOCK_T + 1, 2 * BLOCK_T], [399, 7, 10, 200, 120]
    copy_token_ranges(src, dst, token_ranges(starts, to, lengths, device))
    expect = torch.full_like(dst, float("nan"))
    for s, n, d in zip(starts, lengths, to):
        expect[d:d + n] = src[s:s + n]
    assert torch.equal(dst.isnan(), expect.isnan()) and torch.equal(dst.nan_to_num(), expect.nan_to_num())
    with pytest.raises(ValueError, match="1-D of one length"):
        token_ranges([0, 1], [2], [1, 1], "cpu")
    with pytest.raises(ValueError, match=">= 0"):
        token_ranges([0], [-3], [1], "cpu")
    with pytest.raises(ValueError, match="same width"):
        copy_token_ranges(src, torch.empty(400, 8), token_ranges([0], [0], [1], "cpu"))
