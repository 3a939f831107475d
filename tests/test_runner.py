"""The runner: same tensors for every backend, wrong outputs caught, failures recorded, resume without loss or
duplicates (kernels under the Triton interpreter)."""

import csv
import dataclasses

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from packinfer_bench.backends import BACKENDS, Backend
from packinfer_bench.backends.packinfer import PACKINFER_VARIANTS
from packinfer_bench.config import ShapeConfig, load_config
from packinfer_bench.experiment import read_batches, run_experiment
from packinfer_bench.reference import reference_attention
from packinfer_bench.run_folder import RECORDS_FILE
from packinfer_bench.run_folder.records import FIELDS, Record
from packinfer_bench.runner import make_inputs
from packinfer_bench.timing import Timer
from packinfer_bench.workload import Batch

CONFIG = (FIXTURES / "tiny.yaml").read_text()


def _rows(out):
    with open(out / RECORDS_FILE, newline="") as f:
        return list(csv.DictReader(f))


def _run(write, tmp_path, config=CONFIG, name="run", resume=False):
    cfg = load_config(write("c.yaml", config))
    return run_experiment(cfg, tmp_path / name, resume=resume, log=lambda _: None)


def test_records_cover_every_backend_variant_with_the_documented_columns(write, tmp_path):
    _run(write, tmp_path)
    rows = _rows(tmp_path / "run")
    assert list(rows[0]) == FIELDS
    by = {(r["batch_id"], r["backend"], r["variant"]): r for r in rows}
    assert len(by) == len(rows) == 2 * (1 + len(PACKINFER_VARIANTS) + 1)
    for r in rows:
        if r["backend"] == "fa2":
            assert r["status"] == "skipped" and r["reason"].startswith("unavailable: ") and "CUDA" in r["reason"]
        elif r["status"] == "skipped":  # a variant that changes the other path (prefill tiles / decode)
            assert r["backend"] == "packinfer" and r["reason"].startswith("not applicable: variant")
        else:
            assert r["status"] == "ok", r
            assert float(r["rel_err"]) < 1e-2 and float(r["kernel_ms"]) > 0 and float(r["tflops"]) > 0
            assert r["timing"] == "wall-clock-cpu"


def test_a_wrong_backend_is_caught_and_a_failing_one_recorded(write, tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS, "wrong", Backend("wrong", ("q-as-output",), lambda d: None,
                                                   lambda x, v: (lambda: x.q.clone())))

    def explode(x, v):
        raise (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB") if v == "oom"
               else RuntimeError("kernel launch failed"))

    monkeypatch.setitem(BACKENDS, "broken", Backend("broken", ("oom", "raise"), lambda d: None, explode))
    _run(write, tmp_path, CONFIG.replace("[sdpa_padded, packinfer, fa2]", "[wrong, broken, sdpa_padded]"))
    rows = {(r["batch_id"].split("/")[-1], r["backend"], r["variant"]): r for r in _rows(tmp_path / "run")}
    assert rows[("prefill", "wrong", "q-as-output")]["status"] == "incorrect"
    assert "relative error" in rows[("prefill", "wrong", "q-as-output")]["reason"]
    assert rows[("prefill", "broken", "oom")]["status"] == "error"
    assert rows[("prefill", "broken", "oom")]["reason"].startswith("out of memory")
    assert rows[("mixed", "broken", "raise")]["reason"] == "RuntimeError: kernel launch failed"
    assert rows[("mixed", "sdpa_padded", "auto")]["status"] == "ok"  # the run went on


def test_resume_after_an_interruption_gives_the_same_records_without_duplicates(write, tmp_path, monkeypatch):
    _run(write, tmp_path, name="whole")
    calls = {"n": 0}
    real = BACKENDS["packinfer"]

    def interrupted(x, variant):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real.prepare(x, variant)

    monkeypatch.setitem(BACKENDS, "packinfer", dataclasses.replace(real, prepare=interrupted))
    with pytest.raises(KeyboardInterrupt):
        _run(write, tmp_path, name="cut")
    kept = _rows(tmp_path / "cut")
    assert 0 < len(kept) < len(_rows(tmp_path / "whole"))
    with open(tmp_path / "cut" / RECORDS_FILE, "a") as f:
        f.write("k/mix/b3/s0/mixed,mix,k,mi")  # and a row cut short by the kill
    monkeypatch.setitem(BACKENDS, "packinfer", real)
    _run(write, tmp_path, name="cut", resume=True)
    key = lambda r: (r["batch_id"], r["shape"], r["backend"], r["variant"], r["status"])  # noqa: E731
    resumed, whole = [key(r) for r in _rows(tmp_path / "cut")], [key(r) for r in _rows(tmp_path / "whole")]
    assert len(resumed) == len(set(resumed)) and sorted(resumed) == sorted(whole)
    assert all(r in resumed for r in (key(k) for k in kept))  # nothing measured before the cut was redone or lost


def test_a_record_skipped_for_a_missing_backend_is_measured_by_a_later_session_that_has_it(write, tmp_path,
                                                                                           monkeypatch):
    """A sweep run in pieces on machines with different baselines installed: what one piece skipped because the
    backend could not run there, a later --resume that can run it measures; a variant that does not apply to a
    batch is not tried again; the report reads each record's latest row."""
    from packinfer_bench.report.tables import load_records
    from packinfer_bench.run_folder.records import UNAVAILABLE, RecordStore

    real = BACKENDS["packinfer"]
    monkeypatch.setitem(BACKENDS, "packinfer", dataclasses.replace(real, available=lambda d: "not installed"))
    _run(write, tmp_path)
    first = _rows(tmp_path / "run")
    assert {r["reason"] for r in first if r["backend"] == "packinfer"} == {UNAVAILABLE + "not installed"}
    assert RecordStore(tmp_path / "run").keys(["packinfer"]) < RecordStore(tmp_path / "run").keys()
    monkeypatch.setitem(BACKENDS, "packinfer", real)
    _run(write, tmp_path, resume=True)
    rows = _rows(tmp_path / "run")
    assert rows[:len(first)] == first  # append-only
    again = [r for r in rows[len(first):]]
    assert again and {r["backend"] for r in again} == {"packinfer"}
    assert {r["status"] for r in again} <= {"ok", "skipped"} and not any(r["reason"].startswith(UNAVAILABLE)
                                                                        for r in again)
    records = load_records(tmp_path / "run")
    assert len(records) == len(first) and not records.duplicated(["batch_id", "shape", "backend", "variant"]).any()
    assert (records[records["backend"] == "packinfer"]["status"] != "skipped").any()
    _run(write, tmp_path, resume=True)  # fa2 cannot run here, variants that do not apply stay skipped: nothing new
    assert len(_rows(tmp_path / "run")) == len(rows)


def test_inputs_are_deterministic_per_batch_and_shape(write, tmp_path):
    cfg = load_config(write("c.yaml", CONFIG))
    run_experiment(cfg, tmp_path / "r", dry_run=True, log=lambda _: None)
    first, second = read_batches(tmp_path / "r")[:2]
    a = make_inputs(first, cfg.shapes[0], torch.device("cpu"))
    b = make_inputs(first, cfg.shapes[0], torch.device("cpu"))
    c = make_inputs(second, cfg.shapes[0], torch.device("cpu"))
    assert torch.equal(a.q, b.q) and torch.equal(a.v, b.v) and a.q.abs().sum() > 0
    assert not torch.equal(a.q[:3], c.q[:3])


def test_a_shared_prefix_holds_the_same_kv_in_every_member():
    batch = Batch("b", "t", "static", q_lens=[1, 1, 1, 1], kv_lens=[10, 12, 9, 6], request_ids=[0, 1, 2, 3],
                  prefix_ids=[5, 5, 5, -1], prefix_lens=[8, 8, 8, 0])
    x = make_inputs(batch, ShapeConfig("s", 4, 2, 64, "fp16"), torch.device("cpu"))
    starts = [0, 10, 22]
    for s in starts[1:]:
        assert torch.equal(x.k[s:s + 8], x.k[:8]) and torch.equal(x.v[s:s + 8], x.v[:8])
    assert not torch.equal(x.k[10 + 8:10 + 9], x.k[8:9]), "positions past the prefix stay the request's own"
    assert batch.dedup_kv_tokens() == 16


@pytest.mark.parametrize("variant", ["full", "paged", "no-prefix-grouping"])
def test_packinfer_decode_path_reads_the_batch_laid_out_in_a_kv_cache(variant):
    batch = Batch("b", "t", "static", q_lens=[1, 2, 1, 1], kv_lens=[40, 35, 9, 20], request_ids=[0, 1, 2, 3],
                  prefix_ids=[5, 5, 5, -1], prefix_lens=[19, 19, 19, 0])
    x = make_inputs(batch, ShapeConfig("s", 4, 2, 64, "fp16"), torch.device("cpu"))
    out = BACKENDS["packinfer"].prepare(x, variant)()
    assert (out.float() - reference_attention(x)).abs().max() < 4e-3


def test_record_key_and_fields():
    rec = Record("t", "w", "prefill", "w/t/b1", 1, 5, 5, "s", "packinfer", "full", "ok")
    assert rec.key == ("w/t/b1", "s", "packinfer", "full")
    assert {"trace", "phase", "batch_id", "batch_size", "num_tokens", "backend", "variant", "status", "reason",
            "plan_ms", "kernel_ms", "kernel_ms_p10", "kernel_ms_p90", "tflops", "kv_tbps", "max_abs_err"} <= set(FIELDS)


def test_availability_names_what_is_missing():
    from packinfer_bench.backends.base import needs_cuda

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert needs_cuda(torch.device("cpu"), "json") == "needs a CUDA device"
    assert needs_cuda(cuda, "json") is None
    assert needs_cuda(cuda, "no_such_module", "json") is None  # one of them is enough
    assert needs_cuda(cuda, "no_such_module.sub") == "no_such_module.sub is not installed"
    assert needs_cuda(cuda, "no_such_module", missing="install it") == "install it"


def test_list_scheduling_makespan():
    from packinfer_bench.analytic import makespan

    assert makespan(np.array([3.0, 1, 1, 1]), 2) == 3.0  # the long program first: the others fill the second SM
    assert makespan(np.array([1.0, 1, 1, 3]), 2) == 4.0  # the long program last: it straggles
    assert makespan(np.array([2.0, 2]), 8) == 2.0


def test_analytic_mode_predicts_without_a_gpu(write, tmp_path):
    config = CONFIG.replace("device: cpu", "device: analytic\ngpu: {name: H100, sms: 132}")
    _run(write, tmp_path, config)
    rows = list(csv.DictReader(open(tmp_path / "run" / "analytic.csv")))
    assert len(rows) == 2 and not (tmp_path / "run" / RECORDS_FILE).exists()
    for r in rows:
        assert float(r["fa2_grid_imbalance"]) >= 1.0 and float(r["packinfer_imbalance"]) >= 1.0
        assert float(r["predicted_speedup"]) == pytest.approx(
            float(r["fa2_grid_makespan"]) / float(r["packinfer_makespan"]))
    with pytest.raises(Exception, match="device: analytic needs a 'gpu' section"):
        _run(write, tmp_path, CONFIG.replace("device: cpu", "device: analytic"), name="r2")


def test_a_batch_whose_inputs_cannot_be_built_is_recorded_for_every_backend(write, tmp_path, monkeypatch):
    import packinfer_bench.runner as runner

    def no_memory(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(runner, "reference_attention", no_memory)
    _run(write, tmp_path)
    rows = _rows(tmp_path / "run")
    assert {r["status"] for r in rows if r["backend"] != "fa2"} == {"error"}
    assert all(r["reason"].startswith("inputs or reference: OutOfMemoryError") for r in rows if r["backend"] != "fa2")


def test_cuda_graph_timing_is_a_gpu_method_and_the_cpu_keeps_its_wall_clock(write, tmp_path):
    cpu = Timer(torch.device("cpu"), warmup=1, repeats=3, flush_l2=True, cuda_graphs=True)
    assert cpu.method == "wall-clock-cpu" and len(cpu(lambda: None)) == 3
    logs = []
    cfg = load_config(write("c.yaml", CONFIG.replace("flush_l2: false", "flush_l2: false, cuda_graphs: true")))
    assert cfg.timing.cuda_graphs
    run_experiment(cfg, tmp_path / "run", log=logs.append)
    assert any("cuda_graphs ignored" in line for line in logs)
    assert {r["timing"] for r in _rows(tmp_path / "run") if r["status"] == "ok"} == {"wall-clock-cpu"}


def test_the_serving_call_holds_a_batch_of_long_contexts_in_its_cache():
    """The serving call's cache is sized to the batch: every request must fit, however long (spread placement
    once split this cache so that a ShareGPT batch of 2-3k-token contexts errored)."""
    from packinfer_bench.backends.serving_call import _cached
    from packinfer_bench.runner import make_inputs
    from packinfer_bench.workload import Batch

    kv = np.array([1200, 2100, 900, 2511, 1700, 2300, 800, 2600])
    batch = Batch("b", "t", "w", np.ones(len(kv), np.int64), kv, np.arange(10, 10 + len(kv)))
    x = make_inputs(batch, ShapeConfig("s", 4, 2, 64, "fp16"), torch.device("cpu"))
    attention = BACKENDS["packinfer"].serving(torch.device("cpu"), 4, 2, 64)
    cache, slots, new = _cached(x, attention)
    assert len(slots) == len(new) == len(kv) and set(cache.request_ids) >= set(batch.request_ids.tolist())


def test_scheduler_batches_run_through_each_backends_serving_call(write, tmp_path, monkeypatch):
    """A continuous workload's batches (decode rows, chunks, fresh prompts of requests with any ids) are measured
    through the serving call - the backend's own cache holding the batch, the new K/V written, attention - for
    every serving variant, against the same float32 reference. The fusing threshold is lowered so that these
    small batches fall on both sides of it (their most rows per request: 1, 21, 22, 28, 47 or 48)."""
    from packinfer_bench.backends import packinfer as ours_module
    from packinfer_bench.backends.packinfer import PLANNER_OPTIONS, SERVING_VARIANTS, fuses

    fuse_max_q = 30
    monkeypatch.setattr(ours_module, "FUSE_MAX_Q", fuse_max_q)

    config = """
name: s
device: cpu
traces:
  - {name: t, kind: synthetic, options: {num_requests: 10, rate: 80.0, seed: 3,
     prompt: {dist: uniform, low: 5, high: 70}, output: {dist: uniform, low: 2, high: 9},
     prefix: {groups: 2, length: 12}}}
workloads:
  - name: serving
    continuous: {num_requests: null, max_num_seqs: 6, max_num_batched_tokens: 48, every: 5}
shapes:
  - {name: small, num_heads: 4, num_kv_heads: 2, head_dim: 64, dtype: fp16}
backends: [fa2, packinfer]
timing: {warmup: 0, repeats: 1, flush_l2: false}
"""
    cfg = load_config(write("s.yaml", config))
    run_experiment(cfg, tmp_path / "run", log=lambda _: None)
    rows = _rows(tmp_path / "run")
    batches = {b.batch_id: b for b in read_batches(tmp_path / "run")}
    assert any(min(b.request_ids) > 0 for b in batches.values()), "some batches hold later requests only"
    assert {r["phase"] for r in rows} == {"serving"}
    ours = [r for r in rows if r["backend"] == "packinfer"]
    assert {r["variant"] for r in ours} == set(SERVING_VARIANTS)
    assert len(ours) == len(batches) * len(SERVING_VARIANTS)
    for r in ours:
        fused = fuses(batches[r["batch_id"]])
        if (r["variant"], fused) in {("unfused", False), ("fuse-all", True)}:  # the default's code: not re-timed
            assert r["status"] == "skipped" and "as the default" in r["reason"], r
        elif r["status"] == "skipped":  # a planner switch that changes nothing on this batch
            assert set(SERVING_VARIANTS[r["variant"]]) <= PLANNER_OPTIONS, r
            assert "plans this batch as the default does" in r["reason"], r
        else:
            assert r["status"] == "ok" and float(r["rel_err"]) < 1e-2, r
    measured = {r["variant"] for r in ours if r["status"] == "ok"}
    assert measured >= {"full", "no-gqa-packing", "paged"} and measured & {"tiles-16", "tiles-128"}, measured
    most = [int(b.q_lens.max()) for b in batches.values()]
    assert {fuses(b) for b in batches.values()} == {True, False}, "each fusing variant measured somewhere"
    assert any(1 < m <= fuse_max_q for m in most), "the default fuses a batch of prompt or chunk rows too"
    assert {r["status"] for r in rows if r["backend"] == "fa2"} == {"skipped"}


def test_a_planner_ablation_that_plans_a_batch_as_the_default_does_is_skipped_not_timed_twice():
    """One short decode request: nothing to split, balance or share, so those switches give the default's plan
    (timing it again would only measure noise); a fixed tile shape the planner did not choose is measured."""
    from packinfer_bench.backends.packinfer import SERVING_VARIANTS

    batch = Batch("b", "t", "w", np.ones(1, np.int64), np.array([40]), np.arange(1))
    attention = {name: BACKENDS["packinfer"].serving(torch.device("cpu"), 8, 2, 64, **options)
                 for name, options in SERVING_VARIANTS.items()}
    assert attention["full"].variant_skip(batch) is None
    for name in ("no-split", "no-balancing", "no-prefix-grouping"):
        assert attention[name].variant_skip(batch).startswith("plans this batch as the default does"), name
    assert attention["tiles-128"].variant_skip(batch) is None  # the planner picks the narrowest tile here
    assert attention["no-gqa-packing"].variant_skip(batch) is None
    assert attention["paged"].variant_skip(batch) is None  # another layout: never compared by plan


def test_flashinfers_append_variant_is_skipped_with_the_reason_where_its_module_cannot_build(monkeypatch):
    """FlashInfer's append_paged_kv_cache is tried once per device and KV shape, at that shape; where it fails (an
    offline bundle without the page module's sources) variant "append" gets the build's own error line as its
    skip reason."""
    from packinfer_bench.backends import flashinfer as fi_backend

    class Unbuildable:
        calls = 0

        def append_paged_kv_cache(self, *args, **kwargs):
            Unbuildable.calls += 1
            raise RuntimeError("Ninja build failed. Ninja output:\nninja: error: 'csrc/page.cu' missing")

    class Working:  # FlashInfer's page kernels take head dims 64, 128, 256 and 512 only
        def append_paged_kv_cache(self, k, v, batch_indices, positions, pages, indices, indptr, last, kv_layout):
            if k.shape[-1] not in (64, 128, 256, 512):
                raise RuntimeError(f"Unsupported head_dim: {k.shape[-1]}")
            assert kv_layout == "NHD" and pages[0].shape[2:] == k.shape[1:]
            pages[0][indices[batch_indices], positions].copy_(k)

    monkeypatch.setattr(fi_backend, "_PROBLEMS", {})
    cpu = torch.device("cpu")
    first = fi_backend._append_problem(Unbuildable(), cpu, 8, 128)
    assert first == ("FlashInfer's append_paged_kv_cache does not run here "
                     "(RuntimeError: ninja: error: 'csrc/page.cu' missing)")
    assert fi_backend._append_problem(Unbuildable(), cpu, 8, 128) == first and Unbuildable.calls == 1  # once
    assert fi_backend._append_problem(Working(), cpu, 8, 128) == first  # (cached per device and shape)
    assert fi_backend._append_problem(Working(), cpu, 2, 128) is None
    assert "Unsupported head_dim: 80" in fi_backend._append_problem(Working(), cpu, 2, 80)


def test_flashinfers_batch_attention_variant_is_skipped_where_flashinfer_lacks_it_or_cannot_build_it(monkeypatch):
    """Variant "batch-attention" (FlashInfer's persistent kernel for mixed batches) is tried once per device and
    shape on one query row of one page; a FlashInfer without BatchAttention, or whose module fails to build, gives
    the reason instead of an error."""
    from packinfer_bench.backends import flashinfer as fi_backend
    from packinfer_bench.backends.base import PAGE_SIZE

    class Old:
        __version__ = "0.1.6"

    class Unbuildable(Old):
        class BatchAttention:
            def __init__(self, kv_layout, device):
                pass

            def plan(self, *args, **kwargs):
                raise RuntimeError("Ninja build failed.\nFAILED: batch_attention.cuda.o\nnvcc error: bad arch")

    planned = []

    class Working(Old):
        class BatchAttention:
            def __init__(self, kv_layout, device):
                assert kv_layout == "NHD"

            def plan(self, qo_indptr, kv_indptr, kv_indices, kv_lens, heads, kv_heads, head_dim_qk, head_dim_vo,
                     page_size, causal, q_data_type, kv_data_type):
                planned.append((qo_indptr.tolist(), kv_indptr.tolist(), kv_lens.tolist(), heads, kv_heads,
                                page_size, causal))

            def run(self, q, kv_cache):
                assert kv_cache[0].shape == (1, PAGE_SIZE, 2, 128) and q.shape == (1, 8, 128)
                return torch.zeros_like(q), torch.zeros(q.shape[:2])

    monkeypatch.setattr(fi_backend, "_PROBLEMS", {})
    cpu = torch.device("cpu")
    assert fi_backend._batch_attention_problem(Old(), cpu, 8, 1, 128) == \
        "FlashInfer's BatchAttention does not run here (RuntimeError: FlashInfer 0.1.6 has no BatchAttention)"
    assert fi_backend._batch_attention_problem(Unbuildable(), cpu, 8, 4, 128) == \
        "FlashInfer's BatchAttention does not run here (RuntimeError: nvcc error: bad arch)"
    assert fi_backend._batch_attention_problem(Working(), cpu, 8, 2, 128) is None
    assert planned == [([0, 1], [0, 1], [1], 8, 2, PAGE_SIZE, True)], "one causal row of one page"
    assert fi_backend._batch_attention_problem(Old(), cpu, 8, 2, 128) is None, "tried once per device and shape"
