"""FlashAttention-2 varlen: the flash-attn package when installed, else PyTorch's built-in FA2 kernel
(torch.nn.attention.varlen.varlen_attn, torch >= 2.9).

Serving: flash-attn installed: flash_attn_varlen_func over the paged cache (block table, 256-token pages). Else
PyTorch's built-in FA2 (aten._flash_attention_forward, which has no block table): each request one contiguous
extent of the grouped layout, read in place through cu_seqlens_k = its start and seqused_k = its length, no
prefix sharing (FA2 reads one range per request); the e2e summary says which (`kv_access`)."""

from __future__ import annotations

import inspect

import numpy as np
import torch

from packinfer_bench.backends.base import Backend, Inputs, ServingAttention, needs_cuda
from packinfer_bench.backends.kv_layouts import contiguous_extents

FA2_PAGE = 256  # FlashAttention-2's paged KV needs a multiple of 256 tokens per page


def _available(device: torch.device) -> str | None:
    return needs_cuda(device, "flash_attn", "torch.nn.attention.varlen",
                      missing="neither flash-attn nor torch.nn.attention.varlen (torch >= 2.9) is installed")


def _prepare(x: Inputs, variant: str):
    try:
        from flash_attn import flash_attn_varlen_func

        return lambda: flash_attn_varlen_func(x.q, x.k, x.v, x.cu_q, x.cu_k, x.max_q, x.max_k, causal=True)
    except ImportError:
        from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    k, v = x.k, x.v
    if x.shape.num_heads != x.shape.num_kv_heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older torch: expand K/V heads here, outside the timed call
            g = x.shape.num_heads // x.shape.num_kv_heads
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return lambda: varlen_attn(x.q, k, v, x.cu_q, x.cu_k, x.max_q, x.max_k, **kwargs)


class Fa2Attention(ServingAttention):
    """FA2 over the serving cache: paged with flash-attn, else contiguous extents (see the module's docstring).
    PyTorch's FA2 runs decode iterations inside CUDA graphs (fixed batch of padded size: padding requests read
    no key; one query row each; max_seqlen_k the longest context the schedule can reach)."""

    name = "fa2"

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        try:
            from flash_attn import flash_attn_varlen_func

            self._paged_fn = flash_attn_varlen_func
            self.layout, self.page_size, self.kv_access = "paged", FA2_PAGE, "paged"
            self.kernel = "flash-attn 2 varlen, paged"
        except ImportError:
            self._paged_fn = None
            self.layout, self.share_prefixes, self.kv_access = "grouped", False, "contiguous-slots"
            self.kernel = "PyTorch FA2 (aten._flash_attention_forward), contiguous extents"
            self.graph_kinds = frozenset({"decode"})
        self.launches_per_layer = 3
        self._static: dict[str, torch.Tensor] = {}
        self._max_kv = 0

    def configure(self, *, max_rows, max_seqs, max_kv_len, capacity_tokens):
        if self._paged_fn is None:
            dev = self.device
            self._static = {"cu_q": torch.arange(max_rows + 1, dtype=torch.int32, device=dev),
                            "cu_k": torch.zeros(max_rows + 1, dtype=torch.int32, device=dev),
                            "used": torch.zeros(max_rows, dtype=torch.int32, device=dev)}
        self._max_kv = max_kv_len

    def begin(self, step):
        super().begin(step)
        b = step.batch
        view = step.cache.view(self._request_order())
        if step.padded is not None:  # decode inside a graph: the fixed buffers, padded with empty requests
            n, p = len(b), step.padded
            starts, used = np.zeros(p + 1, np.int32), np.zeros(p, np.int32)
            starts[:n + 1], used[:n] = contiguous_extents(step.cache, view)
            starts[p] = step.cache.capacity_tokens
            self.staging.to_device(starts, self._static["cu_k"])
            self.staging.to_device(used, self._static["used"])
            self._graph_args(p)
            return
        self._cu_q = self.staging.to_device(step.cu_q)
        self._max = int(b.q_lens.max()), int(b.kv_lens.max())
        if self._paged_fn is not None:
            self._cu_k = self.staging.to_device(b.cu_seqlens()[1])
            self._table = self.staging.to_device(view.block_table)
        else:
            starts, used = contiguous_extents(step.cache, view)
            self._cu_k, self._used = self.staging.to_device(starts), self.staging.to_device(used)

    def _graph_args(self, padded: int) -> None:
        st = self._static
        self._cu_q, self._cu_k, self._used = st["cu_q"][:padded + 1], st["cu_k"][:padded + 1], st["used"][:padded]
        self._max = 1, self._max_kv

    def capture_begin(self, padded, key, cache):
        self._static["used"][:padded].zero_()
        self._graph_args(padded)

    def attend(self, layer, q):
        c = self.step.cache
        if self._paged_fn is not None:
            shape = (-1, self.page_size, self.num_kv_heads, self.head_dim)
            return self._paged_fn(q, c.k_pools[layer].view(shape), c.v_pools[layer].view(shape), self._cu_q,
                                  self._cu_k, *self._max, causal=True, block_table=self._table)
        return torch.ops.aten._flash_attention_forward(
            q, c.k_pools[layer], c.v_pools[layer], self._cu_q, self._cu_k, *self._max, 0.0, True, False,
            seqused_k=self._used)[0]


BACKEND = Backend("fa2", ("varlen",), _available, _prepare, serving=Fa2Attention)
