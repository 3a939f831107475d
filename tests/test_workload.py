"""Workload replay: static samples and the continuous-batching scheduler produce the batches they promise."""

from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from packinfer_bench.errors import ConfigError
from packinfer_bench.traces import Trace, load_trace
from packinfer_bench.workload import Batch, ContinuousSpec, StaticSpec, StepTime, continuous_batches, static_batches


def _trace(prompts, outputs, arrivals=None, name="t"):
    df = pd.DataFrame({"prompt_len": prompts, "output_len": outputs})
    if arrivals is not None:
        df["arrival_s"] = arrivals
    return Trace(name=name, kind="test", requests=df, source="test", licence="n/a", tokenizer="n/a")


def test_static_prefill_decode_mixed_shapes():
    trace = load_trace("sharegpt")
    spec = StaticSpec(phases=["prefill", "decode", "mixed"], batch_sizes=[32, 64], batches_per_size=2,
                      decode_points=[0.0, 1.0], chunk_size=512, seed=1)
    batches = list(static_batches(trace, spec))
    assert len(batches) == 2 * 2 * (1 + 2 + 1)
    prompt = trace.requests.set_index("request_id")["prompt_len"]
    output = trace.requests.set_index("request_id")["output_len"]
    for b in batches:
        p, o = prompt[b.request_ids].to_numpy(), output[b.request_ids].to_numpy()
        if b.batch_id.endswith("prefill"):
            assert b.phase == "prefill" and (b.q_lens == p).all() and (b.kv_lens == p).all()
        elif "decode@0" in b.batch_id:
            assert b.phase == "decode" and (b.q_lens == 1).all() and (b.kv_lens == p + 1).all()
        elif "decode@1" in b.batch_id:
            assert (b.kv_lens == p + o).all()  # the last decode step processes token output-1
        else:
            decode = b.q_lens == 1
            assert (b.kv_lens[decode] > p[decode]).all() and (b.kv_lens[decode] <= p[decode] + o[decode]).all()
            chunks = ~decode | (p == 1)
            assert (b.q_lens <= 512).all() and (b.kv_lens[chunks] <= p[chunks]).all()
            assert ((b.kv_lens[~decode] - b.q_lens[~decode]) % 512 == 0).all()  # chunks start on chunk borders


def test_static_is_deterministic_per_seed():
    trace = load_trace("azure-conv")
    a = [b.to_record() for b in static_batches(trace, StaticSpec(seed=5))]
    b = [b.to_record() for b in static_batches(trace, StaticSpec(seed=5))]
    c = [b.to_record() for b in static_batches(trace, StaticSpec(seed=6))]
    assert a == b and a != c


def test_static_max_len_filters_and_reports():
    trace = _trace([10, 5000, 20], [5, 5, 5])
    batches = list(static_batches(trace, StaticSpec(phases=["prefill"], batch_sizes=[2], max_len=100)))
    assert sorted(batches[0].q_lens.tolist()) == [10, 20]
    with pytest.raises(ConfigError, match="max_len=4 leaves no request"):
        list(static_batches(trace, StaticSpec(max_len=4)))


def test_batch_accounting():
    b = Batch(batch_id="x", trace="t", workload="static", q_lens=[3, 1, 2], kv_lens=[3, 5, 6], request_ids=[0, 1, 2],
              prefix_ids=[7, 7, -1], prefix_lens=[2, 4, 0])
    assert b.request_phases.tolist() == ["prefill", "decode", "append"] and b.phase == "mixed"
    # causal bottom-right: prefill 3 -> 1+2+3; decode over 5 keys -> 5; append 2 over 6 -> 5+6
    assert b.causal_pairs() == 6 + 5 + 11
    assert b.dedup_kv_tokens() == 2  # group 7 shares at least 2 tokens, read once instead of twice
    cu_q, cu_k = b.cu_seqlens()
    assert cu_q.tolist() == [0, 3, 4, 6] and cu_k.tolist() == [0, 3, 8, 14] and cu_q.dtype == np.int32
    assert Batch.from_record(b.to_record()).to_record() == b.to_record()
    with pytest.raises(ValueError, match="1 <= q_len <= kv_len"):
        Batch(batch_id="x", trace="t", workload="s", q_lens=[4], kv_lens=[3], request_ids=[0])


def _replay(trace, **kw):
    return list(continuous_batches(trace, ContinuousSpec(num_requests=None, **kw)))


@pytest.mark.parametrize("chunked", [True, False])
def test_continuous_processes_every_token_once_within_limits(chunked):
    trace = load_trace(None, "synthetic", num_requests=60, prompt={"dist": "lognormal", "median": 300, "sigma": 1.0,
                                                                    "max": 2000},
                       output={"dist": "uniform", "low": 1, "high": 40}, rate=50.0, seed=2)
    batches = _replay(trace, max_num_seqs=16, max_num_batched_tokens=2048, chunked_prefill=chunked)
    per_request = defaultdict(int)
    last_kv = {}
    arrival = trace.requests.set_index("request_id")["arrival_s"]
    for i, b in enumerate(batches):
        assert b.iteration == i
        assert len(b) <= 16 and b.q_lens.sum() <= 2048
        assert len(set(b.request_ids.tolist())) == len(b)
        if not chunked:
            assert b.phase in ("prefill", "decode")  # vLLM v0: prefill and decode iterations never mix
        for rid, q, kv in zip(b.request_ids, b.q_lens, b.kv_lens):
            assert arrival[rid] <= b.time_s + 1e-12  # nothing runs before it arrives
            assert kv - q == last_kv.get(rid, 0)  # keys continue where the request left off
            last_kv[rid] = kv
            per_request[rid] += q
    expected = (trace.requests["prompt_len"] + trace.requests["output_len"] - 1).to_numpy()
    assert [per_request[r] for r in range(len(trace))] == expected.tolist()
    assert np.all(np.diff([b.time_s for b in batches]) > 0)


def test_continuous_chunked_prefill_splits_long_prompts_and_decodes_first():
    trace = _trace([10, 5000], [6, 4], arrivals=[0.0, 0.0])
    batches = _replay(trace, max_num_batched_tokens=1024, chunked_prefill=True)
    assert batches[0].q_lens.tolist() == [10, 1014] and batches[0].kv_lens.tolist() == [10, 1014]
    for b in batches[1:4]:  # the short request decodes first, the long prompt takes the rest of the budget
        assert b.request_ids.tolist() == [0, 1] and b.q_lens[0] == 1 and b.q_lens.sum() == 1024
        assert b.request_phases.tolist() == ["decode", "append"]
    assert batches[4].q_lens.tolist() == [1, 5000 - 1014 - 3 * 1023] and batches[5].q_lens.tolist() == [1, 1]


def test_continuous_kv_budget_preempts_and_recomputes():
    trace = _trace([100, 100, 100], [50, 50, 50], arrivals=[0.0, 0.0, 0.0])
    batches = _replay(trace, max_kv_tokens=320, max_num_batched_tokens=1000)
    assert all(b.kv_lens.sum() <= 320 for b in batches)
    preempted = [b for b in batches for rid, q, kv in zip(b.request_ids, b.q_lens, b.kv_lens) if q > 1 and kv > 100]
    assert preempted, "a preempted request recomputes prompt + generated tokens"
    finished = {rid: 0 for rid in range(3)}
    for b in batches:
        for rid, kv in zip(b.request_ids, b.kv_lens):
            finished[rid] = max(finished[rid], kv)
    assert finished == {0: 149, 1: 149, 2: 149}


def test_continuous_arrivals_scale_and_poisson_are_deterministic():
    azure = load_trace("azure-conv")
    a = list(continuous_batches(azure, ContinuousSpec(num_requests=20, time_scale=0.1, max_iterations=40)))
    b = list(continuous_batches(azure, ContinuousSpec(num_requests=20, time_scale=0.1, max_iterations=40)))
    assert [x.to_record() for x in a] == [x.to_record() for x in b] and len(a) == 40
    sharegpt = load_trace("sharegpt")
    with pytest.raises(ConfigError, match="no timestamps: use arrivals: poisson"):
        next(continuous_batches(sharegpt, ContinuousSpec()))
    p1 = list(continuous_batches(sharegpt, ContinuousSpec(arrivals="poisson", rate=4.0, num_requests=30, seed=1)))
    p2 = list(continuous_batches(sharegpt, ContinuousSpec(arrivals="poisson", rate=4.0, num_requests=30, seed=2)))
    assert [x.time_s for x in p1] != [x.time_s for x in p2]


def test_step_time_model():
    assert StepTime(base_ms=1.0, per_token_us=2.0, per_kv_token_ns=3.0).seconds(1000, 10**6) == pytest.approx(
        1e-3 + 2e-3 + 3e-3)


def test_continuous_spec_validation():
    with pytest.raises(ConfigError, match="rate: must be > 0"):
        ContinuousSpec(arrivals="poisson")
    with pytest.raises(ConfigError, match="arrivals: 'closed' not allowed"):
        ContinuousSpec(arrivals="closed")


def test_continuous_every_samples_iterations_of_the_same_schedule():
    trace = load_trace("azure-conv")
    spec = dict(num_requests=30, time_scale=0.05, max_iterations=60)
    every_batch = list(continuous_batches(trace, ContinuousSpec(**spec)))
    sampled = list(continuous_batches(trace, ContinuousSpec(**spec, every=7)))
    assert [b.iteration for b in sampled] == list(range(0, 60, 7))
    assert [b.to_record() for b in sampled] == [b.to_record() for b in every_batch[::7]]
    with pytest.raises(ConfigError, match=r"every: 0 not allowed; allowed: 1\.\."):
        ContinuousSpec(every=0)
