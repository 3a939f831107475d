"""The end-to-end method (issue 15) on made-up clocks and tiny replays: inter-token latency, goodput and the
sustained rate; the closed-loop client's dependencies; backends interleaved across repeats; a replay that fails
half-way leaves an error row and the next one runs; intervals and verdicts in the comparison table."""

import json

import numpy as np
import pandas as pd
import pytest
from test_serving import E2E, _trace

from packinfer_bench.config import load_config
from packinfer_bench.experiment import run_experiment
from packinfer_bench.report.e2e_tables import e2e_compare_table, e2e_slo_table
from packinfer_bench.serving.metrics import Slo, inter_token_gaps, request_latencies, summarize, timeline
from packinfer_bench.serving.stage import scenario
from packinfer_bench.workload import Batch, ContinuousSpec, continuous_batches


def _schedule():
    # request 1: prompt in one chunk then 3 decode steps; request 2 arrives at 1.5 s, 2 tokens
    return [Batch("a", "t", "c", [4], [4], [1], sampled=[True]),
            Batch("b", "t", "c", [1], [5], [1], sampled=[True]),
            Batch("c", "t", "c", [1, 3], [6, 3], [1, 2], sampled=[True, True]),
            Batch("d", "t", "c", [1, 1], [7, 4], [1, 2], sampled=[True, True])]


def test_itl_goodput_and_slo_attainment_on_a_made_up_clock():
    schedule, arrivals = _schedule(), {1: 0.0, 2: 1.5}
    ends, sent = timeline(schedule, arrivals, [1.0, 0.5, 0.25, 2.0])
    assert ends.tolist() == [1.0, 1.5, 1.75, 3.75]
    req = request_latencies(schedule, sent, ends)
    gaps = inter_token_gaps(schedule, ends, {1, 2})
    assert sorted(gaps.tolist()) == [0.25, 0.5, 2.0, 2.0]  # request 1: 0.5, 0.25, 2.0; request 2: 2.0
    out = summarize(req, [1.0, 0.5, 0.25, 2.0], {1: 4, 2: 2}, itl_s=gaps, slo=Slo(ttft_ms=500, tpot_ms=1000))
    assert out["itl_ms_mean"] == pytest.approx(1187.5) and out["itl_ms_median"] == pytest.approx(1250.0)
    assert out["itl_ms_p99"] == pytest.approx(np.percentile([250, 500, 2000, 2000], 99))
    # request 1: TTFT 1.0 s > 0.5 s; request 2: TTFT 0.25 s, TPOT 2.0 s > 1 s: neither meets the SLO
    assert out["slo_attainment"] == 0.0 and out["goodput_req_s"] == 0.0
    loose = summarize(req, [1.0, 0.5, 0.25, 2.0], {1: 4, 2: 2}, itl_s=gaps, slo=Slo(ttft_ms=1000, tpot_ms=2000))
    assert loose["slo_attainment"] == 1.0 and loose["goodput_req_s"] == pytest.approx(2 / 3.75)
    assert out["itl_ms_quantiles"].split()[0] == "250" and len(out["itl_ms_quantiles"].split()) == 21


def test_an_iteration_after_idle_time_pays_its_host_work():
    schedule, arrivals = _schedule(), {1: 0.0, 2: 10.0}
    ends, _ = timeline(schedule, arrivals, [1.0, 0.5, 0.25, 2.0], cold=[1.5, 0.9, 0.7, 2.5])
    assert ends.tolist() == [1.5, 2.0, 10.7, 12.7]  # the first and the one after the gap start cold


def test_the_sustained_rate_is_the_highest_swept_rate_within_the_slo():
    rows = [{"e2e": "m", "trace": "t", "backend": b, "rate": str(r), "repeat": k, "status": "ok",
             "slo_attainment": att, "goodput_req_s": r * att, "slo": "ttft<=1ms tpot<=1ms attainment>=0.9"}
            for b, atts in (("packinfer", {2: 1.0, 4: 0.95, 8: 0.92, 16: 0.5}), ("fa2", {2: 1.0, 4: 0.91, 8: 0.6,
                                                                                            16: 0.2}))
            for r, att in atts.items() for k in (0, 1)]
    table = e2e_slo_table(pd.DataFrame(rows)).set_index("backend")
    assert table.loc["packinfer", "max_rate_within_slo"] == 8 and table.loc["fa2", "max_rate_within_slo"] == 4
    assert table.loc["packinfer", "goodput_there"] == pytest.approx(8 * 0.92)


def test_a_closed_loop_client_sends_each_request_after_the_one_it_waited_for():
    trace = _trace(12)
    sent_after = {}
    spec = ContinuousSpec(num_requests=None, arrivals="poisson", rate=1e6, max_concurrency=3, max_num_seqs=8)
    schedule = list(continuous_batches(trace, spec, sent_after))
    in_flight, finished, first_seen = set(), set(), {}
    last = {r: i for i, b in enumerate(schedule) for r in b.request_ids.tolist()}
    for i, b in enumerate(schedule):
        for r in b.request_ids.tolist():
            first_seen.setdefault(r, i)
            in_flight.add(r)
        assert len(in_flight) <= 3, "never more than max_concurrency in flight"
        for r in b.request_ids.tolist():
            if last[r] == i:
                in_flight.discard(r)
                finished.add(r)
    assert len(sent_after) == 12 - 3, "all but the first three waited for a finish"
    for r, before in sent_after.items():
        assert last[before] < first_seen[r], "sent only after the request it waited for finished"
    ends, sent = timeline(schedule, {r: 0.0 for r in first_seen}, [0.1] * len(schedule), sent_after)
    for r, before in sent_after.items():
        assert sent[r] == pytest.approx(ends[last[before]])


def test_repeats_interleave_the_backends_and_a_failing_replay_leaves_an_error_row(write, tmp_path, monkeypatch):
    text = E2E.replace("rates: [RATE]", "rates: [30.0, 40.0]").replace("BUDGET", "null").replace(
        "repeats: 1", "repeats: 2").replace("backends: [fa2, packinfer]", "backends: [packinfer, reference]")
    cfg = load_config(write("e.yaml", text))
    import packinfer_bench.serving.stage as stage

    real = stage.Server.replay
    calls = []

    def flaky(self, schedule, keep, on_iteration):
        calls.append(self.attention.name)
        if self.attention.name == "packinfer" and len(calls) == 3:  # the second repeat's packinfer, 30 req/s
            def broken(it):
                on_iteration(it)
                if it.iteration == 2:
                    raise RuntimeError("device fell over")
            return real(self, schedule, keep, broken)
        return real(self, schedule, keep, on_iteration)

    monkeypatch.setattr(stage.Server, "replay", flaky)
    out = tmp_path / "run"
    run_experiment(cfg, out, log=lambda _: None)
    rows = pd.read_csv(out / "e2e" / "summary.csv", keep_default_na=False, dtype={"rate": str})
    order = list(zip(rows["rate"], rows["repeat"], rows["backend"]))
    assert order == [("30", 0, "packinfer"), ("30", 0, "reference"), ("30", 1, "packinfer"), ("30", 1, "reference"),
                     ("40", 0, "packinfer"), ("40", 0, "reference"), ("40", 1, "packinfer"), ("40", 1, "reference")]
    failed = rows[(rows["rate"] == "30") & (rows["repeat"] == 1) & (rows["backend"] == "packinfer")].iloc[0]
    assert failed["status"] == "error" and "iteration 3: RuntimeError: device fell over" in failed["reason"]
    assert (rows.drop(failed.name)["status"] == "ok").all(), "every other replay ran"
    its = pd.read_csv(out / "e2e" / "iterations.csv")
    assert {"kind", "gpu_ms", "host_ms", "graph", "launches_per_layer"} <= set(its.columns)
    # the comparison pairs only ok replays: at 30 req/s one repeat, at 40 two
    from packinfer_bench.report.e2e_tables import load_e2e, load_e2e_iterations
    summary, requests = load_e2e(out)
    table = e2e_compare_table(summary, requests, load_e2e_iterations(out))
    repeats = table.groupby("rate")["repeats"].first().to_dict()
    assert repeats == {"30": 1, "40": 2}
    latency = table[(table["rate"] == "40") & (table["metric"] == "e2e latency")].iloc[0]
    assert latency["ratio_low"] <= latency["ratio"] <= latency["ratio_high"]
    assert latency["verdict"] in ("better", "worse", "no difference")


def test_scenarios_of_a_concurrency_sweep_are_closed_loop(write):
    text = E2E.replace("rates: [RATE]", "concurrency: [2, 4]").replace("BUDGET", "null")
    entry = load_config(write("e.yaml", text)).e2e[0]
    points = entry.load_points()
    assert [label for label, _ in points] == ["c2", "c4"]
    spec = ContinuousSpec(**{**entry.continuous.__dict__, **points[0][1]})
    scen = scenario(_trace(10), spec)
    assert scen.sent_after and max(len(b) for b in scen.schedule) <= 2


class _FakeClock:
    """time for the stage and the deadline: monotonic / perf_counter read a clock the test moves."""

    def __init__(self):
        import time as real
        self.now, self._real = 0.0, real

    def monotonic(self):
        return self.now

    perf_counter = monotonic

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_a_time_limit_starts_no_replay_that_would_not_end_and_resume_does_the_rest(write, tmp_path, monkeypatch):
    import packinfer_bench.deadline as deadline_module
    import packinfer_bench.serving.stage as stage
    from packinfer_bench.deadline import Deadline

    text = E2E.replace("rates: [RATE]", "rates: [30.0, 40.0]").replace("BUDGET", "null").replace(
        "backends: [fa2, packinfer]", "backends: [packinfer, reference]")
    cfg = load_config(write("e.yaml", text))
    clock = _FakeClock()
    monkeypatch.setattr(stage, "time", clock)
    monkeypatch.setattr(deadline_module, "time", clock)
    # every schedule is modelled at 5 s; a preparation takes 5 s and a replay 10 s of the fake clock
    monkeypatch.setattr(stage.Scenario, "modelled_s", property(lambda self: 5.0))
    monkeypatch.setattr(stage, "FIRST_PREPARE_S", 5.0)
    real_prepare, real_replay = stage.Server.prepare, stage.Server.replay

    def prepare(self, *args):
        clock.now += 5.0
        return real_prepare(self, *args)

    def replay(self, *args):
        clock.now += 10.0
        return real_replay(self, *args)

    monkeypatch.setattr(stage.Server, "prepare", prepare)
    monkeypatch.setattr(stage.Server, "replay", replay)
    out = tmp_path / "run"
    # 30 req/s: packinfer (5 s prep + 10 s), reference (5 + 10) end at 30 s; 40 req/s would need 15 s more
    summary = run_experiment(cfg, out, log=lambda _: None, deadline=Deadline(32.0, start=0.0))
    assert summary.stopped.startswith("e2e tiny t load 40: packinfer #0 (~15 s needed, 2 s left)")
    rows = pd.read_csv(out / "e2e" / "summary.csv", keep_default_na=False, dtype={"rate": str})
    assert list(zip(rows["rate"], rows["backend"], rows["status"])) == [("30", "packinfer", "ok"),
                                                                         ("30", "reference", "ok")]

    # the piece after it estimates from the paces and preparations stored by the first (a 10 s replay of a 5 s
    # schedule: pace 2.0; 5 s to prepare), not from FIRST_PREPARE_S: 40 req/s needs 15 s per backend
    (model,) = json.loads((out / "e2e" / "pace.json").read_text()).values()
    assert model == {"packinfer": {"pace": 2.0, "prepare_s": 5.0}, "reference": {"pace": 2.0, "prepare_s": 5.0}}
    monkeypatch.setattr(stage, "FIRST_PREPARE_S", 1000.0)
    clock.now = 0.0
    resumed = run_experiment(cfg, out, resume=True, log=lambda _: None, deadline=Deadline(31.0, start=0.0))
    assert resumed.stopped is None
    rows = pd.read_csv(out / "e2e" / "summary.csv", keep_default_na=False, dtype={"rate": str})
    assert list(zip(rows["rate"], rows["backend"])) == [("30", "packinfer"), ("30", "reference"),
                                                        ("40", "packinfer"), ("40", "reference")]
    assert (rows["status"] == "ok").all()


def test_a_deadline_refuses_what_would_not_end_and_then_everything(monkeypatch):
    import packinfer_bench.deadline as deadline_module
    from packinfer_bench.deadline import Deadline

    clock = _FakeClock()
    monkeypatch.setattr(deadline_module, "time", clock)
    d = Deadline(60.0, start=0.0)
    clock.now = 20.0
    assert d.left() == 40.0 and d.allows(40.0, "a") and d.stopped is None
    assert not d.allows(41.0, "b") and d.stopped == "b (~41 s needed, 40 s left)"
    assert not d.allows(1.0, "c"), "nothing smaller starts after the first refusal"
    assert d.stopped.startswith("b ")
    unlimited = Deadline()
    assert unlimited.left() == float("inf") and unlimited.allows(1e12, "x")
