"""A mergeable quantile sketch for per-shard score summaries, serialised as plain JSON. Torch-free.

Each shard's writer builds one :class:`QuantileSketch` per score; the job's summary (``_job.json``, the
status) is the merge of the shards' sketches, so no score is ever read back from the data.

The sketch is a weighted quantile summary: at most ``size`` points ``(value, weight)``, sorted. A shard
with no more values than ``size`` keeps them all (exact); a larger one keeps ``size`` points at evenly
spaced ranks, each standing for ``count / size`` values. Merging concatenates the points of every
sketch and compacts them back to ``size`` the same way. Each compaction moves a rank by at most
``count / (2 size)``: with the default ``size`` of 1024, one merge of any number of shards stays within
0.05% rank error (tests/test_sketch.py checks 1% on 100,000 values over 50 shards). Count, sum (so the
mean), min and max are exact.

A job's shards are merged by :class:`SketchMerger` with bounded memory: batches of shard sketches,
merged like a binary counter, so a value goes through at most ``log2(shards / batch) + 2`` compactions
(under 1% rank error for a million shards; tested on 2,000).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KIND = "embedjob.weighted-quantiles/v1"
DEFAULT_SIZE = 1024
# What a sketch read back may hold: the points a merge keeps in memory per shard, and its count.
MAX_SIZE = 1 << 14
MAX_COUNT = 1 << 40
# The quantiles the summaries report (status, _job.json, `embedjob report`).
SUMMARY_QUANTILES = {"p1": 0.01, "p10": 0.10, "p50": 0.50, "p90": 0.90, "p99": 0.99}


@dataclass
class QuantileSketch:
    """Count, sum, min, max and a weighted quantile summary of a stream of finite values."""

    size: int = DEFAULT_SIZE
    count: int = 0
    total: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    values: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))
    weights: np.ndarray = field(default_factory=lambda: np.empty(0, np.float64))

    @classmethod
    def of(cls, values: Iterable[float] | np.ndarray, size: int = DEFAULT_SIZE) -> QuantileSketch:
        """The sketch of ``values`` (NaN and infinities are not counted)."""
        v = np.asarray(values, dtype=np.float64).ravel()
        v = np.sort(v[np.isfinite(v)])
        s = cls(size=size)
        if v.size:
            s.count, s.total = int(v.size), float(v.sum())
            s.min, s.max = float(v[0]), float(v[-1])
            s.values, s.weights = _compact(v, np.ones_like(v), size)
        return s

    @classmethod
    def merge(cls, sketches: Iterable[QuantileSketch], size: int = DEFAULT_SIZE) -> QuantileSketch:
        """One sketch of everything the given sketches summarise (none: an empty sketch)."""
        parts = [s for s in sketches if s.count]
        out = cls(size=size)
        if not parts:
            return out
        out.count = sum(s.count for s in parts)
        out.total = float(sum(s.total for s in parts))
        out.min, out.max = min(s.min for s in parts), max(s.max for s in parts)
        v = np.concatenate([s.values for s in parts])
        w = np.concatenate([s.weights for s in parts])
        order = np.argsort(v, kind="stable")
        out.values, out.weights = _compact(v[order], w[order], size)
        return out

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """The value at rank ``q * count`` (0 <= q <= 1); None for an empty sketch."""
        if not self.count:
            return None
        if q <= 0:
            return self.min
        if q >= 1:
            return self.max
        cum = np.cumsum(self.weights)
        # A point stands for the values around it: its rank is the middle of its weight.
        mid = cum - self.weights / 2
        i = int(np.searchsorted(mid, q * cum[-1], side="left"))
        return float(self.values[min(i, len(self.values) - 1)])

    def summary(self) -> dict[str, Any]:
        """``{count, mean, min, max, p1, p10, p50, p90, p99}`` (values None when empty)."""
        out: dict[str, Any] = {"count": self.count, "mean": _round(self.mean),
                               "min": _round(self.min if self.count else None),
                               "max": _round(self.max if self.count else None)}
        out.update({name: _round(self.quantile(q)) for name, q in SUMMARY_QUANTILES.items()})
        return out

    def histogram(self, bins: int, lo: float, hi: float) -> list[float]:
        """Approximate counts in ``bins`` equal bins over [lo, hi] (what `embedjob report` draws when it
        has only the sketch)."""
        edges = np.linspace(lo, hi, bins + 1)
        counts, _ = np.histogram(np.clip(self.values, lo, hi), bins=edges, weights=self.weights)
        return counts.tolist()

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "size": self.size, "count": self.count, "sum": self.total,
                "min": self.min if self.count else None, "max": self.max if self.count else None,
                "values": self.values.tolist(),
                # A compacted sketch's points all weigh the same: one number instead of a list.
                "weights": (float(self.weights[0]) if self.weights.size and np.all(self.weights == self.weights[0])
                            else self.weights.tolist())}

    @classmethod
    def from_json(cls, d: Any) -> QuantileSketch:
        """The inverse of :meth:`to_json`; raises ValueError on anything else. A sketch comes from a
        manifest the job owner can write, and the shared operator merges it: it is read only with at
        most :data:`MAX_SIZE` finite points of positive weight, a count that is a count, and finite
        bounds that hold the points."""
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise ValueError(f"not a {KIND} sketch")
        size, count = d.get("size", DEFAULT_SIZE), d.get("count", 0)
        if type(size) is not int or not 1 <= size <= MAX_SIZE:
            raise ValueError(f"sketch size: not 1..{MAX_SIZE}")
        if type(count) is not int or not 0 <= count <= MAX_COUNT:
            raise ValueError("sketch count: not a count")
        raw_values, w = d.get("values") or [], d.get("weights")
        if not isinstance(raw_values, list) or len(raw_values) > size:
            raise ValueError("sketch values: not a list of at most size points")
        if not isinstance(w, int | float | list | None) or (isinstance(w, list) and len(w) != len(raw_values)):
            raise ValueError("sketch values and weights differ in length")
        try:
            values = np.asarray(raw_values, dtype=np.float64)
            weights = (np.full(values.shape, float(w)) if isinstance(w, int | float)
                       else np.asarray(w or [], dtype=np.float64))
            total = float(d.get("sum") or 0.0)
            low, high = (float(d["min"]), float(d["max"])) if count else (math.inf, -math.inf)
        except (TypeError, ValueError, KeyError):
            raise ValueError("sketch: a field is not a number") from None
        if values.shape != weights.shape or values.ndim != 1:
            raise ValueError("sketch values and weights differ in length")
        if count and not (np.isfinite(values).all() and (weights > 0).all() and np.isfinite(weights).all()
                          and math.isfinite(total) and low <= high and math.isfinite(low) and math.isfinite(high)
                          and (not values.size or (low <= values.min() and values.max() <= high))):
            raise ValueError("sketch: points, weights or bounds are not finite, positive and ordered")
        if bool(count) != bool(values.size):
            raise ValueError("sketch: points without a count, or a count without points")
        return cls(size=size, count=count, total=total, min=low, max=high, values=values, weights=weights)


def _compact(v: np.ndarray, w: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``size`` points at evenly spaced ranks of the sorted weighted points ``(v, w)``."""
    if v.size <= size:
        return v.copy(), w.copy()
    cum = np.cumsum(w)
    total = cum[-1]
    targets = (np.arange(size) + 0.5) * (total / size)
    idx = np.minimum(np.searchsorted(cum, targets, side="left"), v.size - 1)
    return v[idx].copy(), np.full(size, total / size)


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


class SketchMerger:
    """Merges any number of sketches in bounded memory: ``batch`` at a time, then the batches' merges
    pairwise by level (a binary counter), so no value is compacted more than ``log2(n / batch) + 2``
    times and at most ``batch + log2(n / batch)`` sketches are held."""

    def __init__(self, batch: int = 256, size: int = DEFAULT_SIZE) -> None:
        self.batch, self.size = batch, size
        self._pending: list[QuantileSketch] = []
        self._levels: dict[int, QuantileSketch] = {}

    def add(self, sketch: QuantileSketch) -> None:
        self._pending.append(sketch)
        if len(self._pending) >= self.batch:
            merged, self._pending = QuantileSketch.merge(self._pending, self.size), []
            level = 0
            while level in self._levels:
                merged = QuantileSketch.merge([self._levels.pop(level), merged], self.size)
                level += 1
            self._levels[level] = merged

    def result(self) -> QuantileSketch:
        return QuantileSketch.merge([*self._pending, *self._levels.values()], self.size)


def merge_summaries(per_shard: Iterable[Mapping[str, QuantileSketch | dict[str, Any]] | None],
                    ) -> dict[str, dict[str, Any]]:
    """``{score: summary}`` of the merged ``{score: sketch}`` of each shard (sketches, or their JSON; a
    shard without sketches is skipped). ``per_shard`` may be a generator: it is read once, in bounded
    memory."""
    mergers: dict[str, SketchMerger] = {}
    for sketches in per_shard:
        for name, d in (sketches or {}).items():
            sketch = d if isinstance(d, QuantileSketch) else QuantileSketch.from_json(d)
            mergers.setdefault(name, SketchMerger()).add(sketch)
    return {name: m.result().summary() for name, m in sorted(mergers.items())}
