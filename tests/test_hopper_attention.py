"""Hopper's warp-specialized prefill kernel (packinfer.hopper_attention, the "gluon" engine).

On the CPU: it compiles for sm_90a (Triton's compiler and ptxas, in a child process without the interpreter) into
one program per SM with the registers it asks for; a "gluon" plan runs through the Triton kernel wherever the
Gluon kernel cannot (here: the interpreter), with the same results. On a Hopper GPU (PACKINFER_TEST_GPU=1): the
kernel itself against the float32 reference on ragged batches at its real tile size (128 slots x 128 keys),
outputs poisoned first, and other requests' NaN/inf never reaching a request."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from packinfer import (
    KernelConfig,
    hopper_attention,
    plan_for,
    plan_varlen,
    reference_varlen_attention,
    varlen_attention,
)
from test_packinfer_kernel import _assert_poison_stays_in_request_1, _batch

GLUON = KernelConfig(128, 128, 8, 3, True, engine="gluon")
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
ON_HOPPER = os.environ.get("PACKINFER_TEST_GPU") == "1" and torch.cuda.is_available() and \
    torch.cuda.get_device_capability()[0] == 9
gpu = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (PACKINFER_TEST_GPU=1)")

#: The ablation knobs under measurement, all on at once (their 3-stage ring aside, which with the wide store would
#: not fit an SM): compiled on the CPU too, so that a knob's code keeps compiling between GPU runs.
KNOBS_ON = {"pingpong": True, "wide_store": True, "rescale_under_qk": True}


def _gluon_plan(cu_q, cu_k, heads, kv_heads, dim, causal=True, pack_gqa=True, **kw):
    group = heads // kv_heads if pack_gqa else 1
    return plan_varlen(cu_q, cu_k, heads, kv_heads, dim, causal=causal, block_m=128 // group, block_n=128,
                       pack_gqa=pack_gqa, engine="gluon", **kw)


@pytest.fixture
def ran_gluon(monkeypatch):
    """The number of calls that reached the Gluon kernel."""
    calls = []
    real = hopper_attention.launch
    monkeypatch.setattr(hopper_attention, "launch", lambda *a, **k: (calls.append(1), real(*a, **k)))
    return calls


def _check(q_lens, kv_lens, *, heads=32, kv_heads=8, dim=128, dtype=torch.bfloat16, causal=True, seed=0,
           pack_gqa=True, device="cuda", **kw):
    q, k, v, cu_q, cu_k = _batch(q_lens, kv_lens, heads, kv_heads, dim, dtype, device, seed)
    plan = _gluon_plan(cu_q, cu_k, heads, kv_heads, dim, causal, pack_gqa, **kw)
    out = torch.full_like(q, float("nan"))
    varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(kv_lens), causal=causal, plan=plan, out=out)
    ref = reference_varlen_attention(q, k, v, cu_q, cu_k, causal=causal)
    assert not out.isnan().any(), "some output elements were never written"
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]}"


# --- CPU ------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs under the Triton interpreter")
def test_a_gluon_plan_runs_through_the_triton_kernel_where_gluon_cannot(ran_gluon):
    """Under the interpreter (no GPU) the same plan runs through packed_attention, correctly."""
    q_lens = [1, 31, 33, 5]
    q, k, v, cu_q, cu_k = _batch(q_lens, [4, 31, 140, 5], 8, 2, 64, torch.float16, "cpu", 1)
    plan = _gluon_plan(cu_q, cu_k, 8, 2, 64)
    assert plan.engine == "gluon" and hopper_attention.supports(plan, q)
    out = varlen_attention(q, k, v, cu_q, cu_k, 33, 140, causal=True, plan=plan)
    assert not ran_gluon
    assert (out.float() - reference_varlen_attention(q, k, v, cu_q, cu_k)).abs().max() <= TOL[torch.float16]


def test_what_the_gluon_kernel_supports():
    cu = torch.tensor([0, 300, 700], dtype=torch.int32)
    q = torch.zeros(700, 32, 128, dtype=torch.bfloat16)
    assert hopper_attention.supports(plan_for(cu, cu, 32, 8, 128, causal=True, config=GLUON), q)
    assert not hopper_attention.supports(plan_for(cu, cu, 32, 8, 128, causal=True, config=GLUON),
                                         q.float())  # fp32
    assert not hopper_attention.supports(plan_for(cu, cu, 32, 8, 128, causal=True, window=(64, 0), config=GLUON), q)
    short = KernelConfig(64, 64, 4, 3, True, engine="gluon")
    assert not hopper_attention.supports(plan_for(cu, cu, 32, 8, 128, causal=True, config=short), q)
    no_keys = torch.tensor([0, 0, 0], dtype=torch.int32)
    assert not hopper_attention.supports(plan_for(cu, no_keys, 32, 8, 128, causal=False, config=GLUON), q)
    assert not hopper_attention.available(torch.device("cpu"))
    with pytest.raises(ValueError, match="engine"):
        plan_varlen(cu, cu, 32, 8, 128, causal=True, engine="cuda")


@pytest.fixture(scope="module")
def compiled():
    """{head dim, or 128+knobs (KNOBS_ON): (shared bytes, warps)} of the kernel compiled for sm_90a in a child
    process."""
    if hopper_attention.gluon is None:
        pytest.skip("this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and any(
            missing in done.stderr for missing in ("No such file", "not found", "Permission denied")):
        pytest.skip(f"no runnable ptxas here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_kernel_compiles_for_hopper_into_one_program_per_sm(compiled):
    assert set(compiled) == {"64", "128", "128+knobs"}
    for variant, (shared, warps) in compiled.items():
        assert warps == 12, f"{variant}: {warps} warps (two consumer warpgroups and a loader)"
        assert shared <= 227 * 1024, f"{variant}: {shared} bytes of shared memory do not fit an SM"


# --- Hopper GPU -----------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
def test_tile_edges(dtype, dim, ran_gluon):
    """Lengths 1 and tile edges +-1 (32 rows x 4 heads, 128-key steps), some requests packed into shared tiles."""
    lens = [1, 31, 32, 33, 127, 128, 129, 255, 257, 3, 1000]
    _check(lens, lens, dim=dim, dtype=dtype, seed=dim)
    assert ran_gluon


@gpu
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("pack_gqa", [True, False])
def test_gqa_ratios_and_q_shorter_than_kv(group, pack_gqa, ran_gluon):
    q_lens = [1, 5, 33, 2, 1, 200, 129]
    kv_lens = [7, 5, 300, 40, 1, 700, 129]
    _check(q_lens, kv_lens, heads=8 * group, kv_heads=8, pack_gqa=pack_gqa, seed=group)
    assert ran_gluon


@gpu
@pytest.mark.parametrize("seed", range(6))
def test_random_ragged_batches(seed, ran_gluon):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    kv_lens = rng.integers(1, 3000, size=n)
    q_lens = np.where(rng.random(n) < 0.6, kv_lens, np.maximum(1, (rng.random(n) * kv_lens).astype(int)))
    _check(q_lens.tolist(), kv_lens.tolist(), dtype=[torch.bfloat16, torch.float16][seed % 2],
           causal=seed % 3 != 2, balancing=bool(seed % 2), packing=seed != 4, seed=seed)
    assert ran_gluon


@gpu
@pytest.mark.parametrize("variant", [{"wide_store": True}, {"rescale_under_qk": True},
                                     {"rescale_under_qk": True, "pingpong": True}, {"pingpong": True},
                                     {"stages": 3}, {"regs": (232, 48)}, KNOBS_ON])
def test_the_variants_under_measurement_compute_the_same(variant, monkeypatch, ran_gluon):
    """Each ablation knob of hopper_attention.TUNING (benchmarks/prefill_hopper.py) against the reference: tile
    edges, packed tiles and q_len < kv_len."""
    monkeypatch.setattr(hopper_attention, "TUNING", {**hopper_attention.TUNING, **variant})
    lens = [1, 31, 32, 33, 127, 128, 129, 255, 257, 3, 1000]
    _check(lens, lens, seed=11)
    _check([1, 5, 33, 2, 200, 129], [7, 5, 300, 40, 700, 129], seed=12)
    assert ran_gluon


@gpu
def test_rows_that_see_no_key_and_empty_requests(ran_gluon):
    _check([3, 0, 4, 40], [3, 9, 4, 20], causal=False)
    _check([300, 7], [300, 2], causal=True)  # q_len > kv_len: early rows see nothing and write zeros
    # a pack ending in the head rows of a request with more rows than keys: the earlier requests still see
    # all their keys
    _check([3, 300], [300, 5], causal=True)
    _check([1, 200], [100, 1], causal=True)


@gpu
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("packing", [True, False])
def test_one_requests_nan_or_inf_never_reaches_another_request(poison, packing, ran_gluon):
    """Request 1's K and V hold NaN/inf: every other request (sharing its packed tiles and key blocks) keeps each
    bit of its clean output."""
    q_lens, kv_lens = [3, 40, 2, 90, 1, 300], [3, 70, 2, 200, 4, 300]
    q, k, v, cu_q, cu_k = _batch(q_lens, kv_lens, 32, 8, 128, torch.bfloat16, "cuda", 7)
    plan = _gluon_plan(cu_q, cu_k, 32, 8, 128, packing=packing)
    _assert_poison_stays_in_request_1(q, k, v, cu_q, cu_k, plan, poison)
    assert ran_gluon


@gpu
def test_a_request_sees_its_own_nan(ran_gluon):
    """A NaN in a value that rows of its own request see makes those rows NaN (cleaning hides nothing), and the
    other request, sharing the packed tile, keeps each bit of its output."""
    q, k, v, cu_q, cu_k = _batch([50, 60], [50, 60], 32, 8, 128, torch.bfloat16, "cuda", 3)
    plan = _gluon_plan(cu_q, cu_k, 32, 8, 128)
    clean = varlen_attention(q, k, v, cu_q, cu_k, 60, 60, causal=True, plan=plan)
    v[55, 2, 7] = float("nan")  # request 1's 6th key, KV head 2 (query heads 8-11), one element
    out = varlen_attention(q, k, v, cu_q, cu_k, 60, 60, causal=True, plan=plan)
    assert out[55:110, 8:12].isnan().any(-1).all(), "rows that see the NaN value must be NaN"
    assert torch.equal(out[:50], clean[:50])
    assert ran_gluon


if __name__ == "__main__":  # the child process: print {head dim or variant: [shared bytes, warps]}
    import triton
    from triton.backends.compiler import GPUTarget

    out = {}
    for name, dim, knobs in [(str(d), d, {}) for d in hopper_attention.HEAD_DIMS] + [("128+knobs", 128, KNOBS_ON)]:
        hopper_attention.TUNING.update(knobs)
        src, options = hopper_attention.compile_source(dim, torch.bfloat16)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        out[name] = [compiled.metadata.shared, compiled.metadata.num_warps]
    print(json.dumps(out))
