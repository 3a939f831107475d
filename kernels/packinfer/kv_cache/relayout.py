"""The re-layout copy: move token ranges of a KV pool in one launch (GroupedKVCache's data movement).

Tiling: each program copies BLOCK_T tokens x BLOCK_W elements of one range; program id 0 indexes the list of
(range, first token) token blocks of all ranges, id 1 is the block of BLOCK_W elements of a token's row
(num_kv_heads * head_dim elements).

The ranges go to the device once (token_ranges) and serve any number of copies: a cache moves every layer's K
and V pools by the same addresses. The upload does not make the host wait for queued GPU work
(packinfer.device.upload), so moving data never stalls a serving loop that prepares the next iteration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from packinfer.device import upload

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


@dataclass(frozen=True)
class TokenRanges:
    """Ranges dst[dst_start[i] : + lengths[i]] = src[src_start[i] : ...] as int32 device tensors, with the
    launch's token blocks ([num_blocks, 2]: range, first token of the block)."""

    blocks: torch.Tensor
    src_start: torch.Tensor
    dst_start: torch.Tensor
    lengths: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[0]


def token_ranges(src_start, dst_start, lengths, device: torch.device | str) -> TokenRanges:
    """The ranges (host sequences or CPU tensors of token addresses) on `device`, in one non-blocking upload."""
    src_start, dst_start, lengths = (torch.as_tensor(t, dtype=torch.int64) for t in (src_start, dst_start, lengths))
    if not (src_start.shape == dst_start.shape == lengths.shape) or lengths.dim() != 1:
        raise ValueError(f"src_start, dst_start and lengths must be 1-D of one length, got {tuple(src_start.shape)}, "
                         f"{tuple(dst_start.shape)}, {tuple(lengths.shape)}")
    if len(lengths) and (int(lengths.min()) < 0 or int(torch.minimum(src_start, dst_start).min()) < 0):
        raise ValueError("lengths and token addresses must be >= 0")
    per_range = (lengths + BLOCK_T - 1) // BLOCK_T
    which = torch.repeat_interleave(torch.arange(len(per_range)), per_range)
    offset = (torch.arange(len(which)) - (torch.cumsum(per_range, 0) - per_range)[which]) * BLOCK_T
    host = torch.cat([torch.stack([which, offset], 1).reshape(-1), src_start, dst_start, lengths])
    if len(host) and int((torch.maximum(src_start, dst_start) + lengths).max()) >= 2 ** 31:
        raise ValueError("token addresses must fit in int32")
    dev = upload(host.to(torch.int32), device)
    nb, nr = len(which), len(lengths)
    return TokenRanges(dev[:2 * nb].view(nb, 2), *dev[2 * nb:].split(nr))


def copy_token_ranges(src: torch.Tensor, dst: torch.Tensor, ranges: TokenRanges) -> None:
    """Copy `ranges` from src to dst, 2-D tensors [tokens, width] with unit last stride. Ranges must not overlap
    between src and dst (copy through a scratch buffer to move data inside one pool). A pool in CPU memory
    (where Triton cannot launch outside its interpreter) is copied with torch indexing instead."""
    if src.dim() != 2 or dst.dim() != 2 or src.shape[1] != dst.shape[1] or src.stride(1) != 1 or dst.stride(1) != 1:
        raise ValueError(f"src and dst must be [tokens, width] with the same width and unit last stride, got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    if src.dtype != dst.dtype:
        raise ValueError(f"src and dst dtypes differ: {src.dtype}, {dst.dtype}")
    if ranges.num_blocks == 0:
        return
    if not src.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        _copy_on_host(src, dst, ranges)
        return
    grid = (ranges.num_blocks, triton.cdiv(src.shape[1], BLOCK_W))
    _copy_ranges[grid](src, dst, ranges.blocks, ranges.src_start, ranges.dst_start, ranges.lengths, src.shape[1],
                       src.stride(0), dst.stride(0), BLOCK_T=BLOCK_T, BLOCK_W=BLOCK_W)


def _copy_on_host(src: torch.Tensor, dst: torch.Tensor, ranges: TokenRanges) -> None:
    lengths = ranges.lengths.long()
    offset = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    dst[torch.repeat_interleave(ranges.dst_start.long(), lengths) + offset] = (
        src[torch.repeat_interleave(ranges.src_start.long(), lengths) + offset])
