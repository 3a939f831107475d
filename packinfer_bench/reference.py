"""The float32 references every backend's output is checked against (bottom-right causal, per request): on a
batch's inputs (kernel level), and inside a serving forward pass over a KV cache (end to end)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from packinfer_bench.backends.base import Inputs, ServingAttention, Step
from packinfer_bench.config import REFERENCE

#: Most bytes of float32 scores one block of the blocked reference holds.
BLOCK_BYTES = 256 << 20


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q, cu_k, *,
                      block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """float32 causal (bottom-right) attention of every request, q [Tq, H, D], k/v [Tk, Hkv, D], computed in blocks
    of query rows so that memory stays O(block x kv) (one block's scores at most block_bytes), never O(q x kv):
    a 32k-token prompt verifies in a few GB. Rows that see no key give zeros."""
    cu_q, cu_k = [int(c) for c in cu_q], [int(c) for c in cu_k]
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[2]
    group, scale = heads // kv_heads, dim ** -0.5
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i in range(len(cu_q) - 1):
        n_q, n_k = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if n_q == 0 or n_k == 0:
            continue
        ks, vs = k[cu_k[i]:cu_k[i + 1]].float(), v[cu_k[i]:cu_k[i + 1]].float()
        rows = max(1, block_bytes // (4 * heads * n_k))
        for r0 in range(0, n_q, rows):
            r1 = min(n_q, r0 + rows)
            seen = min(n_k, n_k - n_q + r1)  # keys the block's last row sees
            if seen <= 0:
                continue
            qb = q[cu_q[i] + r0:cu_q[i] + r1].float().view(r1 - r0, kv_heads, group, dim)
            scores = torch.einsum("nhgd,khd->hgnk", qb, ks[:seen]).mul_(scale)
            limit = n_k - n_q + torch.arange(r0, r1, device=q.device)  # row j sees keys <= limit[j]
            scores.masked_fill_(torch.arange(seen, device=q.device)[None, :] > limit[:, None], float("-inf"))
            top = scores.amax(-1, keepdim=True).nan_to_num_(0.0, posinf=0.0, neginf=0.0)
            probs = scores.sub_(top).exp_()  # in place: one block of scores in memory
            total = probs.sum(-1, keepdim=True)
            o = torch.einsum("hgnk,khd->hgnd", probs, vs[:seen]) / total.clamp_min(1e-30)
            out[cu_q[i] + r0:cu_q[i] + r1] = o.permute(2, 0, 1, 3).reshape(r1 - r0, heads, dim)
            del scores, probs
    return out


def reference_attention(x: Inputs) -> torch.Tensor:
    """float32 attention of every request on the inputs' device: SDPA in float32 on a GPU, the blocked einsum
    reference on the CPU."""
    if x.q.device.type == "cpu":
        return blocked_attention(x.q, x.k, x.v, x.cu_q_cpu, x.cu_k_cpu)
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
    """The serving yardstick: float32, one request at a time in blocks of rows, K/V gathered from the grouped
    cache (slow, memory-bounded)."""

    name, layout = REFERENCE, "grouped"

    def begin(self, step: Step) -> None:
        super().begin(step)
        addr = [step.cache.addresses(r) for r in self._request_order()]
        self._gather = torch.from_numpy(np.concatenate(addr)).to(self.device)
        self._cu_k = np.concatenate([[0], np.cumsum([len(a) for a in addr])])

    def attend(self, layer, q):
        c = self.step.cache
        k, v = c.k_pools[layer][self._gather], c.v_pools[layer][self._gather]
        return blocked_attention(q, k, v, self.step.cu_q, self._cu_k).to(q.dtype)
