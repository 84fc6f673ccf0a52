"""The report's score panels in two bounded passes (embedjob.report_scores) against sorting every value:
exact histogram, slider counts, lowest and highest thumbnails, and (up to the sample's size) quantiles
and median thumbnails; above it, the sample's quantiles and median within its rank error."""

from __future__ import annotations

import numpy as np
import pytest

from embedjob import report_scores
from embedjob.report_scores import HIST_BINS, SLIDER_STEPS, ScoreBins, ScoreStats

K = 4


def _shards(seed: int, sizes: list[int]) -> list[np.ndarray]:
    """Score columns with ties (values rounded to a grid), NaN and infinities, as a column can hold."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        v = np.round(rng.normal(5.0, 1.5, n), 2).astype(np.float32)
        v[rng.random(n) < 0.02] = np.nan
        v[rng.random(n) < 0.005] = np.inf
        out.append(v)
    return out


def _two_passes(shards: list[np.ndarray]) -> ScoreBins:
    stats = ScoreStats("s", K)
    for i, v in enumerate(shards):
        stats.add(v, i)
    bins = ScoreBins(stats)
    for i, v in enumerate(shards):
        bins.add(v, i)
    return bins


def _reference(shards: list[np.ndarray]) -> dict:
    """What sorting every value gives (the page before the two passes): a stable sort in output order."""
    values = np.concatenate(shards)
    where = [(i, r) for i, v in enumerate(shards) for r in range(v.size)]
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(values[finite], kind="stable")]
    v = values[finite].astype(np.float64)
    edges = report_scores.edges(float(v.min()), float(v.max()))
    thresholds = np.linspace(edges[0], edges[-1], SLIDER_STEPS + 1)
    s = np.sort(v)
    k = min(K, order.size)
    mid = max(0, order.size // 2 - k // 2)
    groups = {"lowest": order[:k], "median": order[mid:mid + k], "highest": order[::-1][:k]}
    return {"counts": np.histogram(v, bins=edges)[0].tolist(), "edges": edges.tolist(),
            "atOrAbove": (s.size - np.searchsorted(s, thresholds, side="left")).tolist(),
            "quantiles": {f"p{q}": float(np.quantile(v, q / 100)) for q in (1, 10, 50, 90, 99)},
            "mean": float(v.mean()), "count": int(v.size), "sorted": s,
            "picks": {g: [(float(values[i]), *where[i]) for i in idx] for g, idx in groups.items()}}


def test_every_value_in_the_sample_gives_what_sorting_every_value_gives():
    shards = _shards(1, [700, 0, 1, 2500, 300, 4000])
    bins, ref = _two_passes(shards), _reference(shards)
    panel = bins.panel()
    assert bins.stats.exact and panel["quantilesFrom"] is None
    for key in ("counts", "edges", "atOrAbove", "quantiles", "count"):
        assert panel[key] == ref[key], key
    assert panel["mean"] == pytest.approx(ref["mean"], rel=1e-12)
    assert len(panel["counts"]) == HIST_BINS and sum(panel["counts"]) == ref["count"]
    assert bins.picks() == ref["picks"]


def test_above_the_sample_size_the_counts_and_extremes_stay_exact(monkeypatch):
    """60,000 values through a sample of 2,000: histogram, slider counts, lowest and highest are still
    exact; the quantiles and the median's thumbnails are within the sample's rank error; the sample never
    holds more than its size."""
    monkeypatch.setattr(report_scores, "SAMPLE_SIZE", 2000)
    shards = _shards(2, [5000] * 12)
    bins, ref = _two_passes(shards), _reference(shards)
    panel = bins.panel()
    assert not bins.stats.exact and panel["quantilesFrom"] == "a uniform sample of 2,000"
    assert bins.stats.sample_values.size == 2000
    for key in ("counts", "edges", "atOrAbove", "count"):
        assert panel[key] == ref[key], key
    picks = bins.picks()
    assert picks["lowest"] == ref["picks"]["lowest"] and picks["highest"] == ref["picks"]["highest"]

    def rank(x: float) -> float:
        return np.searchsorted(ref["sorted"], x, side="left") / ref["count"]

    for name, q in panel["quantiles"].items():
        assert abs(rank(q) - int(name[1:]) / 100) <= 0.03, name
    assert len(picks["median"]) == K
    assert all(abs(rank(v) - 0.5) <= 0.03 for v, _, _ in picks["median"])
    assert [v for v, _, _ in picks["median"]] == sorted(v for v, _, _ in picks["median"])


def test_the_same_output_gives_the_same_page(monkeypatch):
    monkeypatch.setattr(report_scores, "SAMPLE_SIZE", 500)
    shards = _shards(3, [3000] * 4)
    a, b = _two_passes(shards), _two_passes(shards)
    assert a.panel() == b.panel() and a.picks() == b.picks()


def test_a_score_with_no_finite_value_has_no_picks():
    bins = _two_passes([np.array([np.nan, np.inf], np.float32)])
    assert bins.picks() == {} and bins.panel()["count"] == 0 and bins.panel()["quantiles"] == {}
