"""Past one GPU, on a CPU: torch.distributed with gloo and 2 processes (started through torchrun, as `run` starts
them), the tiny model, kernels under the Triton interpreter. A replay sharded over 2 ranks computes what the
whole model computes on one; a kernel sweep spread over 2 processes stores the records one process stores, in the
same order; a `tp` the model's heads cannot be split by is a config error naming the key."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from packinfer_bench.backends.packinfer import PackinferAttention
from packinfer_bench.config import load_config
from packinfer_bench.distributed import NCCL_ENV, Job, World, keep_multicast_off, launch
from packinfer_bench.errors import ConfigError
from packinfer_bench.experiment import run_experiment
from packinfer_bench.models import preset, shard
from packinfer_bench.reference import ReferenceAttention
from packinfer_bench.run_folder.records import FIELDS, UNAVAILABLE, RecordStore, merge_parts
from packinfer_bench.serving.kv_follow import peak_tokens
from packinfer_bench.serving.model import Decoder
from packinfer_bench.serving.replay import ReplayResult, cache_capacity, make_cache, replay
from packinfer_bench.serving.stage import _compare, scenario
from packinfer_bench.serving.tp import TensorParallel
from packinfer_bench.traces.synthetic import load as synthetic
from packinfer_bench.workload.continuous import ContinuousSpec

SPEC = ContinuousSpec(num_requests=None, max_num_batched_tokens=32, max_num_seqs=4)
#: float32 with the float32 reference attention (only the order of the all-reduced sums differs), and fp16 with
#: packinfer's cache attention under the interpreter
CASES = {"fp32-reference": (torch.float32, ReferenceAttention), "fp16-packinfer": (torch.float16, PackinferAttention)}


def _replay(tp: TensorParallel, dtype: torch.dtype, attention) -> ReplayResult:
    """The tiny model (rank tp.rank's shard of it) replaying a schedule of prefill, mixed and decode iterations."""
    trace = synthetic(name="t", num_requests=5, prompt={"dist": "uniform", "low": 3, "high": 24},
                      output={"dist": "uniform", "low": 1, "high": 4}, rate=100.0, seed=1)
    scen = scenario(trace, SPEC)
    model = Decoder(preset("tiny"), "cpu", dtype, seed=0, tp=tp)
    attn = attention(model.device, model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim)
    cache = make_cache(attn, model, cache_capacity(attn, peak_tokens(scen.schedule), SPEC.max_num_seqs))
    return replay(model, scen.schedule, attn, cache, keep_outputs=len(scen.schedule))


def replay_on_each_rank(world: World, out: Path) -> None:
    """Run by every rank: each case's replay through this rank's shard; rank 0 saves what came out."""
    tp = TensorParallel(world.rank, world.size)
    results = {name: _replay(tp, dtype, attention) for name, (dtype, attention) in CASES.items()}
    if world.writer:
        torch.save({name: (r.hidden, r.tokens) for name, r in results.items()}, out)


def test_a_replay_sharded_over_two_ranks_computes_what_the_whole_model_computes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the ranks import this module
    launch(Job(f"{__name__}:replay_on_each_rank", {"out": tmp_path / "tp2.pt"}), 2, tmp_path / "tp2.job",
           log=lambda _: None)
    sharded = torch.load(tmp_path / "tp2.pt")
    for name, (dtype, attention) in CASES.items():
        whole = _replay(TensorParallel(), dtype, attention)  # tp = 1
        hidden, tokens = sharded[name]
        two = ReplayResult(hidden=hidden, tokens=tokens)
        err, match = _compare(two, whole)
        assert len(hidden) == len(whole.hidden) == 6 and err is not None
        if dtype == torch.float32:
            assert err < 1e-5 and match == 1.0, name
        else:  # fp16 sums in another order; a greedy token may flip where two logits tie
            assert err < 1e-2 and match >= 0.9, name


def test_each_rank_holds_a_slice_of_the_whole_models_weights():
    whole = Decoder(preset("tiny"), "cpu", torch.float32, seed=3)
    ranks = [Decoder(preset("tiny"), "cpu", torch.float32, seed=3, tp=TensorParallel(r, 2)) for r in range(2)]
    assert (ranks[0].cfg.num_heads, ranks[0].cfg.num_kv_heads, ranks[0].cfg.intermediate) == (2, 1, 128)
    layer = [r.layers[1] for r in ranks]
    assert torch.equal(torch.cat([w["o"] for w in layer], dim=1), whole.layers[1]["o"])  # row-parallel: columns
    assert torch.equal(torch.cat([w["down"] for w in layer], dim=1), whole.layers[1]["down"])
    d, h = 64, 4 * 64  # qkv rows: rank 0 holds query heads 0-1 and KV head 0
    assert torch.equal(layer[0]["qkv"][:2 * d], whole.layers[1]["qkv"][:2 * d])
    assert torch.equal(layer[0]["qkv"][2 * d:3 * d], whole.layers[1]["qkv"][h:h + d])
    assert torch.equal(ranks[1].embed, whole.embed) and torch.equal(ranks[1].lm_head, whole.lm_head)  # replicated


CONFIG = """
name: spread
device: cpu
traces:
  - {name: t, kind: synthetic, options: {num_requests: 4, rate: 50.0, seed: 2,
     prompt: {dist: uniform, low: 3, high: 40}, output: {dist: constant, value: 3}}}
workloads:
  - name: kernel
    static: {phases: [prefill, decode], batch_sizes: [2], max_len: 64, seed: 0}
shapes:
  - {name: tiny-gqa, num_heads: 4, num_kv_heads: 2, head_dim: 64, dtype: fp16}
backends: [triton_unpacked, sdpa_padded]
timing: {warmup: 0, repeats: 1, flush_l2: false}
e2e:
  - name: tiny-tp2
    model: tiny
    tp: 2
    rates: [40.0]
    continuous: {num_requests: null, max_num_seqs: 4, max_num_batched_tokens: 32}
    backends: [packinfer]
    verify_iterations: 2
    repeats: 1
"""
KEY = ["batch_id", "shape", "backend", "variant"]


def test_a_sweep_spread_over_two_processes_stores_what_one_process_stores(write, tmp_path):
    cfg = load_config(write("spread.yaml", CONFIG))
    run_experiment(cfg, tmp_path / "two", gpus=2, log=lambda _: None)  # kernel sweep: 2 ranks; e2e: tp 2
    run_experiment(cfg, tmp_path / "one", only="kernel", log=lambda _: None)
    two, one = (pd.read_csv(tmp_path / name / "records.csv") for name in ("two", "one"))
    assert len(one) == 4 and two[KEY].values.tolist() == one[KEY].values.tolist()  # same keys, same order
    assert (two["status"] == one["status"]).all() and not (tmp_path / "two" / "dist").exists()
    (row,) = pd.read_csv(tmp_path / "two" / "e2e" / "summary.csv").to_dict("records")  # rank 0 wrote it, once
    assert (row["status"], row["tp"], row["finished"]) == ("ok", 2, 4) and row["max_rel_err"] < 2e-2
    run_experiment(cfg, tmp_path / "two", gpus=2, resume=True, log=lambda _: None)  # nothing left: no ranks start
    assert len(pd.read_csv(tmp_path / "two" / "records.csv")) == 4


def test_records_a_killed_rank_left_are_merged_on_resume_in_the_single_process_order(tmp_path):
    rows = [dict.fromkeys(FIELDS, "") | {"batch_id": f"b{i}", "shape": "s", "backend": "x", "variant": "v",
                                          "status": "ok"} for i in range(4)]
    store = RecordStore(tmp_path)
    store.rows.append([rows[0]])  # already merged before the kill
    RecordStore.part(tmp_path, 0).rows.append([rows[0], rows[2]])
    RecordStore.part(tmp_path, 1).rows.append([rows[3], rows[1]])
    counts = merge_parts(tmp_path, {(f"b{i}", "s", "x", "v"): i for i in range(4)})
    assert counts == {"ok": 3} and not (tmp_path / "dist").exists()
    assert [r["batch_id"] for r in store.rows.read()[0]] == ["b0", "b1", "b2", "b3"]


def test_merging_parts_adds_what_records_held_only_as_unavailable_and_nothing_twice(tmp_path):
    """records.csv holds b0 measured and b1 skipped as unavailable (a machine without the backend); the ranks of a
    later resume measured b1 and b2 and skipped b3 as unavailable: b1's measurement, b2 and b3 are added."""
    row = dict.fromkeys(FIELDS, "") | {"shape": "s", "backend": "x", "variant": "v", "status": "ok"}
    missing = {"status": "skipped", "reason": UNAVAILABLE + "x is not installed"}
    store = RecordStore(tmp_path)
    store.rows.append([row | {"batch_id": "b0"}, row | {"batch_id": "b1"} | missing])
    RecordStore.part(tmp_path, 0).rows.append([row | {"batch_id": "b0", "status": "error"}, row | {"batch_id": "b1"}])
    RecordStore.part(tmp_path, 1).rows.append([row | {"batch_id": "b2"}, row | {"batch_id": "b3"} | missing,
                                               row | {"batch_id": "b1"} | missing])
    assert merge_parts(tmp_path, {(f"b{i}", "s", "x", "v"): i for i in range(4)}) == {"ok": 2, "skipped": 1}
    merged = [(r["batch_id"], r["status"]) for r in store.rows.read()[0]]
    assert merged == [("b0", "ok"), ("b1", "skipped"), ("b1", "ok"), ("b2", "ok"), ("b3", "skipped")]


@pytest.mark.parametrize("model, tp, allowed", [("tiny", 3, "[1, 2]"), ("tiny", 0, "[1, 2]"),
                                                ("llama-3.1-70b", 16, "[1, 2, 4, 8]"),
                                                ("qwen2.5-72b", 3, "[1, 2, 4, 8]")])
def test_a_tp_the_heads_cannot_be_split_by_is_a_config_error_naming_the_key(write, model, tp, allowed):
    text = CONFIG.replace("model: tiny", f"model: {model}").replace("tp: 2", f"tp: {tp}")
    with pytest.raises(ConfigError, match=rf"e2e\[0\]\.tp: {tp} not allowed for {model} .*; allowed: "
                                          + allowed.replace("[", r"\[").replace("]", r"\]")):
        load_config(write("bad.yaml", text))


def test_ranks_on_gpus_keep_nvlink_multicast_off_unless_the_user_set_it():
    env = keep_multicast_off({"NCCL_NVLS_ENABLE": "1"})
    assert env == {**NCCL_ENV, "NCCL_NVLS_ENABLE": "1"}
    assert NCCL_ENV == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.parametrize("name, tp", [("e2e-70b-tp2", 2), ("e2e-70b-tp4", 4)])
def test_the_shipped_70b_replays(name, tp):
    """Llama-3.1-70B (and at TP=4 Qwen2.5-72B) at full depth, ShareGPT and Azure conv, fa2 / flashinfer / packinfer."""
    cfg = load_config(Path(__file__).parents[1] / "experiments" / f"{name}.yaml")
    assert {e.tp for e in cfg.e2e} == {tp} and {t for e in cfg.e2e for t in e.traces} == {"sharegpt", "azure-conv"}
    assert all(e.backends == ["fa2", "flashinfer", "packinfer"] and e.num_layers is None for e in cfg.e2e)
    assert {e.model for e in cfg.e2e} == ({"llama-3.1-70b"} if tp == 2 else {"llama-3.1-70b", "qwen2.5-72b"})
    rank = shard(preset("llama-3.1-70b"), tp)  # what each GPU attends over
    assert (rank.num_heads, rank.num_kv_heads, rank.head_dim) == ({2: 32, 4: 16}[tp], {2: 4, 4: 2}[tp], 128)


def failing_e2e_rank(world: World, **kwargs) -> None:
    """e2e_rank, but on rank 1 the first packinfer replay raises mid-way (once: a marker file remembers)."""
    from packinfer_bench import ranks
    from packinfer_bench.serving.stage import Server

    marker, replay = Path(kwargs["out_dir"]) / "failed-once", Server.replay

    def flaky(self, schedule, keep_outputs, on_iteration):
        if world.rank == 1 and self.attention.name == "packinfer" and not marker.exists():
            marker.touch()
            raise RuntimeError("injected failure")
        return replay(self, schedule, keep_outputs, on_iteration)

    Server.replay = flaky
    ranks.e2e_rank(world, **kwargs)


def test_a_replay_failing_on_one_rank_is_an_error_row_and_the_replays_after_it_run(write, tmp_path, monkeypatch):
    from packinfer_bench import ranks

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    monkeypatch.setattr(ranks, "Job", lambda target, kwargs, cuda: Job(f"{__name__}:failing_e2e_rank", kwargs, cuda))
    cfg = load_config(write("tp.yaml", CONFIG.replace("repeats: 1", "repeats: 2")))
    run_experiment(cfg, tmp_path / "run", only="e2e", log=lambda _: None)
    rows = pd.read_csv(tmp_path / "run" / "e2e" / "summary.csv").sort_values("repeat").to_dict("records")
    assert [(r["repeat"], r["status"]) for r in rows] == [(0, "error"), (1, "ok")]
    assert "rank 1: iteration 0: RuntimeError: injected failure" in rows[0]["reason"]
    assert not (tmp_path / "run" / "dist").exists()
