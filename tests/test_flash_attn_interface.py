"""packinfer.flash_attn_interface against FlashAttention 2's definitions, in FlashAttention's own test style:
randomized ragged batches over every option, and the accuracy rule of FA's tests - the error against a float32
reference is at most twice that of a PyTorch reference computed in the input dtype. Triton interpreter on the
CPU (small shapes); PACKINFER_TEST_GPU=1 runs the same on a GPU."""

import inspect
import random

import numpy as np
import packinfer
import pytest
import torch
from packinfer import reference_varlen_attention
from packinfer.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

DTYPES = [torch.float16, torch.bfloat16]


def _cu(lens, device):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)


def _randn(*shape, gen, device, dtype):
    return torch.randn(*shape, generator=gen).to(device, dtype)


def _slopes(kind, batch, heads, device):
    if kind is None:
        return None
    base = torch.rand(heads) * 0.3 + 0.05
    return (base if kind == "heads" else base[None] * (1 + torch.arange(batch)[:, None] / batch)).to(device)


def _assert_fa_accuracy(out, lse, q, k, v, cu_q, cu_k, **opts):
    """FlashAttention's rule: max |out - ref_fp32| <= 2 max |ref_dtype - ref_fp32| (+1e-5 where both are exact);
    softmax_lse against the fp32 one, +inf exactly on rows that see no key."""
    ref, ref_lse = reference_varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, **opts)
    low = reference_varlen_attention(q, k, v, cu_q, cu_k, dtype=q.dtype, **opts).float()
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any()
    err, err_pt = (out.float() - ref).abs().max().item(), (low - ref).abs().max().item()
    assert err <= 2 * err_pt + 1e-5, f"max error {err:.3g} > 2 x PyTorch's {err_pt:.3g}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows that see no key have lse +inf, and only those"
    assert (lse[~empty] - ref_lse[~empty]).abs().max().item() < 1e-3 if (~empty).any() else True
    assert (out.float()[empty.t().any(1)] == 0).all() if empty.any() else True


# a few long-ish and tile-boundary lengths, length 1, q_len > kv_len (bottom-right: its first rows see nothing)
CASES = [
    ([1, 17, 15, 40, 3], [9, 17, 30, 40, 1]),
    ([64, 1, 65], [64, 70, 65]),
    ([5, 33, 2], [3, 20, 0]),
]


def _random_options(seed):
    """FA-style: every option drawn at random (seeded), so the matrix covers their combinations over time."""
    rnd = random.Random(seed)
    return dict(head_dim=rnd.choice([40, 59, 64, 80, 96, 111, 128, 160, 256]), dtype=rnd.choice(DTYPES),
                causal=rnd.random() < 0.5, window=rnd.choice([(-1, -1), (7, 0), (7, 3), (0, 0), (12, -1)]),
                softcap=rnd.choice([0.0, 0.0, 5.0]), alibi=rnd.choice([None, None, "heads", "batch"]),
                heads=rnd.choice([(4, 4), (4, 1), (8, 2)]), case=rnd.randrange(len(CASES)))


@pytest.mark.parametrize("seed", range(16))
def test_varlen_matches_flash_attention_definitions(seed, device):
    o = _random_options(seed)
    q_lens, kv_lens = CASES[o["case"]]
    heads, kv_heads = o["heads"]
    gen = torch.Generator().manual_seed(seed)
    q = _randn(sum(q_lens), heads, o["head_dim"], gen=gen, device=device, dtype=o["dtype"])
    k = _randn(sum(kv_lens), kv_heads, o["head_dim"], gen=gen, device=device, dtype=o["dtype"])
    v = _randn(sum(kv_lens), kv_heads, o["head_dim"], gen=gen, device=device, dtype=o["dtype"])
    cu_q, cu_k = _cu(q_lens, device), _cu(kv_lens, device)
    slopes = _slopes(o["alibi"], len(q_lens), heads, device)
    out, lse, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lens), max(kv_lens), 0.0, None, o["causal"],
                                             o["window"], o["softcap"], slopes, False, True)
    assert probs is None
    _assert_fa_accuracy(out, lse, q, k, v, cu_q, cu_k, causal=o["causal"], window=o["window"], softcap=o["softcap"],
                        alibi_slopes=slopes)


@pytest.mark.parametrize("seed", range(6))
def test_varlen_with_seqused_leftpad_and_paged_kv_reads_only_its_keys(seed, device):
    """seqused_k / leftpad_k and block_table run on the cache kernel: keys outside a request's range (and pages
    nobody owns) are NaN, and no output sees them."""
    o = _random_options(100 + seed)
    q_lens, kv_lens = CASES[o["case"]]
    heads, kv_heads, dim, dtype = *o["heads"], o["head_dim"], o["dtype"]
    gen = torch.Generator().manual_seed(seed)
    q = _randn(sum(q_lens), heads, dim, gen=gen, device=device, dtype=dtype)
    slopes = _slopes(o["alibi"], len(q_lens), heads, device)
    opts = dict(causal=o["causal"], window=o["window"], softcap=o["softcap"], alibi_slopes=slopes)
    k_dense = _randn(sum(kv_lens), kv_heads, dim, gen=gen, device=device, dtype=dtype)
    v_dense = _randn(sum(kv_lens), kv_heads, dim, gen=gen, device=device, dtype=dtype)
    cu_q, cu_k = _cu(q_lens, device), _cu(kv_lens, device)
    if seed % 2:  # padded: every request's keys inside a larger slot, NaN around them
        pad = [seed % 3 for _ in kv_lens]
        slot = [n + p + 2 for n, p in zip(kv_lens, pad)]
        k = torch.full((sum(slot), kv_heads, dim), float("nan"), dtype=dtype, device=device)
        v = k.clone()
        starts = np.concatenate([[0], np.cumsum(slot)])[:-1]
        for b, (n, p) in enumerate(zip(kv_lens, pad)):
            k[starts[b] + p:starts[b] + p + n] = k_dense[int(cu_k[b]):int(cu_k[b + 1])]
            v[starts[b] + p:starts[b] + p + n] = v_dense[int(cu_k[b]):int(cu_k[b + 1])]
        out, lse, _ = flash_attn_varlen_func(
            q, k, v, cu_q, _cu(slot, device), max(q_lens), max(slot), causal=o["causal"], window_size=o["window"],
            softcap=o["softcap"], alibi_slopes=slopes, return_attn_probs=True,
            seqused_k=torch.tensor([n + p for n, p in zip(kv_lens, pad)], dtype=torch.int32, device=device),
            leftpad_k=torch.tensor(pad, dtype=torch.int32, device=device))
    else:  # paged: pages of 16 positions in shuffled order, unowned pages NaN
        page = 16
        pages = [-(-n // page) for n in kv_lens]
        order = torch.randperm(sum(pages) + 3, generator=gen)
        k = torch.full((sum(pages) + 3, page, kv_heads, dim), float("nan"), dtype=dtype, device=device)
        v = k.clone()
        table = torch.zeros(len(kv_lens), max(max(pages), 1), dtype=torch.int32)
        used = 0
        for b in range(len(kv_lens)):
            for j in range(pages[b]):
                blk = int(order[used])
                used += 1
                table[b, j] = blk
                lo, hi = int(cu_k[b]) + j * page, min(int(cu_k[b]) + (j + 1) * page, int(cu_k[b + 1]))
                k[blk, :hi - lo], v[blk, :hi - lo] = k_dense[lo:hi], v_dense[lo:hi]
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lens), max(kv_lens), causal=o["causal"],
                                             window_size=o["window"], softcap=o["softcap"], alibi_slopes=slopes,
                                             return_attn_probs=True, block_table=table.to(device))
    _assert_fa_accuracy(out, lse, q, k_dense, v_dense, cu_q, cu_k, **opts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_api_writes_every_element_and_isolates_requests(dtype, device):
    """Outputs poisoned first; a NaN/inf in another request's keys never reaches a row (head_dim 80, window)."""
    q_lens, kv_lens = [3, 17, 1], [20, 17, 33]
    gen = torch.Generator().manual_seed(7)
    q = _randn(sum(q_lens), 4, 80, gen=gen, device=device, dtype=dtype)
    k = _randn(sum(kv_lens), 2, 80, gen=gen, device=device, dtype=dtype)
    v = _randn(sum(kv_lens), 2, 80, gen=gen, device=device, dtype=dtype)
    cu_q, cu_k = _cu(q_lens, device), _cu(kv_lens, device)
    clean = packinfer.varlen_attention(q, k, v, cu_q, cu_k, 17, 33, causal=True, window=(9, 0))
    v[:20, 0, 5] = float("nan")  # request 0's values: request 0 turns NaN where it reads them, the others never
    k[37:, 1, 0] = float("inf")
    out = torch.full_like(q, float("nan"))
    packinfer.varlen_attention(q, k, v, cu_q, cu_k, 17, 33, causal=True, window=(9, 0), out=out)
    assert torch.equal(out[3:20], clean[3:20]), "request 1 reads none of the poisoned keys"


def test_causal_rows_before_the_keys_see_nothing(device):
    """q_len > kv_len, bottom-right: the first q_len - kv_len rows output zeros, lse +inf; the rest is normal."""
    q = torch.randn(8, 2, 64).half().to(device)
    k, v = torch.randn(3, 2, 64).half().to(device), torch.randn(3, 2, 64).half().to(device)
    cu_q, cu_k = _cu([8], device), _cu([3], device)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 3, causal=True, return_attn_probs=True)
    assert (out[:5] == 0).all() and torch.isinf(lse[:, :5]).all() and torch.isfinite(lse[:, 5:]).all()
    ref = reference_varlen_attention(q, k, v, cu_q, cu_k, causal=True)
    assert (out.float() - ref).abs().max() < 4e-3


@pytest.mark.parametrize("causal", [False, True])
def test_batched_and_packed_entry_points(causal, device):
    gen = torch.Generator().manual_seed(3)
    q = _randn(2, 9, 4, 96, gen=gen, device=device, dtype=torch.float16)
    kv = _randn(2, 13, 2, 2, 96, gen=gen, device=device, dtype=torch.float16)
    k, v = kv[:, :, 0], kv[:, :, 1]
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 9)
    cu_q, cu_k = _cu([9, 9], device), _cu([13, 13], device)
    flat = (q.reshape(18, 4, 96), k.reshape(26, 2, 96), v.reshape(26, 2, 96))
    _assert_fa_accuracy(out.reshape(18, 4, 96), lse.transpose(0, 1).reshape(4, 18), *flat, cu_q, cu_k,
                        causal=causal)
    assert torch.equal(flash_attn_kvpacked_func(q, kv, causal=causal), out)
    assert torch.equal(flash_attn_varlen_kvpacked_func(flat[0], kv.reshape(26, 2, 2, 96), cu_q, cu_k, 9, 13,
                                                       causal=causal), out.reshape(18, 4, 96))
    qkv = _randn(2, 9, 3, 4, 64, gen=gen, device=device, dtype=torch.float16)
    packed = flash_attn_qkvpacked_func(qkv, causal=causal)
    assert torch.equal(packed, flash_attn_func(*qkv.unbind(2), causal=causal))
    assert torch.equal(flash_attn_varlen_qkvpacked_func(qkv.reshape(18, 3, 4, 64), cu_q, 9, causal=causal),
                       packed.reshape(18, 4, 64))


def _rotary_reference(x, cos, sin, positions, interleaved):
    """Rotary embedding written with complex numbers: pairs (interleaved) or halves rotated by the angle."""
    d = 2 * cos.shape[1]
    angle = torch.polar(torch.ones_like(cos[positions]), torch.atan2(sin[positions], cos[positions]))  # [B, S, d/2]
    xr = x[..., :d].float()
    if interleaved:
        pairs = torch.view_as_complex(xr.reshape(*xr.shape[:-1], d // 2, 2).contiguous())
        rot = torch.view_as_real(pairs * angle[:, :, None]).flatten(-2)
    else:
        pairs = torch.complex(xr[..., :d // 2], xr[..., d // 2:]) * angle[:, :, None]
        rot = torch.cat([pairs.real, pairs.imag], -1)
    return torch.cat([rot.to(x.dtype), x[..., d:]], -1)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_with_kvcache_appends_then_attends_like_flash_attention(paged, seed, device):
    rnd = random.Random(seed)
    batch, s_q, new, heads, kv_heads, dim, cap = 3, rnd.choice([1, 4]), rnd.choice([0, 2]), 4, 2, 80, 48
    dtype = DTYPES[seed % 2]
    causal, window, softcap = rnd.random() < 0.7, rnd.choice([(-1, -1), (10, 0)]), rnd.choice([0.0, 4.0])
    interleaved = seed % 2 == 0
    gen = torch.Generator().manual_seed(seed)
    seqlens = torch.tensor([5, 30, 17][:batch], dtype=torch.int32)
    q = _randn(batch, s_q, heads, dim, gen=gen, device=device, dtype=dtype)
    k_new = _randn(batch, new, kv_heads, dim, gen=gen, device=device, dtype=dtype) if new else None
    v_new = _randn(batch, new, kv_heads, dim, gen=gen, device=device, dtype=dtype) if new else None
    dense = _randn(batch, cap, kv_heads, dim, gen=gen, device=device, dtype=dtype)
    dense_v = _randn(batch, cap, kv_heads, dim, gen=gen, device=device, dtype=dtype)
    for b in range(batch):  # positions past a request's cache: never written, NaN
        dense[b, int(seqlens[b]):], dense_v[b, int(seqlens[b]):] = float("nan"), float("nan")
    cos_sin = torch.rand(cap, 16, generator=gen) * 6.28
    cos, sin = cos_sin.cos().to(device), cos_sin.sin().to(device)
    args = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved) if new else {}
    if paged:
        page = 16
        perm = torch.randperm(batch * cap // page, generator=gen)
        table = perm.view(batch, cap // page).to(torch.int32)
        k_cache = torch.empty(batch * cap // page, page, kv_heads, dim, dtype=dtype, device=device)
        v_cache = torch.empty_like(k_cache)
        for b in range(batch):
            for j in range(cap // page):
                k_cache[int(table[b, j])] = dense[b, j * page:(j + 1) * page]
                v_cache[int(table[b, j])] = dense_v[b, j * page:(j + 1) * page]
        args["block_table"] = table.to(device)
    else:
        k_cache, v_cache = dense.clone(), dense_v.clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens.to(device),
                                       causal=causal, window_size=window, softcap=softcap, return_softmax_lse=True,
                                       **args)
    # the reference: rotate, append, then plain varlen attention over each request's first seqlen + new keys
    pos = seqlens.long().to(device)[:, None] + torch.arange(max(new, s_q), device=device)[None]
    q_ref = q
    if new:
        k_rot = _rotary_reference(k_new, cos, sin, pos[:, :new], interleaved)
        q_pos = pos[:, :s_q] if causal or window != (-1, -1) else pos[:, :1].expand(batch, s_q)
        q_ref = _rotary_reference(q, cos, sin, q_pos, interleaved)
        for b in range(batch):
            dense[b, int(seqlens[b]):int(seqlens[b]) + new] = k_rot[b]
            dense_v[b, int(seqlens[b]):int(seqlens[b]) + new] = v_new[b]
    lens = [int(s) + new for s in seqlens]
    flat_k = torch.cat([dense[b, :n] for b, n in enumerate(lens)])
    flat_v = torch.cat([dense_v[b, :n] for b, n in enumerate(lens)])
    cu_q, cu_k = _cu([s_q] * batch, device), _cu(lens, device)
    _assert_fa_accuracy(out.reshape(-1, heads, dim), lse.transpose(0, 1).reshape(heads, -1),
                        q_ref.reshape(-1, heads, dim), flat_k, flat_v, cu_q, cu_k, causal=causal, window=window,
                        softcap=softcap)
    if new and not paged:  # the cache was updated in place, rotated keys included
        assert torch.equal(k_cache[0, 5:5 + new], dense[0, 5:5 + new])


def test_with_kvcache_batch_index_and_left_padding(device):
    gen = torch.Generator().manual_seed(11)
    k_cache = _randn(4, 32, 2, 64, gen=gen, device=device, dtype=torch.float16)
    v_cache = _randn(4, 32, 2, 64, gen=gen, device=device, dtype=torch.float16)
    q = _randn(2, 1, 4, 64, gen=gen, device=device, dtype=torch.float16)
    idx, pad = torch.tensor([3, 1], dtype=torch.int32), torch.tensor([4, 0], dtype=torch.int32)
    seqlens = torch.tensor([20, 9], dtype=torch.int32)
    k_cache[3, :4] = float("nan")  # left padding is never read
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens.to(device), causal=True,
                                  cache_batch_idx=idx.to(device), cache_leftpad=pad.to(device))
    flat_k = torch.cat([k_cache[3, 4:20], k_cache[1, :9]])
    flat_v = torch.cat([v_cache[3, 4:20], v_cache[1, :9]])
    ref = reference_varlen_attention(q.reshape(2, 4, 64), flat_k, flat_v, _cu([1, 1], device), _cu([16, 9], device))
    assert (out.reshape(2, 4, 64).float() - ref).abs().max() < 4e-3


def test_signatures_are_flash_attention_2s():
    """Same parameter names, order and defaults as flash_attn 2.8, so positional calls mean the same."""
    expected = {
        flash_attn_varlen_func: "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p=0.0 "
                                "softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 alibi_slopes=None "
                                "deterministic=False return_attn_probs=False block_table=None",
        flash_attn_func: "q k v dropout_p=0.0 softmax_scale=None causal=False window_size=(-1, -1) softcap=0.0 "
                         "alibi_slopes=None deterministic=False return_attn_probs=False",
        flash_attn_with_kvcache: "q k_cache v_cache k=None v=None rotary_cos=None rotary_sin=None cache_seqlens=None "
                                 "cache_batch_idx=None cache_leftpad=None block_table=None softmax_scale=None "
                                 "causal=False window_size=(-1, -1) softcap=0.0 rotary_interleaved=True "
                                 "alibi_slopes=None num_splits=0 return_softmax_lse=False",
    }
    for fn, text in expected.items():
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.KEYWORD_ONLY]
        got = " ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params)
        assert got == text, fn.__name__


def test_what_it_cannot_honour_is_a_named_error(device):
    q = torch.randn(4, 2, 64).half().to(device)
    cu = _cu([4], device)
    out = flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, 0.0)  # FA's positional call, dropout_p = 0.0
    ref = reference_varlen_attention(q, q, q, cu, cu, causal=False)  # FA's default: not causal
    assert (out.float() - ref).abs().max() < 4e-3
    cases = [
        (lambda: flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, 0.1), "dropout_p=0.1 is not supported"),
        (lambda: flash_attn_varlen_func(q.clone().requires_grad_(), q, q, cu, cu, 4, 4), "no backward pass"),
        (lambda: flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, window_size=(-3, 0)), "window_size entries"),
        (lambda: flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, softcap=-1.0), "softcap must be >= 0"),
        (lambda: flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, alibi_slopes=torch.ones(3, device=device)),
         r"alibi_slopes must have shape \(2,\) or \(1, 2\)"),
        (lambda: flash_attn_func(torch.randn(1, 4, 2, 320).half(), torch.randn(1, 4, 2, 320).half(),
                                 torch.randn(1, 4, 2, 320).half()), "head_dim 320 is not supported"),
        (lambda: flash_attn_with_kvcache(q[None], q[None], q[None], cache_seqlens=9), "must fit the cache"),
        (lambda: flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, seqused_k=torch.tensor([5], dtype=torch.int32)),
         "seqused_k"),
        (lambda: flash_attn_varlen_func(q, q[:3], q[:3], cu, cu, 4, 4, seqused_k=torch.tensor([3], dtype=torch.int32)),
         "holding cu_seqlens_k"),
        (lambda: flash_attn_varlen_func(q, q.view(1, 4, 2, 64), q.view(1, 4, 2, 64), cu, cu, 4, 4,
                                        block_table=torch.tensor([[1]], dtype=torch.int32, device=device)),
         r"block_table entries must be blocks 0..0"),
        (lambda: flash_attn_with_kvcache(q[None], q[None], q[None], cache_seqlens=2,
                                         rotary_cos=torch.ones(8, 16), rotary_sin=torch.zeros(8, 16)),
         "need the new k and v"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    empty_cache = flash_attn_with_kvcache(q[None], q[None], q[None], cache_seqlens=0, causal=True,
                                          return_softmax_lse=True)  # no key at all: zeros, lse +inf
    assert (empty_cache[0] == 0).all() and torch.isinf(empty_cache[1]).all()
    with torch.no_grad():  # grad mode off: inputs that require grad are fine
        flash_attn_varlen_func(q.clone().requires_grad_(), q, q, cu, cu, 4, 4)


def test_softcap_uses_the_gpus_tanh_except_under_the_interpreter(monkeypatch):
    """The GPU computes the cap's tanh with tanh.approx.f32 (as FlashAttention does), the interpreter (no PTX) and
    PACKINFER_EXACT_TANH=1 with exp2; a bound launch is specialised on which, so switching takes effect."""
    from packinfer.scoring import ScoreOptions
    from packinfer.triton_common import EXP2_TANH, HARDWARE_TANH, softcap_mode

    monkeypatch.delenv("PACKINFER_EXACT_TANH", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert softcap_mode(0.0) == 0 and softcap_mode(50.0) == EXP2_TANH
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.version.hip is None:
        assert softcap_mode(50.0) == HARDWARE_TANH
    hardware = ScoreOptions(softcap=50.0).key()
    monkeypatch.setenv("PACKINFER_EXACT_TANH", "1")
    assert softcap_mode(50.0) == EXP2_TANH and ScoreOptions(softcap=50.0).key() != hardware
