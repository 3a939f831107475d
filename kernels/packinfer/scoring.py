"""What changes an attention score beyond q k^T * scale, as FlashAttention defines it, and how a kernel launch
receives it: a logit soft cap and ALiBi slopes (launch options), a sliding window (part of a plan, since it
decides which keys a tile reads). Shared by both kernels' launches, the planners and the API."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packinfer.triton_common import LOG2E, softcap_mode

#: Stands for an unbounded window side inside the kernels (query positions stay far below it).
UNBOUNDED = 1 << 30


def window_bounds(window: tuple[int, int], causal: bool) -> tuple[int, int]:
    """A sliding window (left, right): a query at key position p sees keys in [p - left, p + right] (-1: that
    side unbounded), as the kernels take it: UNBOUNDED for an open side, right 0 when causal."""
    left = window[0] if window[0] >= 0 else UNBOUNDED
    right = 0 if causal else (window[1] if window[1] >= 0 else UNBOUNDED)
    return left, right


@dataclass
class ScoreOptions:
    """softcap > 0: scores become softcap * tanh(score / softcap) (Gemma 2). alibi_slopes: fp32 [heads] or
    [query rows, heads] on the device; the score of query position p and key j gets -slope * |p - j| (after the
    cap). The defaults change nothing."""

    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None

    def key(self) -> tuple:
        """What a bound launch is specialised on, how tanh is computed included (the slopes' values are not:
        they are read per call)."""
        s = self.alibi_slopes
        return self.softcap, softcap_mode(self.softcap), None if s is None else (tuple(s.shape), s.stride())

    def scales(self, softmax_scale: float) -> tuple[float, float]:
        """(qk_scale, cap) for triton_common.scores: base-2 scaling, through the cap when there is one."""
        if self.softcap > 0:
            return softmax_scale / self.softcap, self.softcap * LOG2E
        return softmax_scale * LOG2E, 0.0

    def slopes(self, like: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(slopes x log2 e, row stride, head stride) for the kernels; a dummy when there is no ALiBi."""
        s = self.alibi_slopes
        if s is None:
            return like, 0, 0
        s = (s.float() * LOG2E).contiguous()
        return (s, 0, 1) if s.dim() == 1 else (s, s.stride(0), 1)


NO_OPTIONS = ScoreOptions()
