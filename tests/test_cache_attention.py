"""packinfer.cache_attention (decode and append over a KV cache) against a float32 reference: both layouts,
shared and unshared prefixes, split and unsplit KV, GQA ratios, both dtypes. Outputs are poisoned first (every
element must be written). Triton interpreter on the CPU; PACKINFER_TEST_GPU=1 runs them on a GPU."""

import numpy as np
import pytest
import torch
from packinfer import cache_attention, make_cache, plan_cache_attention, reference_varlen_attention

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
           dtype=torch.float16, device="cpu", use_tma=None, **plan_kw):
    prefix_of = prefix_of or [None] * len(kv_lens)
    cache = _fill(layout, kv_lens, prefix_of, prefix_lens or {}, kv_heads=kv_heads, dim=dim, dtype=dtype,
                  device=device)
    view = cache.view(range(len(kv_lens)))
    plan = plan_cache_attention(view, q_lens, heads, block_n=BN, **plan_kw)
    q = torch.randn(sum(q_lens), heads, dim, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    out = torch.full_like(q, float("nan"))
    cache_attention(q, view, plan, out=out, use_tma=use_tma)
    k, v = (torch.cat(t) for t in zip(*(cache.read(r) for r in range(len(kv_lens)))))
    cu = [torch.tensor(np.concatenate([[0], np.cumsum(x)]), dtype=torch.int32) for x in (q_lens, kv_lens)]
    ref = reference_varlen_attention(q, k, v, *cu, causal=True)
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


def test_tensor_descriptor_loads_on_the_grouped_layout(device):
    """Hopper's path: K/V tiles through TMA descriptors; keys past an item are neighbours' data, masked."""
    _check("grouped", EDGE_KV, EDGE_Q, [None] * 5 + [0, 0], {0: 1}, heads=8, kv_heads=2, dtype=torch.bfloat16,
           device=device, use_tma=True, kv_chunk=2 * BN)


def test_plan_splits_long_contexts_and_every_row_gets_a_partial():
    cache = _fill("grouped", [1000, 10, 10, 10], [None] * 4, {}, kv_heads=2, dim=64, dtype=torch.float16,
                  device="cpu")
    view = cache.view(range(4))
    plan = plan_cache_attention(view, [1, 1, 1, 1], 4, num_sms=8)
    lens = plan.items[:, 4]
    assert lens.max() <= plan.kv_chunk < 1000, "the long context is split"
    assert plan.items[0, 4] == lens.max(), "largest items launch first"
    assert (np.diff(plan.merge_ptr) >= 1).all()
    assert sorted(plan.merge_idx.tolist()) == list(range(plan.num_partials))
    unsplit = plan_cache_attention(view, [1, 1, 1, 1], 4, split=False)
    assert unsplit.num_items == 4 and unsplit.num_partials == 4


def test_bad_arguments_are_named():
    cache = _fill("paged", [10, 20], [None, None], {}, kv_heads=2, dim=64, dtype=torch.float16, device="cpu")
    view = cache.view([0, 1])
    plan = plan_cache_attention(view, [1, 2], 4)
    q = torch.randn(3, 4, 64).half()
    cases = [
        (lambda: plan_cache_attention(view, [1], 4), "q_lens has 1 entries but the view has 2"),
        (lambda: plan_cache_attention(view, [1, 21], 4), "request 1 has q_len 21, kv_len 20"),
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
