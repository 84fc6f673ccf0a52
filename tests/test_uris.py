"""URI hygiene (embedjob.uris) and where it is applied: the spec, the workers' checks of a message."""

from __future__ import annotations

import pytest

from embedjob import uris
from embedjob.access import AccessPolicy, StorageNotAllowed
from embedjob.spec import SpecError, parse_spec


@pytest.mark.parametrize("uri", ["s3://b/a/in/../../b/x.tar", "s3://b/a/./x.tar", "s3://b/a//x.tar",
                                 "s3://b/a/x\n.tar", "s3://b/a/\u202ex.tar", "s3://b/a/x\x00.tar",
                                 "/data/../etc/x.tar", "/data/x\r.tar"])
def test_unsafe_locations_are_refused(uri):
    with pytest.raises(uris.UnsafeURI):
        uris.check_uri(uri)


@pytest.mark.parametrize("uri", ["s3://b/a/in/", "s3://b", "s3://b/a/x.tar", "s3://b/a/{000..009}.tar",
                                 "/data//x/", "relative/x.tar", "/data/x..y.tar"])
def test_clean_locations_pass(uri):
    assert uris.check_uri(uri) == uri


@pytest.mark.parametrize("uri", ["http://evil/x.tar", "file:///etc/passwd", "S3://b/x.tar", "gs://b/x.tar",
                                 "s3:/b/x.tar", "C:/x.tar"])
def test_anything_not_s3_with_a_scheme_is_refused_never_opened_as_a_local_path(uri):
    with pytest.raises(uris.UnsafeURI, match="unsupported scheme"):
        uris.check_uri(uri)
    policy = AccessPolicy(local_paths=True)  # even where local paths are allowed (embedjob run)
    with pytest.raises(StorageNotAllowed, match="unsupported scheme"):
        policy.check("task input", uri)


@pytest.mark.parametrize("stem", ["../../b/x", "a/../b", "a//b", "/abs", "a/", "x\ny", "a\\b", ""])
def test_unsafe_stems_are_refused(stem):
    with pytest.raises(uris.UnsafeURI):
        uris.check_stem(stem)
    with pytest.raises(StorageNotAllowed, match="task stem"):
        AccessPolicy().check_task("s3://b/in/x.tar", "s3://b/out/", None, stem=stem)


def test_the_spec_names_the_field():
    base = {"input": {"uri": "s3://bkt/a/in/"}, "output": {"uri": "s3://bkt/a/out/"}}
    for field, spec in (("spec.input.uri", {**base, "input": {"uri": "s3://bkt/a/in/../../b/x.tar"}}),
                        ("spec.input.shards[1]", {**base, "input": {"shards": ["s3://bkt/a/0.tar",
                                                                                "s3://bkt/a//1.tar"]}}),
                        ("spec.output.uri", {**base, "output": {"uri": "s3://bkt/a/out/\u0007/"}}),
                        ("spec.input.uri", {**base, "input": {"uri": "http://evil.example/x.tar"}}),
                        ("spec.model.path", {**base, "model": {"path": "/models/../etc"}})):
        with pytest.raises(SpecError) as e:
            parse_spec(spec, allow_local=True)
        assert e.value.field == field, (field, e.value)


def test_a_job_files_relative_paths_are_resolved_before_the_check(tmp_path):
    (tmp_path / "jobs").mkdir()
    spec = parse_spec({"input": {"uri": "../shards/"}, "output": {"uri": "./out/"}}, base_dir=tmp_path / "jobs")
    assert spec.input.uri == str(tmp_path / "shards") and spec.output.uri == str(tmp_path / "jobs" / "out")


def test_storage_never_opens_another_scheme_as_a_local_path(tmp_path, monkeypatch):
    from embedjob.storage import Storage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "http:").mkdir()
    (tmp_path / "http:" / "x.tar").write_bytes(b"x")  # what "http://x.tar" would open as a relative path
    for op in (lambda s: s.open_read("http://x.tar"), lambda s: s.exists("file:///etc/passwd"),
               lambda s: list(s.list("gs://b/")), lambda s: s.put_atomic("S3://b/x", b"x")):
        with pytest.raises(uris.UnsafeURI):
            op(Storage())
