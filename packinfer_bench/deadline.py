"""A wall-clock limit for a run (`run --time-limit`): work that would not end before the limit is not started, so a
run cut into time-limited pieces (a GPU lent for ten minutes at a time) is never killed mid-replay and loses
nothing; `--resume` goes on where it stopped."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class Deadline:
    """seconds: the limit from `start` (None: no limit). `stopped` names what was not started once the limit
    stopped the run (None while it has not)."""

    seconds: float | None = None
    start: float = field(default_factory=time.monotonic)
    stopped: str | None = None

    def left(self) -> float:
        """Seconds left (inf without a limit)."""
        return math.inf if self.seconds is None else self.start + self.seconds - time.monotonic()

    def allows(self, estimate_s: float, what: str) -> bool:
        """Whether work of about `estimate_s` seconds, named `what`, ends before the limit. The first refusal is
        kept in `stopped`, and every later call refuses too: a stopped run starts nothing smaller after it."""
        if self.stopped is not None:
            return False
        left = self.left()
        if estimate_s <= left:
            return True
        self.stopped = f"{what} (~{estimate_s:.0f} s needed, {max(left, 0.0):.0f} s left)"
        return False
