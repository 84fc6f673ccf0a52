"""The report's score panels in bounded memory, whatever the output's size: two passes over each
shard's score columns, none holding more than one shard's values. Torch-free.

Pass 1 (:class:`ScoreStats`): count, sum, min and max; the ``k`` lowest and highest values with where
they are; and a uniform sample of at most :data:`SAMPLE_SIZE` values (the ones with the smallest
random keys, seeded per shard: the same output gives the same page). Pass 2 (:class:`ScoreBins`),
over the edges pass 1 fixed: the histogram, the number of values at or above each slider threshold,
both exact, and the median's thumbnails.

An output of at most :data:`SAMPLE_SIZE` values of a score is all in the sample: its quantiles and its
median thumbnails are exact (what a sort of every value gives). A larger one's quantiles are the
sample's (rank error about 1/sqrt(SAMPLE_SIZE), 0.4%), and its median thumbnails are the ``k`` first
values, in (value, position) order, at or above the sample's value at the median rank. A position is
``stem index << 32 | row``, so ties go in output order, as a stable sort of every value orders them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HIST_BINS = 40
SLIDER_STEPS = 400  # the kept count is exact at every step of the slider
SAMPLE_SIZE = 1 << 16
SAMPLE_SEED = 20260601
QUANTILES = (1, 10, 50, 90, 99)

Picks = dict[str, list[tuple[float, int, int]]]  # group -> [(value, stem index, row)]


def _k_smallest(v: np.ndarray, pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` smallest (value, position) pairs, in that order."""
    if v.size > k:
        kth = np.partition(v, k - 1)[k - 1]
        keep = v <= kth
        v, pos = v[keep], pos[keep]
    order = np.lexsort((pos, v))[:k]
    return v[order], pos[order]


def edges(lo: float, hi: float, n: int = HIST_BINS) -> np.ndarray:
    """``n`` equal bins over [lo, hi] (a unit range when the values are all equal or there are none)."""
    if not np.isfinite(lo) or not np.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n + 1)


def _finite(values: np.ndarray, stem_index: int) -> tuple[np.ndarray, np.ndarray]:
    """The finite values of one shard's column (float32) and their positions."""
    v = np.asarray(values, dtype=np.float32)
    rows = np.flatnonzero(np.isfinite(v))
    return v[rows], (np.int64(stem_index) << 32) | rows.astype(np.int64)


class ScoreStats:
    """Pass 1 of one score (see the module)."""

    def __init__(self, name: str, k: int) -> None:
        self.name, self.k = name, k
        self.count, self.total = 0, 0.0
        self.lo, self.hi = np.inf, -np.inf
        empty_v, empty_p = np.empty(0, np.float32), np.empty(0, np.int64)
        self.lowest = self.highest = (empty_v, empty_p)
        self.sample_keys, self.sample_values, self.sample_pos = np.empty(0), empty_v, empty_p

    def add(self, values: np.ndarray, stem_index: int) -> None:
        v, pos = _finite(values, stem_index)
        if not v.size:
            return
        v64 = v.astype(np.float64)
        self.count += int(v.size)
        self.total += float(v64.sum())
        self.lo, self.hi = min(self.lo, float(v64.min())), max(self.hi, float(v64.max()))
        self.lowest = _k_smallest(np.concatenate([self.lowest[0], v]), np.concatenate([self.lowest[1], pos]), self.k)
        high_v, high_p = _k_smallest(np.concatenate([-self.highest[0], -v]),
                                     np.concatenate([-self.highest[1], -pos]), self.k)
        self.highest = (-high_v, -high_p)
        keys = np.random.default_rng([SAMPLE_SEED, stem_index]).random(v.size)
        keys = np.concatenate([self.sample_keys, keys])
        values_all = np.concatenate([self.sample_values, v])
        pos_all = np.concatenate([self.sample_pos, pos])
        if keys.size > SAMPLE_SIZE:
            keep = np.argpartition(keys, SAMPLE_SIZE - 1)[:SAMPLE_SIZE]
            keys, values_all, pos_all = keys[keep], values_all[keep], pos_all[keep]
        self.sample_keys, self.sample_values, self.sample_pos = keys, values_all, pos_all

    @property
    def exact(self) -> bool:
        """Every value is in the sample."""
        return self.count <= SAMPLE_SIZE

    def median_start(self) -> tuple[int, float]:
        """The rank the median thumbnails start at, and the sample's value there."""
        k = min(self.k, self.count)
        mid = max(0, self.count // 2 - k // 2)
        s = np.sort(self.sample_values.astype(np.float64))
        at = mid if self.exact else min(s.size - 1, round(mid / max(1, self.count - 1) * (s.size - 1)))
        return mid, float(s[at])


class ScoreBins:
    """Pass 2 of one score, over the edges its :class:`ScoreStats` fixed (see the module)."""

    def __init__(self, stats: ScoreStats) -> None:
        self.stats = stats
        self.edges = edges(stats.lo, stats.hi)
        self.thresholds = np.linspace(self.edges[0], self.edges[-1], SLIDER_STEPS + 1)
        self.counts = np.zeros(HIST_BINS, np.int64)
        self.below = np.zeros(SLIDER_STEPS + 2, np.int64)  # [i]: values with i thresholds at or under them
        self.mid, self.median_value = stats.median_start() if stats.count else (0, 0.0)
        self.median = (np.empty(0, np.float32), np.empty(0, np.int64))

    def add(self, values: np.ndarray, stem_index: int) -> None:
        v, pos = _finite(values, stem_index)
        if not v.size:
            return
        v64 = v.astype(np.float64)
        self.counts += np.histogram(v64, bins=self.edges)[0]
        self.below += np.bincount(np.searchsorted(self.thresholds, v64, side="right"), minlength=self.below.size)
        if not self.stats.exact:
            at_or_above = v >= np.float32(self.median_value)
            self.median = _k_smallest(np.concatenate([self.median[0], v[at_or_above]]),
                                      np.concatenate([self.median[1], pos[at_or_above]]), self.stats.k)

    def panel(self) -> dict[str, Any]:
        """What the page draws: the histogram, and for the slider the number of values at or above each
        threshold; the mean, and the quantiles (exact, or the sample's: see the module)."""
        s = self.stats
        at_or_above = np.cumsum(self.below[::-1])[::-1][1:]
        sample = s.sample_values.astype(np.float64)
        return {"count": s.count, "edges": self.edges.tolist(), "counts": self.counts.tolist(),
                "thresholds": self.thresholds.tolist(), "atOrAbove": at_or_above.tolist(),
                "mean": s.total / s.count if s.count else None,
                "quantiles": {f"p{q}": float(np.quantile(sample, q / 100)) for q in QUANTILES} if s.count else {},
                "quantilesFrom": None if s.exact else f"a uniform sample of {sample.size:,}"}

    def picks(self) -> Picks:
        """The lowest, median and highest ``k`` values with their (stem index, row)."""
        s = self.stats
        if not s.count:
            return {}
        if s.exact:
            v, pos = _k_smallest(s.sample_values, s.sample_pos, s.sample_values.size)
            k = min(s.k, v.size)
            median = (v[self.mid:self.mid + k], pos[self.mid:self.mid + k])
        else:
            median = self.median
        groups = {"lowest": s.lowest, "median": median, "highest": s.highest}
        return {g: [(float(x), int(p >> 32), int(p & 0xFFFFFFFF)) for x, p in zip(*vp, strict=True)]
                for g, vp in groups.items()}
