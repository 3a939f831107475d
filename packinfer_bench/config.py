"""Experiment configs: the YAML schema as dataclasses, and a loader whose errors name the key, the bad value and
what is allowed. The schema is documented in experiments/README.md."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from packinfer import HEAD_DIMS

from packinfer_bench.backends import BACKENDS
from packinfer_bench.errors import ConfigError
from packinfer_bench.models import check_tp, preset
from packinfer_bench.resources import find_experiment
from packinfer_bench.traces import KINDS, SHIPPED
from packinfer_bench.traces import check_options as check_trace_options
from packinfer_bench.traces.limits import (
    MAX_COUNT,
    MAX_RATE,
    MIN_RATE,
    KeyedConfigError,
    check_float,
    check_int,
    check_name,
    check_seed,
    check_unique,
    join,
)
from packinfer_bench.workload import ContinuousSpec, StaticSpec

#: Attention heads of one layer (the largest models have 128).
MAX_HEADS = 1024
#: Warm-up and timed calls per measurement.
MAX_REPEATS = 100_000


@dataclass
class TraceConfig:
    """A trace to replay: a shipped name, a file path or hf:OWNER/NAME (none for synthetic); kind is detected
    from the file when omitted; options go to the loader (e.g. tokenizer, or a synthetic trace's parameters)."""

    name: str
    source: str | None = None
    kind: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.kind is not None and self.kind not in KINDS:
            raise KeyedConfigError("kind", f"{self.kind!r} not allowed; allowed: {sorted(KINDS)}")
        synthetic = self.kind == "synthetic" or (self.source is None and self.kind is None)
        if self.source is None and not synthetic:
            raise KeyedConfigError("source", f"required for a {self.kind} trace (a shipped name {sorted(SHIPPED)}, "
                                             "a file path or hf:OWNER/NAME)")
        if self.source is not None and (not self.source.strip() or "\0" in self.source):
            raise KeyedConfigError("source", f"{self.source!r} not allowed; allowed: a shipped name "
                                             f"{sorted(SHIPPED)}, a file path or hf:OWNER/NAME")
        kind = "synthetic" if synthetic else self.kind or SHIPPED.get(self.source, (None, None))[1] or (
            "sharegpt" if self.source.startswith("hf:") else None)
        if kind is not None:  # a file's kind is only known once it is read: its loader checks then
            check_trace_options(kind, self.options, lambda key, detail: KeyedConfigError(join("options", key), detail))


@dataclass
class WorkloadConfig:
    """How traces become batches: exactly one of `static` and `continuous`; `traces` names the traces it
    replays (all of the experiment's when omitted)."""

    name: str
    traces: list[str] | None = None
    static: StaticSpec | None = None
    continuous: ContinuousSpec | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if (self.static is None) == (self.continuous is None):
            raise ConfigError("a workload needs exactly one of 'static' and 'continuous'")
        _check_trace_list(self.traces)


@dataclass
class ShapeConfig:
    """An attention shape (one model's layer): query heads, KV heads (GQA), head dim, dtype."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: Literal["bf16", "fp16"] = "bf16"

    def __post_init__(self) -> None:
        check_name(self.name)
        check_int(self.num_heads, "num_heads", 1, MAX_HEADS, "query heads of one layer")
        check_int(self.num_kv_heads, "num_kv_heads", 1, MAX_HEADS, "KV heads of one layer")
        if self.num_heads % self.num_kv_heads:
            raise KeyedConfigError("num_heads", f"{self.num_heads} must be a positive multiple of num_kv_heads "
                                                f"({self.num_kv_heads})")
        if self.head_dim not in HEAD_DIMS:
            raise KeyedConfigError("head_dim", f"{self.head_dim} not allowed; allowed: {list(HEAD_DIMS)}")


@dataclass
class GpuConfig:
    """The GPU the experiment is meant for (used by analytic predictions and to label reports)."""

    name: str
    sms: int
    hbm_tbps: float | None = None
    bf16_tflops: float | None = None

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise KeyedConfigError("name", "must not be empty")
        check_int(self.sms, "sms", 1, 4096, "streaming multiprocessors; an H100 has 132")
        if self.hbm_tbps is not None:
            check_float(self.hbm_tbps, "hbm_tbps", 0.0, 1000.0, lo_open=True, why="memory bandwidth in TB/s")
        if self.bf16_tflops is not None:
            check_float(self.bf16_tflops, "bf16_tflops", 0.0, 1e6, lo_open=True, why="dense bf16 TFLOP/s")


@dataclass
class TimingConfig:
    """Warm-up calls, timed repeats (median and spread reported), L2 flush before each repeat; cuda_graphs: time
    the replay of a CUDA graph captured from the call (records say `timing: cuda-graph`; a call that cannot be
    captured is an `error` record naming why)."""

    warmup: int = 10
    repeats: int = 50
    flush_l2: bool = True
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        check_int(self.warmup, "warmup", 0, MAX_REPEATS, "untimed calls before the timed ones, per measurement")
        check_int(self.repeats, "repeats", 1, MAX_REPEATS, "timed calls per measurement: at least one to take "
                                                         "the median of")


#: The end-to-end replays' float32 yardstick, accepted beside the backends that serve (Backend.serving).
REFERENCE = "reference"
E2E_BACKENDS = (REFERENCE, *(name for name, b in BACKENDS.items() if b.serving is not None))


@dataclass
class SloConfig:
    """A request meets the SLO when its TTFT and TPOT are within bounds (null: unbounded); a load point is
    sustained when at least `attainment` of its finished requests meet it."""

    ttft_ms: float | None = 1000.0
    tpot_ms: float | None = 50.0
    attainment: float = 0.9

    def __post_init__(self) -> None:
        for key in ("ttft_ms", "tpot_ms"):
            if getattr(self, key) is not None:
                check_float(getattr(self, key), key, 0.0, 1e9, lo_open=True, why="a latency bound in ms")
        check_float(self.attainment, "attainment", 0.0, 1.0, lo_open=True, why="share of requests within the SLO")


@dataclass
class E2EConfig:
    """An end-to-end serving replay: a model preset (layers limited by num_layers), the traces it replays, the
    continuous-batching schedule (its max_kv_tokens is the KV budget; burstiness and max_concurrency shape the
    client), the load points - `rates` (requests/s, gamma arrivals), `concurrency` (closed loop: every request
    ready at once, at most N in flight), or neither (the trace's own arrivals) - each replayed `repeats` times
    with the backends interleaved (A B C A B C ...), the SLO that goodput and the sustained rate count against,
    the latency percentiles reported, how many first iterations are checked against the float32 reference
    (verify_iterations), a warm-up pass that compiles every kernel before the timed replays, CUDA graphs (full
    for backends with a graph mode, else piecewise), and `calibrate`: measure the model's iteration time on this
    GPU first and schedule with that step-time model (stored in the run folder) instead of continuous.step_time;
    `tp`: tensor-parallel degree, the model sharded over that many ranks (GPUs; processes on a CPU), each
    attending over its share of the heads with its own KV cache of the backend (`run` starts the ranks)."""

    name: str
    model: str
    continuous: ContinuousSpec
    num_layers: int | None = None
    traces: list[str] | None = None
    rates: list[float] | None = None
    concurrency: list[int] | None = None
    repeats: int = 3
    backends: list[str] = field(default_factory=lambda: ["fa2", "flashinfer", "packinfer"])
    dtype: Literal["bf16", "fp16"] = "bf16"
    slo: SloConfig = field(default_factory=SloConfig)
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    verify_iterations: int = 4
    warmup: bool = True
    cuda_graphs: bool = True
    calibrate: bool = True
    seed: int = 0
    tp: int = 1

    def __post_init__(self) -> None:
        check_name(self.name)
        check_tp(preset(self.model, self.num_layers), self.tp)  # names the allowed models / layer counts / degrees
        _check_trace_list(self.traces)
        bad = [b for b in self.backends if b not in E2E_BACKENDS]
        if bad:
            raise KeyedConfigError("backends", f"unknown end-to-end backend(s) {bad}; allowed: {list(E2E_BACKENDS)}")
        if not self.backends:
            raise KeyedConfigError("backends", f"needs at least one of {list(E2E_BACKENDS)}")
        check_unique(self.backends, "backends")
        if self.rates is not None and self.concurrency is not None:
            raise KeyedConfigError("concurrency", "give rates (open loop) or concurrency (closed loop), not both: "
                                                  "make two entries")
        if self.rates is not None:
            if not self.rates:
                raise KeyedConfigError("rates", "needs at least one rate (or null: the schedule's own arrivals)")
            if any(r <= 0 for r in self.rates):
                raise KeyedConfigError("rates", f"every rate must be > 0 requests/s, got {self.rates}")
            for i, rate in enumerate(self.rates):
                check_float(rate, f"rates[{i}]", MIN_RATE, MAX_RATE, why="Poisson arrivals, requests/s")
            check_unique(self.rates, "rates")
        if self.concurrency is not None:
            if not self.concurrency:
                raise KeyedConfigError("concurrency", "needs at least one request count (or leave it out)")
            for i, n in enumerate(self.concurrency):
                check_int(n, f"concurrency[{i}]", 1, 65536, "requests in flight at once")
            check_unique(self.concurrency, "concurrency")
        check_int(self.repeats, "repeats", 1, 1000, "replays of each load point per backend")
        if not self.percentiles:
            raise KeyedConfigError("percentiles", "needs at least one percentile, e.g. [50, 90, 99]")
        for i, p in enumerate(self.percentiles):
            check_float(p, f"percentiles[{i}]", 0.0, 100.0, why="a percentile")
        check_unique(self.percentiles, "percentiles")
        check_int(self.verify_iterations, "verify_iterations", 0, MAX_COUNT, "first iterations checked against "
                                                                            "the reference (0: none)")
        check_seed(self.seed)

    def load_points(self) -> list[tuple[str, dict]]:
        """(label, changes to the continuous spec) of every load point: 'R' for R requests/s, 'cN' for N in
        flight, 'trace' for the trace's own arrivals."""
        if self.rates is not None:
            return [(f"{r:g}", {"arrivals": "poisson", "rate": r}) for r in self.rates]
        if self.concurrency is not None:  # everything ready at once: the client's limit is the only pacing
            return [(f"c{n}", {"arrivals": "poisson", "rate": MAX_RATE, "max_concurrency": n})
                    for n in self.concurrency]
        return [("trace", {})]


@dataclass
class OutputConfig:
    dir: str = "runs"  # new runs; committed reference runs live in results/

    def __post_init__(self) -> None:
        if not self.dir.strip() or "\0" in self.dir:
            raise KeyedConfigError("dir", f"{self.dir!r} not allowed; allowed: a folder path")


@dataclass
class ExperimentConfig:
    name: str
    traces: list[TraceConfig]
    workloads: list[WorkloadConfig] = field(default_factory=list)
    shapes: list[ShapeConfig] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    description: str = ""
    device: Literal["auto", "cuda", "cpu", "analytic"] = "auto"
    gpu: GpuConfig | None = None
    timing: TimingConfig = field(default_factory=TimingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    e2e: list[E2EConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_name(self.name, folder=True)
        for key, items in (("traces", self.traces), ("workloads", self.workloads), ("shapes", self.shapes),
                           ("e2e", self.e2e)):
            names = [i.name for i in items]
            if not names and key == "traces":
                raise ConfigError("traces: needs at least one entry")
            if not names and key in ("workloads", "shapes") and not self.e2e:
                raise ConfigError(f"{key}: needs at least one entry (or an e2e section)")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"{key}: duplicate name(s) {dup}")
        known = [t.name for t in self.traces]
        for key, items in (("workloads", self.workloads), ("e2e", self.e2e)):
            for i, w in enumerate(items):
                bad = [t for t in (w.traces or []) if t not in known]
                if bad:
                    raise ConfigError(f"{key}[{i}].traces: unknown trace(s) {bad}; allowed: {known}")
        if self.device == "analytic" and self.gpu is None:
            raise ConfigError("device: analytic needs a 'gpu' section (name, sms) to predict for")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise ConfigError(f"backends: unknown backend(s) {bad}; allowed: {list(BACKENDS)}")
        check_unique(self.backends, "backends")

    def traces_of(self, workload: WorkloadConfig) -> list[TraceConfig]:
        return [t for t in self.traces if workload.traces is None or t.name in workload.traces]

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (config.yaml); an e2e entry's tp is left out at 1, its default, so that a run
        folder begun before the key existed still resumes with the same config."""
        data = dataclasses.asdict(self)
        for entry in data["e2e"]:
            if entry["tp"] == 1:
                del entry["tp"]
        return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate an experiment YAML file (a shipped one by its repository path from any folder), with
    `overrides` ("key=value", `run --set`) applied to its data first, so that they are checked like the file."""
    path = find_experiment(Path(path))
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: duplicate key {e.key!r} (first on line {e.first}); YAML would keep "
                          "only the last value: give each key once") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if isinstance(data, dict):
        for item in overrides:
            apply_override(data, item)
    try:
        return build(ExperimentConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_override(data: dict, item: str) -> None:
    """Set one "key=value" in a config's YAML data: the key dotted (timing.repeats, e2e[0].rates or e2e.0.rates),
    the value read as YAML (3, true, [fa2, packinfer], {a: 1}); missing mappings on the way are created, and
    the schema then checks the result like any key of the file."""
    key, sep, text = item.partition("=")
    parts = key.strip().replace("[", ".").replace("]", "").split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY, e.g. timing.repeats=5 or "
                          "e2e[0].rates=[1.0]")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        why = getattr(e, "problem", None) or e
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({why})") from None
    node: Any = data
    where = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {item!r}: {where} is a list of {len(node)}; allowed: an index 0 to "
                                  f"{len(node) - 1}, e.g. {where}[0]")
            index = int(part)
            where = f"{where}[{index}]"
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {where} is {node!r}, not a mapping: it has no key {part!r}")
        where = _join(where, part)
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def select_backends(config: ExperimentConfig, only: Sequence[str] | None = None,
                    skip: Sequence[str] = ()) -> ExperimentConfig:
    """The config with only the backends `only` names (all when None), less those in `skip`, in its kernel sweep
    and its end-to-end entries (an entry left with none is dropped); `run --backends/--skip`. A name the config
    does not run is a ConfigError listing the ones it does."""
    ours = list(dict.fromkeys([*config.backends, *(b for e in config.e2e for b in e.backends)]))
    for flag, names in (("--backends", only or ()), ("--skip", skip)):
        bad = [n for n in names if n not in ours]
        if bad:
            others = [n for n in (*BACKENDS, REFERENCE) if n not in ours]
            raise ConfigError(f"{flag}: {', '.join(bad)} not among this config's backends; allowed: "
                              f"{', '.join(ours)}" + (f" (to add one of {', '.join(others)}, use --set backends=[...])"
                                                      if others else ""))

    def keep(names: list[str]) -> list[str]:
        return [n for n in names if (only is None or n in only) and n not in skip]

    if not keep(ours):
        raise ConfigError(f"--backends/--skip leave no backend to run; this config's backends: {', '.join(ours)}")
    kernel = keep(config.backends)
    e2e = [dataclasses.replace(e, backends=keep(e.backends)) for e in config.e2e if keep(e.backends)]
    if not kernel and e2e:  # no kernel backend left: no kernel sweep (its batches would be measured by none)
        return dataclasses.replace(config, backends=[], e2e=e2e, workloads=[], shapes=[])
    return dataclasses.replace(config, backends=kernel, e2e=e2e)


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from plain YAML data, checking keys and types against its annotations."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping with keys {_field_names(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{_join(where, unknown[0])}: unknown key; allowed keys: {list(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing")
    try:
        return cls(**kwargs)
    except KeyedConfigError as e:
        raise e.under(where) from None
    except ConfigError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} not allowed; allowed: {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)  # NaN and inf are left to the dataclass's range check, which names the range
        except OverflowError:
            raise ConfigError(f"{where}: {str(value)[:20]}... ({len(str(value))} digits) is too large; allowed: a "
                              "finite number in the key's range") from None
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")


def _check_trace_list(traces: list[str] | None) -> None:
    if traces is not None:
        if not traces:
            raise KeyedConfigError("traces", "needs at least one trace name (or leave it out: every trace)")
        check_unique(traces, "traces")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"line {line}: duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, but a key given twice in one mapping is an error (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
        return super().construct_mapping(node, deep)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
