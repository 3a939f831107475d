"""End-to-end serving replay: the model with packinfer attention matches the reference attention over a whole
replay (prefix groups, chunked prefill, preemption under a KV budget), the latency arithmetic is right on a
made-up clock, and a replay that outgrows its KV cache ends in an error record that keeps what was measured."""

import dataclasses
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO

from packinfer_bench.backends import packinfer as packinfer_backend
from packinfer_bench.backends.base import iteration_kind
from packinfer_bench.backends.packinfer import PackinferAttention, fuses
from packinfer_bench.config import load_config
from packinfer_bench.errors import ConfigError
from packinfer_bench.experiment import run_experiment
from packinfer_bench.models import PRESETS, preset
from packinfer_bench.reference import ReferenceAttention
from packinfer_bench.serving.kv_follow import peak_tokens
from packinfer_bench.serving.metrics import request_latencies, summarize, timeline
from packinfer_bench.serving.model import Decoder
from packinfer_bench.serving.replay import cache_capacity, make_cache, replay
from packinfer_bench.serving.stage import _compare, fit_step_time, scenario
from packinfer_bench.traces.synthetic import load as synthetic
from packinfer_bench.workload import Batch
from packinfer_bench.workload.continuous import ContinuousSpec

# every replay here runs a model on the CPU, whose kernels need the Triton interpreter (off with PACKINFER_TEST_GPU=1)
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU replays: the kernels need TRITON_INTERPRET=1")


def _trace(num_requests=10, prefixes=True):
    return synthetic(name="t", num_requests=num_requests, prompt={"dist": "uniform", "low": 3, "high": 60},
                     output={"dist": "uniform", "low": 1, "high": 6}, rate=100.0,
                     prefix={"groups": 2, "length": 20} if prefixes else None, seed=1)


def _run(model, scen, attention_cls, keep):
    attn = attention_cls(model.device, model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim)
    cache = make_cache(attn, model, cache_capacity(attn, peak_tokens(scen.schedule), scen.spec.max_num_seqs))
    return replay(model, scen.schedule, attn, cache, keep_outputs=keep)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packinfer_attention_reproduces_the_reference_model_outputs_over_a_whole_replay(dtype):
    spec = ContinuousSpec(num_requests=None, max_num_batched_tokens=64, max_num_seqs=6, max_kv_tokens=200)
    scen = scenario(_trace(), spec)
    kinds = {b.phase for b in scen.schedule}
    restarts = [b for b in scen.schedule[1:] if ((b.q_lens == b.kv_lens) & (b.kv_lens > 1)).any()]
    assert kinds == {"prefill", "decode", "mixed"} and restarts  # chunked prefill, decode, and a preemption
    assert any(len(g[1]) for b in scen.schedule for g in b.shared_prefixes())  # a prefix group reads one copy
    model = Decoder(preset("tiny"), "cpu", dtype)
    n = len(scen.schedule)
    ref = _run(model, scen, ReferenceAttention, n)
    got = _run(model, scen, PackinferAttention, n)
    err, match = _compare(got, ref)
    bf16 = dtype == torch.bfloat16
    # greedy tokens may flip where two logits tie within bf16's precision (here: 1 of 31)
    assert err < (1e-2 if bf16 else 2e-3) and match >= (0.9 if bf16 else 1.0)
    assert sum(len(h) for h in got.hidden.values()) == sum(int(b.sampled.sum()) for b in scen.schedule)
    assert [it.q_tokens for it in got.iterations] == [int(b.q_lens.sum()) for b in scen.schedule]
    # iterations of short rows store their K/V in the attention launch (later iterations read it from the cache);
    # rows that may be positions of a shared prefix (not past their request's prefix) can keep the two writes
    launches = [it.launches_per_layer for it in got.iterations]
    for n, b in zip(launches, scen.schedule):
        past_prefix = (b.kv_lens - b.q_lens >= b.prefix_lens).all()
        assert n == 1 if past_prefix and fuses(b) else n in (1, 3), (iteration_kind(b), n)
    assert any(n == 1 for n, b in zip(launches, scen.schedule) if iteration_kind(b) != "decode")


def test_fresh_prompts_past_the_fusing_threshold_store_their_kv_in_the_launch_and_match_the_reference(monkeypatch):
    """No shared prefixes, the threshold at 8 rows: iterations of fresh prompts only are one launch per layer
    whatever their length, other iterations with longer rows three, and the outputs are the reference model's."""
    monkeypatch.setattr(packinfer_backend, "FUSE_MAX_Q", 8)
    spec = ContinuousSpec(num_requests=None, max_num_batched_tokens=64, max_num_seqs=6, max_kv_tokens=200)
    scen = scenario(_trace(prefixes=False), spec)
    model = Decoder(preset("tiny"), "cpu", torch.float16)
    n = len(scen.schedule)
    ref = _run(model, scen, ReferenceAttention, n)
    got = _run(model, scen, PackinferAttention, n)
    err, match = _compare(got, ref)
    assert err < 2e-3 and match == 1.0
    long = [(bool((b.q_lens == b.kv_lens).all()), it.launches_per_layer)
            for b, it in zip(scen.schedule, got.iterations) if b.q_lens.max() > 8]
    assert {k for fresh, k in long if fresh} == {1} and {k for fresh, k in long if not fresh} == {3}


def test_an_iteration_stores_its_kv_in_the_attention_launch_if_its_rows_are_few_or_all_fresh_prompts():
    def batch(q, kv):
        return Batch("b", "t", "c", q, kv, list(range(len(q))))

    assert fuses(batch([1, 1], [40, 900])) and fuses(batch([256, 1], [600, 40]))  # decode rows, a short chunk
    assert fuses(batch([374], [374])) and fuses(batch([300, 6758], [300, 6758]))  # fresh prompts, any length
    assert not fuses(batch([1140, 1], [1140, 800]))  # a long prompt among decode rows
    assert not fuses(batch([2377], [5954]))  # a long chunk of a prompt begun earlier
    assert not fuses(batch([1], [40]), fuse_max_q=0) and not fuses(batch([374], [374]), fuse_max_q=0)  # "unfused"


def test_latency_arithmetic_on_a_made_up_clock():
    # request 1 arrives at 0 (prompt 4 in two chunks, 3 tokens out); request 2 arrives at 2.5 s (prompt 2, 2 out)
    schedule = [Batch("a", "t", "c", [2], [2], [1], sampled=[False]),
                Batch("b", "t", "c", [2], [4], [1], sampled=[True]),
                Batch("c", "t", "c", [1, 2], [5, 2], [1, 2], sampled=[True, True]),
                Batch("d", "t", "c", [1, 1], [6, 3], [1, 2], sampled=[True, True])]
    arrivals = {1: 0.0, 2: 2.5}
    ends, sent = timeline(schedule, arrivals, [1.0, 1.0, 0.5, 0.25])
    assert ends.tolist() == [1.0, 2.0, 3.0, 3.25]  # iteration 3 waits for request 2 to arrive at 2.5
    assert sent == arrivals
    req = request_latencies(schedule, sent, ends).set_index("request_id")
    assert req.loc[1, ["ttft_s", "e2e_s", "output_tokens"]].tolist() == [2.0, 3.25, 3]
    assert req.loc[1, "tpot_s"] == pytest.approx((3.25 - 2.0) / 2)
    assert req.loc[2, ["ttft_s", "tpot_s", "e2e_s"]].tolist() == [0.5, 0.25, 0.75]
    out = summarize(req.reset_index(), [1.0, 1.0, 0.5, 0.25], {1: 3, 2: 2})
    assert out["finished"] == 2 and out["unfinished"] == 0
    assert out["e2e_ms_mean"] == pytest.approx(2000.0) and out["ttft_ms_p50"] == pytest.approx(1250.0)
    assert out["throughput_tok_s"] == pytest.approx(5 / 3.25) and out["busy_tok_s"] == pytest.approx(5 / 2.75)
    short = summarize(req.reset_index(), [1.0] * 4, {1: 4, 2: 2})  # request 1 should have made 4 tokens
    assert short["finished"] == 1 and short["e2e_ms_mean"] == pytest.approx(750.0)


def test_the_step_time_fit_keeps_small_iterations_right_beside_long_prefills():
    """Iteration time is not linear: a prefill's attention grows with its length squared. Fitted to ~10 ms decode
    steps and prefills of up to 8k tokens (~120 ms) alike, the linear model must keep the decode steps - most of
    a schedule - within a few percent (a least-squares fit in ms paced the smallest 40% fast: 4.4 ms base); an
    exact linear model is recovered exactly."""
    curved = lambda q, kv: 9.0 + 0.020 * q + 5e-5 * kv + 1.2e-6 * q * q  # noqa: E731 -- ms
    decode = [{"q_tokens": q, "kv_tokens": kv, "ms": curved(q, kv)} for q, kv in [(8, 8200), (32, 32800), (64, 65600)]]
    prefill = [{"q_tokens": t, "kv_tokens": t, "ms": curved(t, t)} for t in (256, 1024, 4096, 8192)]
    fit = fit_step_time(decode * 6 + prefill * 3)
    for p in decode:
        assert fit.seconds(p["q_tokens"], p["kv_tokens"]) * 1e3 == pytest.approx(p["ms"], rel=0.04)
    linear = lambda q, kv: 9.0 + 0.026 * q + 5e-5 * kv  # noqa: E731
    exact = fit_step_time([{"q_tokens": q, "kv_tokens": kv, "ms": linear(q, kv)} for q, kv in
                           [(8, 100), (300, 300), (8, 50000), (2048, 9000)]])
    assert (exact.base_ms, exact.per_token_us, exact.per_kv_token_ns) == pytest.approx((9.0, 26.0, 50.0))


def test_presets_have_the_published_sizes_and_layers_can_be_limited():
    assert PRESETS["llama-3.1-8b"].params == pytest.approx(8.03e9, rel=1e-3)
    assert PRESETS["llama-2-13b"].params == pytest.approx(13.0e9, rel=2e-3)
    cut = preset("llama-3.1-8b", 8)
    assert (cut.num_layers, cut.full_layers, cut.hidden) == (8, 32, 4096)
    with pytest.raises(ConfigError, match=r"model: 'llama-9b' not allowed; allowed: \["):
        preset("llama-9b")
    with pytest.raises(ConfigError, match=r"num_layers: 40 not allowed for mistral-7b; allowed: 1..32"):
        preset("mistral-7b", 40)


E2E = """
name: e
device: cpu
traces:
  - {name: t, kind: synthetic, options: {num_requests: 6, rate: 50.0, seed: 2,
     prompt: {dist: uniform, low: 3, high: 40}, output: {dist: constant, value: 3}}}
e2e:
  - name: tiny
    model: tiny
    traces: [t]
    rates: [RATE]
    continuous: {num_requests: null, max_num_seqs: 4, max_num_batched_tokens: 48, max_kv_tokens: BUDGET}
    backends: [fa2, packinfer]
    verify_iterations: 3
    repeats: 1
"""


def test_an_e2e_experiment_writes_summary_requests_and_iterations_and_resumes(write, tmp_path):
    cfg = load_config(write("e.yaml", E2E.replace("RATE", "40.0").replace("BUDGET", "null")))
    out = tmp_path / "run"
    run_experiment(cfg, out, log=lambda _: None)
    summary = pd.read_csv(out / "e2e" / "summary.csv")
    assert summary.set_index("backend")["status"].to_dict() == {"fa2": "skipped", "packinfer": "ok"}
    row = summary.set_index("backend").loc["packinfer"]
    assert (row["finished"], row["unfinished"], row["refused"], row["rate"]) == (6, 0, 0, 40)
    assert row["max_rel_err"] < 1e-2 and row["token_match"] == 1.0 and row["kv_layout"] == "grouped"
    requests = pd.read_csv(out / "e2e" / "requests.csv")
    assert len(requests) == 6 and (requests["output_tokens"] == 3).all()
    assert row["e2e_ms_mean"] == pytest.approx(1e3 * requests["e2e_s"].mean())
    iterations = pd.read_csv(out / "e2e" / "iterations.csv")
    assert len(iterations) == row["iterations"] and (iterations["attention_ms"] < iterations["iteration_ms"]).all()
    run_experiment(cfg, out, resume=True, log=lambda _: None)  # nothing left to do
    assert len(pd.read_csv(out / "e2e" / "summary.csv")) == 2
    lines: list[str] = []
    run_experiment(cfg, out, dry_run=True, resume=True, log=lines.append)  # the preview counts what is stored
    assert "; 2 of 2 replays stored" in "\n".join(lines) and lines[-1].endswith("0.0 left to run")


def test_a_replay_skipped_for_a_missing_backend_runs_when_a_later_session_has_it(write, tmp_path, monkeypatch):
    """A run cut into pieces on machines with different baselines installed: what one piece skipped because
    the backend was missing, a later piece with the backend measures; the later row is the replay's."""
    from packinfer_bench.backends import BACKENDS
    from packinfer_bench.report.e2e_tables import load_e2e
    from packinfer_bench.run_folder.e2e import E2EStore
    from packinfer_bench.serving.stage import replays_left

    cfg = load_config(write("e.yaml", E2E.replace("RATE", "40.0").replace("BUDGET", "null")))
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setitem(BACKENDS, "packinfer", dataclasses.replace(BACKENDS["packinfer"],
                                                            available=lambda device: "packinfer is not installed"))
        run_experiment(cfg, out, log=lambda _: None)
        assert replays_left(cfg, out, torch.device("cpu")) == 0  # nothing more can run here
    assert replays_left(cfg, out, torch.device("cpu")) == 1  # packinfer is back
    run_experiment(cfg, out, resume=True, log=lambda _: None)
    rows = pd.read_csv(out / "e2e" / "summary.csv")
    assert rows[rows["backend"] == "packinfer"]["status"].tolist() == ["skipped", "ok"]  # append-only
    latest = {(r["backend"], r["status"]) for r in E2EStore(out, writer=False).summaries()}
    assert latest == {("fa2", "skipped"), ("packinfer", "ok")} and replays_left(cfg, out, torch.device("cpu")) == 0
    summary, requests = load_e2e(out)
    assert summary.set_index("backend")["status"].to_dict() == {"fa2": "skipped", "packinfer": "ok"}
    assert len(requests) == 6
    run_experiment(cfg, out, resume=True, log=lambda _: None)  # fa2 is still missing: nothing runs again
    assert len(pd.read_csv(out / "e2e" / "summary.csv")) == 3


def test_a_request_larger_than_the_kv_budget_is_refused_and_a_full_cache_is_an_error_record(write, tmp_path,
                                                                                              monkeypatch):
    cfg = load_config(write("e.yaml", E2E.replace("RATE", "40.0").replace("BUDGET", "30")))
    scen = scenario(_load_t(cfg), cfg.e2e[0].continuous)
    assert scen.refused > 0  # prompt + output over 30 tokens: never scheduled, reported as refused
    # a cache smaller than the schedule needs: the replay stops with a message, its iterations are kept
    monkeypatch.setattr("packinfer_bench.serving.stage.cache_capacity",
                        lambda attn, budget, seqs: 120 if attn.name == "packinfer" else 4096)
    out = tmp_path / "run"
    run_experiment(cfg, out, log=lambda _: None)
    row = pd.read_csv(out / "e2e" / "summary.csv").set_index("backend").loc["packinfer"]
    assert row["status"] == "error" and "KV cache full at iteration" in row["reason"] and "budget 30" in row["reason"]
    assert row["iterations"] > 0 and len(pd.read_csv(out / "e2e" / "iterations.csv")) == row["iterations"]


def test_a_dry_run_shows_each_load_points_schedule_and_what_the_replays_will_take(write, tmp_path):
    """Before any GPU time: the schedules, their modelled minutes by the step-time model the run will use (a
    stored calibration wins over the config's), and the KV cache memory."""
    cfg = load_config(write("e.yaml", E2E.replace("RATE", "40.0").replace("BUDGET", "600")))
    out, lines = tmp_path / "run", []
    run_experiment(cfg, out, dry_run=True, log=lines.append)
    text = "\n".join(lines)
    scen = scenario(_load_t(cfg), dataclasses.replace(cfg.e2e[0].continuous, arrivals="poisson", rate=40.0))
    assert f"load 40: 6 requests (0 refused), {len(scen.schedule)} iterations, {scen.modelled_s:.1f} s modelled" in text
    assert "the config's; a GPU run calibrates first" in text and "minutes of modelled replays in all" in text
    assert "(1263 tokens, the grouped layout's room for a 600-token budget)" in text  # 600 + 600 // 4 + 2 x 64 x 4 + 1
    assert not (out / "e2e" / "summary.csv").exists() and "replays stored" not in text  # nothing replayed
    assert f"{2 * scen.modelled_s / 60:.1f} left to run" in text  # two backends, one repeat
    (out / "e2e").mkdir()
    (out / "e2e" / "step_time.json").write_text(json.dumps(
        {"tiny": {"step_time": {"base_ms": 50.0, "per_token_us": 0.0, "per_kv_token_ns": 0.0}}}))
    lines.clear()
    run_experiment(cfg, out, dry_run=True, resume=True, log=lines.append)
    assert "50 ms + 0 us/token + 0 ns/KV token (calibrated, stored)" in "\n".join(lines)


def _load_t(cfg):
    from packinfer_bench.experiment import load_traces

    return load_traces(cfg.traces)["t"]


@pytest.mark.parametrize("old, new, message", [
    ("model: tiny", "model: gpt-5", r"e2e\[0\]: model: 'gpt-5' not allowed"),
    ("backends: [fa2, packinfer]", "backends: [fa9]", r"unknown end-to-end backend\(s\) \['fa9'\]; allowed: \["),
    ("rates: [RATE]", "rates: [0]", r"rates: every rate must be > 0"),
    ("traces: [t]\n", "traces: [u]\n", r"e2e\[0\].traces: unknown trace\(s\) \['u'\]"),
])
def test_bad_e2e_sections_name_the_key(write, old, new, message):
    text = E2E.replace("RATE", "4.0").replace("BUDGET", "null")
    assert old.replace("RATE", "4.0") in text
    with pytest.raises(ConfigError, match=message):
        load_config(write("e.yaml", text.replace(old.replace("RATE", "4.0"), new)))


@pytest.mark.parametrize("name", ["h100.yaml", "e2e-h200.yaml"])
def test_the_shipped_end_to_end_matrix(name):
    """The standard matrix: three traces at a moderate rate and one near saturation, a sweep of five rates,
    every peer, repeats, 256 requests (64 for Mooncake's 12k-token prompts)."""
    cfg = load_config(REPO / "experiments" / name)
    by_trace = {cfg.traces_of(e)[0].name: e for e in cfg.e2e}
    assert set(by_trace) == {"sharegpt", "azure-conv", "mooncake-conv"}
    for trace, entry in by_trace.items():
        assert entry.model == "llama-3.1-8b" and set(entry.backends) == {"fa2", "fa3", "flashinfer", "packinfer"}
        assert entry.repeats >= 2 and len(entry.rates) >= 2 and np.isfinite(entry.rates).all()
        assert entry.continuous.num_requests == (64 if trace == "mooncake-conv" else 256)
        assert not math.isnan(float(entry.continuous.max_kv_tokens))
    assert len(by_trace["azure-conv"].rates) >= 5


def test_servers_share_one_kv_pool_and_a_server_made_anew_captures_its_graphs_again(write, tmp_path, monkeypatch):
    """The backends' servers keep their caches in one allocation (one replays at a time), so four 200k-token
    caches need the memory of one. When a backend needs more than the pool holds, the servers over it go, their
    memory is really free (no reference left anywhere) before the larger pool is allocated, and a server made
    anew is prepared (its graphs captured) again."""
    import weakref

    from packinfer_bench.serving import stage

    made: list[tuple[str, int]] = []  # (backend, address of its K pool)
    real_make_cache, real_grow, real_prepare = stage.make_cache, stage.KVPool.grow, stage.Server.prepare

    def tracked_make_cache(attention, model, capacity, pools=None):
        cache = real_make_cache(attention, model, capacity, pools=pools)
        made.append((attention.name, cache.k_pools.untyped_storage().data_ptr()))
        return cache

    def checked_grow(pool, tokens):
        old = [weakref.ref(t) for t in pool.flat or ()]
        real_grow(pool, tokens)
        assert all(r() is None for r in old), "the old pool's memory is still referenced"

    prepared: list[str] = []
    real_capacity = stage.cache_capacity  # packinfer's cache a page larger than the reference's (same layout)
    monkeypatch.setattr(stage, "cache_capacity", lambda attn, budget, seqs: real_capacity(attn, budget, seqs)
                        + 16 * (attn.name == "packinfer"))
    monkeypatch.setattr(stage, "make_cache", tracked_make_cache)
    monkeypatch.setattr(stage.KVPool, "grow", checked_grow)
    monkeypatch.setattr(stage.Server, "prepare", lambda self, *a: prepared.append(self.attention.name)
                        or real_prepare(self, *a))
    text = E2E.replace("RATE", "40.0").replace("BUDGET", "null").replace("backends: [fa2, packinfer]",
                                                                        "backends: [reference, packinfer]")
    out = tmp_path / "run"
    run_experiment(load_config(write("e.yaml", text.replace("repeats: 1", "repeats: 2"))), out, log=lambda _: None)
    rows = pd.read_csv(out / "e2e" / "summary.csv")
    assert (rows["status"] == "ok").all() and len(rows) == 4, rows[["backend", "repeat", "status", "reason"]]
    # the verification's float32 run has a cache of its own; then the reference's server, packinfer's (its cache
    # is larger: the pool grows and the reference's server goes) and the reference's again, over the same pool
    names = [name for name, _ in made]
    assert names == ["reference", "reference", "packinfer", "reference"] and prepared == names[1:]
    assert made[2][1] == made[3][1]


def test_a_replay_that_fails_or_refuses_everything_leaves_its_rows_and_the_next_replay_runs(write, tmp_path,
                                                                                             monkeypatch):
    text = E2E.replace("rates: [RATE]", "rates: [20.0, 30.0, 40.0]").replace("BUDGET", "null")
    cfg = load_config(write("e.yaml", text))
    real = scenario

    def flaky(trace, spec):
        if spec.rate == 20.0:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
        if spec.rate == 30.0:  # every request larger than the scheduler's limits
            return dataclasses.replace(real(trace, spec), schedule=[], arrivals={}, expected={}, refused=6)
        return real(trace, spec)

    monkeypatch.setattr("packinfer_bench.serving.stage.scenario", flaky)
    out = tmp_path / "run"
    run_experiment(cfg, out, log=lambda _: None)
    rows = pd.read_csv(out / "e2e" / "summary.csv", keep_default_na=False, dtype={"rate": str})
    status = {(r["rate"], r["backend"]): r["status"] for _, r in rows.iterrows()}
    assert status == {("20", "fa2"): "error", ("20", "packinfer"): "error", ("30", "fa2"): "refused",
                      ("30", "packinfer"): "refused", ("40", "fa2"): "skipped", ("40", "packinfer"): "ok"}
    assert "OutOfMemoryError" in rows[rows["rate"] == "20"]["reason"].iloc[0]
    assert "refused all 6 requests" in rows[rows["rate"] == "30"]["reason"].iloc[0]
