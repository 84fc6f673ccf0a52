"""Storage against REAL SeaweedFS: streaming reads that survive dropped connections, atomic writes."""

from __future__ import annotations

import os

import pytest
from urllib3.exceptions import ProtocolError

from embedjob.storage import Storage, StorageError, StorageOptions, s3_client


class _DroppingBody:
    """Stands in for a connection that resets: every read fails."""

    def read(self, n: int = -1) -> bytes:
        raise ProtocolError("Connection broken: ConnectionResetError(104, 'Connection reset by peer')")

    def close(self) -> None:
        pass


@pytest.fixture()
def blob(bucket):
    data = os.urandom(3 * 1024 * 1024 + 123)
    s3_client().put_object(Bucket=bucket, Key="big.bin", Body=data)
    return f"s3://{bucket}/big.bin", data


def test_stream_resumes_after_a_dropped_connection(blob):
    uri, data = blob
    with Storage().open_read(uri) as f:
        head = f.read(1_000_001)
        f._body = _DroppingBody()  # the connection drops mid-object
        rest = f.read()
        assert f.resumed == 1
    assert head + rest == data


def test_resume_never_splices_a_replaced_object(blob, bucket):
    uri, data = blob
    with Storage().open_read(uri) as f:
        f.read(1000)
        s3_client().put_object(Bucket=bucket, Key="big.bin", Body=b"new content" * 1000)
        f._body = _DroppingBody()
        with pytest.raises(StorageError, match="PreconditionFailed|412") as err:
            f.read()
    assert uri in str(err.value) and not err.value.transient


def test_atomic_put_leaves_no_temporaries(bucket, tmp_path):
    storage = Storage()
    storage.put_atomic(f"s3://{bucket}/out/img_emb/a.npy", b"x" * 10, tmp_root=f"s3://{bucket}/out/_tmp")
    assert storage.read_bytes(f"s3://{bucket}/out/img_emb/a.npy") == b"x" * 10
    assert list(storage.list(f"s3://{bucket}/out/_tmp/")) == []
    storage.put_atomic(str(tmp_path / "d" / "a.npy"), b"y" * 10)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["a.npy"]


# -- errors name the operation and the URI, and say whether retrying can help -----------------------------
def test_missing_bucket_and_object_are_permanent_and_named(s3_env):
    storage = Storage()
    with pytest.raises(StorageError) as err:
        list(storage.list("s3://no-such-bucket-here/prefix/"))
    e = err.value
    assert e.code == "NoSuchBucket" and not e.transient and e.missing
    assert str(e).startswith("ListObjectsV2 s3://no-such-bucket-here/prefix/: NoSuchBucket")


def test_wrong_credentials_are_access_errors(tmp_path, monkeypatch):
    """A real SeaweedFS with authentication: a wrong secret is a permanent access error on every
    operation, with a hint about the credentials."""
    from embedjob.dev.services import SeaweedS3

    ident = {"identities": [{"name": "admin", "credentials": [{"accessKey": "right", "secretKey": "right-secret"}],
                             "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    server = SeaweedS3(tmp_path, config=ident).start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "right")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "right-secret")
        opts = StorageOptions(endpoint=server.endpoint, region="us-east-1")
        from embedjob.storage import s3_client

        s3_client(opts).create_bucket(Bucket="auth-bucket")
        Storage(opts).put_atomic("s3://auth-bucket/a.bin", b"x")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        import embedjob.storage as storage_module

        storage_module._clients.clear()
        bad = Storage(opts)
        for op, call in (("HeadObject", lambda: bad.exists("s3://auth-bucket/a.bin")),
                         ("GetObject", lambda: bad.read_bytes("s3://auth-bucket/a.bin")),
                         ("ListObjectsV2", lambda: list(bad.list("s3://auth-bucket/")))):
            with pytest.raises(StorageError) as err:
                call()
            e = err.value
            assert e.access_denied and not e.transient, (op, e.code)
            assert str(e).startswith(f"{op} s3://auth-bucket/") and "AWS_SECRET_ACCESS_KEY" in str(e)
    finally:
        import embedjob.storage as storage_module

        storage_module._clients.clear()
        server.stop(grace=3)


def test_unreachable_endpoint_is_transient(monkeypatch):
    from embedjob.dev.services import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    from embedjob import settings

    monkeypatch.setattr(settings, "load", lambda: settings.Settings(s3_max_attempts=2))
    storage = Storage(StorageOptions(endpoint=f"http://127.0.0.1:{free_port()}", region="us-east-1"))
    with pytest.raises(StorageError) as err:
        storage.exists("s3://any-bucket/x.json")
    assert err.value.transient and err.value.code == "EndpointConnectionError"
    assert str(err.value).startswith("HeadObject s3://any-bucket/x.json: ")
