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
#: The serving cache's request id for the scratch slot that padded rows of a CUDA graph write their K/V to.
SCRATCH = -(1 << 40)


def add_scratch(cache) -> None:
    """Allocate the scratch slot (one token) in a serving cache."""
    cache.allocate(SCRATCH, reserve=1, exact=True)
    cache.extend(SCRATCH, 1)


def scratch_slot(cache) -> int:
    """The scratch slot's token address now (a re-layout of a grouped cache may move it)."""
    return int(cache.addresses(SCRATCH)[0])


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


class Staging:
    """Host-to-device copies that never make the host wait for the GPU: an array goes through a pinned buffer
    and a non-blocking copy on the current stream, and a pinned buffer is reused only after its copy has run.
    (A plain tensor.to(cuda) from pageable memory waits for all queued GPU work: it would stop the host from
    preparing the next iteration while the GPU runs this one.) On the CPU, a copy."""

    def __init__(self, device: torch.device, ring: int = 16) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._ring: list[tuple[torch.Tensor | None, object]] = [(None, None)] * ring
        self._next = 0

    def to_device(self, array: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """`array` on the device (in out[:len(array)] when out is given; returns that view)."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if not self._cuda:
            if out is None:
                return host.clone()
            out[:len(host)].copy_(host)
            return out[:len(host)]
        buf, done = self._ring[self._next]
        if done is not None:
            done.synchronize()
        need = host.numel() * host.element_size()
        if buf is None or buf.numel() < need:
            buf = torch.empty(max(need, 4096), dtype=torch.uint8, pin_memory=True)
        staged = buf[:need].view(host.dtype).view(host.shape)
        staged.copy_(host)
        dst = torch.empty(host.shape, dtype=host.dtype, device=self.device) if out is None else out[:len(host)]
        dst.copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._ring[self._next] = (buf, event)
        self._next = (self._next + 1) % len(self._ring)
        return dst


@dataclass
class Step:
    """One serving iteration as attention sees it: the batch, the cache, and which query rows store their K/V
    where. In a full CUDA graph (`padded` set: the graph's row count), rows / slots are the graph's fixed-size
    buffers (padding entries write to a scratch slot) and q has `padded` rows, the batch's first."""

    batch: Batch
    cache: object
    rows: torch.Tensor | None  # query rows to store (None: all of them, in order)
    slots: torch.Tensor  # token addresses of those rows
    cu_q: np.ndarray  # int32 [B + 1]
    padded: int | None = None

    @property
    def kind(self) -> str:
        return iteration_kind(self.batch)


def iteration_kind(batch: Batch) -> str:
    """'decode' (every request one new row), 'prefill' (only fresh prompts) or 'mixed'."""
    return "decode" if int(batch.q_lens.max()) == 1 else batch.phase


class ServingAttention:
    """A backend's attention inside a serving forward pass, over its own KV cache: begin(step) plans the
    iteration once (CPU), then every layer calls it; it stores the layer's new K/V at the step's slots and
    attends (attend()). layout / page_size: the KV cache it reads (packinfer.make_cache); kv_access: how, as the
    e2e summary reports it; share_prefixes: requests of a prefix group read one stored copy of it.

    CUDA graphs: `graph_kinds` are the iteration kinds (decode, mixed, prefill) whose whole forward pass,
    attention included, can be captured: for those, begin(step) with step.padded set writes the plan into the
    backend's fixed buffers for that padded size and every launch reads only them; capture_begin(padded, key)
    readies them with no work for the capture. graph_key(step) names what else a captured graph depends on.
    `kernel` says which kernel runs, for the summary; launches_per_layer counts the launches of one layer's call
    (the K/V write included)."""

    name = ""
    layout = "paged"
    page_size = PAGE_SIZE
    kv_access = "cache"
    share_prefixes = True
    graph_kinds: frozenset[str] = frozenset()
    kernel = ""

    def __init__(self, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int, **options):
        self.device, self.num_heads, self.num_kv_heads, self.head_dim = device, num_heads, num_kv_heads, head_dim
        self.options = options  # a serving variant's switches (Backend.serving_variants)
        self.step: Step | None = None
        self.staging = Staging(device)
        self.launches_per_layer = 0

    def configure(self, *, max_rows: int, max_seqs: int, max_kv_len: int, capacity_tokens: int) -> None:
        """Sizes for the fixed graph buffers (a backend without graph_kinds ignores them)."""

    def variant_skip(self, batch) -> str | None:
        """Why this serving variant is not measured on `batch` (the kernel sweep then skips it): it runs the same
        code as the default one there, or a part of it cannot run on this machine; None: it is measured."""
        return None

    def begin(self, step: Step) -> None:
        self.step = step

    def graph_key(self, step: Step) -> object:
        return None

    def capture_begin(self, padded: int, key: object, cache) -> None:
        raise NotImplementedError(f"{self.name} has no CUDA-graph mode")

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
    serving forward pass (None: the backend takes no part in end-to-end replays); serving_variants: the
    variants of that serving call the kernel sweep measures on scheduler batches (name -> options given to the
    ServingAttention; the first is the one end-to-end replays run)."""

    name: str
    variants: tuple[str, ...]
    available: Callable[[torch.device], str | None]
    prepare: Callable[[Inputs, str], Callable[[], torch.Tensor]]
    serving: type[ServingAttention] | None = None
    serving_variants: dict[str, dict] = field(default_factory=lambda: {"serving": {}})


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
