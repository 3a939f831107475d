"""Experiment configs: the YAML schema as dataclasses, and a loader whose errors name the key, the bad value and
what is allowed. The schema is documented in experiments/README.md."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from packinfer_bench.backends import BACKENDS
from packinfer_bench.errors import ConfigError
from packinfer_bench.models import preset
from packinfer_bench.workload import ContinuousSpec, StaticSpec

HEAD_DIMS = (64, 128, 256)


@dataclass
class TraceConfig:
    """A trace to replay: a shipped name, a file path or hf:OWNER/NAME (none for synthetic); kind is detected
    from the file when omitted; options go to the loader (e.g. tokenizer, or a synthetic trace's parameters)."""

    name: str
    source: str | None = None
    kind: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkloadConfig:
    """How traces become batches: exactly one of `static` and `continuous`; `traces` names the traces it
    replays (all of the experiment's when omitted)."""

    name: str
    traces: list[str] | None = None
    static: StaticSpec | None = None
    continuous: ContinuousSpec | None = None

    def __post_init__(self) -> None:
        if (self.static is None) == (self.continuous is None):
            raise ConfigError("a workload needs exactly one of 'static' and 'continuous'")


@dataclass
class ShapeConfig:
    """An attention shape (one model's layer): query heads, KV heads (GQA), head dim, dtype."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: Literal["bf16", "fp16"] = "bf16"

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a positive multiple of num_kv_heads "
                              f"({self.num_kv_heads})")
        if self.head_dim not in HEAD_DIMS:
            raise ConfigError(f"head_dim: {self.head_dim} not allowed; allowed: {list(HEAD_DIMS)}")


@dataclass
class GpuConfig:
    """The GPU the experiment is meant for (used by analytic predictions and to label reports)."""

    name: str
    sms: int
    hbm_tbps: float | None = None
    bf16_tflops: float | None = None


@dataclass
class TimingConfig:
    """Warm-up calls, timed repeats (median and spread reported), L2 flush before each repeat; cuda_graphs: time
    the replay of a CUDA graph captured from the call (records say `timing: cuda-graph`; a call that cannot be
    captured is an `error` record naming why)."""

    warmup: int = 10
    repeats: int = 50
    flush_l2: bool = True
    cuda_graphs: bool = False


E2E_BACKENDS = ("reference", "fa2", "flashinfer", "packinfer")


@dataclass
class E2EConfig:
    """An end-to-end serving replay: a model preset (layers limited by num_layers), the traces it replays, the
    continuous-batching schedule (its max_kv_tokens is the KV budget), Poisson `rates` (requests/s; each is one
    replay; omitted: the schedule's own arrivals), the attention backends, how many first iterations are
    checked against the float32 reference attention (verify_iterations), a warm-up pass that compiles every
    kernel before the timed replay, and piecewise CUDA graphs for decode iterations (on a GPU)."""

    name: str
    model: str
    continuous: ContinuousSpec
    num_layers: int | None = None
    traces: list[str] | None = None
    rates: list[float] | None = None
    backends: list[str] = field(default_factory=lambda: ["fa2", "flashinfer", "packinfer"])
    dtype: Literal["bf16", "fp16"] = "bf16"
    verify_iterations: int = 4
    warmup: bool = True
    cuda_graphs: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        preset(self.model, self.num_layers)  # names the allowed models / layer counts if wrong
        bad = [b for b in self.backends if b not in E2E_BACKENDS]
        if bad:
            raise ConfigError(f"backends: unknown end-to-end backend(s) {bad}; allowed: {list(E2E_BACKENDS)}")
        if any(r <= 0 for r in self.rates or []):
            raise ConfigError(f"rates: every rate must be > 0 requests/s, got {self.rates}")
        if self.verify_iterations < 0:
            raise ConfigError(f"verify_iterations must be >= 0, got {self.verify_iterations}")


@dataclass
class OutputConfig:
    dir: str = "results"


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

    def traces_of(self, workload: WorkloadConfig) -> list[TraceConfig]:
        return [t for t in self.traces if workload.traces is None or t.name in workload.traces]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return build(ExperimentConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


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
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]
