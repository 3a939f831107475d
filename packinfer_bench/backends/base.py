"""What a backend is: a named attention implementation with variants, a cheap availability check, a prepare
step (layouts, plans: timed apart as plan cost) and a run step (the timed part)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from packinfer_bench.workload import Batch


@dataclass
class AttentionShape:
    """One model layer's attention: query heads, KV heads (GQA), head dim, dtype."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclass
class Inputs:
    """The tensors every backend of a batch gets: q [total_q, H, D], k/v [total_k, Hkv, D], int32 cu_seqlens
    (on the device and on the CPU)."""

    batch: Batch
    shape: AttentionShape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    cu_q_cpu: torch.Tensor
    cu_k_cpu: torch.Tensor
    scratch: dict = field(default_factory=dict, repr=False)  # layouts built once per batch (not plan cost)

    @property
    def max_q(self) -> int:
        return int(self.batch.q_lens.max())

    @property
    def max_k(self) -> int:
        return int(self.batch.kv_lens.max())


class NotApplicable(Exception):
    """Raised by prepare() when a variant does not apply to a batch (e.g. a decode-only variant on prefill):
    the runner records it `skipped` with this message."""


@dataclass(frozen=True)
class Backend:
    """name and variants as they appear in records; available(device) returns None or the reason it cannot run;
    prepare(inputs, variant) returns the timed callable, which returns out like q (causal attention)."""

    name: str
    variants: tuple[str, ...]
    available: Callable[[torch.device], str | None]
    prepare: Callable[[Inputs, str], Callable[[], torch.Tensor]]


def needs_cuda(device: torch.device, *modules: str, missing: str = "") -> str | None:
    """None when the device is a GPU and one of `modules` can be imported (or none is named), else why not."""
    if device.type != "cuda":
        return "needs a CUDA device"
    if modules and not any(_importable(m) for m in modules):
        return missing or f"{' or '.join(modules)} is not installed"
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False
