"""The float32 references every backend's output is checked against (bottom-right causal, per request): on a
batch's inputs (kernel level), and inside a serving forward pass over a KV cache (end to end)."""

from __future__ import annotations

import numpy as np
import packinfer
import torch
import torch.nn.functional as F

from packinfer_bench.backends.base import Inputs, ServingAttention
from packinfer_bench.config import REFERENCE


def reference_attention(x: Inputs) -> torch.Tensor:
    """float32 attention of every request on the inputs' device: SDPA in float32 on a GPU, packinfer's
    einsum reference on the CPU."""
    if x.q.device.type == "cpu":
        return packinfer.reference_varlen_attention(x.q, x.k, x.v, x.cu_q_cpu, x.cu_k_cpu, causal=True)
    from torch.nn.attention.bias import causal_lower_right

    cu_q, cu_k = x.cu_q_cpu.tolist(), x.cu_k_cpu.tolist()
    group = x.shape.num_heads // x.shape.num_kv_heads
    out = torch.zeros(x.q.shape, dtype=torch.float32, device=x.q.device)
    for i in range(len(cu_q) - 1):
        if cu_q[i + 1] == cu_q[i]:
            continue
        q = x.q[cu_q[i]:cu_q[i + 1]].float().transpose(0, 1)[None]
        k = x.k[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
        v = x.v[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(group, dim=1).transpose(0, 1)[None]
        n_q, n_k = q.shape[2], k.shape[2]
        mask = None if n_q == n_k else causal_lower_right(n_q, n_k)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=n_q == n_k)
        out[cu_q[i]:cu_q[i + 1]] = o[0].transpose(0, 1)
    return out


class ReferenceAttention(ServingAttention):
    """The serving yardstick: float32, one request at a time, K/V gathered from the grouped cache (slow)."""

    name, layout = REFERENCE, "grouped"

    def begin(self, step: Step) -> None:
        super().begin(step)
        addr = [step.cache.addresses(r) for r in self._request_order()]
        self._gather = torch.from_numpy(np.concatenate(addr)).to(self.device)
        self._cu_k = np.concatenate([[0], np.cumsum([len(a) for a in addr])])

    def attend(self, layer, q):
        c = self.step.cache
        k, v = c.k_pools[layer][self._gather], c.v_pools[layer][self._gather]
        out = packinfer.reference_varlen_attention(q, k, v, self.step.cu_q, self._cu_k)
        return out.to(q.dtype)
