"""Piecewise CUDA graphs for decode iterations, as serving engines run them (vLLM's piecewise mode): everything
between two attention calls (norms, projections, rotary embedding, MLP, LM head) is replayed from a graph
captured per padded batch size, and attention runs eagerly in between, so every backend keeps its own dynamic
plan while the rest of the model costs no host launch time. Without it a decode step of an 8B model is bound by
Python issuing ~300 kernels, and attention differences vanish in that overhead."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import torch

from packinfer_bench.serving.model import Attention, Decoder

#: Padded batch sizes (rows) with a captured graph; a decode iteration of n rows replays the smallest >= n.
SIZES = (1, 2, 4, 8, *range(16, 257, 16), 320, 384, 448, 512)


def bucket(n: int) -> int | None:
    """The padded size for n rows (None: larger than every captured size)."""
    i = bisect.bisect_left(SIZES, n)
    return SIZES[i] if i < len(SIZES) else None


class _Captured:
    """One padded size's static inputs, graphs (layers + 1 pieces) and the tensors they write."""

    def __init__(self, model: Decoder, n: int, pool) -> None:
        dev, cfg = model.device, model.cfg
        self.tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.attn = [torch.zeros(n, cfg.num_heads, cfg.head_dim, dtype=model.dtype, device=dev)
                     for _ in range(cfg.num_layers)]
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.qkv: list[tuple[torch.Tensor, ...]] = []
        pieces = self._pieces(model)
        side = torch.cuda.Stream(dev)  # warm-up off the capture stream (lazy inits, workspace allocation)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            state = None
            for piece in pieces:
                state = piece(state)
        torch.cuda.current_stream(dev).wait_stream(side)
        state = None
        for piece in pieces:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                state = piece(state)
            self.graphs.append(graph)
            self.qkv.append(state[3:] if len(state) == 6 else ())
        self.out_tokens, self.out_hidden = state

    def _pieces(self, model: Decoder):
        layers = model.cfg.num_layers

        def first(_):
            cos, sin = model.rope(self.positions)
            x = model.embed[self.tokens]
            return (x, cos, sin, *model.attention_inputs(0, x, cos, sin))

        def middle(i):
            def piece(state):
                x, cos, sin = state[:3]
                x = model.after_attention(i - 1, x, self.attn[i - 1])
                return (x, cos, sin, *model.attention_inputs(i, x, cos, sin))
            return piece

        def last(state):
            return model.head(model.after_attention(layers - 1, state[0], self.attn[layers - 1]))

        return [first, *(middle(i) for i in range(1, layers)), last]


class DecodeGraphs:
    """The model's decode pieces captured for the padded sizes asked for; forward() is Decoder.forward for an
    iteration whose rows all fit one size."""

    def __init__(self, model: Decoder) -> None:
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model = model
        self._pool = torch.cuda.graph_pool_handle()
        self._sizes: dict[int, _Captured] = {}

    def ensure(self, row_counts: Iterable[int]) -> None:
        """Capture every size the given iteration row counts need (largest first, sharing one memory pool)."""
        for n in sorted({b for b in map(bucket, row_counts) if b is not None} - set(self._sizes), reverse=True):
            self._sizes[n] = _Captured(self.model, n, self._pool)

    def covers(self, n: int) -> bool:
        return bucket(n) in self._sizes

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention,
                sample_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.shape[0]
        c = self._sizes[bucket(n)]
        c.tokens[:n].copy_(tokens)
        c.positions[:n].copy_(positions)
        for i, graph in enumerate(c.graphs[:-1]):
            graph.replay()
            q, k, v = c.qkv[i]
            c.attn[i][:n].copy_(attention(i, q[:n], k[:n], v[:n]))
        c.graphs[-1].replay()
        return c.out_tokens[:n][sample_rows], c.out_hidden[:n][sample_rows]
