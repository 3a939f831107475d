"""The serving graphs' bookkeeping, on the CPU: a stand-in for CUDA graph capture that replays by running the
captured function again into the same output tensors exercises everything but the capture itself - padded
sizes, static inputs, K/V writes of padding rows to the scratch slot, packinfer's plans in fixed buffers (the
capture sees an empty plan), piecewise pieces with attention between them - and must give the eager outputs.
On a GPU (PACKINFER_TEST_GPU=1) the same replays run through real CUDA graphs and must equal eager ones."""

import os
import time

import numpy as np
import packinfer
import pytest
import torch
from test_serving import _trace

from packinfer_bench.backends import packinfer as packinfer_backend
from packinfer_bench.backends.packinfer import PackinferAttention, _view_like
from packinfer_bench.models import preset
from packinfer_bench.serving.graphs import Graphs, bucket
from packinfer_bench.serving.kv_follow import peak_tokens
from packinfer_bench.serving.model import Decoder
from packinfer_bench.serving.replay import cache_capacity, make_cache, prepare_graphs, replay
from packinfer_bench.serving.stage import _compare, scenario
from packinfer_bench.workload import Batch
from packinfer_bench.workload.continuous import ContinuousSpec

GPU = os.environ.get("PACKINFER_TEST_GPU") == "1"


class ReplayedByRunning(Graphs):
    """Graphs whose 'capture' keeps the function and whose replay runs it again into the captured outputs."""

    def _capture(self, fn):
        out = fn()

        def replay():
            new = fn()
            if out is not None:
                for a, b in zip(out, new):
                    a.copy_(b)
        return replay, out

    def _warm_up(self, fn):
        fn()


def _replays(device, graphs_cls, num_requests=8, prefixes=True, probe_every=0, attention=PackinferAttention,
             clock=time.perf_counter, eager=True):
    """(scenario, eager replay or None, graphed replay) of a small trace through the tiny model."""
    spec = ContinuousSpec(num_requests=None, max_num_batched_tokens=64, max_num_seqs=6, max_kv_tokens=260)
    scen = scenario(_trace(num_requests, prefixes), spec)
    model = Decoder(preset("tiny"), device, torch.float16)

    def run(graphs):
        attn = attention(model.device, model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim)
        if device == "cpu":
            attn._sms = 8  # the planner's SM count: a small capacity grid keeps the interpreter quick
        cache = make_cache(attn, model, cache_capacity(attn, peak_tokens(scen.schedule), spec.max_num_seqs))
        attn.configure(max_rows=64, max_seqs=6, max_kv_len=200, capacity_tokens=cache.capacity_tokens)
        if graphs is not None:
            assert prepare_graphs(graphs, scen.schedule, attn, cache) == ""
        cache = make_cache(attn, model, cache.capacity_tokens)
        return replay(model, scen.schedule, attn, cache, graphs=graphs, keep_outputs=len(scen.schedule),
                      probe_every=probe_every, clock=clock)

    eager_replay = run(None) if eager else None
    graphs = graphs_cls(model, 64, 6)
    return scen, eager_replay, run(graphs)


@pytest.mark.skipif(GPU, reason="the CPU stand-in for capture; on a GPU the real graphs are tested below")
@pytest.mark.parametrize("fuse_max_q, num_requests, prefixes", [(None, 8, True), (8, 16, True), (8, 8, False)],
                         ids=["default", "fusing-up-to-8-rows", "fresh-prompts-fused"])
def test_full_graph_bookkeeping_gives_the_eager_outputs_on_the_cpu(fuse_max_q, num_requests, prefixes,
                                                                   monkeypatch):
    """With a fusing threshold of 8 rows, two mixed iterations of 16 padded rows differ in graph key (one's
    launch stores the K/V, the other's does not): each key gets its own graph. Without shared prefixes, fresh
    prompts of more than 8 rows are graphs whose launch stores the K/V."""
    if fuse_max_q is not None:
        monkeypatch.setattr(packinfer_backend, "FUSE_MAX_Q", fuse_max_q)
    scen, eager, graphed = _replays("cpu", ReplayedByRunning, num_requests, prefixes)
    if not prefixes:
        assert any(it.launches_per_layer == 1 and b.q_lens.max() > 8 for b, it in zip(scen.schedule,
                                                                                       graphed.iterations))
    assert {it.graph for it in graphed.iterations} == {"full"}, "every iteration fits a captured size"
    assert {it.padded_rows for it in graphed.iterations} <= {bucket(n) for n in range(1, 65)}
    assert any(it.padded_rows > it.q_tokens for it in graphed.iterations), "some iterations are padded"
    err, match = _compare(graphed, eager)
    assert err < 2e-3 and match == 1.0


@pytest.mark.skipif(GPU, reason="the CPU stand-in for capture; on a GPU the real graphs are tested below")
def test_probing_full_graph_iterations_times_their_attention_and_changes_no_output():
    """Every third full-graph iteration runs its attention once more before the graph, on random q / k / v
    (whose K/V the graph then overwrites): it gets an attention time, the others stay NaN, and every output is
    bit for bit the unprobed replay's."""
    scen, _, plain = _replays("cpu", ReplayedByRunning, eager=False)
    _, _, probed = _replays("cpu", ReplayedByRunning, probe_every=3, eager=False)
    times = [it.attention_ms for it in probed.iterations if it.graph == "full"]
    assert len(times) == len(scen.schedule)
    assert np.isfinite(times[::3]).all() and min(times[::3]) > 0
    assert np.isnan([t for i, t in enumerate(times) if i % 3]).all()
    assert np.isnan([it.attention_ms for it in plain.iterations]).all()
    assert plain.hidden.keys() == probed.hidden.keys() == set(range(len(scen.schedule)))
    for i in plain.hidden:
        assert torch.equal(plain.hidden[i], probed.hidden[i]) and torch.equal(plain.tokens[i], probed.tokens[i])


class Ticking(PackinferAttention):
    """packinfer's attention on a made-up clock that advances 1 ms a call and stands still otherwise."""

    now = [0.0]

    def __call__(self, layer, q, k, v):
        Ticking.now[0] += 1e-3
        return super().__call__(layer, q, k, v)


@pytest.mark.skipif(GPU, reason="the CPU stand-in for capture; on a GPU the real graphs are tested below")
def test_a_probed_iteration_keeps_its_own_times_on_a_made_up_clock():
    """Only attention calls take time (1 ms each): every full-graph iteration lasts its layers' calls, probed or
    not (the probe's span is taken out of its iteration, host and launch times), and a probed iteration's
    attention time is the probe's calls."""
    layers = preset("tiny").num_layers
    _, _, graphed = _replays("cpu", ReplayedByRunning, probe_every=2, attention=Ticking, clock=lambda: Ticking.now[0],
                             eager=False)
    for i, it in enumerate(graphed.iterations):
        assert it.graph == "full"
        for ms in (it.iteration_ms, it.gpu_ms, it.host_ms, it.launch_ms):
            assert ms == pytest.approx(layers)
        assert it.attention_ms == pytest.approx(layers) if i % 2 == 0 else np.isnan(it.attention_ms)


@pytest.mark.skipif(not GPU, reason="needs a GPU (PACKINFER_TEST_GPU=1)")
@pytest.mark.parametrize("probe_every", [0, 2])
def test_cuda_graph_replays_equal_eager_replays(probe_every):
    scen, eager, graphed = _replays("cuda", Graphs, probe_every=probe_every)
    assert {it.graph for it in graphed.iterations} == {"full"}
    err, match = _compare(graphed, eager)
    assert err < 2e-3 and match == 1.0
    assert np.isfinite([it.gpu_ms for it in graphed.iterations]).all()
    probed = [it.attention_ms for it in graphed.iterations[::2]]
    assert (np.isfinite(probed).all() and min(probed) > 0) if probe_every else np.isnan(probed).all()


@pytest.mark.parametrize("slots", [16, 128])
def test_graph_capacity_holds_prompt_chunks_that_share_a_prefix_unsplit(slots):
    """Two 2048-row prompt chunks reading one shared prefix: every row is in two items' row blocks (the prefix's
    and its own tokens'), so the unsplit plan has twice the row blocks of the iteration, all within the capacity
    of the largest graph (the Mooncake replay at 2 req/s overflowed it at 128 slots)."""
    attn = PackinferAttention(torch.device("cpu"), 32, 8, 128)
    attn._sms = 132
    attn.configure(max_rows=4096, max_seqs=2, max_kv_len=8192, capacity_tokens=20000)
    batch = Batch("b", "t", "continuous", [2048, 2048], [6144, 6144], [0, 1], prefix_ids=[7, 7],
                  prefix_lens=[4096, 4096])
    view = _view_like(batch, 8, 128)
    assert (view.prefix_lens == 4096).all(), "the two requests read one stored prefix"
    max_items, max_partials = attn._capacity(slots)
    plan = packinfer.plan_cache_attention(view, batch.q_lens, 32, num_sms=132, slots=slots, split=False)
    assert plan.num_items > 4096 // (slots // 4), "more items than the iteration's row blocks"
    assert plan.num_items <= max_items and plan.num_partials <= max_partials
    capped = packinfer.plan_cache_attention(view, batch.q_lens, 32, num_sms=132, slots=slots,
                                            max_items=max_items, max_partials=max_partials)
    assert capped.num_items <= max_items
