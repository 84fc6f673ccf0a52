"""The mergeable quantile sketch (embedjob.sketch): rank error, exactness, JSON round trip."""

import json

import numpy as np
import pytest

from embedjob.sketch import SUMMARY_QUANTILES, QuantileSketch, merge_summaries


def _rank_error(sorted_values: np.ndarray, value: float, q: float) -> float:
    lo = np.searchsorted(sorted_values, value, side="left") / sorted_values.size
    hi = np.searchsorted(sorted_values, value, side="right") / sorted_values.size
    return 0.0 if lo <= q <= hi else min(abs(lo - q), abs(hi - q))


@pytest.mark.parametrize("dist", ["normal", "skewed", "ties"])
def test_merged_quantiles_within_one_percent_rank_error_over_50_shards(dist):
    rng = np.random.default_rng(7)
    if dist == "normal":
        values = rng.normal(5.0, 1.0, 100_000)
    elif dist == "skewed":
        values = rng.exponential(0.05, 100_000)
    else:
        values = rng.integers(0, 20, 100_000).astype(np.float64)
    # 50 shards of uneven sizes, sketched each on its own, and through JSON (as stored).
    cuts = np.sort(rng.choice(np.arange(1, values.size), 49, replace=False))
    shards = [json.loads(json.dumps(QuantileSketch.of(part).to_json())) for part in np.split(values, cuts)]
    assert len(shards) == 50
    merged = QuantileSketch.merge(QuantileSketch.from_json(s) for s in shards)
    exact = np.sort(values)
    assert merged.count == 100_000
    assert merged.mean == pytest.approx(values.mean(), rel=1e-12)
    assert merged.min == exact[0] and merged.max == exact[-1]
    for q in [*SUMMARY_QUANTILES.values(), 0.25, 0.75, 0.999]:
        assert _rank_error(exact, merged.quantile(q), q) <= 0.01, q


def test_small_shards_are_exact_and_nan_is_not_counted():
    s = QuantileSketch.of([3.0, 1.0, float("nan"), 2.0])
    assert s.count == 3 and s.quantile(0.5) == 2.0 and s.summary()["mean"] == 2.0
    empty = QuantileSketch.merge([QuantileSketch.of([]), QuantileSketch()])
    assert empty.count == 0 and empty.summary()["p50"] is None


def test_merge_summaries_per_score():
    a = {"aesthetic": QuantileSketch.of(np.arange(100.0)).to_json()}
    b = {"aesthetic": QuantileSketch.of(np.arange(100.0, 200.0)).to_json(),
         "nsfw": QuantileSketch.of([0.5]).to_json()}
    out = merge_summaries([a, None, b])
    assert out["aesthetic"]["count"] == 200 and out["aesthetic"]["mean"] == pytest.approx(99.5)
    assert out["nsfw"] == {"count": 1, "mean": 0.5, "min": 0.5, "max": 0.5,
                           "p1": 0.5, "p10": 0.5, "p50": 0.5, "p90": 0.5, "p99": 0.5}


def test_from_json_refuses_what_is_not_a_sketch():
    with pytest.raises(ValueError):
        QuantileSketch.from_json({"kind": "pickle"})


def test_merger_of_2000_shards_in_small_batches_stays_within_one_percent():
    """Many levels of compaction (batches of 8: eight levels), as a big job's summary goes through."""
    from embedjob.sketch import SketchMerger

    rng = np.random.default_rng(3)
    values = rng.gamma(2.0, 1.5, 100_000)
    merger = SketchMerger(batch=8, size=256)
    for part in np.array_split(values, 2000):
        merger.add(QuantileSketch.of(part, size=256))
    merged = merger.result()
    exact = np.sort(values)
    assert merged.count == values.size and merged.mean == pytest.approx(values.mean(), rel=1e-12)
    for q in (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        assert _rank_error(exact, merged.quantile(q), q) <= 0.01, q


@pytest.mark.parametrize("field, value", [
    ("size", 10**9), ("size", 0), ("size", True), ("size", "1024"),
    ("count", -1), ("count", 2**60), ("count", 1.5),
    ("values", [float("nan"), 1.0, 2.0]), ("values", [1.0, "x", 2.0]), ("values", {"a": 1}),
    ("weights", [1.0, -1.0, 1.0]), ("weights", [1.0, 1.0]), ("weights", "w"),
    ("min", 1.5), ("max", 2.5), ("min", None), ("sum", float("inf")),
])
def test_from_json_refuses_a_planted_sketch(field, value):
    """The shared operator merges the sketches a job owner's output holds: each field is checked (a size
    of 10**9 would let one shard's sketch hold any number of points, and NaN or unordered bounds would
    corrupt the job's quantiles)."""
    good = {"kind": "embedjob.weighted-quantiles/v1", "size": 1024, "count": 3, "sum": 6.0, "min": 1.0,
            "max": 3.0, "values": [1.0, 2.0, 3.0], "weights": [1.0, 1.0, 1.0]}
    assert QuantileSketch.from_json(good).summary()["count"] == 3
    with pytest.raises(ValueError):
        QuantileSketch.from_json({**good, field: value})


def test_from_json_refuses_more_points_than_its_size_and_a_count_without_points():
    good = QuantileSketch.of(np.arange(10.0)).to_json()
    with pytest.raises(ValueError):
        QuantileSketch.from_json({**good, "size": 5})
    with pytest.raises(ValueError):
        QuantileSketch.from_json({**good, "values": [], "weights": []})
