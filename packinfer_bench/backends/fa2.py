"""FlashAttention-2 varlen: the flash-attn package when installed, else PyTorch's built-in FA2 kernel
(torch.nn.attention.varlen.varlen_attn, torch >= 2.9)."""

from __future__ import annotations

import inspect

import torch

from packinfer_bench.backends.base import Backend, Inputs, needs_cuda


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


BACKEND = Backend("fa2", ("varlen",), _available, _prepare)
