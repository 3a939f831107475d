"""A decoder-only transformer with random weights, shaped like a real model (no downloads: the shapes are
public), whose attention is a callback: the end-to-end replay runs the same forward pass with each backend's
attention. Layers: RMSNorm, fused QKV projection, rotary embeddings, attention, output projection, RMSNorm,
SwiGLU MLP; then a final norm and the LM head on the rows that sample a token (greedy). Under tensor parallelism
(serving.tp) a Decoder is one rank's shard: its `cfg` is the shard's shape (its heads, its MLP width)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

from packinfer_bench.models import ModelConfig, shard
from packinfer_bench.serving.tp import TensorParallel, shard_weight

#: attention(layer, q [T, H, D], k [T, Hkv, D], v [T, Hkv, D]) -> out [T, H, D]: the new tokens' K/V are
#: the callee's to store; causal over each request's cached tokens plus these.
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Decoder:
    """The model with random weights (seeded, scaled so activations stay O(1) through every layer); with `tp`, the
    shard of rank tp.rank (each full weight drawn, then sliced: the shards are exactly the degree-1 model's)."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, tp: TensorParallel | None = None):
        self.tp = tp or TensorParallel()
        self.cfg, self.device, self.dtype = shard(cfg, self.tp.size), torch.device(device), dtype
        gen = torch.Generator(device=self.device).manual_seed(seed)
        h, d = cfg.hidden, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d

        def weight(name: str, rows: int, cols: int, scale: float = 1.0) -> torch.Tensor:
            w = torch.randn(rows, cols, generator=gen, device=self.device, dtype=dtype)
            return shard_weight(name, w.mul_(scale / cols ** 0.5), cfg, self.tp)

        depth = (2 * cfg.num_layers) ** -0.5  # residual branches shrink with depth
        self.embed = torch.randn(cfg.vocab, h, generator=gen, device=self.device, dtype=dtype)
        self.layers = [{"norm1": torch.ones(h, device=self.device, dtype=dtype), "qkv": weight("qkv", qkv_out, h),
                        "o": weight("o", h, cfg.num_heads * d, depth),
                        "norm2": torch.ones(h, device=self.device, dtype=dtype),
                        "gate_up": weight("gate_up", 2 * cfg.intermediate, h),
                        "down": weight("down", h, cfg.intermediate, depth)}
                       for _ in range(cfg.num_layers)]
        self.norm = torch.ones(h, device=self.device, dtype=dtype)
        self.lm_head = weight("lm_head", cfg.vocab, h)
        self.inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=self.device, dtype=torch.float32) / d)

    def truncated(self, num_layers: int) -> Decoder:
        """The same model cut to its first layers (shares the weights): for warm-up passes."""
        cut = object.__new__(Decoder)
        cut.__dict__.update(self.__dict__)
        cut.cfg = dataclasses.replace(self.cfg, num_layers=num_layers)
        cut.layers = self.layers[:num_layers]
        return cut

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attention: Attention,
                sample_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the new tokens of one iteration (int64 [T] ids and positions, requests' rows in batch order)
        through every layer; returns (greedy next token of each sample row, final hidden state of those rows)."""
        cos, sin = self.rope(positions)
        x = self.embed[tokens]
        for i in range(self.cfg.num_layers):
            q, k, v = self.attention_inputs(i, x, cos, sin)
            x = self.after_attention(i, x, attention(i, q, k, v))
        return self.head(x[sample_rows])

    # the pieces between attention calls (DecodeGraphs captures them as CUDA graphs)
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return tuple(t.to(self.dtype)[:, None, :] for t in (angles.cos(), angles.sin()))

    def attention_inputs(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Layer i up to attention: norm, QKV projection, rotary embedding -> q [T, H, D], k, v [T, Hkv, D]."""
        cfg, w = self.cfg, self.layers[i]
        n, hq, hkv, d = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = F.rms_norm(x, (cfg.hidden,), w["norm1"], cfg.rms_eps) @ w["qkv"].T
        q = _rotate(qkv[:, :hq * d].view(n, hq, d), cos, sin)
        k = _rotate(qkv[:, hq * d:(hq + hkv) * d].view(n, hkv, d), cos, sin)
        return q, k, qkv[:, (hq + hkv) * d:].reshape(n, hkv, d)

    def after_attention(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Layer i from attention on: output projection, residual, norm, SwiGLU MLP, residual (under tensor
        parallelism both projections back to the hidden size are partial sums, all-reduced over the group)."""
        cfg, w, tp = self.cfg, self.layers[i], self.tp
        x = x + tp.all_reduce(attn.reshape(x.shape[0], -1) @ w["o"].T)
        gate, up = (F.rms_norm(x, (cfg.hidden,), w["norm2"], cfg.rms_eps) @ w["gate_up"].T).chunk(2, dim=-1)
        return x + tp.all_reduce((F.silu(gate) * up) @ w["down"].T)

    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm and LM head: (greedy token, normed hidden state) of each row."""
        last = F.rms_norm(x, (self.cfg.hidden,), self.norm, self.cfg.rms_eps)
        return (last @ self.lm_head.T).argmax(dim=-1), last


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (Llama): pairs (i, i + D/2) turn by position x frequency i."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
