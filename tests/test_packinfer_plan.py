"""The planner's invariants: every query row is computed exactly once, each tile's key range holds every key
its rows need and no key block that none of them needs, and balancing orders tiles longest first."""

import dataclasses

import numpy as np
import pytest
import torch
from packinfer import TILE_FIELDS, plan_varlen, varlen_attention

F = {name: i for i, name in enumerate(TILE_FIELDS)}


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _row_intervals(cu_q, cu_k, causal):
    """[lo, hi] of keys each query row may see (bottom-right causal), computed directly per request."""
    lo, hi = [], []
    for b in range(len(cu_q) - 1):
        nq, nk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        for i in range(nq):
            lo.append(cu_k[b])
            hi.append(cu_k[b] + (nk - nq + i if causal else nk - 1))
    return np.array(lo), np.array(hi)


def _check_invariants(q_lens, kv_lens, causal=True, block_m=64, block_n=32, **kw):
    cu_q, cu_k = _cu(q_lens), _cu(kv_lens)
    plan = plan_varlen(cu_q, cu_k, 8, 2, 128, causal=causal, block_m=block_m, block_n=block_n, **kw)
    lo, hi = _row_intervals(cu_q, cu_k, causal)
    covered = np.zeros(cu_q[-1], dtype=int)
    for t in plan.tile_table():
        rows = np.arange(t[F["row_start"]], t[F["row_end"]])
        assert 0 < len(rows) <= block_m
        covered[rows] += 1
        seqs = np.searchsorted(cu_q, rows, side="right") - 1
        assert seqs.min() == t[F["seq_first"]] and seqs.max() == t[F["seq_last"]]
        k_start, k_nomask, k_end = t[F["k_start"]], t[F["k_nomask_end"]], t[F["k_end"]]
        assert k_start <= k_nomask <= k_end and (k_nomask - k_start) % block_n == 0
        # every key a row needs lies in the tile's range; the unmasked prefix is valid for every row
        needs = hi[rows] >= lo[rows]
        assert (lo[rows][needs] >= k_start).all() and (hi[rows][needs] < k_end).all()
        if k_nomask > k_start:
            assert (lo[rows] <= k_start).all() and (hi[rows] >= k_nomask - 1).all()
        # no fully masked key block: each block of the range is needed by some row of the tile
        for block in range(k_start, k_end, block_n):
            assert ((lo[rows] < block + block_n) & (hi[rows] >= block)).any(), (t, block)
    assert (covered == 1).all(), "every query row is computed exactly once"
    return plan


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_invariants_on_random_batches(packing, causal):
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(1, 40))
        kv = rng.integers(1, 700, size=n)
        q = np.where(rng.random(n) < 0.5, kv, np.maximum(1, (rng.random(n) * kv).astype(int)))
        q[rng.random(n) < 0.1] = 0  # requests with keys but no queries
        if q.sum() == 0:
            q[0] = 1
        _check_invariants(q, kv, causal=causal, packing=packing)


@pytest.mark.parametrize("causal", [True, False])
def test_invariants_when_requests_have_more_rows_than_keys(causal):
    """A pack that ends in the head rows of a request with more rows than keys (so they see few keys or none)
    still spans its earlier requests' keys."""
    _check_invariants([3, 300], [300, 5], causal=causal, block_m=128, block_n=128)
    _check_invariants([1, 200], [100, 1], causal=causal, block_m=128, block_n=128)
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(1, 30))
        q = rng.integers(1, 400, size=n)
        kv = np.where(rng.random(n) < 0.5, q, rng.integers(1, 400, size=n))
        _check_invariants(q, kv, causal=causal)


@pytest.mark.parametrize("lengths", [[64, 128, 64], [64], [10, 20]])
def test_batches_with_only_full_tiles_or_only_packs(lengths):
    """No request leaves head rows (every length a multiple of the tile), or no request fills a tile."""
    plan = _check_invariants(lengths, lengths, packing=True)
    assert plan.num_tiles == (sum(lengths) // 64 if lengths[0] == 64 else 1)


def test_packing_puts_short_requests_together_and_unpacked_is_the_fa2_grid():
    lengths = [10, 20, 30, 200, 5]
    packed = _check_invariants(lengths, lengths, packing=True, balancing=False)
    unpacked = _check_invariants(lengths, lengths, packing=False, balancing=False)
    # FA2 grid: ceil(q / 64) tiles per request -> 1 + 1 + 1 + 4 + 1
    assert unpacked.num_tiles == 8
    assert all(t[F["seq_first"]] == t[F["seq_last"]] for t in unpacked.tile_table())
    # packed: [10, 20, 30] share one tile; 200's 8 head rows do not fit beside them (60 + 8 > 64) and take a
    # tile of their own, then 3 full tiles; 5 opens a new pack
    assert packed.num_tiles == 6
    tiles = packed.tile_table()
    first = tiles[0]
    assert (first[F["seq_first"]], first[F["seq_last"]], first[F["row_end"]]) == (0, 2, 60)
    assert [t[F["row_end"]] - t[F["row_start"]] for t in tiles[1:]] == [8, 64, 64, 64, 5]
    # a request's full tiles launch from its last rows
    assert [t[F["row_start"]] for t in tiles[2:5]] == [196, 132, 68]


def test_balancing_launches_heavy_runs_first_with_their_tiles_together():
    rng = np.random.default_rng(1)
    kv = rng.integers(1, 3000, size=100)
    plan = _check_invariants(kv, kv, balancing=True)
    costs, run = plan.tile_costs(), plan.tile_run
    starts = np.flatnonzero(np.diff(run)) + 1
    groups = np.split(np.arange(len(run)), starts)
    assert len(groups) == len(plan.runs), "each run's tiles are adjacent"
    heaviest = [costs[g].max() for g in groups]
    assert heaviest == sorted(heaviest, reverse=True) and heaviest[0] == costs.max()
    assert all((np.diff(costs[g]) <= 0).all() for g in groups), "a run launches its heaviest tile first"
    unbalanced = plan_varlen(_cu(kv), _cu(kv), 8, 2, 128, block_m=64, block_n=32, balancing=False, causal=True)
    assert sorted(map(tuple, unbalanced.tile_table())) == sorted(map(tuple, plan.tile_table()))  # same work
    assert (np.diff(unbalanced.tile_table()[:, F["seq_first"]]) >= 0).all()  # batch order


def test_plan_accepts_tensors_and_records_its_cost():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    plan = plan_varlen(cu, cu, 4, 4, 64, causal=True)
    assert plan.plan_ms > 0 and plan.batch_size == 2 and plan.tile_run.dtype == np.int32


def test_plan_size_is_per_request_not_per_tile():
    """256 requests of ~1.7k tokens: thousands of tiles, yet the plan holds O(requests) runs (what keeps
    planning well under a millisecond; the time itself is measured by the benchmark, not asserted here)."""
    kv = np.random.default_rng(2).lognormal(np.log(1700), 1.0, size=256).astype(int).clip(1, 8192)
    plan = plan_varlen(_cu(kv), _cu(kv), 32, 8, 128, block_m=32, pack_gqa=True, causal=True)
    assert plan.num_tiles > 10 * len(kv) and len(plan.runs) <= 2 * len(kv)


# --- bad input -------------------------------------------------------------------------------------------

def _qkv(total_q=8, total_k=8, heads=4, kv_heads=2, dim=64, dtype=torch.float16):
    return (torch.randn(total_q, heads, dim).to(dtype), torch.randn(total_k, kv_heads, dim).to(dtype),
            torch.randn(total_k, kv_heads, dim).to(dtype))


CU = torch.tensor([0, 3, 8], dtype=torch.int32)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "q": a["q"].float()}, r"q must be float16 or bfloat16, got torch.float32"),
    (lambda a: {**a, "k": a["k"].bfloat16(), "v": a["v"].bfloat16()}, r"q, k, v must share a dtype"),
    (lambda a: {**a, "q": a["q"][0]}, r"q must have rank 3"),
    (lambda a: {**a, "k": a["k"].to("meta"), "v": a["v"].to("meta")}, r"k is on meta but q is on cpu"),
    (lambda a: {**a, "k": a["k"].repeat(1, 3, 1)[:, :3], "v": a["v"].repeat(1, 3, 1)[:, :3]},
     r"q heads \(4\) must be a multiple of k/v heads \(3\)"),
    (lambda a: {**a, "q": torch.randn(8, 4, 320).half(), "k": torch.randn(8, 2, 320).half(),
                "v": torch.randn(8, 2, 320).half()}, r"head_dim 320 is not supported: it must be between 1 and 256"),
    (lambda a: {**a, "v": a["v"][:7]}, r"k and v must have the same shape"),
    (lambda a: {**a, "cu_seqlens_q": CU.long()}, r"cu_seqlens_q must be an int32 tensor, got torch.int64"),
    (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 3, 9], dtype=torch.int32)},
     r"cu_seqlens_k\[-1\] = 9 does not match the 8 tokens of k"),
    (lambda a: {**a, "cu_seqlens_q": torch.tensor([1, 3, 8], dtype=torch.int32),
                "cu_seqlens_k": torch.tensor([1, 3, 8], dtype=torch.int32)}, r"cu_seqlens_q must start at 0"),
    (lambda a: {**a, "cu_seqlens_q": torch.tensor([0, 6, 5, 8], dtype=torch.int32),
                "cu_seqlens_k": torch.tensor([0, 6, 6, 8], dtype=torch.int32)}, r"cu_seqlens_q must be non-decreasing"),
    (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 8], dtype=torch.int32)},
     r"cu_seqlens_q and cu_seqlens_k must have the same length"),
])
def test_bad_input_names_the_argument(change, message):
    q, k, v = _qkv()
    args = change({"q": q, "k": k, "v": v, "cu_seqlens_q": CU, "cu_seqlens_k": CU})
    with pytest.raises(ValueError, match=message):
        varlen_attention(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"], 5, 5,
                         causal=True)


def test_plan_for_another_batch_is_rejected():
    q, k, v = _qkv()
    other = plan_varlen(torch.tensor([0, 4, 8], dtype=torch.int32), torch.tensor([0, 4, 8], dtype=torch.int32), 4, 2,
                        64, causal=True)
    with pytest.raises(ValueError, match="plan was built for another batch"):
        varlen_attention(q, k, v, CU, CU, 5, 5, causal=True, plan=other)
    varlen_attention(q, k, v, CU, CU, 5, 5, causal=True, plan=other, validate=False)  # the caller's promise: no check
    with pytest.raises(ValueError, match="out must match q"):
        varlen_attention(q, k, v, CU, CU, 5, 5, causal=True, out=torch.empty(8, 4, 64))


def test_bad_plan_arguments():
    with pytest.raises(ValueError, match="block_m .* must be a power of two >= 16, got 24"):
        plan_varlen(CU.numpy(), CU.numpy(), 4, 2, 64, block_m=24, causal=True)
    with pytest.raises(ValueError, match="pack_gqa needs a power-of-two GQA group"):
        plan_varlen(CU.numpy(), CU.numpy(), 6, 2, 64, pack_gqa=True, causal=True)
    with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
        plan_varlen(CU.numpy().astype(np.int64), CU.numpy(), 4, 2, 64, causal=True)


def test_the_gluon_kernel_takes_only_head_dim_128s_long_tiles():
    """On a Hopper GPU (unless PACKINFER_GLUON=0), head dim 128's long tiles run Hopper's warp-specialized
    kernel (the Triton kernel keeps the same launch configuration for the plans it runs instead); every other
    shape stays with the Triton kernel."""
    from packinfer import choose_config

    long_q = np.array([4096] * 16)
    short_q = np.array([300] * 64)
    on_hopper = choose_config(long_q, long_q, 32, 8, 128, gluon=True)
    elsewhere = choose_config(long_q, long_q, 32, 8, 128, gluon=False)
    assert on_hopper.engine == "gluon" and elsewhere.engine == "triton"
    assert dataclasses.replace(on_hopper, engine="triton") == elsewhere
    assert choose_config(short_q, short_q, 32, 8, 128, gluon=True).engine == "triton"
    assert choose_config(long_q, long_q, 32, 8, 64, gluon=True).engine == "triton"  # measured at 128 only
    assert choose_config(long_q, long_q, 32, 8, 128).engine == "triton"  # no Hopper GPU here


def test_choose_config_follows_the_batch_shape():
    from packinfer import FA2_LIKE, KernelConfig, choose_config, plan_for

    decode_mix = choose_config(np.array([1] * 96 + [512] * 32), np.array([3000] * 96 + [1024] * 32), 32, 8, 128)
    long_prompts = choose_config(np.array([4096] * 16), np.array([4096] * 16), 32, 8, 128)
    short_prompts = choose_config(np.array([300] * 64), np.array([300] * 64), 32, 8, 128)
    assert decode_mix == short_prompts and short_prompts.slots == 64 and short_prompts.pack_gqa
    assert long_prompts.slots == 128 and long_prompts.block_n == 128
    # the long tile from 1500 keys per query row on average (causal prompts of n tokens: (n + 1) / 2 keys a row)
    assert choose_config(np.array([3100] * 32), np.array([3100] * 32), 32, 8, 128) == long_prompts
    assert choose_config(np.array([2900] * 32), np.array([2900] * 32), 32, 8, 128) == short_prompts
    # a GQA group that is no power of two cannot be packed into one program
    assert not choose_config(np.array([300] * 4), np.array([300] * 4), 12, 4, 128).pack_gqa
    plan = plan_for(_cu([300] * 64), _cu([300] * 64), 32, 8, 128, causal=True)
    assert plan.pack_gqa and plan.block_m == short_prompts.slots // 4 and plan.num_warps == short_prompts.num_warps
    fa2 = plan_for(_cu([300] * 64), _cu([300] * 64), 32, 8, 128, causal=True, packing=False, balancing=False,
                   config=FA2_LIKE)
    assert fa2.block_m == 128 and not fa2.pack_gqa and fa2.num_tiles == 64 * 3
    # head dims that are not a power of two take the tiles of the one they are padded to, but 64-key steps on long
    # prompts (their K/V loads go through pointers, not TMA); head dim 256 one shape that fits shared memory
    assert choose_config(np.array([300] * 4), np.array([300] * 4), 32, 8, 80) == choose_config(
        np.array([300] * 4), np.array([300] * 4), 32, 8, 128)
    long_80 = choose_config(np.array([4096] * 16), np.array([4096] * 16), 32, 8, 80)
    assert (long_80.slots, long_80.block_n) == (128, 64)
    for q in ([300] * 64, [4096] * 16):
        assert choose_config(np.array(q), np.array(q), 16, 8, 256) == KernelConfig(128, 64, 8, 2, True)
        # a GPU with less shared memory per block (an A100's 163 KiB) gets a shape that fits it
        assert choose_config(np.array(q), np.array(q), 16, 8, 256, shared_memory=166912).slots == 64
    assert choose_config(np.array([300] * 4), np.array([300] * 4), 64, 8, 256).pack_gqa  # 16 rows of 8 heads
    assert not choose_config(np.array([300] * 4), np.array([300] * 4), 32, 2, 256).pack_gqa  # 8 rows only
    with pytest.raises(ValueError, match="head_dim 512 is not supported"):
        choose_config(np.array([1]), np.array([1]), 32, 8, 512)
