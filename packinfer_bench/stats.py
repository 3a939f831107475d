"""Confidence intervals by bootstrap, for the end-to-end comparisons: a metric's mean over units (requests,
iterations) and the paired ratio of two backends' means over the same units (the same schedule replayed by both,
so unit i of one backend is unit i of the other). Seeded: the same data always gives the same interval. One unit
(a throughput of a single repeat) has a value and no interval: resampling it would give a zero-width one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
#: Resampled values a default-sized bootstrap draws at most (resamples x units): large samples get fewer resamples
#: (never under MIN_RESAMPLES), whose interval ends are then already far steadier than the data's spread.
WORK = 4_000_000
MIN_RESAMPLES = 400


def default_resamples(n: int) -> int:
    """RESAMPLES, or fewer for a sample so large that they would cost more than WORK draws."""
    return max(MIN_RESAMPLES, min(RESAMPLES, WORK // max(n, 1)))


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided percentile-bootstrap interval."""

    value: float
    low: float
    high: float

    def spans(self, x: float) -> bool:
        return self.low <= x <= self.high

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def bootstrap(samples: np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean, *,
              confidence: float = CONFIDENCE, resamples: int | None = None, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of statistic(samples), resampling the samples with replacement
    (resamples: default_resamples(n))."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return Interval(float(statistic(x)) if len(x) else float("nan"), float("nan"), float("nan"))
    resamples = resamples or default_resamples(len(x))
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    if statistic in (np.mean, np.median):  # vectorised over the resamples
        stats = statistic(x[idx], axis=1)
    else:
        stats = np.array([statistic(x[i]) for i in idx])
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(statistic(x)), float(lo), float(hi))


def paired_ratio(ours: np.ndarray, theirs: np.ndarray, *, statistic: str = "mean", confidence: float = CONFIDENCE,
                 resamples: int | None = None, seed: int = 0) -> Interval:
    """Interval of statistic(ours) / statistic(theirs) over paired units (the same resampled indices for both);
    statistic: 'mean' or 'median'."""
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    stat = np.mean if statistic == "mean" else np.median
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) == 0 or stat(b) == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    if len(a) == 1:
        return Interval(float(a[0] / b[0]), float("nan"), float("nan"))
    resamples = resamples or default_resamples(len(a))
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = stat(a[idx], axis=1) / stat(b[idx], axis=1)
    lo, hi = np.quantile(ratios, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(stat(a) / stat(b)), float(lo), float(hi))


def verdict(ratio: Interval, lower_is_better: bool = True) -> str:
    """How a ratio ours / peer reads: 'no difference' when its interval spans 1.0, 'one sample' without one."""
    if not np.isfinite(ratio.value):
        return "n/a"
    if not (np.isfinite(ratio.low) and np.isfinite(ratio.high)):
        return "one sample"
    if ratio.spans(1.0):
        return "no difference"
    better = ratio.high < 1.0 if lower_is_better else ratio.low > 1.0
    return "better" if better else "worse"
