"""F.scaled_dot_product_attention on a padded [B, H, max_len, D] batch: what a server without varlen kernels
does. The padding copy is part of prepare; the timed call is SDPA plus the gather back to packed rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packinfer_bench.backends.base import Backend, Inputs


def _prepare(x: Inputs, variant: str):
    b = x.batch
    n, lq, lk = len(b), x.max_q, x.max_k
    dev = x.q.device
    q_rows = torch.from_numpy(b.q_lens).to(dev)
    k_rows = torch.from_numpy(b.kv_lens).to(dev)
    q_pos = torch.arange(lq, device=dev)
    k_pos = torch.arange(lk, device=dev)
    q_valid = q_pos[None, :] < q_rows[:, None]
    k_valid = k_pos[None, :] < k_rows[:, None]
    qp = x.q.new_zeros(n, lq, x.shape.num_heads, x.shape.head_dim)
    kp = x.k.new_zeros(n, lk, x.shape.num_kv_heads, x.shape.head_dim)
    vp = torch.zeros_like(kp)
    qp[q_valid], kp[k_valid], vp[k_valid] = x.q, x.k, x.v
    # query i of a request sees keys <= kv_len - q_len + i (bottom-right), and only its own keys
    limit = (k_rows - q_rows)[:, None] + q_pos[None, :]
    mask = (k_pos[None, None, :] <= limit[:, :, None]) & k_valid[:, None, :]
    mask = mask | ~q_valid[:, :, None]  # padded query rows attend to something, so no row is all -inf
    qt, kt, vt = qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2)
    mask = mask[:, None]
    rows = q_valid.nonzero().unbind(1)  # (request, position) of each packed row: no host sync in the timed call

    def run() -> torch.Tensor:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)[rows]

    return run


BACKEND = Backend("sdpa_padded", ("auto",), lambda device: None, _prepare)
