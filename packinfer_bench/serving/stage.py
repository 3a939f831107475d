"""The end-to-end stage of an experiment. For every e2e entry: measure the model's iteration time on this GPU
(calibration: the scheduler's step-time model, stored in the run folder), build each load point's
continuous-batching schedule once (trace x rate or concurrency), then replay it `repeats` times with the
backends interleaved (A B C A B C ...: slow drifts of the machine touch every backend alike), each backend
keeping one server (KV cache, graphs) for the whole entry. The first iterations are checked against the float32
reference attention; per-iteration, per-request and summary rows go to e2e/ in the run folder as they are made.
A load point or replay that fails (out of memory included) leaves error rows and the run goes on.

An entry with `tp: N` runs on the N ranks of a World (packinfer_bench.distributed), every rank replaying the same
schedules in the same order through its shard of the model (serving.tp): rank 0 decides what is left to do and
the scheduler's step-time model and hands them to the others, and only rank 0 writes to the run folder. There a
failure other than a full KV cache (which every rank meets at the same iteration) stops the run instead of being
recorded, since the other ranks would wait in a collective that never comes; --resume continues."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from packinfer import KVCacheError

from packinfer_bench import envinfo
from packinfer_bench.backends import BACKENDS, DTYPES, ServingAttention
from packinfer_bench.backends.base import add_scratch
from packinfer_bench.config import REFERENCE, E2EConfig, ExperimentConfig
from packinfer_bench.deadline import Deadline
from packinfer_bench.distributed import World
from packinfer_bench.errors import ConfigError, first_line
from packinfer_bench.logs import get_logger
from packinfer_bench.models import ModelConfig, preset
from packinfer_bench.reference import ReferenceAttention
from packinfer_bench.run_folder import ITERATIONS_FILE, REQUESTS_FILE, write_atomic
from packinfer_bench.run_folder.e2e import E2ERecord, E2EStore, attention_share, new_attempt
from packinfer_bench.run_folder.files import DIST_DIR
from packinfer_bench.serving.graphs import Graphs
from packinfer_bench.serving.kv_follow import peak_tokens
from packinfer_bench.serving.metrics import Slo, inter_token_gaps, request_latencies, summarize, timeline
from packinfer_bench.serving.model import Decoder
from packinfer_bench.serving.replay import (
    PROBE_EVERY,
    ReplayResult,
    cache_capacity,
    kv_bytes,
    make_cache,
    prepare_graphs,
    replay,
)
from packinfer_bench.serving.tp import TensorParallel
from packinfer_bench.traces import Trace
from packinfer_bench.workload import Batch, StepTime, continuous_batches
from packinfer_bench.workload.continuous import ContinuousSpec, replayed_requests

#: Sampled rows whose final hidden state is further than this (relative L2) from the reference's: `incorrect`.
#: Looser than the kernel check: bf16 differences in attention compound through every layer.
E2E_MAX_REL_ERR = 5e-2
_log = get_logger(__name__)

#: The calibration's file in e2e/ (one step-time model per entry).
STEP_TIME_FILE = "step_time.json"
#: Under a time limit (Deadline), what a replay is assumed to take before one of its backend has run in this
#: run: PACE x the schedule's modelled duration, plus FIRST_PREPARE_S for compiling and capturing graphs
#: (replays on an H200 took 0.95-1.44x the modelled time, first preparations 20-50 s). Calibration: CALIBRATE_S.
PACE, FIRST_PREPARE_S, CALIBRATE_S = 2.0, 120.0, 120.0
#: The slowest pace and preparation each backend has shown in the run (e2e/, per model), kept so that a resumed
#: piece under a time limit estimates from them instead of PACE and FIRST_PREPARE_S.
PACE_FILE = "pace.json"


def _stored_paces(path: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """PACE_FILE's {model: {backend: (pace, prepare_s)}}; entries that are not numbers are left out, and an absent
    or unreadable file gives {} (the estimates then fall back to PACE and FIRST_PREPARE_S)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for key, seen in (stored.items() if isinstance(stored, dict) else ()):
        for backend, v in (seen.items() if isinstance(seen, dict) else ()):
            try:
                out.setdefault(key, {})[backend] = (float(v["pace"]), float(v["prepare_s"]))
            except (TypeError, KeyError, ValueError):
                continue
    return out


@dataclasses.dataclass
class Scenario:
    """One schedule to replay: which requests, when they arrive (and, with a client concurrency limit, which
    finish each waited for), how many tokens each must produce."""

    spec: ContinuousSpec
    schedule: list[Batch]
    arrivals: dict[int, float]
    expected: dict[int, int]  # request -> output tokens
    refused: int  # requests the scheduler never ran (too large for its limits)
    sent_after: dict[int, int] = dataclasses.field(default_factory=dict)

    @property
    def modelled_s(self) -> float:
        """The schedule's duration by the scheduler's step-time model."""
        st = self.spec.step_time
        return sum(st.seconds(int(b.q_lens.sum()), int(b.kv_lens.sum())) for b in self.schedule)


def scenario(trace: Trace, spec: ContinuousSpec) -> Scenario:
    sent_after: dict[int, int] = {}
    schedule = list(continuous_batches(trace, spec, sent_after))
    df, times = replayed_requests(trace, spec)
    arrivals = {int(r): float(t) for r, t in zip(df["request_id"], times)}
    expected = {int(r): int(o) for r, o in zip(df["request_id"], df["output_len"])}
    seen = {r for b in schedule for r in b.request_ids.tolist()}
    return Scenario(spec, schedule, {r: t for r, t in arrivals.items() if r in seen},
                    {r: n for r, n in expected.items() if r in seen}, len(expected) - len(seen), sent_after)


def stored_step_time(stored: dict, entry: E2EConfig) -> StepTime | None:
    """The step-time model a run folder's step_time.json (its content: `stored`) holds for the entry, if any."""
    return StepTime(**stored[entry.name]["step_time"]) if entry.name in stored else None


def load_point_specs(config: ExperimentConfig, entry: E2EConfig,
                     step_time: StepTime) -> list[tuple[str, str, ContinuousSpec]]:
    """(trace, load label, the schedule's spec) of every load point of the entry, each trace of it at each load,
    scheduled by `step_time`."""
    return [(tcfg.name, label, dataclasses.replace(entry.continuous, **changes, step_time=step_time))
            for tcfg in config.traces_of(entry) for label, changes in entry.load_points()]


def server_budget(spec: ContinuousSpec, scenarios: Iterable[Scenario]) -> tuple[int, int]:
    """The live KV tokens and the requests at once that an entry's servers are sized for (cache_capacity): the
    config's budget (else the schedules' peak) and max_num_seqs, at most the requests of its largest load point."""
    scenarios = list(scenarios)
    budget = spec.max_kv_tokens or max(peak_tokens(s.schedule) for s in scenarios)
    return budget, min(spec.max_num_seqs, max(len(s.arrivals) for s in scenarios))


#: Numbers the servers a run makes.
_SERVER_SERIALS = itertools.count()


class _PoolTooSmall(Exception):
    def __init__(self, tokens: int):
        super().__init__(f"the shared KV pool needs {tokens} tokens")
        self.tokens = tokens


class KVPool:
    """One K/V allocation under every server of a model: a run replays one backend at a time and each replay
    starts from an emptied cache, so the servers need the memory of the largest cache, not of all of them (the
    standard matrix's four 200k-token caches of 32 layers fit an 80 GB card no other way), and each keeps its
    graphs, which point into the pool. A cache of n tokens is the pool's first n tokens' worth of memory, viewed
    as its own [layers, n, kv heads, head dim] pools, so each cache has the capacity it would have alone. Growing
    frees the old memory first: the servers over it must be gone (_Model.server)."""

    def __init__(self, model: Decoder):
        self.model = model
        self.flat: tuple[torch.Tensor, torch.Tensor] | None = None
        cfg = model.cfg
        self.shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)

    @property
    def capacity(self) -> int:
        layers, heads, dim = self.shape
        return 0 if self.flat is None else self.flat[0].numel() // (layers * heads * dim)

    def view(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V pools of `tokens` tokens over the pool's memory (_PoolTooSmall if it holds fewer)."""
        if self.flat is None or tokens > self.capacity:
            raise _PoolTooSmall(tokens)
        layers, heads, dim = self.shape
        k, v = (t[:layers * tokens * heads * dim].view(layers, tokens, heads, dim) for t in self.flat)
        return k, v

    def grow(self, tokens: int) -> None:
        self.flat = None
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        _check_memory(tokens, self.model.cfg, self.model.dtype, self.model.device)
        n = tokens * self.shape[0] * self.shape[1] * self.shape[2]
        self.flat = (torch.empty(n, dtype=self.model.dtype, device=self.model.device),
                     torch.empty(n, dtype=self.model.dtype, device=self.model.device))


class Server:
    """One backend serving the model for a whole e2e entry: its attention, one KV cache (reset between replays,
    so that captured graphs keep pointing at its pools) and the graphs it needs."""

    def __init__(self, backend: str, model: Decoder, graphs: Graphs | None, capacity: int, max_rows: int,
                 max_seqs: int, max_kv_len: int, pool: KVPool | None = None):
        serving = ReferenceAttention if backend == REFERENCE else BACKENDS[backend].serving
        cfg = model.cfg
        self.model, self.graphs = model, graphs
        self.budget, self.max_seqs, self.max_kv = capacity, max_seqs, max_kv_len
        self.attention: ServingAttention = serving(model.device, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.capacity = cache_capacity(self.attention, capacity, max_seqs)
        if pool is None:
            _check_memory(self.capacity, cfg, model.dtype, model.device)
            self.cache = make_cache(self.attention, model, self.capacity)
        else:
            self.cache = make_cache(self.attention, model, self.capacity, pools=pool.view(self.capacity))
        self.attention.configure(max_rows=max_rows, max_seqs=max_seqs, max_kv_len=max_kv_len,
                                 capacity_tokens=self.cache.capacity_tokens)
        self.warm = False  # kernels compiled (JIT modules built) by a one-layer pass over a schedule
        self.serial = next(_SERVER_SERIALS)  # tells a server made anew (its graphs captured again) from the last

    def fresh_cache(self):
        """The cache emptied for a new replay (same pools), its scratch slot allocated again."""
        self.cache.reset()
        add_scratch(self.cache)
        return self.cache

    def prepare(self, schedule: list[Batch], warmup: bool) -> str:
        """Compile what the schedule needs (a one-layer pass over the first schedule: kernels and JIT modules are
        per configuration, not per batch) and capture its graphs (whose warm-up compiles what they hold);
        returns why full graphs are not used ('' when they are or the backend has none)."""
        if warmup and not self.warm and self.model.device.type == "cuda":
            shallow = self.model.truncated(1)
            cache = make_cache(self.attention, shallow, self.capacity)
            replay(shallow, schedule, self.attention, cache)
            del cache
            self.warm = True
        if self.graphs is None:
            return ""
        return prepare_graphs(self.graphs, schedule, self.attention, self.fresh_cache())

    def replay(self, schedule: list[Batch], keep_outputs: int, on_iteration,
               probe_every: int = PROBE_EVERY) -> ReplayResult:
        return replay(self.model, schedule, self.attention, self.fresh_cache(), graphs=self.graphs,
                      keep_outputs=keep_outputs, on_iteration=on_iteration, probe_every=probe_every)


def run_e2e(config: ExperimentConfig, out_dir, traces: dict[str, Trace], device: torch.device,
            log: Callable[[str], None] = print, world: World | None = None,
            deadline: Deadline | None = None) -> dict[str, int]:
    """Run every end-to-end replay of the config not already stored; returns counts per status. Entries of the
    same model share it, its graphs, its calibration and the backends' servers. Every entry's tp must be the
    world's size (a single process: 1). With a deadline, a replay that would not end before it is not started
    (nor anything after it): deadline.stopped names it."""
    world = world or World()
    deadline = deadline or Deadline()
    bad = [e.name for e in config.e2e if e.tp != world.size]
    if bad:
        raise ValueError(f"e2e entries {bad} need tp ranks, this world has {world.size}")
    store = E2EStore(out_dir, writer=world.writer)
    counts: dict[str, int] = {}
    shared: dict[tuple, _Model] = {}
    for entry in config.e2e:
        key = (entry.model, entry.num_layers, entry.dtype, entry.seed, entry.cuda_graphs,
               entry.continuous.max_num_batched_tokens, entry.continuous.max_num_seqs)
        if key not in shared:
            for old in shared.values():  # one model on the GPU at a time
                old.close()
            shared.clear()
            shared[key] = _Model(entry, device, world)
        _Entry(config, entry, store, traces, device, log, counts, shared[key], deadline).run()
        if deadline.stopped:
            break
    for model in shared.values():
        model.close()
    return counts


def failed_replay_file(out_dir: Path, rank: int) -> Path:
    """Where rank `rank` of a tensor-parallel group leaves the error record of the replay it failed in."""
    return Path(out_dir) / DIST_DIR / f"failed-replay.rank{rank}.json"


def installed(backends: Iterable[str], device: torch.device) -> list[str]:
    """The backends that can run on `device` now: what a run folder holds of theirs as skipped for want of them
    (e2e replays, kernel records) is measured again."""
    return [b for b in backends if b == REFERENCE or BACKENDS[b].available(device) is None]


def replays_left(config: ExperimentConfig, out_dir, device: torch.device) -> int:
    """How many replays of the config's e2e entries the run folder does not hold yet (or holds as skipped, of a
    backend installed now)."""
    done = E2EStore(out_dir, writer=False).done(retry=installed({b for e in config.e2e for b in e.backends}, device))
    return sum(key not in done for e in config.e2e for t in config.traces_of(e) for label, _ in e.load_points()
               for key in replay_keys(e, t.name, label))


def replay_keys(entry: E2EConfig, trace: str, label: str) -> dict[tuple[str, ...], tuple[str, int]]:
    """The replays of one load point in the order they run (repeats outer, backends interleaved): their store
    key (run_folder.e2e.KEY_FIELDS) -> (backend, repeat)."""
    return {(entry.name, trace, label, b, str(r)): (b, r) for r in range(entry.repeats) for b in entry.backends}


class _Model:
    """A model with random weights on the device, its graphs, its calibrated step time and the backends'
    servers, made on first use and shared by the entries that serve it; the servers' caches share one KVPool."""

    def __init__(self, entry: E2EConfig, device: torch.device, world: World):
        self.entry, self.device, self.world = entry, device, world
        self.cfg: ModelConfig = preset(entry.model, entry.num_layers)  # the whole model's (records name it)
        self.decoder: Decoder | None = None
        self.graphs: Graphs | None = None
        self.servers: dict[str, Server] = {}
        self.pool: KVPool | None = None  # made with the model
        self.step_time: tuple[StepTime, dict] | None = None
        self.pace: dict[str, float] = {}  # backend -> the slowest (replay seconds / modelled seconds) seen
        self.prepare_s: dict[str, float] = {}  # backend -> seconds its last preparation took

    def model(self) -> Decoder:
        if self.decoder is None:
            e = self.entry
            tp = TensorParallel(self.world.rank, self.world.size)
            self.decoder = Decoder(self.cfg, self.device, DTYPES[e.dtype], seed=e.seed, tp=tp)
            self.pool = KVPool(self.decoder)
            if e.cuda_graphs and self.device.type == "cuda":
                c = e.continuous
                self.graphs = Graphs(self.decoder, c.max_num_batched_tokens, c.max_num_seqs)
        return self.decoder

    def server(self, backend: str, capacity: int, max_rows: int, max_seqs: int, max_kv: int) -> Server:
        """The backend's server holding at least `capacity` tokens (made anew when a larger one is needed)."""
        have = self.servers.get(backend)
        if have is not None and have.budget >= capacity and have.max_seqs >= max_seqs and have.max_kv >= max_kv:
            return have
        self.drop(backend)
        model = self.model()
        try:
            server = Server(backend, model, self.graphs, capacity, max_rows, max_seqs, max_kv, self.pool)
        except _PoolTooSmall as small:  # every rank asks for the same sizes in the same order: all grow here
            for other in list(self.servers):  # their caches are views of the pool being replaced
                self.drop(other)
            assert self.pool is not None
            self.pool.grow(small.tokens)
            server = Server(backend, model, self.graphs, capacity, max_rows, max_seqs, max_kv, self.pool)
        self.servers[backend] = server
        return server

    def drop(self, backend: str) -> None:
        server = self.servers.pop(backend, None)
        if server is not None:
            if self.graphs is not None:
                self.graphs.drop(server.attention.name)  # its full graphs point into the cache being freed
            del server
            gc.collect()  # should a server's objects refer to each other, its cache goes only once collected
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def close(self) -> None:
        for backend in list(self.servers):
            self.drop(backend)
        self.decoder = self.graphs = self.pool = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _Entry:
    """The replays of one e2e entry, in order: load points, repeats, backends interleaved."""

    def __init__(self, config, entry: E2EConfig, store: E2EStore, traces, device, log, counts, shared: _Model,
                 deadline: Deadline):
        self.config, self.entry, self.store, self.traces, self.device = config, entry, store, traces, device
        self.log, self.counts, self.shared, self.deadline = log, counts, shared, deadline
        self.cfg: ModelConfig = shared.cfg
        self.world = shared.world
        self.server_errors: dict[str, Exception] = {}
        self.current: E2ERecord | None = None  # the replay in progress (what a failure in a group is charged to)
        self.commit = envinfo.git_sha() or ""
        self.slo = Slo(entry.slo.ttft_ms, entry.slo.tpot_ms, entry.slo.attainment)
        self._pace_key = f"{self.cfg.name}/{self.cfg.num_layers}"
        stored = self.world.from_writer(lambda: _stored_paces(self.store.dir / PACE_FILE))
        for backend, (pace, prepare_s) in stored.get(self._pace_key, {}).items():
            self.shared.pace[backend] = max(pace, self.shared.pace.get(backend, 0.0))
            self.shared.prepare_s.setdefault(backend, prepare_s)

    def _remember_pace(self, backend: str) -> None:
        """Store the backend's slowest pace and preparation time of the run so far (PACE_FILE)."""
        if not self.world.writer:
            return
        path = self.store.dir / PACE_FILE
        stored = _stored_paces(path)
        pace, prepare_s = stored.setdefault(self._pace_key, {}).get(backend, (0.0, 0.0))
        stored[self._pace_key][backend] = (max(pace, self.shared.pace.get(backend, 0.0)),
                                           max(prepare_s, self.shared.prepare_s.get(backend, 0.0)))
        text = {key: {b: {"pace": round(p, 3), "prepare_s": round(t, 1)} for b, (p, t) in seen.items()}
                for key, seen in stored.items()}
        write_atomic(path, json.dumps(text, indent=2) + "\n")

    @property
    def graphs(self) -> Graphs | None:
        return self.shared.graphs

    def run(self) -> None:
        entry, retry = self.entry, installed(self.entry.backends, self.device)
        done = self.world.from_writer(lambda: self.store.done(retry))
        todo = {(t.name, label): [br for key, br in replay_keys(entry, t.name, label).items() if key not in done]
                for t in self.config.traces_of(entry) for label, _ in entry.load_points()}
        if not any(todo.values()):
            return
        step_time = self._step_time()
        if step_time is None:
            return
        scenarios = {}
        for trace, label, spec in load_point_specs(self.config, entry, step_time):
            if not todo[(trace, label)]:
                continue
            try:
                scenarios[(trace, label)] = scenario(self.traces[trace], spec)
            except Exception as e:  # noqa: BLE001 -- one load point's failure must not end the run
                self._store_all(trace, label, todo[(trace, label)], "error",
                                f"building the schedule: {type(e).__name__}: {first_line(e)}")
        for (trace, label), scen in scenarios.items():
            self._load_point(trace, label, scen, todo[(trace, label)], scenarios)
            if self.deadline.stopped:
                return

    # --- set-up -------------------------------------------------------------------------------------------------
    def _ensure_model(self) -> Decoder:
        return self.shared.model()

    def _server(self, backend: str, scenarios: dict) -> Server | Exception:
        """The backend's server, sized for every load point of the entry (an exception: why it cannot be made)."""
        if backend in self.server_errors:
            return self.server_errors[backend]
        try:
            c = self.entry.continuous
            budget, max_seqs = server_budget(c, scenarios.values())
            max_kv = max(int(b.kv_lens.max()) for s in scenarios.values() for b in s.schedule)
            return self.shared.server(backend, budget, c.max_num_batched_tokens, max_seqs, max_kv)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: this backend's replays become errors
            self._fatal_in_a_group(e)
            self.server_errors[backend] = e
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return e

    def _step_time(self) -> StepTime | None:
        """The scheduler's step-time model: calibrated on this GPU once per entry (stored, so a resumed run
        schedules exactly as before), or the config's; None when the time limit leaves no time to calibrate."""
        e = self.entry
        path = self.store.dir / STEP_TIME_FILE
        stored = self.world.from_writer(lambda: json.loads(path.read_text()) if path.exists() else {})
        if (step_time := stored_step_time(stored, e)) is not None:
            return step_time
        if not (e.calibrate and self.device.type == "cuda"):
            return e.continuous.step_time
        if self.shared.step_time is not None:  # measured for an earlier entry of the same model
            fitted, record = self.shared.step_time
            stored[e.name] = record
            if self.world.writer:
                write_atomic(path, json.dumps(stored, indent=2) + "\n")
            return fitted
        backend = next((b for b in ("fa2", *e.backends) if b != REFERENCE and b in BACKENDS
                        and BACKENDS[b].serving is not None and not BACKENDS[b].available(self.device)), None)
        if backend is None:
            return e.continuous.step_time
        if not self.deadline.allows(CALIBRATE_S, f"calibrating the step-time model of e2e {e.name}"):
            return None
        self.log(f"e2e {e.name}: calibrating the step-time model with {backend} ...")
        try:
            fitted, points = calibrate(self._ensure_model(), self.graphs, backend, e.continuous)
        except Exception as ex:  # noqa: BLE001 -- fall back to the config's model, and say so
            self._fatal_in_a_group(ex)
            self.log(f"  calibration failed ({type(ex).__name__}: {first_line(ex)}); using continuous.step_time")
            return e.continuous.step_time
        fitted, points = self.world.from_writer(lambda: (fitted, points))  # rank 0's times: one schedule for all
        stored[e.name] = {"step_time": dataclasses.asdict(fitted), "backend": backend, "points": points,
                          "model": self.cfg.name, "num_layers": self.cfg.num_layers}
        self.shared.step_time = (fitted, stored[e.name])
        if self.world.writer:
            write_atomic(path, json.dumps(stored, indent=2) + "\n")
        self.log(f"  step time = {fitted.base_ms:.2f} ms + {fitted.per_token_us:.2f} us/token + "
                 f"{fitted.per_kv_token_ns:.2f} ns/KV token -> {path}")
        return fitted

    # --- replays ------------------------------------------------------------------------------------------------
    def _load_point(self, trace: str, label: str, scen: Scenario, todo, scenarios) -> None:
        e = self.entry
        self.log(f"e2e {e.name} {trace} load {label}: {len(scen.arrivals)} requests ({scen.refused} refused), "
                 f"{len(scen.schedule)} iterations, model {self.cfg.name} x {self.cfg.num_layers} layers, "
                 f"{e.repeats} repeat(s)")
        if not scen.arrivals:
            self._store_all(trace, label, todo, "refused", f"the scheduler refused all {scen.refused} requests "
                            "(each needs more than max_kv_tokens / max_num_batched_tokens allow)")
            return
        first, rep = todo[0]
        if not self._in_time(scen, first, False, f"e2e {e.name} {trace} load {label}: {first} #{rep}"):
            return
        reference = None
        if e.verify_iterations and any(b != REFERENCE for b, _ in todo):
            try:
                reference = _reference_outputs(self._ensure_model(), scen, e.verify_iterations)
            except Exception as ex:  # noqa: BLE001 -- out of memory and the like: this load point only
                self._fatal_in_a_group(ex)
                self._store_all(trace, label, todo, "error", f"reference: {type(ex).__name__}: {first_line(ex)}")
                return
        prepared: dict[str, tuple[int, str]] = {}  # backend -> (its server's serial, why not full graphs)
        server: Server | Exception | None = None
        for backend, rep in todo:  # repeat-major: A B C A B C
            # (no variable may keep a server: one made anew must find the old one's memory free)
            ready = prepared.get(backend, (-1, ""))[0] == getattr(self.shared.servers.get(backend), "serial", None)
            if not self._in_time(scen, backend, ready, f"e2e {e.name} {trace} load {label}: "
                                 f"{backend} #{rep}"):
                return
            record = self.current = self._base(trace, label, backend, rep, scen)
            why = None if backend == REFERENCE else BACKENDS[backend].available(self.device)
            if why:
                record = dataclasses.replace(record, status="skipped", reason=why)
                self.log(f"  {backend}: skipped ({why})")
            else:
                server = None  # the last replay's server: held here, it could not make room for this one
                server = self._server(backend, scenarios)
                if isinstance(server, Exception):
                    record = dataclasses.replace(record, status="error",
                                                 reason=f"server: {type(server).__name__}: {first_line(server)}")
                else:
                    try:
                        if prepared.get(backend, (-1, ""))[0] != server.serial:  # new, or made anew to fit
                            t0 = time.monotonic()
                            prepared[backend] = server.serial, server.prepare(scen.schedule, e.warmup)
                            self.shared.prepare_s[backend] = time.monotonic() - t0
                            self._remember_pace(backend)
                    except Exception as ex:  # noqa: BLE001 -- compilation or capture failed: this backend only
                        self._fatal_in_a_group(ex)
                        record = dataclasses.replace(record, status="error", reason=f"warm-up / graphs: "
                                                     f"{type(ex).__name__}: {first_line(ex)}")
                    else:
                        record = self._replay(server, scen, record, reference, prepared[backend][1])
            if record.status != "ok":
                self.log(f"  {backend} #{rep}: {record.status} ({record.reason})")
            self.store.add_summary(record)
            self.current = None
            self.counts[record.status] = self.counts.get(record.status, 0) + 1

    def _in_time(self, scen: Scenario, backend: str, prepared: bool, what: str) -> bool:
        """Whether the replay (and, unless `prepared`, its backend's preparation) ends before the deadline, by
        the slowest pace and preparation this backend has shown in the run (this process or one before it)."""
        if self.deadline.seconds is None:
            return True
        estimate = scen.modelled_s * self.shared.pace.get(backend, PACE)
        if not prepared and backend != REFERENCE:
            estimate += self.shared.prepare_s.get(backend, FIRST_PREPARE_S)
        return self.deadline.allows(estimate, what)

    def _replay(self, server: Server, scen: Scenario, base: E2ERecord, reference, graph_failure: str) -> E2ERecord:
        e = self.entry
        labels = {**dict(zip(("e2e", "trace", "rate", "backend", "repeat"), base.key)), "attempt": base.attempt}
        rows: list[dict] = []
        done_iterations = 0

        def keep(it) -> None:
            nonlocal done_iterations
            done_iterations += 1
            rows.append({**labels, **{k: _sig(v) for k, v in dataclasses.asdict(it).items()}})
            if len(rows) >= 256:
                self.store.append(ITERATIONS_FILE, rows)
                rows.clear()

        attn = server.attention
        base = dataclasses.replace(base, kv_layout=attn.layout, kv_access=attn.kv_access, kernel=attn.kernel,
                                   kv_capacity_tokens=server.capacity)
        t0 = time.perf_counter()
        try:
            result = server.replay(scen.schedule, e.verify_iterations, keep)
        except KVCacheError as ex:
            self.store.append(ITERATIONS_FILE, rows)
            return dataclasses.replace(base, status="error", iterations=done_iterations, reason=(
                f"KV cache full at iteration {done_iterations} (budget {base.kv_budget_tokens} tokens): "
                f"{first_line(ex)}"))
        except Exception as ex:  # noqa: BLE001 -- a backend failing must not lose the other replays
            self.store.append(ITERATIONS_FILE, rows)
            self._fatal_in_a_group(ex, f"iteration {done_iterations}: {type(ex).__name__}: {first_line(ex)}")
            _log.warning("  %s #%s: replay failed at iteration %d", base.backend, base.repeat, done_iterations,
                         exc_info=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return dataclasses.replace(base, status="error", reason=f"iteration {done_iterations}: "
                                       f"{type(ex).__name__}: {first_line(ex)}", iterations=done_iterations)
        self.store.append(ITERATIONS_FILE, rows)
        if scen.modelled_s > 0:
            pace = (time.perf_counter() - t0) / scen.modelled_s
            self.shared.pace[base.backend] = max(pace, self.shared.pace.get(base.backend, 0.0))
            self._remember_pace(base.backend)
        record = _summary(base, scen, result, reference, self.slo, e.percentiles, graph_failure)
        self.store.append(REQUESTS_FILE, [{**labels, **r} for r in record.requests])
        self.log(f"  {base.backend} #{base.repeat}: {record.record.status}, mean e2e {record.record.e2e_ms_mean:.1f} "
                 f"ms, TTFT {record.record.ttft_ms_mean:.1f}, TPOT {record.record.tpot_ms_mean:.2f}, "
                 f"{record.record.throughput_tok_s:.0f} tok/s, iteration {record.record.iteration_ms_mean:.2f} ms "
                 f"({record.record.graphs}) [{time.perf_counter() - t0:.0f} s]")
        return record.record

    def _fatal_in_a_group(self, error: Exception, reason: str | None = None) -> None:
        """In a tensor-parallel group a failure stops the job (re-raised): the other ranks cannot skip along. A
        failure inside a replay is charged to it first (failed_replay_file: the process that started the ranks
        stores it as an error row and starts them again, so the replays after it still run)."""
        if self.world.size == 1:
            return
        if self.current is not None:
            why = reason or f"{type(error).__name__}: {first_line(error)}"
            record = dataclasses.replace(self.current, status="error", reason=f"rank {self.world.rank}: {why}")
            path = failed_replay_file(self.store.dir.parent, self.world.rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(dataclasses.asdict(record)))
        raise error

    def _base(self, trace: str, label: str, backend: str, rep: int, scen: Scenario | None) -> E2ERecord:
        cfg, e = self.cfg, self.entry
        spec = scen.spec if scen is not None else e.continuous
        closed = spec.max_concurrency is not None
        return E2ERecord(
            e.name, trace, label, backend, cfg.name, cfg.num_layers, cfg.full_layers or cfg.num_layers, status="ok",
            repeat=rep, attempt=new_attempt(), commit=self.commit, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            schedule=(f"closed-loop (max {spec.max_concurrency} in flight)" if closed else "open-loop"),
            burstiness=spec.burstiness if spec.arrivals == "poisson" else None, max_concurrency=spec.max_concurrency,
            kv_budget_tokens=spec.max_kv_tokens or (peak_tokens(scen.schedule) if scen is not None else None),
            slo=f"ttft<={self.slo.ttft_ms}ms tpot<={self.slo.tpot_ms}ms attainment>={self.slo.attainment}",
            step_time=(f"{spec.step_time.base_ms:.3g} ms + {spec.step_time.per_token_us:.3g} us/token + "
                       f"{spec.step_time.per_kv_token_ns:.3g} ns/kv"),
            timing="CUDA events (pipelined iterations)" if self.device.type == "cuda" else "wall-clock-cpu",
            cuda_graphs="on" if self.graphs is not None else "off", tp=e.tp)

    def _store_all(self, trace: str, label: str, todo, status: str, reason: str) -> None:
        self.log(f"  {status}: {reason}")
        for backend, rep in todo:
            self.store.add_summary(dataclasses.replace(self._base(trace, label, backend, rep, None), status=status,
                                                       reason=reason))
            self.counts[status] = self.counts.get(status, 0) + 1


def _sig(value):
    """A float to 6 significant digits (timers resolve ~0.5 us: the rest of a double's digits is noise that
    triples iterations.csv); anything else as it is."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


@dataclasses.dataclass
class _Summary:
    record: E2ERecord
    requests: list[dict]


def _summary(base: E2ERecord, scen: Scenario, result: ReplayResult, reference, slo: Slo, percentiles,
             graph_failure: str) -> _Summary:
    its = result.iterations
    # an iteration that starts after the engine sat idle could not overlap its host work with the previous one
    durations = np.array([it.iteration_ms for it in its]) * 1e-3
    cold = np.array([it.host_ms + it.gpu_ms for it in its]) * 1e-3
    ends, sent = timeline(scen.schedule, scen.arrivals, durations, scen.sent_after, cold=cold)
    requests = request_latencies(scen.schedule, sent, ends)
    finished = {int(r) for r, n in zip(requests["request_id"], requests["output_tokens"])
                if scen.expected.get(int(r)) == n}
    main = [p for p in percentiles if p in (50, 90, 99)]
    metrics = summarize(requests, durations, scen.expected, itl_s=inter_token_gaps(scen.schedule, ends, finished),
                        slo=slo, percentiles=sorted({*main, *percentiles}))
    extra = {k: v for k, v in metrics.items() if k.split("_p")[-1].replace(".", "").isdigit()
             and k not in E2ERecord.__dataclass_fields__}
    err, match = _compare(result, reference)
    status = "incorrect" if err is not None and err > E2E_MAX_REL_ERR else "ok"
    total = sum(it.iteration_ms for it in its)
    modes: dict[str, int] = {}
    for it in its:
        modes[it.graph] = modes.get(it.graph, 0) + 1
    record = dataclasses.replace(
        base, status=status, reason="" if status == "ok" else f"final hidden states {err:.3g} from the reference",
        num_requests=len(scen.arrivals) + scen.refused, refused=scen.refused, iterations=len(its),
        **{k: v for k, v in metrics.items() if k in E2ERecord.__dataclass_fields__},
        percentiles=json.dumps(extra) if extra else "",
        iteration_ms_mean=total / max(len(its), 1),
        gpu_ms_mean=float(np.mean([it.gpu_ms for it in its])) if its else None,
        host_ms_mean=float(np.mean([it.host_ms for it in its])) if its else None,
        prepare_ms_mean=float(np.mean([it.prepare_ms for it in its])) if its else None,
        launch_ms_mean=float(np.mean([it.launch_ms for it in its])) if its else None,
        launches_per_layer=float(np.mean([it.launches_per_layer for it in its])) if its else None,
        attn_host_us_per_layer=float(np.mean([it.attn_host_us_per_layer for it in its])) if its else None,
        attention_share=attention_share([it.graph for it in its], [it.iteration_ms for it in its],
                                        [it.attention_ms for it in its]),
        room_ms_total=sum(it.room_ms for it in its), moved_gb=sum(it.moved_bytes for it in its) / 1e9,
        max_rel_err=err, token_match=match, graphs=" ".join(f"{k}:{v}" for k, v in sorted(modes.items())) + (
            f" (full graphs failed: {graph_failure})" if graph_failure else ""))
    return _Summary(record, requests.to_dict("records"))


def _reference_outputs(model: Decoder, scen: Scenario, n: int) -> ReplayResult:
    head = scen.schedule[:n]
    attn = ReferenceAttention(model.device, model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim)
    cache = make_cache(attn, model, cache_capacity(attn, peak_tokens(head), min(scen.spec.max_num_seqs,
                                                                                 len(scen.arrivals))))
    return replay(model, head, attn, cache, keep_outputs=n)


def _compare(result: ReplayResult, reference) -> tuple[float | None, float | None]:
    """Largest relative L2 error of the sampled rows' final hidden states against the reference's over the
    verified iterations, and the share of greedy tokens that agree."""
    if reference is None:
        return None, None
    errs, same, total = [], 0, 0
    for i, ref in reference.hidden.items():
        if i in result.hidden and ref.numel():
            errs.append(float((result.hidden[i] - ref).norm() / ref.norm().clamp_min(1e-12)))
            same += int((result.tokens[i] == reference.tokens[i]).sum())
            total += ref.shape[0]
    return (max(errs) if errs else None), (same / total if total else None)


def _check_memory(capacity: int, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
    if device.type != "cuda":
        return
    need = kv_bytes(capacity, cfg, dtype)
    free, _ = torch.cuda.mem_get_info(device)
    if need > 0.9 * free:
        raise ConfigError(f"a KV cache of {capacity} tokens x {cfg.num_layers} layers needs {need / 2**30:.1f} GiB, "
                           f"{free / 2**30:.1f} GiB free: lower continuous.max_kv_tokens or num_layers")


def calibrate(model: Decoder, graphs: Graphs | None, backend: str, spec: ContinuousSpec,
              ) -> tuple[StepTime, list[dict]]:
    """Fit the scheduler's step-time model (base + per new token + per KV token read) to this GPU: replay a
    synthetic schedule (prefills of a few sizes, then decode steps of a few batch sizes and contexts) through
    the model with `backend`'s attention and fit its measured iteration times (fit_step_time)."""
    schedule = _calibration_schedule(spec)
    server = Server(backend, model, graphs, peak_tokens(schedule), spec.max_num_batched_tokens,
                    max(len(b) for b in schedule), max(int(b.kv_lens.max()) for b in schedule))
    server.prepare(schedule, warmup=True)
    times = [it.iteration_ms for it in server.replay(schedule, 0, None, probe_every=0).iterations]
    points = [{"q_tokens": int(b.q_lens.sum()), "kv_tokens": int(b.kv_lens.sum()), "ms": t}
              for b, t in zip(schedule, times)]
    if graphs is not None:
        graphs.drop(server.attention.name)  # they point into this server's cache, which goes now
    del server
    return fit_step_time(points), points


def fit_step_time(points: list[dict]) -> StepTime:
    """The step-time model (base + per new token + per KV token) closest to measured iterations (q_tokens,
    kv_tokens, ms) in relative error: a schedule is mostly small iterations, which an absolute fit sacrifices to
    the few long prefills (on an H100 it paced 9.6 ms decode steps at 7.2 ms, and long schedules fell behind)."""
    x = np.array([[1.0, p["q_tokens"], p["kv_tokens"]] for p in points])
    ms = np.array([p["ms"] for p in points], dtype=float)
    coef, *_ = np.linalg.lstsq(x / ms[:, None], np.ones_like(ms), rcond=None)
    coef = np.maximum(coef, 0.0)
    return StepTime(base_ms=float(coef[0]), per_token_us=float(coef[1] * 1e3), per_kv_token_ns=float(coef[2] * 1e6))


def _calibration_schedule(spec: ContinuousSpec) -> list[Batch]:
    """Prefill chunks of 256 to max_num_batched_tokens tokens, then decode steps of 8 to 64 requests at 1k and
    4k context (within the KV budget), each measured several times."""
    batches, rid = [], 0
    tokens = [t for t in (256, 1024, 4096, 8192) if t <= spec.max_num_batched_tokens] or [
        spec.max_num_batched_tokens]
    for t in tokens:
        for _ in range(3):
            batches.append(Batch(f"cal/p{rid}", "calibration", "calibration", [t], [t], [rid], sampled=[True]))
            rid += 1
    budget = spec.max_kv_tokens or 1 << 30
    for n, ctx in ((8, 1024), (32, 1024), (64, 1024), (8, 4096), (32, 4096)):
        if n * (ctx + 8) > budget or n > spec.max_num_seqs:
            continue
        ids = list(range(rid, rid + n))
        rid += n
        for lo in range(0, n * ctx, spec.max_num_batched_tokens):  # the prompts, in chunks the scheduler allows
            rows = np.arange(lo, min(lo + spec.max_num_batched_tokens, n * ctx))
            reqs = np.unique(rows // ctx)
            q = np.array([np.sum(rows // ctx == r) for r in reqs])
            kv = np.array([int(rows[rows // ctx == r].max()) % ctx + 1 for r in reqs])
            batches.append(Batch(f"cal/f{rid}-{lo}", "calibration", "calibration", q, kv, [ids[r] for r in reqs],
                                 sampled=kv == ctx))
        for step in range(6):
            batches.append(Batch(f"cal/d{rid}-{step}", "calibration", "calibration", np.ones(n, int),
                                 np.full(n, ctx + 1 + step), ids, sampled=np.ones(n, bool)))
    return batches
