"""The re-layout copy: move token ranges of a KV pool in one launch (GroupedKVCache.relayout's data movement).

Tiling: each program copies BLOCK_T tokens x BLOCK_W elements of one range; program id 0 indexes the list of
(range, first token) token blocks of all ranges, id 1 is the block of BLOCK_W elements of a token's row
(num_kv_heads * head_dim elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 32
BLOCK_W = 256


@triton.jit
def _copy_ranges(src, dst, blocks, src_start, dst_start, lengths, width, stride_src, stride_dst,
                 BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    r = tl.load(blocks + 2 * tl.program_id(0))
    t = tl.load(blocks + 2 * tl.program_id(0) + 1) + tl.arange(0, BLOCK_T)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = (t < tl.load(lengths + r))[:, None] & (w < width)[None, :]
    s = (tl.load(src_start + r) + t).to(tl.int64)
    d = (tl.load(dst_start + r) + t).to(tl.int64)
    x = tl.load(src + s[:, None] * stride_src + w[None, :], mask=mask)
    tl.store(dst + d[:, None] * stride_dst + w[None, :], x, mask=mask)


def copy_token_ranges(src: torch.Tensor, dst: torch.Tensor, src_start: torch.Tensor, dst_start: torch.Tensor,
                      lengths: torch.Tensor) -> None:
    """dst[dst_start[i] : dst_start[i] + lengths[i]] = src[src_start[i] : ...] for every i, for 2-D tensors
    [tokens, width] with unit last stride. Ranges must not overlap between src and dst (copy through a scratch
    buffer to move data inside one pool)."""
    if src.dim() != 2 or dst.dim() != 2 or src.shape[1] != dst.shape[1] or src.stride(1) != 1 or dst.stride(1) != 1:
        raise ValueError(f"src and dst must be [tokens, width] with the same width and unit last stride, got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    if src.dtype != dst.dtype:
        raise ValueError(f"src and dst dtypes differ: {src.dtype}, {dst.dtype}")
    per_range = (lengths.cpu().to(torch.int64) + BLOCK_T - 1) // BLOCK_T
    if int(per_range.sum()) == 0:
        return
    first_block = torch.cumsum(per_range, 0) - per_range
    which = torch.repeat_interleave(torch.arange(len(per_range)), per_range)
    offset = (torch.arange(len(which)) - first_block[which]) * BLOCK_T
    blocks = torch.stack([which, offset], 1).to(device=src.device, dtype=torch.int32)
    src_start, dst_start, lengths = (t.to(device=src.device, dtype=torch.int32)
                                     for t in (src_start, dst_start, lengths))
    grid = (len(which), triton.cdiv(src.shape[1], BLOCK_W))
    _copy_ranges[grid](src, dst, blocks, src_start, dst_start, lengths, src.shape[1], src.stride(0), dst.stride(0),
                       BLOCK_T=BLOCK_T, BLOCK_W=BLOCK_W)
