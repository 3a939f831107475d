"""FlexAttention with a document mask (block-diagonal per request, bottom-right causal) over the packed batch.
Building the block mask is the plan cost; flex_attention is compiled once per shape."""

from __future__ import annotations

import torch

from packinfer_bench.backends.base import Backend, Inputs, needs_cuda


def _available(device: torch.device) -> str | None:
    return needs_cuda(device, "torch.nn.attention.flex_attention", missing="FlexAttention needs torch >= 2.5")


def _prepare(x: Inputs, variant: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, dev = x.batch, x.q.device
    q_lens, kv_lens = torch.from_numpy(b.q_lens), torch.from_numpy(b.kv_lens)
    doc_q = torch.repeat_interleave(torch.arange(len(b)), q_lens).to(dev)
    doc_k = torch.repeat_interleave(torch.arange(len(b)), kv_lens).to(dev)
    cq, ck, off = x.cu_q.long(), x.cu_k.long(), (kv_lens - q_lens).to(dev)

    def document_causal(batch, head, q_idx, kv_idx):
        dq, dk = doc_q[q_idx], doc_k[kv_idx]
        return (dq == dk) & (kv_idx - ck[dk] <= q_idx - cq[dq] + off[dq])

    block_mask = torch.compile(create_block_mask)(document_causal, 1, None, x.q.shape[0], x.k.shape[0], device=dev)
    attend = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (t.transpose(0, 1).unsqueeze(0) for t in (x.q, x.k, x.v))
    return lambda: attend(qt, kt, vt, block_mask=block_mask, enable_gqa=True)[0].transpose(0, 1)


BACKEND = Backend("flex", ("doc-mask",), _available, _prepare)
