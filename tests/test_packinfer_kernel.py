"""packinfer.varlen_attention against a float32 reference on randomized ragged batches (Triton interpreter on
the CPU; PACKINFER_TEST_GPU=1 runs the same tests on a GPU). Outputs are poisoned first: every element must be
written."""

import numpy as np
import pytest
import torch
from packinfer import plan_varlen, reference_varlen_attention, varlen_attention

BM, BN = 16, 16  # small tiles keep the interpreter fast; lengths straddle them
EDGE_LENGTHS = [1, BM - 1, BM, BM + 1, 2 * BM + 1, 3]
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _batch(q_lens, kv_lens, heads, kv_heads, dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(kv_lens)]), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, dim, generator=gen).to(device, dtype)
    k = torch.randn(int(cu_k[-1]), kv_heads, dim, generator=gen).to(device, dtype)
    v = torch.randn(int(cu_k[-1]), kv_heads, dim, generator=gen).to(device, dtype)
    return q, k, v, cu_q.to(device), cu_k.to(device)


def _check(q_lens, kv_lens, *, heads=4, kv_heads=2, dim=64, dtype=torch.float16, causal=True, device="cpu", seed=0,
           use_tma=None, **plan_kw):
    q, k, v, cu_q, cu_k = _batch(q_lens, kv_lens, heads, kv_heads, dim, dtype, device, seed)
    plan = plan_varlen(cu_q, cu_k, heads, kv_heads, dim, causal=causal, block_m=plan_kw.pop("block_m", BM),
                       block_n=BN, **plan_kw)
    out = torch.full_like(q, float("nan"))
    varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(kv_lens), causal=causal, plan=plan, out=out,
                     use_tma=use_tma)
    ref = reference_varlen_attention(q, k, v, cu_q, cu_k, causal=causal)
    assert not out.isnan().any(), "some output elements were never written"
    err = (out.float() - ref).abs().max().item()
    # never worse than rounding the exact result to the output dtype, plus accumulated bf16/fp16 rounding
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]}"
    return plan


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("packing", [True, False])
def test_prefill_edge_lengths(dtype, packing, device):
    _check(EDGE_LENGTHS, EDGE_LENGTHS, dtype=dtype, packing=packing, device=device)


@pytest.mark.parametrize("pack_gqa", [False, True])
def test_tensor_descriptor_loads(pack_gqa, device):
    """K/V through TMA descriptors (Hopper's path): blocks past the last key read zeros, masked like the rest."""
    _check(EDGE_LENGTHS, [k + 5 for k in EDGE_LENGTHS[:-1]] + [3], heads=8, kv_heads=2, pack_gqa=pack_gqa,
           block_m=BM // 4 if pack_gqa else BM, dtype=torch.bfloat16, use_tma=True, device=device)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("pack_gqa", [False, True])
def test_gqa_ratios_with_q_shorter_than_kv(group, pack_gqa, device):
    q_lens = [1, 5, BM + 1, 2, 1]
    kv_lens = [7, 5, 3 * BM - 1, 40, 1]
    _check(q_lens, kv_lens, heads=2 * group, kv_heads=2, pack_gqa=pack_gqa, block_m=BM // group if pack_gqa else BM,
           device=device, seed=group)


@pytest.mark.parametrize("seed", range(4))
def test_random_ragged_batches(seed, device):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    kv_lens = rng.integers(1, 4 * BM, size=n)
    q_lens = np.where(rng.random(n) < 0.5, kv_lens, np.maximum(1, (rng.random(n) * kv_lens).astype(int)))
    dtype = [torch.float16, torch.bfloat16][seed % 2]
    _check(q_lens.tolist(), kv_lens.tolist(), dtype=dtype, balancing=bool(seed % 3), device=device, seed=seed)


def test_lengths_that_fill_whole_tiles(device):
    _check([BM, 2 * BM], [BM, 2 * BM], device=device)  # no head rows left over: no pack at all


def test_single_request_and_single_token(device):
    _check([37], [37], device=device)
    _check([1], [1], device=device)
    _check([1], [50], device=device)  # one decode step


def test_non_causal_allows_q_longer_than_kv(device):
    _check([20, 3, 1], [5, 3, 30], causal=False, device=device)


def test_head_dim_128_bf16(device):
    _check([BM + 1, 3], [BM + 1, 9], dim=128, dtype=torch.bfloat16, device=device)


def test_requests_without_queries_or_keys(device):
    # empty requests in the batch: no queries (skipped), and non-causal rows with no key write zeros
    _check([3, 0, 4], [3, 9, 4], device=device)
    q, k, v, cu_q, cu_k = _batch([2, 3], [0, 4], 2, 2, 64, torch.float16, device, 1)
    out = varlen_attention(q, k, v, cu_q, cu_k, 3, 4, causal=False)
    assert (out[:2] == 0).all() and not out.isnan().any()


def test_plan_is_built_when_not_given_and_scale_is_honoured(device):
    q, k, v, cu_q, cu_k = _batch([5, 9], [5, 9], 4, 4, 64, torch.float16, device, 2)
    for scale in (None, 0.3):
        out = varlen_attention(q, k, v, cu_q, cu_k, 9, 9, causal=True, softmax_scale=scale)
        ref = reference_varlen_attention(q, k, v, cu_q, cu_k, softmax_scale=scale)
        assert (out.float() - ref).abs().max() < TOL[torch.float16]


def test_default_plan_for_each_head_dim(device):
    for dim in (64, 128, 256):
        q, k, v, cu_q, cu_k = _batch([3, 20], [3, 20], 4, 2, dim, torch.float16, device, dim)
        out = varlen_attention(q, k, v, cu_q, cu_k, 20, 20, causal=True)  # plan_for picks the tile shape
        assert (out.float() - reference_varlen_attention(q, k, v, cu_q, cu_k)).abs().max() < TOL[torch.float16]


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("packing", [True, False])
def test_one_requests_nan_or_inf_never_reaches_another_request(poison, packing, device):
    """Request 1's K and V hold NaN/inf: the other requests of the batch (sharing its packed tiles) keep every
    bit of their clean outputs; the poisoned request's own rows are its own business."""
    q_lens, kv_lens = [3, 5, 2, 9, 1], [3, 7, 2, 20, 4]
    q, k, v, cu_q, cu_k = _batch(q_lens, kv_lens, 4, 2, 64, torch.float16, device, 7)
    plan = plan_varlen(cu_q, cu_k, 4, 2, 64, causal=True, block_m=BM, block_n=BN, packing=packing)
    assert not packing or plan.num_tiles < len(q_lens), "the requests share packed tiles"
    _assert_poison_stays_in_request_1(q, k, v, cu_q, cu_k, plan, poison)


def _assert_poison_stays_in_request_1(q, k, v, cu_q, cu_k, plan, poison):
    """Run the plan clean, put `poison` in some of request 1's K and V, run it again: every other request's rows
    keep each bit of their clean output (shared by the Triton and the Gluon kernel's isolation tests)."""
    max_q, max_k = int(torch.diff(cu_q).max()), int(torch.diff(cu_k).max())
    clean = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, plan=plan)
    k[int(cu_k[1]):int(cu_k[2]):2, 0] = poison
    v[int(cu_k[1]) + 1:int(cu_k[2]), 1, ::3] = poison
    out = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, plan=plan)
    others = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    others[int(cu_q[1]):int(cu_q[2])] = False
    assert out[others].isfinite().all(), "another request's NaN/inf reached these rows"
    assert torch.equal(out[others], clean[others]), "the other requests' outputs changed"
