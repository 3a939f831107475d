"""What a backend is: a named attention implementation with variants, a cheap availability check, a prepare
step (layouts, plans: timed apart as plan cost) and a run step (the timed part), and its attention inside a
serving forward pass (ServingAttention, over its own KV cache)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from packinfer_bench.workload import Batch

#: The config's dtype names.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Tokens per block of the paged KV layout (vLLM's default), for FlashInfer and packinfer's paged variant.
PAGE_SIZE = 16


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


@dataclass
class Step:
    """One serving iteration as attention sees it: the batch, the cache, and which query rows store their K/V
    where."""

    batch: Batch
    cache: object
    rows: torch.Tensor | None  # query rows to store (None: all of them, in order)
    slots: torch.Tensor  # token addresses of those rows
    cu_q: np.ndarray  # int32 [B + 1]


class ServingAttention:
    """A backend's attention inside a serving forward pass, over its own KV cache: begin(step) plans the
    iteration once (CPU), then every layer calls it; it stores the layer's new K/V at the step's slots and
    attends (attend()). layout / page_size: the KV cache it reads (packinfer.make_cache); kv_access: how, as the
    e2e summary reports it; share_prefixes: requests of a prefix group read one stored copy of it."""

    name = ""
    layout = "paged"
    page_size = PAGE_SIZE
    kv_access = "cache"
    share_prefixes = True

    def __init__(self, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int):
        self.device, self.num_heads, self.num_kv_heads, self.head_dim = device, num_heads, num_kv_heads, head_dim
        self.step: Step | None = None

    def begin(self, step: Step) -> None:
        self.step = step

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.step
        if s.rows is not None:
            k, v = k[s.rows], v[s.rows]
        s.cache.write(s.slots, k, v, layer=layer)
        return self.attend(layer, q)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _request_order(self) -> list[int]:
        return self.step.batch.request_ids.tolist()


@dataclass(frozen=True)
class Backend:
    """Everything the harness knows about one attention implementation. name and variants as they appear in
    records; available(device) returns None or the reason it cannot run; prepare(inputs, variant) returns the
    kernel-level timed callable, which returns out like q (causal attention); serving: its attention inside a
    serving forward pass (None: the backend takes no part in end-to-end replays)."""

    name: str
    variants: tuple[str, ...]
    available: Callable[[torch.device], str | None]
    prepare: Callable[[Inputs, str], Callable[[], torch.Tensor]]
    serving: type[ServingAttention] | None = None


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
