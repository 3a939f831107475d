"""packinfer.cache_attention (decode and append over a KV cache) against a float32 reference: both layouts,
shared and unshared prefixes, split and unsplit KV, GQA ratios, both dtypes. Outputs are poisoned first (every
element must be written). Triton interpreter on the CPU; PACKINFER_TEST_GPU=1 runs them on a GPU."""

import numpy as np
import pytest
import torch
from packinfer import (
    KVView,
    PlanBuffers,
    cache_attention,
    make_cache,
    plan_cache_attention,
    reference_varlen_attention,
)

BN = 16  # key block of the tests' plans: lengths straddle it
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _fill(layout, kv_lens, prefix_of, prefix_lens, *, kv_heads, dim, dtype, device, seed=0):
    """A cache holding each request's kv_lens[i] tokens, starting with its shared prefix where it has one."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return (torch.randn(n, kv_heads, dim, generator=gen).to(device, dtype),
                torch.randn(n, kv_heads, dim, generator=gen).to(device, dtype))

    cache = make_cache(layout, 4 * sum(kv_lens) + 256, kv_heads, dim, dtype=dtype, device=device, block_size=BN,
                       headroom=4)
    cache.k.fill_(float("nan"))  # unwritten pool space: no kernel may let it into a result
    cache.v.fill_(float("nan"))
    for pid, n in prefix_lens.items():
        cache.add_prefix(pid, *tokens(n))
    for rid, (n, pid) in enumerate(zip(kv_lens, prefix_of)):
        cache.allocate(rid, pid)
        own = n - (prefix_lens[pid] if pid is not None else 0)
        if layout == "grouped":
            cache.make_room({rid: own})
        cache.append(rid, *tokens(own))
    return cache


def _check(layout, kv_lens, q_lens, prefix_of=None, prefix_lens=None, *, heads=4, kv_heads=2, dim=64,
           dtype=torch.float16, device="cpu", use_tma=None, fresh=False, window=(-1, -1), **plan_kw):
    """The launch against the reference over the cache's tokens. fresh: the rows' own K/V are given to the
    launch (k_new / v_new) and their cache positions hold NaN until it stores them there; fresh="strided": as
    slices of a wider tensor (heads apart by twice the head dim, as TMA cannot read them)."""
    prefix_of = prefix_of or [None] * len(kv_lens)
    cache = _fill(layout, kv_lens, prefix_of, prefix_lens or {}, kv_heads=kv_heads, dim=dim, dtype=dtype,
                  device=device)
    view = cache.view(range(len(kv_lens)))
    plan = plan_cache_attention(view, q_lens, heads, block_n=BN, window=window, **plan_kw)
    q = torch.randn(sum(q_lens), heads, dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out = torch.full_like(q, float("nan"))
    k, v = (torch.cat(t) for t in zip(*(cache.read(r) for r in range(len(kv_lens)))))
    new = {}
    if fresh:
        rows = np.concatenate([np.arange(c - n, c) for n, c in zip(q_lens, np.cumsum(kv_lens))])
        new = {"k_new": k[rows].clone(), "v_new": v[rows].clone()}
        if fresh == "strided":
            new = {name: torch.cat([t, torch.full_like(t, float("nan"))], 2)[..., :dim] for name, t in new.items()}
        slots = np.concatenate([cache.addresses(r)[-n:] for r, n in enumerate(q_lens)])
        cache.k[torch.from_numpy(slots).to(device)] = float("nan")
        cache.v[torch.from_numpy(slots).to(device)] = float("nan")
    cache_attention(q, view, plan, out=out, use_tma=use_tma, **new)
    if fresh:
        k2, v2 = (torch.cat(t) for t in zip(*(cache.read(r) for r in range(len(kv_lens)))))
        assert torch.equal(k2, k) and torch.equal(v2, v), "the launch stored every new row's K/V at its position"
    cu = [torch.tensor(np.concatenate([[0], np.cumsum(x)]), dtype=torch.int32) for x in (q_lens, kv_lens)]
    ref = reference_varlen_attention(q, k, v, *cu, causal=True, window=window)
    assert not out.isnan().any(), "some output elements were never written"
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]}"
    return plan


EDGE_KV = [1, BN - 1, BN, BN + 1, 3 * BN + 1, 100, 2]
EDGE_Q = [1, 1, 3, 1, 17, 1, 2]  # decode rows and appends (q_len > 1), one longer than a block


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["paged", "grouped"])
def test_decode_and_append_at_block_edges(layout, dtype, device):
    _check(layout, EDGE_KV, EDGE_Q, dtype=dtype, device=device, kv_chunk=2 * BN)


@pytest.mark.parametrize("layout", ["paged", "grouped"])
def test_rows_of_a_segment_span_several_programs(layout, device):
    """16 slots = 8 rows of 2 GQA heads per program: a 12-member prefix group and a 17-row append each need
    several row blocks, for every KV chunk."""
    kv = [40 + i for i in range(12)] + [50, 7]
    q = [1] * 11 + [3] + [17, 1]
    _check(layout, kv, q, [0] * 12 + [None, None], {0: 33}, device=device, slots=16, kv_chunk=BN)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("prefix_grouping", [True, False])
@pytest.mark.parametrize("layout", ["paged", "grouped"])
def test_shared_and_unshared_prefixes(layout, prefix_grouping, split, device):
    # prefix "a" (not a block multiple) shared by three, "b" by two, one request alone, and one request whose
    # append reaches into its prefix (it cannot join the group's shared read)
    kv = [30, 31, 50, 45, 60, 20, 24]
    q = [1, 1, 2, 1, 3, 1, 6]
    plan = _check(layout, kv, q, [0, 0, 0, "b", "b", None, 0], {0: 21, "b": BN}, device=device,
                  prefix_grouping=prefix_grouping, split=split, kv_chunk=BN if split else None)
    shared_reads = (2 * 21 + BN) if prefix_grouping else 0
    assert plan.kv_tokens_read == sum(kv) - shared_reads, "each group's prefix is read once"


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("pack_gqa", [True, False])
def test_gqa_ratios(group, pack_gqa, device):
    _check("grouped", [5, 40, 17], [1, 4, 1], [None, 0, 0], {0: 9}, heads=2 * group, kv_heads=2, device=device,
           pack_gqa=pack_gqa, kv_chunk=BN)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout, use_tma", [("paged", False), ("grouped", False), ("grouped", True)])
def test_the_launch_stores_the_new_rows_and_reads_them_from_k_new(layout, use_tma, dtype, device):
    """k_new / v_new: decode rows, appends and fresh prompts at block edges, split and not, a shared prefix read
    by a group; the cache holds NaN at the new positions, so a read of one before its store would show."""
    kv = EDGE_KV + [40, 41, 3 * BN]
    q = EDGE_Q + [1, 2, 3 * BN]
    _check(layout, kv, q, [None] * 7 + [0, 0, None], {0: 2 * BN + 3}, heads=8, kv_heads=2, dtype=dtype,
           device=device, use_tma=use_tma, fresh=True, kv_chunk=2 * BN)
    _check(layout, kv, q, [None] * 7 + [0, 0, None], {0: 2 * BN + 3}, heads=8, kv_heads=2, dtype=dtype,
           device=device, use_tma=use_tma, fresh=True, slots=16, pack_gqa=False)


@pytest.mark.parametrize("use_tma, fresh", [(False, True), (True, True), (True, "strided")])
def test_long_runs_of_new_rows_are_read_from_k_new_whole_blocks_included(use_tma, fresh, device):
    """Chunks and prompts of several blocks: the key blocks every row of an item sees whole and that hold new
    keys only are read from k_new / v_new alone (TMA where they allow it); the block straddling the cached and
    the new keys mixes the two; the cache holds NaN at every new position until the launch stores it."""
    kv = [5 * BN + 7, 4 * BN, 3 * BN + 1, 2 * BN + 2]
    q = [3 * BN + 2, 4 * BN, 2 * BN, BN + 1]  # an unaligned chunk, a fresh prompt, aligned and unaligned chunks
    _check("grouped", kv, q, heads=8, kv_heads=2, dtype=torch.bfloat16, device=device, use_tma=use_tma, fresh=fresh,
           slots=16, pack_gqa=False)
    _check("grouped", kv, q, heads=8, kv_heads=2, dtype=torch.float16, device=device, use_tma=use_tma, fresh=fresh,
           kv_chunk=2 * BN)


@pytest.mark.parametrize("use_tma", [False, True])
def test_new_rows_stored_in_a_windowed_launch(use_tma, device):
    """A sliding window starts a program's key blocks at the first key its slots see, not at a multiple of the
    block: the cached, straddling and new-only blocks are counted from there (8 rows per item, window 37)."""
    _check("grouped", [163, 5 * BN + 7, 2 * BN], [101, 3 * BN + 2, 2 * BN], heads=4, kv_heads=2,
           dtype=torch.bfloat16, device=device, use_tma=use_tma, fresh=True, window=(37, 0), slots=16)


@pytest.mark.parametrize("seed", range(4))
def test_new_rows_stored_in_the_launch_any_iteration_mix(seed, device):
    rng = np.random.default_rng(200 + seed)
    kv, q, prefix_of, prefixes = _iteration(rng, int(rng.integers(3, 9)))
    group = [1, 4, 8][seed % 3]
    _check(["paged", "grouped"][seed % 2], kv, q, prefix_of, prefixes, heads=2 * group, kv_heads=2,
           dtype=[torch.float16, torch.bfloat16][seed // 2], device=device, fresh=True,
           kv_chunk=BN * int(rng.integers(1, 4)) if seed % 3 else None, slots=[None, 16, 32][seed % 3])


def test_new_rows_cannot_be_stored_in_the_launch_when_a_row_is_a_prefix_position():
    """A request whose rows reach into its shared prefix would write positions other requests read."""
    cache = _fill("grouped", [30, 31, 24], [0, 0, 0], {0: 21}, kv_heads=2, dim=64, dtype=torch.float16,
                  device="cpu")
    view = cache.view(range(3))
    plan = plan_cache_attention(view, [1, 1, 6], 4)
    assert not plan.writes_new
    q = torch.randn(8, 4, 64, dtype=torch.float16)
    k = torch.randn(8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="writes_new is False"):
        cache_attention(q, view, plan, k_new=k, v_new=k)
    with pytest.raises(ValueError, match=r"k_new must be \[rows of q, KV heads, head_dim\] = \[8, 2, 64\]"):
        cache_attention(q, view, plan, k_new=k[:7], v_new=k[:7])
    with pytest.raises(ValueError, match="give both k_new and v_new"):
        cache_attention(q, view, plan, k_new=k)


def test_tensor_descriptor_loads_on_the_grouped_layout(device):
    """Hopper's path: K/V tiles through TMA descriptors; keys past an item are neighbours' data, masked."""
    _check("grouped", EDGE_KV, EDGE_Q, [None] * 5 + [0, 0], {0: 1}, heads=8, kv_heads=2, dtype=torch.bfloat16,
           device=device, use_tma=True, kv_chunk=2 * BN)


def test_plan_splits_long_contexts_and_every_row_gets_a_partial():
    """A straggler (20k positions beside three of 10) is cut so that no program reads it alone; the cost model
    keeps a short batch whole (a split costs a partial per chunk)."""
    cache = _fill("grouped", [20000, 10, 10, 10], [None] * 4, {}, kv_heads=2, dim=64, dtype=torch.float16,
                  device="cpu")
    view = cache.view(range(4))
    plan = plan_cache_attention(view, [1, 1, 1, 1], 4, num_sms=132)
    lens = plan.items[:, 4]
    assert lens.max() <= plan.kv_chunk < 20000, "the long context is split"
    assert plan.items[0, 4] == lens.max(), "largest items launch first"
    row_of_long = np.flatnonzero(plan.rows[:, 0] == 0)[0]
    parts = plan.rows[row_of_long, 3]
    assert parts == (plan.items[:, 0] == row_of_long).sum() > 1, "the long request's row has a partial per chunk"
    assert (plan.rows[plan.rows[:, 0] != 0, 3] == 1).all(), "the short ones are written directly"
    assert sorted(plan.merge_idx.tolist()) == list(range(plan.num_partials)) and plan.num_partials == parts
    unsplit = plan_cache_attention(view, [1, 1, 1, 1], 4, split=False)
    assert unsplit.num_items == 4 and unsplit.num_partials == 0 and (unsplit.rows[:, 3] == 1).all()
    short = plan_cache_attention(cache.view([1, 2, 3]), [1, 1, 1], 4, num_sms=132)
    assert short.num_items == 3 and short.num_partials == 0, "nothing worth splitting"


def _plan_only_view(kv_lens) -> KVView:
    """A grouped view of requests with these lengths, 8 KV heads of 128 dims in bf16 and no storage: enough to
    plan (the planner reads lengths and addresses only)."""
    empty = torch.empty(0, 8, 128, dtype=torch.bfloat16)
    kv = np.array(list(kv_lens))
    return KVView("grouped", empty, empty, list(range(len(kv))), kv, np.full(len(kv), -1), np.zeros(len(kv), np.int64),
                  prefix_addr=np.zeros(len(kv), np.int64), own_addr=np.cumsum(kv) - kv)


def test_a_single_wave_of_near_equal_chunks_keeps_the_plans_order():
    """Six long decodes cut into near-equal chunks, all programs running at once (a Mooncake batch at 2 req/s):
    largest first would only scatter each request's chunks, so the plan keeps its order; uneven decodes in one wave
    still launch largest first."""
    def plans(kv_lens):
        view = _plan_only_view(kv_lens)
        return [plan_cache_attention(view, np.ones(len(kv_lens), np.int64), 32, num_sms=132, balancing=b)
                for b in (True, False)]

    even, plan_order = plans([7238, 7741, 7654, 23450, 27193, 10760])
    assert even.num_items * 8 <= 2 * 132 and np.array_equal(even.items, plan_order.items)
    uneven, plan_order = plans([2511, 600, 500, 400, 389])
    keys = uneven.items[:, 4]
    assert not np.array_equal(uneven.items, plan_order.items) and (np.diff(keys) <= 0).all(), "largest first"


def test_a_prompt_that_fits_one_wave_of_the_narrowest_tile_takes_it():
    """A lone 74-token prompt (ShareGPT's first iteration): 16 query slots run all its programs at once and ran
    faster than the 32 the estimate prefers on both tuning sweeps; a 374-token prompt keeps its wide tile."""
    def slots(n):
        plan = plan_cache_attention(_plan_only_view([n]), np.array([n]), 32, num_sms=132)
        return plan.slots, plan.num_items

    assert slots(74) == (16, 19)
    assert slots(374)[0] == 128


def test_small_decode_batches_split_to_about_one_program_per_sm():
    """Five decode rows over 4.4k positions (a ShareGPT batch at 8 req/s): the cost model fit on the H200's serving
    batches cuts them into chunks of 256-1024 positions - 10-30 items of 8 KV heads, about one program per SM, as
    the fastest measured plans were - not the 4 programs per SM a finer split makes; every chunk is a power of
    two of the key step or a whole segment."""
    plan = plan_cache_attention(_plan_only_view([2511, 600, 500, 400, 389]), np.ones(5, np.int64), 32, num_sms=132)
    assert 256 <= plan.kv_chunk <= 1024 and 8 <= plan.num_items <= 30, (plan.kv_chunk, plan.num_items)
    for q_lens, kv_lens in (([1] * 40, range(100, 4100, 100)), ([300, 1, 1], [300, 5000, 9000])):
        view = _plan_only_view(kv_lens)
        chunk = plan_cache_attention(view, np.array(q_lens), 32, num_sms=132).kv_chunk
        whole = -(-int(view.kv_lens.max()) // 64) * 64
        assert chunk == whole or (chunk % 64 == 0 and (chunk // 64) & (chunk // 64 - 1) == 0), chunk


def test_bad_arguments_are_named():
    cache = _fill("paged", [10, 20], [None, None], {}, kv_heads=2, dim=64, dtype=torch.float16, device="cpu")
    view = cache.view([0, 1])
    plan = plan_cache_attention(view, [1, 2], 4)
    q = torch.randn(3, 4, 64).half()
    cases = [
        (lambda: plan_cache_attention(view, [1], 4), "q_lens has 1 entries but the view has 2"),
        (lambda: plan_cache_attention(view, [1, 0], 4), "request 1 has q_len 0"),
        (lambda: plan_cache_attention(view, [1, 1], 4, window=(-2, 0)), "window must be"),
        (lambda: plan_cache_attention(view, [1, 1], 3), "multiple of the cache's 2 KV heads"),
        (lambda: plan_cache_attention(view, [1, 1], 4, kv_chunk=100), "kv_chunk must be a positive multiple"),
        (lambda: plan_cache_attention(view, [1, 1], 6, pack_gqa=True), "power-of-two GQA group"),
        (lambda: cache_attention(q[:2], view, plan), "plan expects 3 rows of 4 heads"),
        (lambda: cache_attention(q.float(), view, plan), "torch.float32"),
        (lambda: cache_attention(q, cache.view([1, 0]), plan), "another view"),
        (lambda: cache_attention(q, view, plan, out=q[:, :2]), "out must match q"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout, use_tma", [("paged", False), ("grouped", False), ("grouped", True)])
def test_one_requests_nan_or_inf_never_reaches_another_request(layout, use_tma, poison, device):
    """Request 2's K/V hold NaN/inf (its split chunks sit next to other requests' in the pool; TMA blocks of a
    neighbour's item run over into it): every other request keeps each bit of its clean output."""
    kv, q_lens = [30, 31, 50, 45, 20], [1, 1, 2, 3, 1]
    cache = _fill(layout, kv, [0, 0, None, None, None], {0: 21}, kv_heads=2, dim=64, dtype=torch.float16,
                  device=device)
    view = cache.view(range(len(kv)))
    plan = plan_cache_attention(view, q_lens, 4, block_n=BN, kv_chunk=BN)
    q = torch.randn(sum(q_lens), 4, 64, generator=torch.Generator().manual_seed(3)).to(device, torch.float16)
    clean = cache_attention(q, view, plan, use_tma=use_tma)
    addr = torch.from_numpy(cache.addresses(2)).to(device)
    cache.k[addr[::3], 1] = poison
    cache.v[addr[1::2], 0, ::5] = poison
    out = cache_attention(q, view, plan, use_tma=use_tma)
    others = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    others[2:4] = False  # request 2's two query rows
    assert out[others].isfinite().all(), "another request's NaN/inf reached these rows"
    assert torch.equal(out[others], clean[others]), "the other requests' outputs changed"


# --- any serving iteration in one launch: fresh prompts, chunks, decode rows, shared prefixes ----------------------

def _iteration(rng, n):
    """A random serving iteration: fresh prompts (q = kv, lengths around the key block), prompt chunks over cached
    tokens (q < kv), decode rows; requests 0-2 share a prefix when they are long enough."""
    edge = [1, BN - 1, BN, BN + 1, 2 * BN + 1, 3]
    kv, q = [], []
    for _ in range(n):
        kind = rng.integers(3)
        if kind == 0:  # fresh prompt
            length = int(rng.choice(edge)) if rng.random() < 0.5 else int(rng.integers(1, 4 * BN))
            kv.append(length), q.append(length)
        elif kind == 1:  # chunk of a prompt, or an append
            length = int(rng.integers(BN, 5 * BN))
            kv.append(length), q.append(int(rng.integers(2, length)))
        else:
            kv.append(int(rng.integers(1, 6 * BN))), q.append(1)
    prefix_of = [0 if i < 3 and kv[i] - q[i] >= 20 else None for i in range(n)]
    return kv, q, prefix_of, ({0: 20} if any(p == 0 for p in prefix_of) else {})


@pytest.mark.parametrize("seed", range(6))
def test_any_iteration_mix_in_one_launch(seed, device):
    rng = np.random.default_rng(100 + seed)
    kv, q, prefix_of, prefixes = _iteration(rng, int(rng.integers(3, 9)))
    layout = ["paged", "grouped"][seed % 2]
    dtype = [torch.float16, torch.bfloat16][(seed // 2) % 2]
    group = [1, 4, 8][seed % 3]
    _check(layout, kv, q, prefix_of, prefixes, heads=2 * group, kv_heads=2, dtype=dtype, device=device,
           kv_chunk=BN * int(rng.integers(1, 4)) if seed % 3 else None, slots=[None, 16, 32][seed % 3])


def _covered_positions(plan, view):
    """Per plan row, the request positions its items read (up to its causal limit), with repeats."""
    segs = {}
    for it in plan.items:
        row_first, num_rows, _, pos_start, kv_len = (int(x) for x in it[:5])
        for r in range(row_first, row_first + num_rows):
            limit = int(plan.rows[r, 1])
            segs.setdefault(r, []).extend(p for p in range(pos_start, pos_start + kv_len) if p <= limit)
    return segs


@pytest.mark.parametrize("layout", ["paged", "grouped"])
def test_plan_covers_every_key_a_row_needs_exactly_once(layout):
    """Whatever the split, tile shape or prefix grouping: each query row appears in the plan once, and the items
    holding it read each position it sees (0..its causal limit) exactly once."""
    for seed in range(25):
        rng = np.random.default_rng(seed)
        kv, q, prefix_of, prefixes = _iteration(rng, int(rng.integers(1, 12)))
        cache = _fill(layout, kv, prefix_of, prefixes, kv_heads=2, dim=16, dtype=torch.float16, device="cpu")
        view = cache.view(range(len(kv)))
        for kw in ({}, {"kv_chunk": BN}, {"split": False}, {"slots": 16}, {"prefix_grouping": False},
                   {"num_sms": 1}, {"num_sms": 1000}):
            plan = plan_cache_attention(view, q, 8, block_n=BN, **kw)
            assert sorted(plan.rows[:, 0].tolist()) == list(range(sum(q))), "every query row exactly once"
            covered = _covered_positions(plan, view)
            for r in range(plan.num_rows):
                assert sorted(covered[r]) == list(range(int(plan.rows[r, 1]) + 1)), (seed, kw, r)
            held = np.bincount(np.concatenate([np.arange(a, a + n) for a, n in plan.items[:, :2]]))
            assert (held == plan.rows[:, 3]).all(), "part_count is the number of items holding the row"
            _assert_merge_lists_name_each_rows_partials(plan)


def _assert_merge_lists_name_each_rows_partials(plan):
    """A split row's merge list holds exactly the partials its items write (item i writes row x's at partial
    items[i, 6] + x - items[i, 0]), every partial of a split row is merged once."""
    for r in np.flatnonzero(plan.rows[:, 3] > 1):
        first, count = int(plan.rows[r, 2]), int(plan.rows[r, 3])
        holders = np.flatnonzero((plan.items[:, 0] <= r) & (r < plan.items[:, 0] + plan.items[:, 1]))
        expected = sorted(int(plan.items[i, 6] + r - plan.items[i, 0]) for i in holders)
        assert sorted(plan.merge_idx[first:first + count].tolist()) == expected, r
    assert len(plan.merge_idx) == len(set(plan.merge_idx.tolist())) == int(plan.rows[:, 3][plan.rows[:, 3] > 1].sum())


def test_plans_loaded_into_fixed_buffers_replay_through_one_bound_launch(device):
    """The CUDA-graph path: one PlanBuffers and one launch bound to them (fixed grid, fixed tensors) serve
    different iterations one after the other; programs past a plan's items return at once."""
    rng = np.random.default_rng(7)
    bufs = launches = None
    for step in range(3):
        kv, q, prefix_of, prefixes = _iteration(rng, 5)
        cache = _fill("grouped", kv, prefix_of, prefixes, kv_heads=2, dim=64, dtype=torch.float16, device=device,
                      seed=step)
        view = cache.view(range(len(kv)))
        plan = plan_cache_attention(view, q, 8, block_n=BN, slots=32, kv_chunk=BN, max_items=200, max_partials=1000)
        if bufs is None:
            bufs = PlanBuffers(device, num_heads=8, num_kv_heads=2, head_dim=64, tile=plan.tile, max_items=200,
                               max_rows=400, max_partials=1000)
        bufs.load(plan)
        x = torch.randn(sum(q), 8, 64, generator=torch.Generator().manual_seed(step)).to(device, torch.float16)
        out = torch.full_like(x, float("nan"))
        cache_attention(x, view, plan, out=out, buffers=bufs)
        launches = launches or dict(bufs.launches)
        assert bufs.launches.keys() == launches.keys(), "the same bound launch every step"
        k, v = (torch.cat(t) for t in zip(*(cache.read(r) for r in range(len(kv)))))
        cu = [torch.tensor(np.concatenate([[0], np.cumsum(a)]), dtype=torch.int32) for a in (q, kv)]
        ref = reference_varlen_attention(x, k, v, *cu, causal=True)
        assert not out.isnan().any() and (out.float() - ref).abs().max() <= TOL[torch.float16]
        assert (bufs.counters == 0).all(), "every arrival counter is back at zero for the next layer"


def test_capacity_overflow_is_a_clear_error_never_a_truncation():
    cache = _fill("grouped", [300, 40, 40], [None] * 3, {}, kv_heads=2, dim=64, dtype=torch.float16, device="cpu")
    view = cache.view(range(3))
    with pytest.raises(ValueError, match=r"max_items=2"):
        plan_cache_attention(view, [1, 40, 1], 4, slots=16, max_items=2)
    capped = plan_cache_attention(view, [1, 1, 1], 4, num_sms=64, max_items=3)
    assert capped.num_items == 3 and capped.num_partials == 0, "splitting gives way to the capacity"
    plan = plan_cache_attention(view, [1, 40, 1], 4, slots=16)
    bufs = PlanBuffers("cpu", num_heads=4, num_kv_heads=2, head_dim=64, tile=plan.tile, max_items=64, max_rows=10,
                       max_partials=64)
    with pytest.raises(ValueError, match=r"plan has 42 rows, more than the buffers' capacity of 10"):
        bufs.load(plan)


def test_tile_shapes_fit_the_gpus_shared_memory():
    """Three K/V stages where the query tile leaves room for them, two where not (head dim 256 at 128 slots on
    Hopper's 227 KiB), and no tile at all where not even two fit (an A100's 163 KiB): the planner leaves those
    shapes out, and asking for one is an error naming slots."""
    from packinfer.cache_plan import BLOCK_N, launch_config

    hopper, a100 = 232448, 166912
    assert launch_config(128, BLOCK_N, 128, 2, hopper) == (8, 3)
    assert launch_config(64, BLOCK_N, 256, 2, hopper) == (4, 3)
    assert launch_config(128, BLOCK_N, 256, 2, hopper) == (8, 2)
    assert launch_config(128, BLOCK_N, 256, 2, a100) is None and launch_config(16, BLOCK_N, 256, 2, a100) == (4, 2)
    cache = _fill("grouped", [700, 900], [None] * 2, {}, kv_heads=2, dim=256, dtype=torch.float16, device="cpu")
    plan = plan_cache_attention(cache.view(range(2)), [600, 900], 4, slots=128)  # the CPU assumes Hopper's
    assert plan.tile == (128, BLOCK_N, True, 8, 2)
