"""A KV cache kept in step with a continuous-batching replay: every iteration, each scheduled request holds exactly
the tokens the schedule says it has computed, byte for byte, in both layouts, across arrivals, growth,
preemption, shared prefixes and re-layouts."""

import pytest
import torch
from packinfer import make_cache

from packinfer_bench.serving.kv_follow import CacheFollower, peak_tokens, sequence_kv
from packinfer_bench.traces.synthetic import load as synthetic
from packinfer_bench.workload import Batch
from packinfer_bench.workload.continuous import ContinuousSpec, continuous_batches

HKV, D = 2, 16


def _replay(**spec):
    trace = synthetic(name="t", num_requests=24, prompt={"dist": "uniform", "low": 3, "high": 40},
                      output={"dist": "uniform", "low": 1, "high": 30}, rate=200.0,
                      prefix={"groups": 3, "length": 12}, seed=1)
    return list(continuous_batches(trace, ContinuousSpec(num_requests=None, max_num_batched_tokens=48,
                                                         max_num_seqs=8, **spec)))


def _expected(rid, kv, prefix_len):
    """What the request should read back: its prefix's tokens (shared copy) then its own."""
    if prefix_len:
        pk, pv = sequence_kv(-1 - prefix_len[0], 0, prefix_len[1], HKV, D, torch.float16, torch.device("cpu"))
        ok, ov = sequence_kv(rid, prefix_len[1], kv - prefix_len[1], HKV, D, torch.float16, torch.device("cpu"))
        return torch.cat([pk, ok]), torch.cat([pv, ov])
    return sequence_kv(rid, 0, kv, HKV, D, torch.float16, torch.device("cpu"))


@pytest.mark.parametrize("layout", ["grouped", "paged"])
@pytest.mark.parametrize("kv_budget", [None, 120])
def test_every_scheduled_request_reads_back_exactly_its_computed_tokens(layout, kv_budget):
    batches = _replay(max_kv_tokens=kv_budget)
    if kv_budget:  # the budget forces preemptions: some request restarts from scratch
        restarts = [b for b in batches[1:] if ((b.q_lens == b.kv_lens) & (b.kv_lens > 1)).any()]
        assert restarts
    capacity = peak_tokens(batches) + 8 * 16 * 2
    cache = make_cache(layout, capacity, HKV, D, dtype=torch.float16, headroom=4)
    follow = CacheFollower(cache, batches)
    relayouts = relocations = 0
    for i, b in enumerate(batches):
        cost = follow.step(i, b)
        relayouts, relocations = relayouts + cost.relayouts, relocations + cost.relocations
        for rid, kv, pid in zip(b.request_ids.tolist(), b.kv_lens.tolist(), b.prefix_ids.tolist()):
            assert cache.length(rid) == kv
            plen = follow.prefix_len.get(pid, 0)
            shared = (pid, plen) if cache.view([rid]).prefix_lens[0] else None
            k, v = cache.read(rid)
            ek, ev = _expected(rid, kv, shared)
            assert torch.equal(k, ek) and torch.equal(v, ev), (i, rid)
        follow.retire(i, b)
    assert not cache.request_ids  # everything finished and freed
    assert cache.stats().live_bytes == 0
    if layout == "grouped":
        assert (relayouts, relocations) == (cache.relayouts, cache.relocations)
        assert cache.relocations > 0 and cache.moved_bytes > 0  # growing requests moved


def test_requests_of_a_prefix_group_share_one_copy():
    batches = _replay()
    cache = make_cache("grouped", peak_tokens(batches) + 256, HKV, D, dtype=torch.float16, headroom=4)
    follow = CacheFollower(cache, batches)
    shared_seen = False
    for i, b in enumerate(batches):
        follow.step(i, b)
        view = cache.view(b.request_ids.tolist())
        shared_seen |= bool((view.prefix_lens > 0).sum() >= 2)
        live = cache.stats().live_bytes // cache.token_bytes
        assert live <= int(b.kv_lens.sum())  # never more than each request's own copy
        follow.retire(i, b)
    assert shared_seen


def test_a_schedule_that_disagrees_with_the_cache_is_named():
    first = Batch("t/it0", "t", "continuous", q_lens=[5, 3], kv_lens=[5, 3], request_ids=[7, 8])
    skipped = Batch("t/it2", "t", "continuous", q_lens=[1, 1], kv_lens=[7, 4], request_ids=[7, 8])
    cache = make_cache("paged", 64, HKV, D, dtype=torch.float16)
    follow = CacheFollower(cache, [first, skipped])
    follow.step(0, first)
    with pytest.raises(ValueError, match="request 7 holds 5 tokens, the schedule says 6"):
        follow.step(1, skipped)
