"""CUDA graphs of the model's forward pass per padded row count, as serving engines run iterations:

- piecewise (vLLM's piecewise mode): everything between two attention calls (norms, projections, rotary
  embedding, MLP, LM head) is replayed from graphs, and attention runs eagerly in between on the real rows, so
  any backend keeps its own dynamic plan;
- full (vLLM's full-graph mode, FlashInfer's CUDA-graph wrappers): the whole pass with the backend's attention
  inside, for backends whose attention reads only fixed buffers (ServingAttention.graph_kinds); the plan is
  written into those buffers before each replay.

An iteration of n rows replays the graphs of the smallest captured size >= n; padded rows compute garbage in
their own rows only (every operation but attention is row-wise, and attention reads only real rows' plans),
write their K/V to a scratch slot, and the LM head runs on a fixed number of sampled rows. Inputs (token ids,
positions, sampled rows, K/V write rows and slots) and the activations passed between pieces live in buffers of
the largest size that every captured size slices, so a size costs little memory beyond its graph.
Without graphs a decode step of an 8B model is bound by the host issuing ~300 kernels.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import torch

from packinfer_bench.backends import ServingAttention, Step
from packinfer_bench.backends.base import Staging
from packinfer_bench.serving.model import Attention, Decoder

#: Padded row counts with a graph (captured when an iteration needs them): fine steps where padding costs most.
SIZES = (1, 2, 4, 8, *range(16, 257, 16), *range(320, 1025, 64), *range(1280, 8193, 256))


def bucket(n: int, limit: int = SIZES[-1]) -> int | None:
    """The padded size for n rows (None: larger than every size up to `limit`)."""
    i = bisect.bisect_left(SIZES, n)
    return SIZES[i] if i < len(SIZES) and SIZES[i] <= limit else None


class GraphCaptureError(RuntimeError):
    """A backend's attention could not be captured in a CUDA graph (it then runs piecewise)."""


class Graphs:
    """The model's graphs for the sizes asked for, sharing one memory pool and the static buffers. max_rows: the
    largest iteration (max_num_batched_tokens); max_samples: the most rows that sample a token (max_num_seqs)."""

    def __init__(self, model: Decoder, max_rows: int, max_samples: int) -> None:
        if model.device.type != "cuda" and type(self)._capture is Graphs._capture:
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model = model
        cfg, dev = model.cfg, model.device
        self.max_rows = bucket(max_rows) or SIZES[-1]
        self.max_samples = max_samples
        n = self.max_rows
        self.tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.sample = torch.zeros(min(n, max_samples), dtype=torch.int64, device=dev)
        self.write_rows = torch.zeros(2 * n, dtype=torch.int64, device=dev)
        self.write_slots = torch.zeros(2 * n, dtype=torch.int64, device=dev)
        # activations handed from one piece to the next (piecewise)
        self.x = torch.zeros(n, cfg.hidden, dtype=model.dtype, device=dev)
        self.cos = torch.zeros(n, 1, cfg.head_dim // 2, dtype=model.dtype, device=dev)
        self.sin = torch.zeros_like(self.cos)
        self.q = torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=model.dtype, device=dev)
        self.k = torch.zeros(n, cfg.num_kv_heads, cfg.head_dim, dtype=model.dtype, device=dev)
        self.v = torch.zeros_like(self.k)
        self.attn = torch.zeros_like(self.q)
        self.staging = Staging(dev)
        self._pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self._piecewise: dict[int, tuple[list[Callable], tuple[torch.Tensor, torch.Tensor]]] = {}
        self._full: dict[tuple, tuple[Callable, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.failed: dict[str, str] = {}  # backend -> why its full capture failed

    def padded(self, n: int) -> int | None:
        return bucket(n, self.max_rows)

    def samples(self, padded: int) -> int:
        return min(padded, self.max_samples)

    # --- inputs -------------------------------------------------------------------------------------------------
    def stage_inputs(self, ids: np.ndarray, pos: np.ndarray, sample: np.ndarray, padded: int) -> None:
        """Token ids, positions and sampled rows of the iteration into the static buffers (padding: row 0)."""
        n, s = len(ids), self.samples(padded)
        if len(sample) > s:
            raise ValueError(f"{len(sample)} rows sample a token but graphs of size {padded} hold {s} "
                             f"(max_num_seqs {self.max_samples})")
        both = np.zeros((2, padded), np.int64)
        both[0, :n], both[1, :n] = ids, pos
        self.staging.to_device(both[0], self.tokens)
        self.staging.to_device(both[1], self.positions)
        rows = np.zeros(s, np.int64)
        rows[:len(sample)] = sample
        self.staging.to_device(rows, self.sample)

    def stage_writes(self, rows: np.ndarray, slots: np.ndarray, padded: int, scratch_slot: int):
        """The K/V writes of the iteration as fixed-size (2 x padded) row and slot buffers: unused entries write
        row 0's K/V to the scratch slot, which nothing reads."""
        width = 2 * padded
        if len(rows) > width:
            raise ValueError(f"{len(rows)} K/V writes exceed the {width} a graph of size {padded} holds")
        r = np.zeros(width, np.int64)
        s = np.full(width, scratch_slot, np.int64)
        r[:len(rows)], s[:len(slots)] = rows, slots
        return self.staging.to_device(r, self.write_rows), self.staging.to_device(s, self.write_slots)

    # --- piecewise ----------------------------------------------------------------------------------------------
    def has_piecewise(self, padded: int) -> bool:
        return padded in self._piecewise

    def capture_piecewise(self, padded: int) -> None:
        if padded in self._piecewise:
            return
        pieces = self._pieces(padded)
        self._warm_up(lambda: [piece() for piece in pieces])
        graphs, out = [], None
        for piece in pieces:
            replay, out = self._capture(piece)
            graphs.append(replay)
        self._piecewise[padded] = (graphs, out)

    def run_piecewise(self, padded: int, n: int, attention: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the pieces of size `padded`, attention(i, q, k, v) on the first n rows between them."""
        graphs, (tokens, hidden) = self._piecewise[padded]
        for i, replay in enumerate(graphs[:-1]):
            replay()
            self.attn[:n].copy_(attention(i, self.q[:n], self.k[:n], self.v[:n]))
        graphs[-1]()
        return tokens, hidden

    def _pieces(self, padded: int) -> list[Callable]:
        model, n, s = self.model, padded, self.samples(padded)
        layers = model.cfg.num_layers

        def inputs_of(i: int, x: torch.Tensor) -> None:
            q, k, v = model.attention_inputs(i, x, self.cos[:n], self.sin[:n])
            self.q[:n].copy_(q)
            self.k[:n].copy_(k)
            self.v[:n].copy_(v)
            self.x[:n].copy_(x)

        def first():
            cos, sin = model.rope(self.positions[:n])
            self.cos[:n].copy_(cos)
            self.sin[:n].copy_(sin)
            inputs_of(0, model.embed[self.tokens[:n]])

        def middle(i: int):
            return lambda: inputs_of(i, model.after_attention(i - 1, self.x[:n], self.attn[:n]))

        def last():
            x = model.after_attention(layers - 1, self.x[:n], self.attn[:n])
            return model.head(x[self.sample[:s]])

        return [first, *(middle(i) for i in range(1, layers)), last]

    # --- full ---------------------------------------------------------------------------------------------------
    def has_full(self, attention: ServingAttention, padded: int, key: object) -> bool:
        return (attention.name, padded, key) in self._full

    def capture_full(self, attention: ServingAttention, padded: int, key: object, cache, scratch_slot: int) -> None:
        """Capture the whole forward pass of size `padded` with `attention` inside (its buffers readied by
        capture_begin with no work); GraphCaptureError when the backend cannot be captured."""
        ident = (attention.name, padded, key)
        if ident in self._full:
            return
        n, s = padded, self.samples(padded)
        rows, slots = self.stage_writes(np.zeros(0, np.int64), np.zeros(0, np.int64), padded, scratch_slot)
        attention.step = Step(None, cache, rows, slots, np.zeros(1, np.int32), padded)
        attention.capture_begin(padded, key, cache)

        def forward():
            return self.model.forward(self.tokens[:n], self.positions[:n], attention, self.sample[:s])

        try:
            self._warm_up(forward)
            self._full[ident] = self._capture(forward)
        except Exception as e:  # noqa: BLE001 -- any capture failure: the backend runs piecewise instead
            if self.model.device.type == "cuda":
                torch.cuda.synchronize()
            raise GraphCaptureError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    def drop(self, backend: str) -> None:
        """Forget a backend's full graphs (its cache is about to go)."""
        self._full = {k: v for k, v in self._full.items() if k[0] != backend}
        self.failed.pop(backend, None)

    def run_full(self, attention: ServingAttention, padded: int, key: object) -> tuple[torch.Tensor, torch.Tensor]:
        replay, out = self._full[(attention.name, padded, key)]
        replay()
        return out

    def _capture(self, fn: Callable) -> tuple[Callable, object]:
        """Capture fn() as a CUDA graph in the shared pool: (replay, its outputs, rewritten by every replay)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        return graph.replay, out

    def _warm_up(self, fn: Callable) -> None:
        """One run off the capture stream (lazy initialisation, workspace allocation, kernel compilation)."""
        dev = self.model.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
