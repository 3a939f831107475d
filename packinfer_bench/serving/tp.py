"""Tensor parallelism for the serving model (Megatron-style, as serving engines shard a 70B model): rank r of `size`
holds the QKV columns of its query and KV heads (heads r*H/size ... and r*Hkv/size ...: each rank's query heads
read only its own KV heads), the matching rows of the output projection (row-parallel: partial sums, all-reduced),
the gate/up columns of its slice of the MLP width and those rows of the down projection (all-reduced again).
Norms, the embedding and the LM head are replicated. Each rank attends over its own heads with its own KV cache.

The shards are slices of the single-GPU model's weights: every rank draws each full weight from the same seeded
generator, in the same order, and keeps its slice, so a replay at any degree computes the same function as at
degree 1 (up to the order of floating-point sums)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packinfer_bench.models import ModelConfig


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (size 1: no parallelism, nothing reduced)."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group (torch.distributed's default process group: the ranks of the job), in place."""
        if self.size > 1:
            torch.distributed.all_reduce(x)
        return x


def shard_weight(name: str, w: torch.Tensor, cfg: ModelConfig, tp: TensorParallel) -> torch.Tensor:
    """Rank tp.rank's slice of the full (degree 1) weight `name` of one layer of `cfg` (qkv and gate_up: rows
    [out, in]; o and down: columns); any other weight, and every weight at size 1, is returned whole."""
    if tp.size == 1 or name not in ("qkv", "o", "gate_up", "down"):
        return w
    r, n, d = tp.rank, tp.size, cfg.head_dim
    hq, hkv, inter = cfg.num_heads // n, cfg.num_kv_heads // n, cfg.intermediate // n
    if name == "qkv":  # rows: [q heads | k heads | v heads]
        q0, k0, v0 = 0, cfg.num_heads * d, (cfg.num_heads + cfg.num_kv_heads) * d
        return torch.cat([w[q0 + r * hq * d:q0 + (r + 1) * hq * d], w[k0 + r * hkv * d:k0 + (r + 1) * hkv * d],
                          w[v0 + r * hkv * d:v0 + (r + 1) * hkv * d]])
    if name == "gate_up":  # rows: [gate | up]
        up = cfg.intermediate
        return torch.cat([w[r * inter:(r + 1) * inter], w[up + r * inter:up + (r + 1) * inter]])
    width = hq * d if name == "o" else inter  # o: the columns of this rank's heads; down: of its MLP slice
    return w[:, r * width:(r + 1) * width].contiguous()
