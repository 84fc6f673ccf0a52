"""Shard planning: brace patterns, prefixes (paginated S3 listing), lists, stems."""

from __future__ import annotations

import time

import pytest

from embedjob.layout import shard_outputs, shard_stem, stem_from_manifest
from embedjob.planning import PlanError, count_braces, expand_braces, plan_shards
from embedjob.spec import InputSpec
from embedjob.storage import Storage, s3_client


def test_brace_expansion_keeps_zero_padding():
    got = expand_braces("s3://b/x/{00000..00003}.tar")
    assert got == [f"s3://b/x/0000{i}.tar" for i in range(4)]
    assert expand_braces("p/{a,b}/{8..10}.tar") == ["p/a/8.tar", "p/a/9.tar", "p/a/10.tar",
                                                    "p/b/8.tar", "p/b/9.tar", "p/b/10.tar"]
    with pytest.raises(PlanError, match="spec.input.uri"):
        expand_braces("s3://b/{x..y}.tar")


def test_pattern_plan_and_stems():
    shards = plan_shards(InputSpec(uri="s3://bucket-a/laion/{000..002}.tar"), Storage())
    assert [(s.uri, s.stem) for s in shards] == [(f"s3://bucket-a/laion/00{i}.tar", f"00{i}") for i in range(3)]


def test_explicit_list_keeps_subfolders():
    shards = plan_shards(InputSpec(shards=("s3://b/d/part1/0.tar", "s3://b/d/part2/0.tar")), Storage())
    assert [s.stem for s in shards] == ["part1/0", "part2/0"]


def test_local_prefix_recursive(tmp_path):
    for p in ["a/1.tar", "a/2.tar", "b/1.tar", "notes.txt"]:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"")
    shards = plan_shards(InputSpec(uri=str(tmp_path)), Storage())
    assert [s.stem for s in shards] == ["a/1", "a/2", "b/1"]
    with pytest.raises(PlanError, match="no .tar shards"):
        plan_shards(InputSpec(uri=str(tmp_path / "empty")), Storage())


def test_s3_prefix_listing_paginates(bucket):
    client = s3_client()
    n = 1234  # more than one 1000-key page
    for i in range(n):
        client.put_object(Bucket=bucket, Key=f"ds/{i:05d}.tar", Body=b"")
    client.put_object(Bucket=bucket, Key="ds/readme.md", Body=b"")
    shards = plan_shards(InputSpec(uri=f"s3://{bucket}/ds/"), Storage())
    assert len(shards) == n
    assert shards[0].stem == "00000" and shards[-1].stem == f"{n - 1:05d}"


def test_layout_round_trip():
    out = shard_outputs("s3://e/run/", "part1/00007")
    assert out.embeddings == "s3://e/run/img_emb/part1/00007.npy"
    assert out.metadata == "s3://e/run/metadata/part1/00007.parquet"
    assert out.manifest == "s3://e/run/_manifests/part1/00007.json"
    assert stem_from_manifest(out.manifest, "s3://e/run/") == "part1/00007"
    assert shard_stem("s3://e/in/x/1.TAR", "s3://e/in") == "x/1"


# -- bounded planning and hygiene (issue 16) ---------------------------------------------------------------
BOMB = "s3://b/ns/in/{0..999999999}/{0..999999999}.tar"


def test_brace_combinations_are_counted_before_anything_is_expanded():
    assert count_braces(BOMB) == 10**18
    assert count_braces("{0..9..3}/{a,b,c}") == 12 and count_braces("{9..0..4}") == len(expand_braces("{9..0..4}"))
    assert count_braces("s3://b/{0..99999999999999999999999999}.tar") == 10**26  # no OverflowError
    started = time.perf_counter()
    with pytest.raises(PlanError) as e:
        plan_shards(InputSpec(uri=BOMB), Storage())
    assert time.perf_counter() - started < 0.1
    assert e.value.field == "spec.input.uri" and "1,000,000,000,000,000,000 shards" in str(e.value)
    with pytest.raises(PlanError, match="expands to 11 shards, more than the 10"):
        plan_shards(InputSpec(uri="s3://b/{00..10}.tar"), Storage(), max_shards=10)
    assert len(plan_shards(InputSpec(uri="s3://b/{00..09}.tar"), Storage(), max_shards=10)) == 10
    with pytest.raises(PlanError, match="spec.input.shards: lists 3 shards"):
        plan_shards(InputSpec(shards=("s3://b/0.tar", "s3://b/1.tar", "s3://b/2.tar")), Storage(), max_shards=2)


def test_a_listing_stops_at_the_cap(bucket):
    client = s3_client()
    for i in range(5):
        client.put_object(Bucket=bucket, Key=f"cap/{i}.tar", Body=b"x")
    with pytest.raises(PlanError, match="holds more than the 3 shards"):
        plan_shards(InputSpec(uri=f"s3://{bucket}/cap/"), Storage(), max_shards=3)
    assert len(plan_shards(InputSpec(uri=f"s3://{bucket}/cap/"), Storage(), max_shards=5)) == 5


def test_dot_segments_after_expansion_and_after_listing_are_refused(tmp_path):
    with pytest.raises(PlanError, match=r"'\.\.' segment"):
        plan_shards(InputSpec(uri="s3://b/a/in/{x,../../b/y}.tar"), Storage())
    # A listed name is checked too. SeaweedFS refuses '..' keys and collapses '//' (AWS keeps both
    # literally), so the listing here is of a local folder holding a name with a control character.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a\nb.tar").write_bytes(b"x")
    with pytest.raises(PlanError, match="U\\+000A"):
        plan_shards(InputSpec(uri=str(tmp_path / "in")), Storage())
