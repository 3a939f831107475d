"""Model presets: the shapes of real decoder models from their published configs (no weights), for the
end-to-end replay and for config validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from packinfer_bench.errors import ConfigError
from packinfer_bench.traces.limits import KeyedConfigError


@dataclass(frozen=True)
class ModelConfig:
    """A decoder's shape. num_layers may be fewer than the real model's for short runs (reports say so)."""

    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    rms_eps: float = 1e-5
    full_layers: int | None = None  # the real model's layer count, when num_layers was limited

    @property
    def params(self) -> int:
        """Weights in the stack (embedding and LM head included)."""
        attn = self.hidden * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attn += self.num_heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.num_layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden


# Shapes from the models' published configs (config.json); rope scaling (Llama 3.1) changes values, not cost.
PRESETS = {
    "llama-3.1-8b": ModelConfig("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256, 500000.0),
    "qwen2.5-7b": ModelConfig("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064, 1000000.0, 1e-6),
    "mistral-7b": ModelConfig("mistral-7b", 32, 4096, 32, 8, 128, 14336, 32768, 1000000.0),
    "llama-2-13b": ModelConfig("llama-2-13b", 40, 5120, 40, 40, 128, 13824, 32000, 10000.0),
    # 70B class: served over several GPUs (an e2e entry's `tp`)
    "llama-3.1-70b": ModelConfig("llama-3.1-70b", 80, 8192, 64, 8, 128, 28672, 128256, 500000.0),
    "qwen2.5-72b": ModelConfig("qwen2.5-72b", 80, 8192, 64, 8, 128, 29568, 152064, 1000000.0, 1e-6),
    # for CPU tests and the smoke run
    "tiny": ModelConfig("tiny", 2, 128, 4, 2, 64, 256, 512, 10000.0),
}


def preset(name: str, num_layers: int | None = None) -> ModelConfig:
    """A preset's shape, with its layers limited to num_layers when given."""
    if name not in PRESETS:
        raise ConfigError(f"model: {name!r} not allowed; allowed: {sorted(PRESETS)}")
    cfg = PRESETS[name]
    if num_layers is None or num_layers == cfg.num_layers:
        return cfg
    if not 0 < num_layers <= cfg.num_layers:
        raise ConfigError(f"num_layers: {num_layers} not allowed for {name}; allowed: 1..{cfg.num_layers}")
    return dataclasses.replace(cfg, num_layers=num_layers, full_layers=cfg.num_layers)


def tp_sizes(cfg: ModelConfig) -> list[int]:
    """Tensor-parallel degrees the shape allows: those that divide its query heads, KV heads and MLP width (each
    rank holds whole heads and an equal slice of the MLP)."""
    common = math.gcd(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate)
    return [n for n in range(1, common + 1) if common % n == 0]


def check_tp(cfg: ModelConfig, tp: object) -> None:
    """A ConfigError naming `tp` and the allowed degrees unless `tp` is one of them."""
    allowed = tp_sizes(cfg)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp not in allowed:
        raise KeyedConfigError("tp", f"{tp!r} not allowed for {cfg.name} ({cfg.num_heads} query heads, "
                                     f"{cfg.num_kv_heads} KV heads, MLP {cfg.intermediate}); allowed: {allowed}")


def shard(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The shape one rank of a tensor-parallel group of `tp` holds: its share of the heads and of the MLP width
    (hidden size and vocabulary unchanged: embedding and LM head are replicated)."""
    check_tp(cfg, tp)
    if tp == 1:
        return cfg
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                               intermediate=cfg.intermediate // tp)
